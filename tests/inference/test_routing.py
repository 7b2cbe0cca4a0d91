"""Task routing: nearest example request, threshold, fallback; MiniLM puts plain requests right."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from medalign.inference.routing import Router

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = ("outline", "lesion", "how", "many", "prognosis", "survival")


def bag_of_words(texts: Sequence[str]) -> np.ndarray:
    """A transparent encoder: word counts over VOCAB, L2-normalised (zero for unknown words)."""
    rows = np.array([[t.lower().split().count(w) for w in VOCAB] for t in texts], dtype=float)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


EXAMPLES = {"segment": ["outline lesion"], "chat": ["how many"], "risk": ["prognosis survival"]}


def test_routes_to_the_most_similar_example_above_the_threshold() -> None:
    router = Router(EXAMPLES, threshold=0.5, encoder=bag_of_words)
    route = router.route("please outline the lesion")
    assert route.name == "segment" and not route.fallback and route.score == pytest.approx(1.0)
    assert router.route("survival").name == "risk"  # cos = 1/sqrt(2) = 0.71 >= 0.5


def test_below_the_threshold_is_the_fallback_and_says_what_was_closest() -> None:
    strict = Router(EXAMPLES, threshold=0.8, encoder=bag_of_words)
    route = strict.route("survival")  # 0.71 < 0.8
    assert route.fallback and route.name is None and route.best == "risk"
    assert (
        Router(EXAMPLES, threshold=0.8, fallback="chat", encoder=bag_of_words).route("survival").name
        == "chat"
    )
    assert strict.route("the weather").fallback  # no known word: similarity 0


def test_bad_router_settings_are_errors() -> None:
    with pytest.raises(ValueError, match="fallback 'x' is not a route"):
        Router(EXAMPLES, fallback="x", encoder=bag_of_words)
    with pytest.raises(ValueError, match=r"threshold is a cosine similarity in \[-1, 1\]"):
        Router(EXAMPLES, threshold=2.0, encoder=bag_of_words)
    with pytest.raises(ValueError, match="none for \\['chat'\\]"):
        Router({"chat": []}, encoder=bag_of_words)
    with pytest.raises(ValueError, match="empty request"):
        Router(EXAMPLES, encoder=bag_of_words).route("  ")


def test_minilm_routes_unseen_phrasings() -> None:
    router = Router()
    expected = {
        "how many lesions do you see?": "chat",
        "please segment the tumor": "segment",
        "is it malignant?": "classify",
        "what's the survival outlook": "risk",
    }
    assert {q: router.route(q).name for q in expected} == expected
    assert router.route("the weather is nice today").fallback

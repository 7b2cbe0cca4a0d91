"""Task routing (the HiCur-NPC idea): a request typed in free text goes to chat, segmentation,
classification or prognosis by its embedding similarity to example requests of each task.

A request's route is the task of its most similar example (cosine of L2-normalised sentence
embeddings; MiniLM's, offline, by default). A best similarity under ``threshold`` is no route
(``Route.name`` is ``fallback``, ``Route.fallback`` True): the caller then does what it does
without a request (the web demo answers everything it can) rather than guessing. Examples are
plain data, so a deployment can add its own phrasings (``Router(examples=...)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROUTES = ("chat", "segment", "classify", "risk")
EXAMPLES: dict[str, tuple[str, ...]] = {
    "chat": (
        "describe this image",
        "what do you see in this scan",
        "how many lesions are there",
        "is there a lesion on the left side",
        "write a report for this image",
        "what are the findings",
    ),
    "segment": (
        "segment the lesion",
        "outline the tumour",
        "draw the boundary of the lesion",
        "show me where the lesion is on the image",
        "delineate the abnormal region",
        "mask the polyp",
    ),
    "classify": (
        "what is the diagnosis",
        "is this benign or malignant",
        "classify this scan",
        "which class does this image belong to",
        "is this normal or abnormal",
    ),
    "risk": (
        "what is the prognosis",
        "estimate the survival of this patient",
        "what is the risk of death",
        "how long will this patient survive",
        "predict the risk of recurrence",
    ),
}
DEFAULT_THRESHOLD = 0.4

Encoder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class Route:
    """Where a request goes: ``name`` (a route, or the fallback), the best similarity and why."""

    name: str | None
    score: float
    best: str  # the most similar route, even below the threshold
    fallback: bool
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"route": self.name, "score": round(self.score, 4), "best": self.best, "fallback": self.fallback,
                "scores": {k: round(v, 4) for k, v in self.scores.items()}}  # fmt: skip


def minilm_encoder() -> Encoder:
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings (the offline text tower)."""
    import torch

    from medalign.models.towers import MINILM_TEXT, build_text_tower, build_tokenizer

    tower = build_text_tower(MINILM_TEXT).eval()
    tokenizer = build_tokenizer(MINILM_TEXT)

    def encode(texts: Sequence[str]) -> np.ndarray:
        tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.inference_mode():
            pooled, _ = tower(tokens["input_ids"], tokens["attention_mask"])
        return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()

    return encode


class Router:
    """Routes free-text requests by nearest example; see the module docstring."""

    def __init__(
        self,
        examples: Mapping[str, Sequence[str]] | None = None,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        fallback: str | None = None,
        encoder: Encoder | None = None,
    ) -> None:
        examples = dict(EXAMPLES if examples is None else examples)
        empty = sorted(name for name, texts in examples.items() if not texts)
        if not examples or empty:
            raise ValueError(f"every route needs example requests; none for {empty or 'any route'}")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if fallback is not None and fallback not in examples:
            raise ValueError(f"fallback {fallback!r} is not a route ({sorted(examples)})")
        self.threshold, self.fallback = threshold, fallback
        self.encoder = encoder or minilm_encoder()
        self.names = [name for name, texts in examples.items() for _ in texts]
        self.keys = self.encoder([text for texts in examples.values() for text in texts])

    def route(self, request: str) -> Route:
        """The route of one request; empty text is an error (nothing to route)."""
        if not request.strip():
            raise ValueError("an empty request has no route")
        similarity = self.keys @ self.encoder([request.strip()])[0]
        scores: dict[str, float] = {}
        for name, value in zip(self.names, similarity.tolist(), strict=True):
            scores[name] = max(scores.get(name, -1.0), value)
        best = max(scores, key=lambda name: scores[name])
        below = scores[best] < self.threshold
        return Route(self.fallback if below else best, scores[best], best, below, scores)

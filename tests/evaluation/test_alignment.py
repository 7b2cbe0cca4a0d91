"""``medalign.evaluation.alignment``: the per-case rows zero-shot saves and the retrieval examples, on fixed embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medalign.evaluation import alignment as ev
from medalign.evaluation.alignment import SplitEmbeddings


def _embeddings(labels: list[int], texts: list[str] | None = None) -> SplitEmbeddings:
    rng = np.random.default_rng(0)
    n = len(labels)
    image = rng.normal(size=(n, 4))
    image[:, 0] += 2 * np.asarray(labels)  # class 1 leans along axis 0, so zero-shot is above chance
    texts = texts if texts is not None else [f"t{i}" for i in range(n)]
    return SplitEmbeddings(
        image=image.astype(np.float32),
        text=None,
        labels=np.asarray(labels),
        texts=texts,
        case_ids=[f"c{i}" for i in range(n)],
        classes=["normal", "lesion"],
    )


@pytest.fixture(autouse=True)
def _class_name_templates(monkeypatch: pytest.MonkeyPatch) -> None:
    """zero_shot reads a template file by name; give it one that prompts with the bare class name."""
    monkeypatch.setattr(ev, "load_templates", lambda name: {"templates": ["{}"], "classes": None})


def test_zero_shot_saves_one_row_per_labelled_case(monkeypatch: pytest.MonkeyPatch) -> None:
    # one prompt per class (template "{}" on the class name): "normal" -> -axis 0, "lesion" -> +axis 0
    directions = {"normal": [-1.0, 0, 0, 0], "lesion": [1.0, 0, 0, 0]}
    monkeypatch.setattr(ev, "encode_texts", lambda model, texts: torch.tensor([directions[t] for t in texts]))
    labels = [0, 1, -1, 0, 1, 1, 0, -1]
    embeddings = _embeddings(labels)
    metrics = ev.zero_shot(None, embeddings, "tests_only_unused")
    rows = metrics["per_case"]
    known = [i for i, y in enumerate(labels) if y >= 0]
    assert [r["case_id"] for r in rows] == [f"c{i}" for i in known]  # unlabelled cases are not rows
    assert [r["label"] for r in rows] == [labels[i] for i in known]
    assert all(list(r["probs"]) == ["normal", "lesion"] for r in rows)
    assert all(sum(r["probs"].values()) == pytest.approx(1, abs=1e-5) for r in rows)
    # the rows reproduce the saved metrics: AUC and confusion matrix
    y = np.array([r["label"] for r in rows])
    p = np.array([r["probs"]["lesion"] for r in rows])
    assert roc_auc_score(y, p) == pytest.approx(metrics["auc"])
    predicted = (p > 0.5).astype(int)
    assert [[int(((y == t) & (predicted == q)).sum()) for q in (0, 1)] for t in (0, 1)] == metrics[
        "confusion_matrix"
    ]


def test_retrieval_examples_rank_distinct_texts_and_mark_the_own_one() -> None:
    texts = ["a", "b", "a", "c", "b", "c", "a"]
    axis = {"a": 0, "b": 1, "c": 2}
    text = np.eye(4)[[axis[t] for t in texts]].astype(np.float32)
    image = text.copy()
    image[6] = [0.1, 0.9, 0.5, 0]  # case 6 says "a" but looks like "b", then "c"
    embeddings = SplitEmbeddings(image, text, np.full(7, -1), texts, [f"c{i}" for i in range(7)], [])
    examples = ev.retrieval_examples(embeddings, n_queries=4, k=3)
    assert [e["case_id"] for e in examples] == ["c0", "c2", "c4", "c6"]  # spread over the split
    first, last = examples[0], examples[-1]
    assert first["text"] == "a" and [t["text"] for t in first["top"]] == ["a", "b", "c"]  # each text once
    assert [t["correct"] for t in first["top"]] == [True, False, False]
    assert first["top"][0]["similarity"] == pytest.approx(1.0)
    assert [t["text"] for t in last["top"]] == ["b", "c", "a"]
    assert [t["correct"] for t in last["top"]] == [False, False, True]
    with pytest.raises(ValueError, match="no 'text' column"):
        ev.retrieval_examples(_embeddings([0, 1]))

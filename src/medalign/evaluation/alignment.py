"""Model-facing evaluation: embed a manifest split once, then zero-shot, retrieval and probe.

The metric math lives in :mod:`medalign.evaluation.metrics`, :mod:`medalign.evaluation.zeroshot` and
:mod:`medalign.evaluation.probe`; this module only turns a model and a manifest into embeddings.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from medalign.data.dataset import Collator, ManifestDataset, stack_modalities
from medalign.evaluation.metrics import bidirectional_retrieval, cosine_similarity, same_group_positives
from medalign.evaluation.probe import linear_probe
from medalign.evaluation.zeroshot import (
    build_class_prompts,
    load_templates,
    resolve_classes,
    zero_shot_weights,
)
from medalign.progress import progress

# What ``embed_split`` returns as image features: the model's embedding (``encode_image``: the
# aligned, L2-normalised space of a dual encoder) or the image tower's pooled output on
# normalised pixels (what a linear probe of a pretrained tower reads: CLS of a ViT, the
# average-pooled head of a CNN; any model with a ``vision`` tower, clinical bundles included).
FEATURES = ("embedding", "tower")


@dataclass
class SplitEmbeddings:
    image: np.ndarray  # [N, D], L2-normalised ("embedding") or raw pooled tower features ("tower")
    text: np.ndarray | None  # [N, D]; None when the split has no text
    labels: np.ndarray  # [N], -1 where missing
    texts: list[str]
    case_ids: list[str]
    classes: list[str]


def autocast_for(model: nn.Module, precision: str = "bf16") -> Any:
    device = next(model.parameters()).device
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def tower_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Pooled output of ``model.vision`` on [0, 1] pixels normalised with the model's statistics."""
    dtype = pixel_values.dtype
    normalised = (pixel_values - model.pixel_mean.to(dtype)) / model.pixel_std.to(dtype)
    pooled, _ = model.vision(normalised)
    return pooled


@torch.no_grad()
def embed_split(
    model: Any,
    dataset: ManifestDataset,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "bf16",
    features: str = "embedding",
) -> SplitEmbeddings:
    """Image (and text) features of every row of ``dataset``; ``features`` picks which (``FEATURES``).

    Tower features come without text embeddings: they are for probes, not for the shared space.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if features == "tower" and getattr(model, "vision", None) is None:
        raise ValueError(f"{type(model).__name__} has no vision tower to take features from")
    model.eval()
    device = next(model.parameters()).device
    tokenizer = model.tokenizer if features == "embedding" else None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=Collator(tokenizer, max_length=model.config.max_text_length),
    )
    keys = dataset.image_keys
    images, texts_emb, labels, texts, case_ids = [], [], [], [], []
    has_text = features == "embedding" and any(t for t in dataset.manifest.table.get("text", []))
    encode = model.encode_image if features == "embedding" else lambda x: tower_features(model, x)
    with autocast_for(model, precision):
        for batch in progress(loader, desc="embed"):
            images.append(encode(stack_modalities(batch, keys).to(device)).float().cpu())
            if has_text:
                texts_emb.append(
                    model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    .float()
                    .cpu()
                )
            labels.append(batch["label"] if "label" in batch else torch.full((len(batch["case_id"]),), -1))
            texts += batch["text"]
            case_ids += batch["case_id"]
    return SplitEmbeddings(
        image=torch.cat(images).numpy(),
        text=torch.cat(texts_emb).numpy() if texts_emb else None,
        labels=torch.cat(labels).numpy(),
        texts=texts,
        case_ids=case_ids,
        classes=dataset.classes,
    )


@torch.no_grad()
def encode_texts(
    model: Any, texts: list[str], batch_size: int = 128, precision: str = "bf16"
) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    out = []
    with autocast_for(model, precision):
        for start in range(0, len(texts), batch_size):
            tokens = model.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=model.config.max_text_length,
                return_tensors="pt",
            )
            out.append(
                model.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
                .float()
                .cpu()
            )
    return torch.cat(out)


def zero_shot(model: Any, embeddings: SplitEmbeddings, templates: str) -> dict[str, Any]:
    """Prompt-ensemble zero-shot classification; classes follow the manifest's class list.

    Besides the metrics, ``per_case`` holds each labelled case's probabilities, so the run
    report can draw ROC curves without re-embedding the split.
    """
    from medalign.evaluation.metrics import classification_metrics, probability_rows

    spec = load_templates(templates)
    class_names = embeddings.classes
    prompts = build_class_prompts(spec["templates"], resolve_classes(spec, class_names))
    weights = zero_shot_weights(lambda texts: encode_texts(model, texts), prompts)
    known = embeddings.labels >= 0
    logits = torch.from_numpy(embeddings.image[known]) @ weights.T * 100.0
    probs = torch.softmax(logits, dim=-1).numpy()
    labels = embeddings.labels[known]
    case_ids = [c for c, keep in zip(embeddings.case_ids, known, strict=True) if keep]
    return {
        **classification_metrics(labels, probs, class_names),
        "per_case": probability_rows(case_ids, labels, probs, class_names),
    }


def retrieval(embeddings: SplitEmbeddings) -> dict[str, Any]:
    if embeddings.text is None:
        raise ValueError("retrieval needs text: the split has no 'text' column")
    texts = np.asarray(embeddings.texts, dtype=object)
    positives = same_group_positives(texts, texts)  # identical reports are all correct answers
    return bidirectional_retrieval(embeddings.image, embeddings.text, positives=positives)


def retrieval_examples(embeddings: SplitEmbeddings, n_queries: int = 4, k: int = 3) -> list[dict[str, Any]]:
    """For ``n_queries`` images spread evenly over the split, the ``k`` most similar texts.

    Distinct texts are ranked (a report shared by ten cases appears once, not ten times) and one
    counts as correct when it equals the query's own text, the rule R@K uses. Rows:
    ``{"case_id", "text", "top": [{"text", "similarity", "correct"}]}`` for the run report.
    """
    if embeddings.text is None:
        raise ValueError("retrieval needs text: the split has no 'text' column")
    first: dict[str, int] = {}  # distinct text -> its first row
    for i, text in enumerate(embeddings.texts):
        first.setdefault(text, i)
    gallery = list(first)
    n = len(embeddings.texts)
    queries = sorted({round(i * (n - 1) / max(n_queries - 1, 1)) for i in range(min(n_queries, n))})
    similarity = cosine_similarity(embeddings.image[queries], embeddings.text[list(first.values())])
    rows = []
    for query, sims in zip(queries, similarity, strict=True):
        own = embeddings.texts[query]
        top = np.argsort(-sims, kind="stable")[:k]
        rows.append(
            {
                "case_id": embeddings.case_ids[query],
                "text": own,
                "top": [
                    {"text": gallery[j], "similarity": round(float(sims[j]), 4), "correct": gallery[j] == own}
                    for j in top
                ],
            }
        )
    return rows


def probe(
    train: SplitEmbeddings, val: SplitEmbeddings, test: SplitEmbeddings, seed: int = 0
) -> dict[str, Any]:
    def known(e: SplitEmbeddings) -> tuple[np.ndarray, np.ndarray]:
        keep = e.labels >= 0
        return e.image[keep], e.labels[keep]

    return linear_probe(*known(train), *known(val), *known(test), seed=seed)

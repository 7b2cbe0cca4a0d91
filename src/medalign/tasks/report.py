"""Report generation: an image-conditioned decoder trained with teacher forcing, and its evaluation.

Training minimises the next-token cross-entropy of each case's ``text`` given its image(s)
(``ReportGenerator.forward``). Evaluation on ``eval.split`` decodes a report per case with the
recipe's ``report`` settings (decoding, beams, length penalty and the loop guards
``no_repeat_ngram_size`` / ``repetition_penalty``, all recorded in metrics.json) and scores it
against the reference with corpus BLEU-1..4 and ROUGE-L (``medalign.textmetrics``), next to two
baselines scored the same way:

* **retrieval**: the report of the nearest *training* case by cosine similarity of
  ``encode_image`` (the trained model's CLS embedding, so it measures that encoder, not a
  separate one);
* **constant**: the most frequent training report for every case (what a model that ignores
  the image can reach).

On the phantom (manifest ``meta.source == "phantom"``), where every report states known findings,
generated and retrieved reports are also parsed (``medalign.data.phantom.parse_report`` /
``parse_diagnosis``) and compared with the true lesions: see ``finding_accuracy``. The share of
generated reports (and of references) that repeat a word 3-gram shows whether decoding loops.
Cases whose text is empty are left out of training and evaluation, and counted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medalign.config import RunConfig
from medalign.data.dataset import Collator, dataset_for_model, stack_modalities
from medalign.data.manifest import Manifest
from medalign.progress import progress
from medalign.textmetrics import text_metrics, tokenize

REPORTS_FILE = "reports.jsonl"


class ReportTask:
    """Teacher-forced cross-entropy of the tokenised ``text`` given the stacked image columns."""

    def __init__(self, model: Any, image_keys: Sequence[str]) -> None:
        self.model = model
        self.image_keys = list(image_keys)

    def training_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.model(
            pixel_values=stack_modalities(batch, self.image_keys),
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )
        return {"loss": out["loss"]}


def with_text(manifest: Manifest) -> tuple[Manifest, dict[str, int]]:
    """The cases that have a report, and how many of each split had none."""
    table = manifest.table
    if "text" not in table.columns:
        raise ValueError("task report needs a 'text' column (the reports or captions to generate)")
    empty = table["text"].fillna("").astype(str).str.strip() == ""
    dropped = (
        {str(k): int(v) for k, v in table.loc[empty, "split"].value_counts().items()}
        if "split" in table
        else {}
    )
    kept = table.loc[~empty].reset_index(drop=True)
    return Manifest(kept, manifest.base_dir, manifest.meta), dropped


def run_report(config: RunConfig, *, resume: bool = False, echo: Any = print) -> Path:
    """``task: report``: train a ``ReportGenerator`` through the engine, then evaluate it."""
    from medalign.models.report import ReportGenerator
    from medalign.run import build_model, fit_and_save, image_columns, prepare_run

    out, manifest = prepare_run(config)
    manifest, dropped = with_text(manifest)
    model = build_model(config, echo)
    if not isinstance(model, ReportGenerator):
        raise ValueError(f"task report needs a report model (report_tiny, ...), not {config.model.name!r}")
    image_keys = image_columns(config, manifest)
    if model.config.in_channels % len(image_keys):
        raise ValueError(
            f"model in_channels={model.config.in_channels} cannot hold {len(image_keys)} stacked modalities"
        )
    dataset = dataset_for_model(manifest, model, "train", None, image_keys, data=config.data, augment=True)
    if len(dataset) == 0:
        raise ValueError("the manifest has no training case with a report (split 'train', non-empty text)")
    task = ReportTask(model, image_keys)

    def evaluate(m: Any) -> dict[str, Any]:
        metrics = evaluate_report(m, manifest, config, image_keys, config.eval.split)
        return {**metrics, "n_without_text": dropped}

    return fit_and_save(config, out, model, task, dataset, evaluate, resume=resume, echo=echo)


def _split_outputs(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str, generate: bool
) -> dict[str, Any]:
    """Case ids, reference texts, image embeddings and (when ``generate``) decoded reports of a split."""
    dataset = dataset_for_model(manifest, model, split, None, image_keys, data=config.data)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.data.eval_batch_size, collate_fn=Collator()
    )
    settings = config.report
    out: dict[str, Any] = {"case_id": [], "text": [], "embedding": [], "generated": []}
    model.eval()
    for batch in progress(loader, desc="generate"):
        pixels = stack_modalities(batch, image_keys)
        out["case_id"] += list(batch["case_id"])
        out["text"] += [str(t) for t in batch["text"]]
        out["embedding"].append(model.encode_image(pixels))
        if generate:
            out["generated"] += model.generate(
                pixels,
                decoding=settings.decoding,
                beam_size=settings.beam_size,
                max_new_tokens=settings.max_new_tokens,
                length_penalty=settings.length_penalty,
                no_repeat_ngram_size=settings.no_repeat_ngram_size,
                repetition_penalty=settings.repetition_penalty,
            )
    out["embedding"] = torch.cat(out["embedding"]) if out["embedding"] else torch.zeros(0, 1)
    return out


def nearest_reports(query: torch.Tensor, keys: torch.Tensor, reports: Sequence[str]) -> list[str]:
    """For each query embedding, the report of the most similar key (cosine; inputs L2-normalised)."""
    if len(reports) == 0:
        raise ValueError("no training reports to retrieve from")
    best = (query.float() @ keys.float().T).argmax(dim=1)
    return [reports[i] for i in best.tolist()]


def evaluate_report(
    model: Any, manifest: Manifest, config: RunConfig, image_keys: list[str], split: str
) -> dict[str, Any]:
    """Generated reports on ``split`` vs references, with the retrieval and constant baselines.

    Writes ``reports.jsonl`` (case_id, reference, generated, retrieved) into ``config.out``.
    """
    manifest, _ = with_text(manifest)
    test = _split_outputs(model, manifest, config, image_keys, split, generate=True)
    if not test["case_id"]:
        raise ValueError(f"split {split!r} has no case with a report to evaluate on")
    train = _split_outputs(model, manifest, config, image_keys, "train", generate=False)
    references, generated = test["text"], test["generated"]
    constant = Counter(train["text"]).most_common(1)[0][0] if train["text"] else ""
    settings = config.report
    results: dict[str, Any] = {
        "split": split,
        "n_cases": len(references),
        "decoding": {
            "decoding": settings.decoding,
            "beam_size": settings.beam_size if settings.decoding == "beam" else 1,
            "max_new_tokens": settings.max_new_tokens,
            "length_penalty": settings.length_penalty,
            "no_repeat_ngram_size": settings.no_repeat_ngram_size,
            "repetition_penalty": settings.repetition_penalty,
        },
        "generated": text_metrics(references, generated),
        "constant": text_metrics(references, [constant] * len(references)),
        "mean_generated_words": sum(len(g.split()) for g in generated) / len(generated),
        "mean_reference_words": sum(len(r.split()) for r in references) / len(references),
        "generated_repeating_3gram": repeating_fraction(generated, 3),
        "reference_repeating_3gram": repeating_fraction(references, 3),
    }
    retrieved: list[str] | None = None
    if settings.retrieval_baseline and train["text"]:
        retrieved = nearest_reports(test["embedding"], train["embedding"], train["text"])
        results["retrieval"] = text_metrics(references, retrieved)
    if manifest.meta.source == "phantom":
        truth = phantom_truth(manifest, test["case_id"], references)
        results["findings"] = {"generated": finding_accuracy(truth, generated)}
        if retrieved is not None:
            results["findings"]["retrieval"] = finding_accuracy(truth, retrieved)
    write_reports(Path(config.out) / REPORTS_FILE, test["case_id"], references, generated, retrieved)
    return results


def repeats_ngram(text: str, n: int) -> bool:
    """Whether some word ``n``-gram occurs twice in ``text`` (words as BLEU/ROUGE-L split them).

    The symptom ``no_repeat_ngram_size`` removes; a reference may repeat too (phantom reports
    say "zone on the left" once per lesion), so the same rate on the references is the baseline.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = tokenize(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def repeating_fraction(texts: Sequence[str], n: int) -> float | None:
    """Share of ``texts`` that repeat a word ``n``-gram (None for no text)."""
    return sum(repeats_ngram(t, n) for t in texts) / len(texts) if texts else None


def write_reports(
    path: Path, case_ids: list[str], references: list[str], generated: list[str], retrieved: list[str] | None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for i, case_id in enumerate(case_ids):
            row = {"case_id": case_id, "reference": references[i], "generated": generated[i]}
            row["retrieved"] = retrieved[i] if retrieved is not None else None
            handle.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Phantom: findings named in a report vs the true lesions
# ---------------------------------------------------------------------------------------------

Finding = tuple[str, str, str, str]  # (type, side, zone, size)


def phantom_truth(
    manifest: Manifest, case_ids: Sequence[str], references: Sequence[str]
) -> list[tuple[list[Finding], str | None]]:
    """True ``(findings, diagnosis)`` per case.

    Findings come from the phantom's ``lesions.jsonl`` beside the manifest (the generator's own
    record) when present, else from parsing the reference report (``parse_report`` is the exact
    inverse of the phantom's report writer). The diagnosis is the ``label`` column.
    """
    from medalign.data.phantom import parse_report

    lesions: dict[str, list[Finding]] = {}
    record_file = manifest.base_dir / "lesions.jsonl"
    if record_file.is_file():
        for line in record_file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            lesions.setdefault(row["case_id"], []).append(
                (row["type"], row["side"], row["zone"], row["size"])
            )
    labels = dict(
        zip(manifest.table["case_id"], manifest.table.get("label", [None] * len(manifest)), strict=True)
    )
    truth = []
    for case_id, reference in zip(case_ids, references, strict=True):
        found = lesions.get(case_id, []) if record_file.is_file() else parse_report(reference)
        label = labels.get(case_id)
        truth.append((found, str(label) if label not in (None, "") else None))
    return truth


def finding_accuracy(
    truth: Sequence[tuple[list[Finding], str | None]], reports: Sequence[str]
) -> dict[str, Any]:
    """How well reports state the true findings (phantom only).

    * ``exact``: cases whose parsed set of (type, side, zone, size) equals the true set;
    * ``count``: cases with the right number of parsed findings;
    * ``location_precision`` / ``location_recall``: over all (side, zone) cells named vs true;
    * ``type`` / ``size``: over true lesions, the report names that cell with the right
      type / size (a missed lesion counts as wrong);
    * ``diagnosis``: ``parse_diagnosis`` equals the label; a report naming no (or several)
      diagnoses counts as wrong and is counted in ``n_no_diagnosis``.

    A ratio with nothing to count (no cell named, no true lesion, no label) is None.
    """
    from medalign.data.phantom import parse_diagnosis, parse_report

    if len(truth) != len(reports):
        raise ValueError(f"{len(truth)} true cases for {len(reports)} reports")
    exact = count = named = named_right = true_cells = type_right = size_right = 0
    diagnosis_right = no_diagnosis = labelled = 0
    for (true_findings, label), report in zip(truth, reports, strict=True):
        parsed = parse_report(report)
        exact += set(parsed) == set(true_findings)
        count += len(parsed) == len(true_findings)
        by_cell = {(f[1], f[2]): f for f in parsed}
        true_by_cell = {(f[1], f[2]): f for f in true_findings}
        named += len(by_cell)
        named_right += len(by_cell.keys() & true_by_cell.keys())
        true_cells += len(true_by_cell)
        for cell, finding in true_by_cell.items():
            guess = by_cell.get(cell)
            type_right += guess is not None and guess[0] == finding[0]
            size_right += guess is not None and guess[3] == finding[3]
        if label is not None:
            labelled += 1
            diagnosis = parse_diagnosis(report)
            no_diagnosis += diagnosis is None
            diagnosis_right += diagnosis == label
    n = len(reports)
    return {
        "n_cases": n,
        "exact": exact / n,
        "count": count / n,
        "location_precision": named_right / named if named else None,
        "location_recall": named_right / true_cells if true_cells else None,
        "type": type_right / true_cells if true_cells else None,
        "size": size_right / true_cells if true_cells else None,
        "n_true_lesions": true_cells,
        "diagnosis": diagnosis_right / labelled if labelled else None,
        "n_no_diagnosis": no_diagnosis,
    }

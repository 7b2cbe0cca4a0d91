"""Clinical heads (Stage III): diagnosis and prognosis training, and their evaluation.

Loss: ``diagnosis_weight`` x cross-entropy over the rows with a label (label >= 0; label
smoothing and, with ``class_weights: balanced``, per-class weights from ``clinical_loss``) + ``survival_weight`` x the survival loss over the rows with a
time: the Cox negative log partial likelihood (Breslow, risk sets within the batch) or the
logistic-hazard (discrete-time) likelihood on ``model.config.time_bins``. A batch with no label
or no event contributes a zero term with the graph kept.

Evaluation on one split (``evaluate_clinical``):

* diagnosis: ACC, balanced ACC, macro-F1, AUC (``medalign.evaluation.metrics.classification_metrics``),
  top-label ECE (15 bins) and a reliability diagram (``reliability.png``);
* survival: Harrell's C-index, the cumulative/dynamic AUC (IPCW, censoring distribution from
  the train split) at the 25/50/75% quantiles of the train split's event times, and
  Kaplan-Meier curves of two predicted risk groups split at the median predicted risk of the
  train split's cases (risk > that median = "high"), compared by a log-rank test
  (``km_risk_groups.png``). Every cut point comes from the training data, so the evaluated
  split is read once, never used to choose where it is cut; a manifest without a train split
  with survival data falls back to the evaluated cases and says so (``cut_points_from``). The discrete-time
  head's risk score is its cumulative hazard over all intervals, ``sum_k softplus(logit_k)``
  (= -log S at the horizon), which orders cases like the predicted survival at the horizon;
* patient level: when several rows share a ``patient_id`` (LGG: one row per slice), every
  metric is repeated on one row per patient with the mean class probability and the mean risk
  of the patient's rows (label, time and event are the patient's, and must agree across rows);
* with several modalities, the headline numbers (AUC, C-index) for every non-empty subset of
  modalities, the others hidden through ``present`` (``medalign.tasks.fuse.evaluate_fusion`` style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medalign.config import ClinicalLossConfig, RunConfig
from medalign.data.dataset import Collator, ManifestDataset, dataset_for_model
from medalign.data.manifest import Manifest
from medalign.losses import cox_partial_likelihood_loss, discrete_time_survival_loss
from medalign.progress import progress
from medalign.tasks.base import Task, TrainingPlan, register_task
from medalign.tasks.columns import check_num_classes, fusion_columns, modality_subsets, per_modality_data
from medalign.tasks.fuse import fusion_inputs

RELIABILITY_PNG = "reliability.png"
KM_PNG = "km_risk_groups.png"
TD_AUC_QUANTILES = (0.25, 0.5, 0.75)


def clinical_inputs(
    model: Any, batch: dict[str, Any], image_keys: Sequence[str], present: Tensor | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``ClinicalModel.forward``: a fusion model's, images under ``images``."""
    inputs = fusion_inputs(model, batch, image_keys, present)
    inputs["images"] = inputs.pop("pixel_values")
    return inputs


def risk_score(outputs: dict[str, Tensor]) -> Tensor | None:
    """One risk per case (higher = earlier event): Cox log hazard ratio, or discrete cumulative hazard."""
    if "risk" in outputs:
        return outputs["risk"].float()
    if "hazard_logits" in outputs:
        return F.softplus(outputs["hazard_logits"].float()).sum(dim=1)
    return None


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> Tensor:
    """``n / (K * n_k)`` per class over the labelled rows (label >= 0), as scikit-learn's "balanced".

    A class with no labelled row has no weight that means anything: an error naming it.
    """
    known = np.asarray([int(y) for y in labels if int(y) >= 0], dtype=np.int64)
    counts = np.bincount(known, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(
            f"clinical_loss.class_weights: balanced needs every class in the train split; classes "
            f"{np.flatnonzero(counts == 0).tolist()} have no labelled row"
        )
    return torch.tensor(len(known) / (num_classes * counts), dtype=torch.float32)


class ClinicalTask:
    """Diagnosis cross-entropy and/or survival loss of a :class:`~medalign.models.heads.ClinicalModel`.

    ``class_weights`` (one per class) weight the cross-entropy (see ``balanced_class_weights``).
    """

    def __init__(
        self,
        model: Any,
        config: ClinicalLossConfig,
        image_keys: Sequence[str],
        label_key: str = "label",
        class_weights: Tensor | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.image_keys = list(image_keys)
        self.label_key = label_key
        self.class_weights = class_weights

    def diagnosis_loss(self, logits: Tensor, batch: dict[str, Any]) -> Tensor:
        if self.label_key not in batch:
            raise ValueError(f"the model has a diagnosis head but batches have no {self.label_key!r}")
        labels = batch[self.label_key].long().to(logits.device)
        if not bool((labels >= 0).any()):  # cross-entropy of no rows would be NaN
            return logits.sum() * 0.0
        weight = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(
            logits.float(), labels, weight=weight, ignore_index=-1, label_smoothing=self.config.label_smoothing
        )

    def survival_loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        if "time" not in batch:
            raise ValueError(
                "the model has a survival head but batches have no time/event (manifest columns)"
            )
        time, event = batch["time"].float(), batch["event"].float()
        rows = torch.isfinite(time)
        if "risk" in outputs:
            return cox_partial_likelihood_loss(outputs["risk"][rows], time[rows], event[rows])
        bins = self.model.config.time_bins
        return discrete_time_survival_loss(outputs["hazard_logits"][rows], time[rows], event[rows], bins)

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        outputs = self.model(**clinical_inputs(self.model, batch, self.image_keys))
        result: dict[str, Tensor] = {}
        total = outputs["features"].sum() * 0.0
        if "logits" in outputs and self.config.diagnosis_weight > 0:
            ce = self.diagnosis_loss(outputs["logits"], batch)
            total = total + self.config.diagnosis_weight * ce
            result["loss_ce"] = ce.detach()
        if ("risk" in outputs or "hazard_logits" in outputs) and self.config.survival_weight > 0:
            surv = self.survival_loss(outputs, batch)
            total = total + self.config.survival_weight * surv
            result["loss_survival"] = surv.detach()
        result["loss"] = total
        return result


# ---------------------------------------------------------------------------------------------
# Running and evaluating
# ---------------------------------------------------------------------------------------------


def clinical_dataset(
    config: RunConfig, manifest: Manifest, model: Any, image_keys: list[str], split: str, augment: bool
) -> ManifestDataset:
    """Every modality of each case at the model's size, ``in_channels`` channels per modality."""

    label = config.data.label if model.config.num_classes else None
    return dataset_for_model(
        manifest, model, split, label, image_keys, data=per_modality_data(config, model), augment=augment
    )


class Clinical(Task):
    """``task: clinical``: a clinical model (``medalign.models.heads``): diagnosis and/or survival heads."""

    name = "clinical"
    model_kind = "a clinical model (clinical_tiny, ...)"

    def model_class(self) -> type:
        from medalign.models.heads import ClinicalModel

        return ClinicalModel

    def plan(self, config: RunConfig, manifest: Manifest, model: Any, out: Path, echo: Any) -> TrainingPlan:
        image_keys = fusion_columns(config, manifest, model)
        check_clinical_data(model, manifest, config)
        dataset = clinical_dataset(config, manifest, model, image_keys, "train", augment=True)
        weights = None
        if model.config.num_classes:
            check_num_classes(dataset, model.config.num_classes, config.data.label)
            if config.clinical_loss.class_weights == "balanced":
                index = {c: i for i, c in enumerate(dataset.classes)}
                labels = [index.get(v, -1) for v in dataset.manifest.table[config.data.label]]
                weights = balanced_class_weights(labels, model.config.num_classes)
        return TrainingPlan(
            ClinicalTask(model, config.clinical_loss, image_keys, class_weights=weights),
            dataset,
            lambda m: evaluate_clinical(m, manifest, config, image_keys, config.eval.split, out=out),
        )


def check_clinical_data(model: Any, manifest: Manifest, config: RunConfig) -> None:
    """The manifest columns the model's heads need, named when missing."""
    columns = set(manifest.table.columns)
    if model.config.num_classes and (not config.data.label or config.data.label not in columns):
        raise ValueError(
            f"the diagnosis head needs data.label to name a label column; {config.data.label!r} is not one "
            f"of {sorted(c for c in columns if c.startswith('label'))}"
        )
    if model.config.survival != "none" and not {"time", "event"} <= columns:
        raise ValueError(
            f"survival {model.config.survival!r} needs 'time' and 'event' columns in the manifest"
        )


@torch.no_grad()
def predict_clinical(
    model: Any, loader: Any, image_keys: Sequence[str], subset: Sequence[int] | None = None
) -> dict[str, Any]:
    """Per-row outputs over a loader: case ids, probabilities, risks, labels, times, events.

    ``subset`` keeps only those modality indices present (the rest hidden); rows left with no
    modality (and no report) are skipped and not returned.
    """
    rows: dict[str, list[Any]] = {k: [] for k in ("case_id", "probs", "risk", "label", "time", "event")}
    m = len(model.config.modalities)
    for batch in progress(loader, desc="predict"):
        present = batch["modalities_present"].bool()
        if subset is not None:
            chosen = torch.zeros(m, dtype=torch.bool)
            chosen[list(subset)] = True
            present = present & chosen
        keep = present.any(dim=1)
        if not keep.any():
            continue
        inputs = clinical_inputs(model, batch, image_keys, present)
        if not keep.all():  # rows without any modality cannot be scored on this subset
            inputs = _select_rows(inputs, keep)
        outputs = model(**inputs)
        idx = keep.nonzero().flatten().tolist()
        rows["case_id"] += [batch["case_id"][i] for i in idx]
        if "logits" in outputs:
            rows["probs"].append(torch.softmax(outputs["logits"].float(), dim=1).numpy())
            rows["label"].append(batch["label"][keep].numpy())
        risk = risk_score(outputs)
        if risk is not None:
            rows["risk"].append(risk.numpy())
            rows["time"].append(batch["time"][keep].numpy())
            rows["event"].append(batch["event"][keep].numpy())
    return {k: (np.concatenate(v) if v and k != "case_id" else v) for k, v in rows.items()}


def _select_rows(inputs: dict[str, Any], keep: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, dict):
            out[key] = {k: v[keep] for k, v in value.items()}
        else:
            out[key] = value[keep] if isinstance(value, Tensor) else value
    return out


def diagnosis_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str], figure: Path | None = None
) -> dict[str, Any]:
    """Classification metrics + ECE + reliability curve on the labelled rows; the diagram if asked."""
    from medalign.evaluation.metrics import classification_metrics, reliability_curve

    labelled = labels >= 0
    if not labelled.any():
        return {"n": 0, "n_unlabelled": len(labels)}
    y, p = labels[labelled].astype(np.int64), probs[labelled]
    result = classification_metrics(y, p, list(classes), scores_are="probabilities")
    curve = reliability_curve(p, y, n_bins=15)
    result.update(ece=curve["ece"], reliability=curve, n_unlabelled=int((~labelled).sum()))
    if figure is not None:
        from medalign.evaluation.plots import reliability_diagram

        reliability_diagram(curve, figure)
        result["figure"] = figure.name
    return result


@dataclass(frozen=True)
class SurvivalReference:
    """The training cases that fix an evaluation's cut points: td-AUC horizons (quantiles of
    their event times), the censoring distribution of the IPCW weights, and the risk threshold
    of the two risk groups (the median of their predicted risks)."""

    time: np.ndarray
    event: np.ndarray
    risk: np.ndarray
    source: str = "train split"


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    reference: SurvivalReference | None = None,
    figure: Path | None = None,
) -> dict[str, Any]:
    """C-index, td-AUC at the reference's event-time quartiles, risk groups split at the
    reference's median risk with KM + log-rank; no reference: the evaluated cases (noted)."""
    from medalign.evaluation.metrics import concordance_index, kaplan_meier, logrank_test, time_dependent_auc

    if reference is None:
        reference = SurvivalReference(time, event, risk, "evaluated cases (no train split with survival data)")
    result: dict[str, Any] = {"n": len(time), "n_events": int(event.sum()), "cut_points_from": reference.source}
    detail = concordance_index(time, event, risk)
    result["c_index"] = detail.pop("c_index")
    result["pairs"] = detail
    event_times = reference.time[reference.event == 1]
    if event_times.size:
        horizons = [float(np.quantile(event_times, q)) for q in TD_AUC_QUANTILES]
        try:
            result["td_auc"] = time_dependent_auc(
                time, event, risk, horizons, train_time=reference.time, train_event=reference.event
            )
        except ValueError as err:  # a case beyond the training follow-up: fall back to the split itself
            result["td_auc"] = {**time_dependent_auc(time, event, risk, horizons), "note": str(err)}
        result["td_auc"]["quantiles"] = list(TD_AUC_QUANTILES)
    threshold = float(np.median(reference.risk))
    high = risk > threshold
    groups = {"low": kaplan_meier(time[~high], event[~high])} if (~high).any() else {}
    if high.any():
        groups["high"] = kaplan_meier(time[high], event[high])
    result["risk_groups"] = {
        "threshold": threshold,
        "rule": f"high = risk > median predicted risk of the {reference.source}",
        "n_low": int((~high).sum()),
        "n_high": int(high.sum()),
        "kaplan_meier": groups,
        "logrank": logrank_test(time, event, np.where(high, "high", "low")) if len(groups) == 2 else None,
    }
    if figure is not None and groups:
        from medalign.evaluation.plots import kaplan_meier_plot

        logrank = result["risk_groups"]["logrank"]
        kaplan_meier_plot(groups, figure, logrank["p_value"] if logrank else None)
        result["figure"] = figure.name
    return result


def patient_rows(predictions: dict[str, Any], patient_of: dict[str, str]) -> tuple[dict[str, Any], int]:
    """One row per patient: mean probability and mean risk of its rows; label/time/event must agree."""
    ids = [patient_of[c] for c in predictions["case_id"]]
    patients = list(dict.fromkeys(ids))
    index = {p: i for i, p in enumerate(patients)}
    rows = np.array([index[p] for p in ids])
    counts = np.bincount(rows, minlength=len(patients)).astype(np.float64)
    out: dict[str, Any] = {"case_id": patients}
    for key in ("probs", "risk"):
        value = predictions[key]
        if len(value):
            summed = np.zeros((len(patients), *value.shape[1:]))
            np.add.at(summed, rows, value)
            out[key] = summed / counts.reshape(-1, *([1] * (value.ndim - 1)))
        else:
            out[key] = value
    for key in ("label", "time", "event"):
        value = predictions[key]
        if len(value):
            first = np.zeros(len(patients), dtype=value.dtype)
            first[rows[::-1]] = value[::-1]  # the first row of each patient
            if (first[rows] != value).any():
                raise ValueError(
                    f"rows of one patient disagree on {key!r}; patient-level metrics need one value"
                )
            out[key] = first
        else:
            out[key] = value
    return out, len(patients)


def _score(
    predictions: dict[str, Any],
    classes: Sequence[str],
    reference: SurvivalReference | None,
    figures: tuple[Path, Path] | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"n": len(predictions["case_id"])}
    if len(predictions["probs"]):
        result["diagnosis"] = diagnosis_metrics(
            predictions["label"], predictions["probs"], classes, figures[0] if figures else None
        )
    if len(predictions["risk"]):
        result["survival"] = survival_metrics(
            predictions["time"],
            predictions["event"],
            predictions["risk"],
            reference,
            figures[1] if figures else None,
        )
    return result


def _headline(scores: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": scores["n"]}
    if "diagnosis" in scores:
        out.update({k: scores["diagnosis"].get(k) for k in ("auc", "accuracy", "balanced_accuracy", "ece")})
    if "survival" in scores:
        out["c_index"] = scores["survival"]["c_index"]
    return out


def survival_reference(predictions: dict[str, Any]) -> SurvivalReference | None:
    """The train split's predictions as the cut-point reference (rows with a time only)."""
    if not len(predictions["risk"]):
        return None
    known = np.isfinite(predictions["time"])
    if not known.any():
        return None
    return SurvivalReference(predictions["time"][known], predictions["event"][known], predictions["risk"][known])


def evaluate_clinical(
    model: Any,
    manifest: Manifest,
    config: RunConfig,
    image_keys: list[str],
    split: str,
    *,
    out: Path | None = None,
    subsets: bool = True,
) -> dict[str, Any]:
    """Diagnosis and survival metrics on ``split`` (row and patient level), figures into ``out``."""

    model.eval()
    dataset = clinical_dataset(config, manifest, model, image_keys, split, augment=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
    )
    names = list(model.config.modalities)
    predictions = predict_clinical(model, loader, image_keys)
    table = manifest.table
    patient_of = dict(zip(table["case_id"], table["patient_id"], strict=True))
    train_predictions = _train_predictions(model, manifest, config, image_keys, split, predictions)
    train = survival_reference(train_predictions) if train_predictions else None
    figures = (out / RELIABILITY_PNG, out / KM_PNG) if out is not None else None
    results: dict[str, Any] = {"split": split, "modalities": names, "level": "row"}
    results.update(_score(predictions, dataset.classes, train, figures))

    per_patient, n_patients = patient_rows(predictions, patient_of)
    train_patients = survival_reference(patient_rows(train_predictions, patient_of)[0]) if train else None
    if n_patients < len(predictions["case_id"]):
        patient_figures = (
            (out / f"patient_{RELIABILITY_PNG}", out / f"patient_{KM_PNG}") if out is not None else None
        )
        results["patient_level"] = {
            "aggregation": "mean probability / mean risk of each patient's rows",
            **_score(per_patient, dataset.classes, train_patients, patient_figures),
        }
    if subsets and len(names) > 1:
        results["subsets"] = {}
        for subset in modality_subsets(names):
            key = "+".join(names[i] for i in subset)
            scored = (
                predict_clinical(model, loader, image_keys, subset)
                if len(subset) < len(names)
                else predictions
            )
            entry = {"row": _headline(_score(scored, dataset.classes, train, None))}
            if "patient_level" in results:
                entry["patient"] = _headline(
                    _score(patient_rows(scored, patient_of)[0], dataset.classes, train_patients, None)
                )
            results["subsets"][key] = entry
    results["per_case"] = _per_case(predictions, dataset.classes)
    return results


def _train_predictions(
    model: Any,
    manifest: Manifest,
    config: RunConfig,
    image_keys: list[str],
    split: str,
    predictions: dict[str, Any],
) -> dict[str, Any] | None:
    """The model's survival predictions on the train split (the cut-point reference), or None
    when the model has no survival head or the manifest no train rows with a time."""
    if not len(predictions["risk"]):
        return None
    if split == "train":
        return predictions
    table = manifest.table
    if "time" not in table.columns or not ((table["split"] == "train") & (table["time"] != "")).any():
        return None
    dataset = clinical_dataset(config, manifest, model, image_keys, "train", augment=False)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.data.eval_batch_size,
        collate_fn=Collator(model.tokenizer, max_length=config.data.text_max_length),
    )
    return predict_clinical(model, loader, image_keys)


def _per_case(predictions: dict[str, Any], classes: Sequence[str]) -> list[dict[str, Any]]:
    from medalign.evaluation.metrics import probability_rows

    rows: list[dict[str, Any]] = (
        probability_rows(predictions["case_id"], predictions["label"], predictions["probs"], classes)
        if len(predictions["probs"])
        else [{"case_id": case_id} for case_id in predictions["case_id"]]
    )
    for i, row in enumerate(rows):
        if len(predictions["risk"]):
            row.update(
                risk=float(predictions["risk"][i]),
                time=float(predictions["time"][i]),
                event=int(predictions["event"][i]),
            )
    return rows


register_task(Clinical())

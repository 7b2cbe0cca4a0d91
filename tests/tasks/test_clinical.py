"""``task: clinical``: training step, run on the phantom (both survival kinds, with and without text),
patient-level aggregation, recipes and config checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from medalign.bundle import load_bundle, save_bundle
from medalign.config import ConfigError, load_config, validate_ranges
from medalign.data.manifest import Manifest, read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.losses import cox_partial_likelihood_loss
from medalign.models import create_model
from medalign.models.heads import ClinicalModel
from medalign.pipeline.run import build_model, run_training
from medalign.tasks.clinical import (
    KM_PNG,
    RELIABILITY_PNG,
    ClinicalTask,
    SurvivalReference,
    evaluate_clinical,
    patient_rows,
    survival_metrics,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs" / "clinical").glob("*.yaml"))
IMPORT_LINE = re.compile(r"^# Import first:\s+(medalign data import .+)$", re.MULTILINE)
FAST = ["train.progress=false", "data.num_workers=0", "train.precision=32-true", "data.batch_size=8"]
TINY = ["model.overrides.image_size=32", "data.eval_batch_size=32"]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in tests/conftest.py


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=40, size=64))


def phantom_config(cases: Path, out: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "clinical" / "phantom.yaml",
        [f"out={out}", f"data.manifest={cases}", "data.phantom=null", *FAST, *TINY, *overrides],
    )


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # Cox head, attention fusion, image features only
        [  # discrete-time head, mean fusion, the report as a text token
            "model.overrides.survival=discrete",
            "model.overrides.time_bins=[0, 12, 24, 36, 60]",
            "model.overrides.fusion=mean",
            "model.overrides.text=tiny",
        ],
    ],
    ids=["cox", "discrete_text"],
)
def test_run_clinical_on_the_phantom(cases, tmp_path, overrides):
    config = phantom_config(cases, tmp_path / "run", "train.max_steps=3", *overrides)
    out = run_training(config, echo=lambda *_: None)
    metrics = json.loads((out / "metrics.json").read_text())
    test_rows = (read_manifest(cases).table["split"] == "test").sum()
    assert metrics["split"] == "test" and metrics["n"] == test_rows and metrics["train"]["steps"] == 3
    diagnosis = metrics["diagnosis"]
    assert diagnosis["class_names"] == ["normal", "benign", "malignant"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "ece"):
        assert key in diagnosis
    assert sum(diagnosis["reliability"]["count"]) == test_rows
    survival = metrics["survival"]
    table = read_manifest(cases).table
    train = table[(table["split"] == "train") & (table["event"].astype(float) == 1)]
    # td-AUC horizons: the quartiles of the TRAIN split's event times, never the test split's
    expected = np.quantile(train["time"].astype(float), [0.25, 0.5, 0.75])
    assert survival["td_auc"]["times"] == pytest.approx(expected.tolist())
    assert survival["cut_points_from"] == "train split"
    groups = survival["risk_groups"]
    assert groups["n_low"] + groups["n_high"] == test_rows
    assert groups["rule"] == "high = risk > median predicted risk of the train split"
    assert set(metrics["subsets"]) == {"a", "b", "a+b"}
    assert metrics["subsets"]["a+b"]["row"]["c_index"] == survival["c_index"]
    assert "patient_level" not in metrics  # phantom: one row per patient
    assert len(metrics["per_case"]) == test_rows
    assert is_png(out / RELIABILITY_PNG) and is_png(out / KM_PNG)
    model = load_bundle(out / "bundle")
    assert isinstance(model, ClinicalModel)
    assert model.needs_text == ("model.overrides.text=tiny" in overrides)
    assert (out / "bundle" / "tokenizer").is_dir() == model.needs_text


def test_survival_cut_points_come_from_the_reference_not_the_evaluated_cases():
    """Horizons, IPCW and the risk-group threshold are fixed by the training cases: changing the
    evaluated cases' times and risks moves none of them."""
    reference = SurvivalReference(
        time=np.array([2.0, 4.0, 6.0, 8.0, 10.0, 12.0]),
        event=np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0]),
        risk=np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
    )
    time, event = np.array([1.0, 3.0, 5.0, 7.0, 20.0]), np.array([1.0, 1.0, 0.0, 1.0, 0.0])
    risk = np.array([9.0, 8.0, 3.0, 2.0, 1.0])
    result = survival_metrics(time, event, risk, reference)
    assert result["td_auc"]["times"] == pytest.approx(np.quantile([2, 4, 6, 8, 10], [0.25, 0.5, 0.75]).tolist())
    assert result["risk_groups"]["threshold"] == 2.5  # median of the reference's risks
    assert (result["risk_groups"]["n_low"], result["risk_groups"]["n_high"]) == (2, 3)
    assert result["cut_points_from"] == "train split"
    shifted = survival_metrics(time * 3, event, risk + 100, reference)
    assert shifted["td_auc"]["times"] == result["td_auc"]["times"]
    assert shifted["risk_groups"]["threshold"] == 2.5 and shifted["risk_groups"]["n_high"] == 5
    alone = survival_metrics(time, event, risk)  # no reference: the evaluated cases, and it says so
    assert alone["risk_groups"]["threshold"] == 3.0 and alone["cut_points_from"].startswith("evaluated cases")


def test_patient_rows_average_probabilities_and_risks():
    predictions = {
        "case_id": ["p1/s1", "p2/s1", "p1/s2"],
        "probs": np.array([[0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]),
        "risk": np.array([1.0, -2.0, 3.0]),
        "label": np.array([1, 0, 1]),
        "time": np.array([5.0, 7.0, 5.0]),
        "event": np.array([1.0, 0.0, 1.0]),
    }
    rows, n = patient_rows(predictions, {"p1/s1": "p1", "p1/s2": "p1", "p2/s1": "p2"})
    assert n == 2 and rows["case_id"] == ["p1", "p2"]
    assert rows["probs"].ravel().tolist() == pytest.approx([0.4, 0.6, 0.9, 0.1])
    assert rows["risk"].tolist() == pytest.approx([2.0, -2.0])
    assert rows["label"].tolist() == [1, 0] and rows["time"].tolist() == [5.0, 7.0]
    predictions["label"] = np.array([1, 0, 0])
    with pytest.raises(ValueError, match="disagree on 'label'"):
        patient_rows(predictions, {"p1/s1": "p1", "p1/s2": "p1", "p2/s1": "p2"})


def test_patient_level_of_duplicated_rows_equals_the_row_level_of_the_originals(cases, tmp_path):
    config = phantom_config(cases, tmp_path)
    torch.manual_seed(0)
    model = create_model("clinical_tiny", **config.model.overrides).eval()
    keys = ["image:a", "image:b"]
    manifest = read_manifest(cases)
    twice = manifest.table.copy()
    twice["case_id"] = twice["case_id"] + "_copy"
    doubled = Manifest(
        pd.concat([manifest.table, twice], ignore_index=True), manifest.base_dir, manifest.meta
    )
    plain = evaluate_clinical(model, manifest, config, keys, "test", subsets=False)
    paired = evaluate_clinical(model, doubled, config, keys, "test", out=tmp_path, subsets=False)
    patient = paired["patient_level"]
    assert paired["n"] == 2 * plain["n"] and patient["n"] == plain["n"]
    assert patient["survival"]["c_index"] == pytest.approx(plain["survival"]["c_index"])
    assert patient["diagnosis"]["accuracy"] == pytest.approx(plain["diagnosis"]["accuracy"])
    assert patient["diagnosis"]["ece"] == pytest.approx(plain["diagnosis"]["ece"], abs=1e-6)
    assert is_png(tmp_path / f"patient_{KM_PNG}")


def test_training_step_skips_unlabelled_rows_and_adds_the_cox_term():
    torch.manual_seed(0)
    model = create_model("clinical_tiny", image_size=32, num_classes=2, survival="cox").eval()
    batch = {
        "image": torch.rand(4, 1, 32, 32),
        "modalities_present": torch.ones(4, 1, dtype=torch.bool),
        "label": torch.tensor([-1, 1, 0, -1]),
        "time": torch.tensor([3.0, 1.0, 2.0, 4.0]),
        "event": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "text": [""] * 4,
    }
    config = load_config(None, ["task=clinical", "clinical_loss.survival_weight=0.5"]).clinical_loss
    result = ClinicalTask(model, config, ["image"]).training_step(batch)
    out = model(batch["image"])
    ce = F.cross_entropy(out["logits"][1:3], torch.tensor([1, 0]))
    cox = cox_partial_likelihood_loss(out["risk"], batch["time"], batch["event"])
    assert result["loss"].item() == pytest.approx((ce + 0.5 * cox).item(), rel=1e-5)
    assert result["loss_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    batch["label"] = torch.full((4,), -1)
    batch["event"] = torch.zeros(4)
    empty = ClinicalTask(model, config, ["image"]).training_step(batch)
    assert empty["loss"].item() == 0.0 and empty["loss"].requires_grad


def test_clinical_checks_and_missing_columns(cases, tmp_path):
    for override, message in [
        ("clinical_loss.survival_weight=-1", "survival_weight must be >= 0"),
        ("clinical_loss.label_smoothing=1.0", "label_smoothing must be in"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate_ranges(phantom_config(cases, tmp_path, override))
    config = phantom_config(cases, tmp_path, "data.label=label:missing")
    with pytest.raises(ValueError, match=r"needs data\.label"):
        run_training(config, echo=lambda *_: None)


def test_an_alignment_bundle_initialises_the_vision_tower(cases, tmp_path):
    aligned = create_model("align_tiny", image_size=32)
    bundle = save_bundle(aligned, tmp_path / "align")
    config = phantom_config(cases, tmp_path / "run", f"model.init_from={bundle}")
    model = build_model(config)
    assert isinstance(model, ClinicalModel) and model.config.in_channels == aligned.config.in_channels
    for name, value in aligned.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], value), name


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_load_and_name_their_data(recipe):
    config = load_config(recipe)
    validate_ranges(config)
    assert config.task == "clinical"
    text = recipe.read_text()
    assert text.startswith("# ") and "split" in text
    if config.data.manifest:
        assert IMPORT_LINE.search(text), f"{recipe.name} must say how to import its data"
    assert {"image_size", "modalities", "in_channels"} <= set(config.model.overrides)


def test_recipe_files_cover_the_benchmarks():
    assert {p.stem for p in RECIPES} >= {"phantom", "lgg_death", "lgg_grade", "busi"}


def test_eval_clinical_cli_reproduces_the_runs_metrics(cases, tmp_path):
    from typer.testing import CliRunner

    from medalign.cli import app

    out = run_training(phantom_config(cases, tmp_path / "run", "train.max_steps=2"), echo=lambda *_: None)
    expected = json.loads((out / "metrics.json").read_text())
    result = CliRunner().invoke(
        app,
        ["eval", "clinical", "--model", str(out / "bundle"), "--manifest", str(cases), "--out", str(tmp_path / "ev")],
    )
    assert result.exit_code == 0, result.output
    assert "diagnosis (row, n=" in result.output and "C-index" in result.output
    got = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert got["survival"]["c_index"] == pytest.approx(expected["survival"]["c_index"])
    assert got["diagnosis"]["auc"] == pytest.approx(expected["diagnosis"]["auc"])
    assert is_png(tmp_path / "ev" / KM_PNG)
    page = (tmp_path / "ev" / "metrics.html").read_text(encoding="utf-8")  # the report beside it
    assert f"wrote {tmp_path / 'ev' / 'metrics.html'}" in result.output
    assert '<img alt="km_risk_groups.png"' in page and "<h2>Survival: survival</h2>" in page
    wrong = CliRunner().invoke(app, ["eval", "clinical", "--model", str(tmp_path / "nope"), "--manifest", str(cases)])
    assert wrong.exit_code != 0


def test_a_head_with_the_wrong_class_count_is_refused_before_training(cases, tmp_path):
    config = phantom_config(cases, tmp_path / "run", "model.overrides.num_classes=2")
    with pytest.raises(ValueError, match=r"column 'label' has 3 classes .* set model.overrides.num_classes to 3"):
        run_training(config, echo=lambda *_: None)
    assert not (tmp_path / "run" / "bundle").exists()


def test_balanced_class_weights_weight_the_cross_entropy():
    from medalign.tasks.clinical import balanced_class_weights

    weights = balanced_class_weights([0, 0, 0, 1, -1, 2, 2, 0], 3)  # counts 4 / 1 / 2 of 7 labelled
    assert torch.allclose(weights, torch.tensor([7 / 12, 7 / 3, 7 / 6]))
    with pytest.raises(ValueError, match=r"classes \[1\] have no labelled row"):
        balanced_class_weights([0, 2, 2], 3)
    torch.manual_seed(0)
    model = create_model("clinical_tiny", image_size=32, num_classes=3).eval()
    batch = {"image": torch.rand(4, 1, 32, 32), "modalities_present": torch.ones(4, 1, dtype=torch.bool),
             "label": torch.tensor([0, 0, 1, 2]), "text": [""] * 4}  # fmt: skip
    config = load_config(None, ["task=clinical", "clinical_loss.class_weights=balanced"]).clinical_loss
    loss = ClinicalTask(model, config, ["image"], class_weights=weights).training_step(batch)["loss"]
    logits = model(batch["image"])["logits"]
    per_row = F.cross_entropy(logits, batch["label"], reduction="none").detach()
    w = weights[batch["label"]]
    assert loss.item() == pytest.approx(float((w * per_row).sum() / w.sum()), rel=1e-5)
    with pytest.raises(ConfigError, match=r"class_weights: 'inverse' is not one of \['none', 'balanced'\]"):
        load_config(None, ["task=clinical", "clinical_loss.class_weights=inverse"])

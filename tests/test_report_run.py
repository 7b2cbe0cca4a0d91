"""``task: report``: train on the phantom, evaluate (BLEU/ROUGE, baselines, findings), bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medalign.bundle import load_bundle, save_bundle
from medalign.config import ConfigError, RunConfig, load_config, validate_ranges
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.models import create_model
from medalign.models.report import ReportGenerator
from medalign.run import build_model
from medalign.tasks.report import (
    evaluate_report,
    finding_accuracy,
    nearest_reports,
    repeating_fraction,
    repeats_ngram,
    run_report,
)
from medalign.textmetrics import tokenize

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.progress=false", "data.num_workers=0", "train.precision=32-true"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=24, size=64))


def phantom_config(cases: Path, out: Path, *overrides: str) -> RunConfig:
    return load_config(
        REPO / "configs" / "report" / "phantom.yaml",
        [
            f"out={out}",
            f"data.manifest={cases}",
            "data.phantom=null",
            "data.batch_size=8",
            "model.name=report_tiny",
            "model.overrides.image_size=32",
            "train.max_steps=3",
            "report.max_new_tokens=6",
            *FAST,
            *overrides,
        ],
    )


def test_run_report_on_phantom_writes_bundle_metrics_and_reports(cases: Path, tmp_path: Path) -> None:
    out = run_report(phantom_config(cases, tmp_path / "run"), echo=lambda *_: None)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["train"]["steps"] == 3
    for method in ("generated", "retrieval", "constant"):
        assert set(metrics[method]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"}
        assert all(0.0 <= v <= 1.0 for v in metrics[method].values())
    assert metrics["decoding"] == {
        "decoding": "beam",
        "beam_size": 3,
        "max_new_tokens": 6,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 3,  # the phantom recipe's guards, chosen on val by bench_report.py
        "repetition_penalty": 1.2,
    }
    assert 0.0 <= metrics["generated_repeating_3gram"] <= 1.0
    findings = metrics["findings"]["generated"]
    assert findings["n_cases"] == metrics["n_cases"] and findings["n_no_diagnosis"] <= findings["n_cases"]
    assert metrics["findings"]["retrieval"]["n_no_diagnosis"] == 0  # retrieved phantom reports always parse
    rows = [json.loads(line) for line in (out / "reports.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["n_cases"] > 0
    assert set(rows[0]) == {"case_id", "reference", "generated", "retrieved"}
    model = load_bundle(out / "bundle")
    assert isinstance(model, ReportGenerator) and model.config.in_channels == 2
    # the guard settings reach the decoder: n = 1 bans every token already written
    config = phantom_config(
        cases, tmp_path / "unigram", "report.no_repeat_ngram_size=1", "report.max_new_tokens=12"
    )
    again = evaluate_report(
        model, read_manifest(config.data.manifest), config, ["image:a", "image:b"], "test"
    )
    assert again["decoding"]["no_repeat_ngram_size"] == 1
    rows = [json.loads(line) for line in (tmp_path / "unigram" / "reports.jsonl").read_text().splitlines()]
    for row in rows:
        words = tokenize(row["generated"])
        assert len(words) == len(set(words)), row["generated"]
    assert again["generated_repeating_3gram"] == 0.0


def test_repeated_ngrams_by_hand() -> None:
    assert repeats_ngram("to the right to the right", 3)  # "to the right" twice
    assert not repeats_ngram("to the right to the left", 3)
    assert repeats_ngram("To the right. to the left", 2)  # lowercased words: "to the" twice
    assert not repeats_ngram("a b", 3)
    assert repeating_fraction(["a b a b", "a b c d", "x y x y", "z"], 2) == pytest.approx(2 / 4)
    assert repeating_fraction([], 3) is None
    with pytest.raises(ValueError, match="n must be"):
        repeats_ngram("a", 0)


def test_nearest_reports_uses_cosine_similarity() -> None:
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    query = torch.nn.functional.normalize(torch.tensor([[0.1, 1.0], [1.0, 0.9], [1.0, -0.2]]), dim=-1)
    assert nearest_reports(query, keys, ["x", "y", "xy"]) == ["y", "xy", "x"]


def test_finding_accuracy_by_hand() -> None:
    truth = [
        ([("cyst", "left", "upper", "small")], "benign"),
        ([("solid", "right", "lower", "large"), ("cyst", "left", "middle", "small")], "malignant"),
        ([], "normal"),
    ]
    reports = [
        "A small cyst is seen in the left upper zone. Impression: benign appearance.",  # all right
        # right cell and size of the first lesion, wrong type; the second lesion missed
        "There is a large simple cyst in the right lower zone. Overall, suspicious for malignancy.",
        "Garbled text without any impression",  # no finding (right: normal), no diagnosis (wrong)
    ]
    result = finding_accuracy(truth, reports)
    assert result["exact"] == pytest.approx(2 / 3)  # case 3's empty set equals the truth
    assert result["count"] == pytest.approx(2 / 3)
    assert result["location_precision"] == pytest.approx(2 / 2)
    assert result["location_recall"] == pytest.approx(2 / 3)
    assert result["type"] == pytest.approx(1 / 3)
    assert result["size"] == pytest.approx(2 / 3)
    assert result["diagnosis"] == pytest.approx(2 / 3)
    assert result["n_no_diagnosis"] == 1 and result["n_true_lesions"] == 3


def test_report_checks(cases: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"report\.beam_size"):
        validate_ranges(phantom_config(cases, tmp_path, "report.beam_size=0"))
    assert RunConfig().report.no_repeat_ngram_size == 3 and RunConfig().report.repetition_penalty == 1.0
    assert load_config(REPO / "configs" / "report" / "medpix.yaml").report.no_repeat_ngram_size == 3
    with pytest.raises(ConfigError, match=r"report\.no_repeat_ngram_size"):
        validate_ranges(phantom_config(cases, tmp_path, "report.no_repeat_ngram_size=-1"))
    with pytest.raises(ConfigError, match=r"report\.repetition_penalty"):
        validate_ranges(phantom_config(cases, tmp_path, "report.repetition_penalty=0.0"))
    with pytest.raises(ConfigError, match=r"no_repeat_ngram_size"):
        phantom_config(cases, tmp_path, "report.no_repeat_ngram_size=2.5")  # not an int
    with pytest.raises(ValueError, match="report model"):
        run_report(phantom_config(cases, tmp_path, "model.name=align_tiny", "model.overrides={}"))


def test_init_from_an_alignment_bundle_copies_the_vision_tower(cases: Path, tmp_path: Path) -> None:
    align = create_model("align_tiny", image_size=32, in_channels=2)
    save_bundle(align, tmp_path / "align")
    config = phantom_config(cases, tmp_path / "run", f"model.init_from={tmp_path / 'align'}")
    model = build_model(config)
    assert isinstance(model, ReportGenerator)
    for key, value in align.vision.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[key], value)

"""``medalign.html_report``: one self-contained HTML page per run, built from the run's own files,
and per ``medalign eval --out FILE.json`` (``FILE.html``), built by the same sections."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from medalign.bundle import save_bundle
from medalign.cli import app
from medalign.config import load_config
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.html_report import RunReportError, _stored_values, fmt, report_command, write_html_report
from medalign.models import create_model
from medalign.run import run_training

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "data.phantom=null",
    "train.max_steps=2",
    "train.log_every=1",
    "train.progress=false",
    "data.num_workers=0",
    "data.batch_size=8",
    "train.precision=32-true",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=40, size=64))


def trained(recipe: str, name: str, factory: pytest.TempPathFactory, *overrides: str) -> Path:
    """One short run of a shipped recipe in a fresh folder."""
    out = factory.mktemp("runs") / name
    config = load_config(REPO / "configs" / recipe, [f"out={out}", *overrides, *FAST])
    return run_training(config, echo=lambda *_: None)


@pytest.fixture(scope="module")
def segment_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(
        "segment/phantom_text.yaml",
        "segment",
        tmp_path_factory,
        f"data.manifest={phantom.with_name('prompts.csv')}",
        "model.name=unet",
        "model.overrides={in_channels: 2, image_size: 64, channels: [8, 16, 32, 64]}",
    )


@pytest.fixture(scope="module")
def clinical_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(
        "clinical/phantom.yaml",
        "clinical",
        tmp_path_factory,
        f"data.manifest={phantom}",
        "model.overrides.image_size=32",
        "data.eval_batch_size=32",
    )


@pytest.fixture(scope="module")
def align_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained(
        "align/phantom.yaml",
        "align",
        tmp_path_factory,
        f"data.manifest={phantom}",
        "model.name=align_tiny",
        "model.overrides={in_channels: 2, image_size: 64}",
    )


def images(page: str) -> dict[str, bytes]:
    """alt text -> decoded PNG of every <img> (which must all be inline PNGs)."""
    tags = re.findall(r"<img [^>]*>", page)
    found = dict(re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]*)">', page))
    assert len(found) == len(tags), "every image must be an inline base64 PNG"
    return {alt: base64.b64decode(data) for alt, data in found.items()}


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_segmentation_report(segment_run: Path) -> None:
    path = write_html_report(segment_run)
    assert path == segment_run / "report.html"
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    pictures = images(page)
    assert all(png.startswith(PNG_MAGIC) for png in pictures.values())
    metrics = json.loads((segment_run / "metrics.json").read_text())
    for key in ("dice", "iou", "pooled_dice", "hd95", "nsd"):
        assert f"<td>{key}</td><td>{metrics[key]:.4f}</td>" in page
    assert f"<td>n_images</td><td>{metrics['n_images']}</td>" in page
    assert "learning curves" in pictures
    ranked = sorted(metrics["per_case"], key=lambda r: r["dice"])
    overlays = {alt.split(":")[0]: alt for alt in pictures if alt.startswith(("best", "worst"))}
    assert set(overlays) == {"best cases", "worst cases"}
    for row in ranked[:3]:
        assert f"{row['case_id']} (Dice {row['dice']:.4f})" in overlays["worst cases"]
    for row in ranked[-3:]:
        assert f"{row['case_id']} (Dice {row['dice']:.4f})" in overlays["best cases"]
    # the data summary comes from the run's manifest: 40 cases -> 60 lesion prompts
    assert "<td>cases</td><td>60</td>" in page


def test_clinical_report_embeds_the_runs_figures(clinical_run: Path, tmp_path: Path) -> None:
    path = write_html_report(clinical_run, tmp_path / "elsewhere" / "clinical.html")
    assert path == tmp_path / "elsewhere" / "clinical.html" and path.is_file()
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    pictures = images(page)
    # the run's own PNGs, byte for byte
    assert pictures["reliability.png"] == (clinical_run / "reliability.png").read_bytes()
    assert pictures["km_risk_groups.png"] == (clinical_run / "km_risk_groups.png").read_bytes()
    assert {"learning curves", "confusion", "ROC curves"} <= set(pictures)
    metrics = json.loads((clinical_run / "metrics.json").read_text())
    diagnosis, survival = metrics["diagnosis"], metrics["survival"]
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert f"<td>{key}</td><td>{diagnosis[key]:.4f}</td>" in page
    assert f"<td>C-index</td><td>{survival['c_index']:.4f}</td>" in page
    # per-modality-subset table: one row per subset with its saved AUC
    for name, entry in metrics["subsets"].items():
        assert re.search(
            rf"<tr><td>{re.escape(name)}</td><td>[^<]*</td><td>{entry['row']['auc']:.4f}</td>", page
        )


def test_alignment_report_has_zero_shot_roc_and_retrieval_examples(align_run: Path) -> None:
    metrics = json.loads((align_run / "metrics.json").read_text())
    zeroshot, examples = metrics["zeroshot"], metrics["retrieval"]["examples"]
    # zero-shot saved one row per evaluated case, with every class's probability
    assert len(zeroshot["per_case"]) == zeroshot["n"]
    assert all(list(r["probs"]) == zeroshot["class_names"] for r in zeroshot["per_case"])
    bundle = json.loads((align_run / "bundle" / "config.json").read_text())
    assert "per_case" not in json.dumps(bundle) and "examples" not in bundle["metrics"]["retrieval"]

    page = (align_run / "report.html").read_text(encoding="utf-8")  # written by the run itself
    assert_self_contained(page)
    pictures = images(page)
    section = page.split("<h2>Classification: zeroshot</h2>")[1].split("<h2>")[0]
    assert '<img alt="confusion"' in section and '<img alt="ROC curves"' in section
    assert "No ROC curves" not in page
    # four query thumbnails, each beside its saved top-3 texts with correct/incorrect marks
    assert len(examples) == 4 and all(len(e["top"]) == 3 for e in examples)
    for example in examples:
        thumbnail = pictures[f"query {example['case_id']}"]
        assert thumbnail.startswith(PNG_MAGIC)
        for hit in example["top"]:
            mark = "✓" if hit["correct"] else "✗"
            assert f"<li>{mark} {html.escape(hit['text'])} ({fmt(hit['similarity'])})</li>" in page
    assert "Thumbnails left out" not in page


def test_retrieval_examples_without_the_manifest_keep_the_texts(align_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "run"
    shutil.copytree(align_run, moved)
    manifest = str(load_config(align_run / "config.yaml").data.manifest)
    (moved / "config.yaml").write_text(
        (moved / "config.yaml").read_text().replace(manifest, "/nowhere/m.csv")
    )
    page = write_html_report(moved).read_text(encoding="utf-8")
    assert "Thumbnails left out: the run&#x27;s manifest (/nowhere/m.csv) is not available" in page
    assert not any(alt.startswith("query ") for alt in images(page))
    example = json.loads((moved / "metrics.json").read_text())["retrieval"]["examples"][0]
    assert html.escape(example["top"][0]["text"]) in page


def test_format_and_stored_values(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    assert fmt(0.123456) == "0.1235" and fmt(3) == "3" and fmt(None) == "–" and fmt(True) == "true"
    assert fmt([1, 0.5]) == "1, 0.5000" and fmt("<b>") == "&lt;b&gt;"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert _stored_values(tmp_path / "model.safetensors") == 10


def test_bad_run_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(RunReportError, match=r"run folder '.*nowhere' does not exist"):
        write_html_report(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("task: segment\n")
    with pytest.raises(RunReportError, match=r"metrics\.json is missing"):
        write_html_report(tmp_path / "half")
    (tmp_path / "half" / "metrics.json").write_text("{not json")
    with pytest.raises(RunReportError, match=r"cannot parse '.*metrics\.json'"):
        write_html_report(tmp_path / "half")


def test_cli_command(segment_run: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("other")(lambda: None)  # two commands, so "report" is addressed by name as in medalign
    runner = CliRunner()
    help_text = runner.invoke(app, ["report", "--help"]).output
    assert "RUN_DIR" in help_text and "medalign report runs/" in help_text
    result = runner.invoke(app, ["report", str(segment_run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").is_file() and f"wrote {tmp_path / 'r.html'}" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "does not exist" in result.output


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=16, size=64))


# a 2-channel bundle saved without an input record: its columns are named, stacked in this order
BOTH = ("--modality", "image:a", "--modality", "image:b")


def tiny_bundle(tmp_path: Path, name: str, **overrides: object) -> Path:
    torch.manual_seed(0)
    save_bundle(create_model(name, **overrides), tmp_path / "bundle")
    return tmp_path / "bundle"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, ["eval", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_eval_zeroshot_writes_a_report_with_confusion_and_roc(small_phantom: Path, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, "align_tiny", in_channels=2, image_size=32)
    out = tmp_path / "eval" / "zeroshot.json"
    output = invoke("zeroshot", "--model", str(bundle), "--manifest", str(small_phantom), *BOTH,
                    "--templates", "phantom_diagnosis", "--out", str(out))  # fmt: skip
    page_path = out.with_suffix(".html")
    assert f"wrote {page_path}" in output
    page = page_path.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert f"Evaluation of {bundle} on {small_phantom} (test)" in page
    assert "<h1>medalign eval zeroshot</h1>" in page and "Learning curves" not in page
    metrics = json.loads(out.read_text())
    section = page.split("<h2>Classification: classification</h2>")[1].split("<h2>")[0]
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert f"<td>{key}</td><td>{metrics[key]:.4f}</td>" in section
    pictures = images(page)
    assert {"confusion", "ROC curves"} <= set(pictures) and "No ROC curves" not in page
    assert all(png.startswith(PNG_MAGIC) for png in pictures.values())
    assert "<h2>Data</h2>" in page and "<td>cases</td><td>16</td>" in page  # summary of the eval's manifest
    assert "templates: phantom_diagnosis" in page  # the command's arguments stand in for config.yaml


def test_eval_segment_writes_a_report_with_overlays(small_phantom: Path, tmp_path: Path) -> None:
    prompts = small_phantom.with_name("prompts.csv")
    bundle = tiny_bundle(tmp_path, "unet", in_channels=2, image_size=64, channels=[4, 8, 16])
    out = tmp_path / "segment.json"
    output = invoke("segment", "--model", str(bundle), "--manifest", str(prompts), "--modality", "image:a",
                    "--modality", "image:b", "--split", "val", "--out", str(out))  # fmt: skip
    assert f"wrote {tmp_path / 'segment.html'}" in output
    page = (tmp_path / "segment.html").read_text(encoding="utf-8")
    assert_self_contained(page)
    assert f"Evaluation of {bundle} on {prompts} (val)" in page
    metrics = json.loads(out.read_text())
    assert f"<td>dice</td><td>{metrics['dice']:.4f}</td>" in page
    assert f"<td>n_images</td><td>{metrics['n_images']}</td>" in page
    pictures = images(page)
    assert "Overlays left out" not in page
    overlays = {alt.split(":")[0] for alt in pictures if alt.startswith(("best", "worst"))}
    assert overlays == {"best cases", "worst cases"}
    assert all(png.startswith(PNG_MAGIC) for png in pictures.values())
    # only the metrics file's own report: no stray figures, no learning curves
    assert not re.search(r"<h2>(Other figures|Learning curves)</h2>", page)


def test_eval_without_out_writes_no_report(small_phantom: Path, tmp_path: Path) -> None:
    bundle = tiny_bundle(tmp_path, "align_tiny", in_channels=2, image_size=32)
    output = invoke("retrieval", "--model", str(bundle), "--manifest", str(small_phantom), *BOTH)
    assert "wrote" not in output and set(json.loads(output)) == {"image_to_text", "text_to_image"}
    assert not list(tmp_path.glob("*.html"))

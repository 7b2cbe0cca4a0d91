"""``task: instruct``: conversations through the engine, stage A freezing, evaluation, kill + resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medalign.config import ConfigError, RunConfig, load_config
from medalign.data.conversations import conversation_rows
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.models import create_model
from medalign.models.instruct import IMAGE_TOKEN, InstructModel
from medalign.run import run_training
from medalign.tasks.instruct import InstructCollator, choose, score_answers, with_placeholders

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "instruct" / "phantom_tiny.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=24, size=64))


def config(cases: Path, out: Path, *overrides: str) -> RunConfig:
    base = [
        "task=instruct", f"out={out}", f"data.manifest={cases}", "data.modalities=[image:a, image:b]",
        "data.label=null", "data.batch_size=8", "data.eval_batch_size=32", "data.num_workers=0",
        "model.name=instruct_tiny", "model.overrides={in_channels: 2, image_size: 64}",
        "train.max_steps=3", "train.progress=false", "train.precision=32-true", "instruct.max_new_tokens=3",
    ]  # fmt: skip
    return load_config(None, [*base, *overrides])


@pytest.fixture(scope="module")
def tuned(cases: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    return run_training(config(cases, out, "instruct.conversations=phantom"), echo=lambda *_: None)


def test_run_scores_every_attribute_against_baselines_and_writes_a_bundle(tuned: Path) -> None:
    from medalign.bundle import load_bundle

    metrics = json.loads((tuned / "metrics.json").read_text())
    assert set(metrics["closed"]["per_kind"]) == {"count", "side", "zone", "diagnosis"}
    for baseline in ("majority", "retrieval", "untuned"):  # every baseline scored on the same questions
        assert metrics[baseline]["closed"]["n"] == metrics["closed"]["n"]
        assert set(metrics[baseline]["closed"]["per_kind"]) == set(metrics["closed"]["per_kind"])
    assert metrics["train"]["steps"] == 3 and metrics["conversations"]["source"] == "phantom"
    answers = (tuned / "answers.jsonl").read_text().splitlines()
    assert len(answers) == metrics["n_rows"] and (tuned / "untuned.json").is_file()
    assert isinstance(load_bundle(tuned / "bundle"), InstructModel)


def answer_loss(model: InstructModel, cases: Path, split: str) -> float:
    """Mean answer-token cross-entropy of ``model`` over the phantom questions of ``split``."""
    from medalign.run import image_columns
    from medalign.tasks.instruct import instruct_dataset

    settings = config(cases, cases.parent, "instruct.conversations=phantom")
    rows, _ = conversation_rows(read_manifest(cases), "phantom")
    keys = image_columns(settings, rows)
    dataset = instruct_dataset(rows, model, settings, keys, split)
    batch = InstructCollator(model, keys, False)([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        model.eval()
        return float(model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])["loss"])


def test_a_short_run_learns_the_answers_far_below_the_untuned_loss(cases: Path, tmp_path: Path) -> None:
    """40 steps: the held-out answer loss must fall far below the random LM's (about ln of the
    vocabulary), i.e. the model has learnt what the answers are, not just run."""
    from lightning.fabric.utilities.seed import seed_everything

    from medalign.bundle import load_bundle
    from medalign.run import build_model

    settings = config(cases, tmp_path, "instruct.conversations=phantom", "train.max_steps=40",
                      "optim.lr=1.0e-2", "instruct.eval_untuned=false", "instruct.max_eval_rows=2")  # fmt: skip
    seed_everything(settings.train.seed)
    untrained = answer_loss(build_model(settings), cases, "test")
    run = run_training(settings, echo=lambda *_: None)
    trained = answer_loss(load_bundle(run / "bundle"), cases, "test")
    assert trained < 0.3 * untrained, (untrained, trained)


def test_stage_projector_trains_the_projector_only(cases: Path, tuned: Path, tmp_path: Path) -> None:
    run = run_training(
        config(cases, tmp_path, f"model.init_from={tuned / 'bundle'}", "instruct.stage=projector",
               "instruct.conversations=caption", "instruct.eval_untuned=false", "instruct.max_eval_rows=2"),
        echo=lambda *_: None,
    )  # fmt: skip
    before, after = load_file(tuned / "bundle" / "model.safetensors"), load_file(run / "bundle" / "model.safetensors")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector"}
    assert "open" in json.loads((run / "metrics.json").read_text())  # captions: BLEU/ROUGE-L


def test_lora_is_merged_into_the_bundle(cases: Path, tuned: Path, tmp_path: Path) -> None:
    lora = "instruct.lora={r: 2, alpha: 4, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    run = run_training(
        config(cases, tmp_path, f"model.init_from={tuned / 'bundle'}", lora, "instruct.eval_untuned=false",
               "instruct.max_eval_rows=2"),
        echo=lambda *_: None,
    )  # fmt: skip
    before, after = load_file(tuned / "bundle" / "model.safetensors"), load_file(run / "bundle" / "model.safetensors")
    assert before.keys() == after.keys()  # no lora_ weights: folded into q_proj / v_proj
    changed = {k for k in before if not torch.equal(before[k], after[k]) and k.startswith("lm.")}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_shipped_recipe_stages_validate() -> None:
    from medalign.config import validate_ranges
    from medalign.curriculum import load_curriculum, stage_config

    curriculum = load_curriculum(RECIPE)
    stages = [stage_config(curriculum, [1]), stage_config(curriculum, [1, 2]), stage_config(curriculum, [1, 2, 3])]
    for stage in stages:
        validate_ranges(stage)
    assert [s.task for s in stages] == ["align", "instruct", "instruct"]  # the ViT is aligned first
    assert [s.instruct.stage for s in stages[1:]] == ["projector", "full"]
    assert stages[2].model.init_from and stages[2].model.init_from.endswith("stages_1-2/bundle")


def test_recipe_checks() -> None:
    with pytest.raises(ConfigError, match=r"instruct\.lora applies to stage full"):
        from medalign.config import validate_ranges

        validate_ranges(load_config(None, ["task=instruct", "data.manifest=x", "instruct.stage=projector",
                                           "instruct.lora={r: 2}"]))  # fmt: skip


def test_separate_images_fill_the_placeholders_in_order(cases: Path) -> None:
    """Two image columns as two images of one conversation: two placeholders, images row by row."""
    manifest = read_manifest(cases)
    rows, _ = conversation_rows(manifest.subset(manifest.table.index < 2), "caption")
    model = create_model("instruct_tiny", in_channels=1, image_size=64)
    samples = [
        {"case_id": f"c{i}", "image:a": torch.full((1, 64, 64), float(i)), "image:b": torch.full((1, 64, 64), i + 0.5),
         "modalities_present": torch.tensor([True, i == 0]), "text": "",
         "attrs": {"conversation": rows.table.iloc[i]["attr:conversation"]}}
        for i in range(2)
    ]  # fmt: skip
    batch = InstructCollator(model, ["image:a", "image:b"], separate=True)(samples)
    assert [float(p[0, 0, 0]) for p in batch["pixel_values"]] == [0.0, 0.5, 1.0]
    placeholders = (batch["input_ids"] == model.image_token_id).sum(dim=1)
    assert placeholders.tolist() == [2, 1]
    out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"])
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match=f"2 {IMAGE_TOKEN} placeholders for 1 images"):
        with_placeholders([{"from": "human", "value": f"{IMAGE_TOKEN}{IMAGE_TOKEN} x"}], 1, "case 'z'")


def test_closed_answers_count_the_option_named_first() -> None:
    assert choose("Yes, there is.", ("yes", "no")) == "yes" and choose("maybe", ("yes", "no")) is None
    scores = score_answers(["two", "no", "An axial CT."], ["two lesions", "yes", "axial CT"],
                           ["count", "zone", "open"], [("one", "two"), ("yes", "no"), ()])  # fmt: skip
    assert scores["closed"]["accuracy"] == 0.5 and scores["closed"]["per_kind"]["count"]["accuracy"] == 1.0
    assert scores["open"]["n"] == 1 and scores["open"]["rouge_l"] > 0


def test_sigkill_mid_stage_then_rerun_resumes_to_the_same_model(cases: Path, tmp_path: Path) -> None:
    """The recipe's stage B through the CLI, killed (SIGKILL) at step 3 and rerun: same weights."""

    def train(out: Path, kill_at: int | None = None) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
        if kill_at:
            env["MEDALIGN_KILL_AT_STEP"] = str(kill_at)
        args = [sys.executable, "-m", "medalign.cli", "train", "--config", str(RECIPE), "--stages", "3",
                f"out={out}", f"data.manifest={cases}", "data.phantom=null", "data.batch_size=8",
                "train.max_steps=5", "train.checkpoint_every=2", "train.progress=false",
                "model.overrides.image_size=32", "instruct.eval_untuned=false", "instruct.max_eval_rows=4",
                "instruct.max_new_tokens=2"]  # fmt: skip
        return subprocess.run(args, env=env, timeout=600, capture_output=True).returncode

    assert train(tmp_path / "straight") == 0
    assert train(tmp_path / "killed", kill_at=3) == -9
    assert not (tmp_path / "killed" / "stages_3" / "bundle").exists()
    assert train(tmp_path / "killed") == 0
    expected = load_file(tmp_path / "straight" / "stages_3" / "bundle" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "stages_3" / "bundle" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


def test_predictor_and_cli_chat_stream_the_answer(tuned: Path, cases: Path) -> None:
    from typer.testing import CliRunner

    from medalign.cli import app
    from medalign.predict import Predictor, PredictorError

    images = {m: cases.parent / "images" / f"ph0000_{m}.png" for m in ("a", "b")}
    predictor = Predictor.from_bundle(tuned / "bundle")
    pieces: list[str] = []
    answer = predictor.chat(images, "How many lesions are there?", stream=pieces.append, max_new_tokens=3)
    assert "".join(pieces).strip() == answer
    with pytest.raises(PredictorError, match="chat\\(\\) needs a instruct bundle"):
        Predictor.from_bundle(tuned / "bundle").__class__(create_model("report_tiny")).chat(images["a"], "hi")
    args = ["chat", "--model", str(tuned / "bundle"), "--image", f"a={images['a']}", "--image", f"b={images['b']}",
            "--max-new-tokens", "3"]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--question", "How many lesions are there?"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == answer
    two = CliRunner().invoke(app, args, input="How many lesions are there?\nWhich side?\n")
    assert two.exit_code == 0 and len(two.output.strip().splitlines()) == 2

"""Every shipped recipe loads, validates and builds its model; each real-data recipe runs end to end.

The real-data smoke tests run the import command written in the recipe's header (so the
documented command is the tested one), then train two steps and evaluate on the recipe's split.
Model widths are shrunk for speed; every other setting is the recipe's.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medalign.cli import app
from medalign.config import RunConfig, load_config, validate_ranges
from medalign.models import DualEncoder, create_model
from medalign.models.fusion import FUSION_MODELS
from medalign.models.segmentation import SEGMENTATION_MODELS, ClipDecoder
from medalign.pipeline.curriculum import is_curriculum
from medalign.pipeline.run import build_model, run_training

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not is_curriculum(p))
CURRICULA = sorted((REPO / "configs" / "curriculum").glob("*.yaml"))
SEPARATE_INPUTS = ("pretrain", "clinical")  # every modality its own input of one shared tower
BUNDLE_KINDS = {"pretrain": "pretrain", "clinical": "clinical", "report": "report", "instruct": "instruct"}
IMPORT_LINE = re.compile(r"^# Import first:\s+(medalign data import .+)$", re.MULTILINE)


def recipe(name: str) -> Path:
    return REPO / "configs" / "segment" / f"{name}.yaml"


def build_architecture(config: RunConfig):
    """The recipe's model; without its init_from bundle (not trained here) the same model from scratch."""
    if config.model.init_from and not Path(config.model.init_from).is_dir():
        config = replace(config, model=replace(config.model, init_from=None))
    return build_model(config)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_builds_its_model(path: Path) -> None:
    config = load_config(path)
    validate_ranges(config)
    assert config.out.startswith("runs/")
    if config.data.manifest:  # a recipe on real data says how to make its manifest
        commands = IMPORT_LINE.findall(path.read_text(encoding="utf-8"))
        assert any(f"--out {config.data.manifest}" in c for c in commands), path.name
    torch.manual_seed(0)
    model = build_architecture(config)
    modalities = 1 if config.task in SEPARATE_INPUTS else len(config.data.modalities or [None])
    channels = config.data.channels or model.config.in_channels // modalities
    assert channels * modalities == model.config.in_channels
    if config.task in BUNDLE_KINDS:  # their own tests run these models; here: the recipe builds the kind
        assert model.bundle_kind == BUNDLE_KINDS[config.task]
        return
    if config.task == "align":
        assert isinstance(model, DualEncoder)
        return
    if config.task == "fuse":  # every modality as its own input (configs/fuse/)
        assert config.model.name in FUSION_MODELS
        size = config.data.image_size or model.config.image_size
        inputs = {"pixel_values": {m: torch.rand(1, channels, size, size) for m in model.config.modalities}}
        if model.needs_text:
            inputs |= model.tokenize(["a cyst in the left upper zone"])
        with torch.no_grad():
            assert model.eval()(**inputs)["logits"].shape == (1, 1, size, size)
        return
    assert config.model.name in SEGMENTATION_MODELS
    size = config.data.image_size or model.config.image_size
    inputs = {"pixel_values": torch.rand(1, model.config.in_channels, size, size)}
    if model.needs_text:
        inputs |= model.tokenize(["the lesion in the left upper zone"])
    if getattr(model.config, "attributes_vocab", None):
        inputs["attributes"] = model.encode_attributes([{"side": "left", "zone": "upper"}])
    with torch.no_grad():
        assert model.eval()(**inputs)["logits"].shape == (1, 1, size, size)


def test_clipseg_busi_aligned_starts_from_the_medpix_alignment_bundle() -> None:
    """init_from is what configs/align/medpix.yaml writes, and its vision tower fits the recipe's data."""
    clipseg = load_config(recipe("clipseg_busi_aligned"))
    medpix = load_config(REPO / "configs" / "align" / "medpix.yaml")
    assert clipseg.model.init_from == f"{medpix.out}/bundle"
    encoder = create_model(medpix.model.name, **medpix.model.overrides)
    model = ClipDecoder.from_dual_encoder(encoder, **clipseg.model.overrides)
    assert model.config.in_channels == clipseg.data.channels == medpix.data.channels
    for key, value in encoder.vision.state_dict().items():
        torch.testing.assert_close(model.vision.state_dict()[key], value)


def test_c2fvl_vocabulary_is_what_the_phantom_prompt_says() -> None:
    """Side and zone, the prompt's content: the lesion's type and size would be information the
    free-text recipe never gets, and the comparison of the two would not be fair."""
    from medalign.data import phantom

    vocab = load_config(recipe("c2fvl_attributes")).model.overrides["attributes_vocab"]
    assert vocab == {"side": list(phantom.SIDES), "zone": list(phantom.ZONES)}


SMALL_UNET = ["model.overrides.channels=[4, 8, 16, 32, 64]"]
# the pretrained encoder stays; 64 px (any multiple of 32 suits it) keeps evaluation short
SMALL_DECODER = ["model.overrides.decoder_channels=[16, 8, 8, 8]", "model.overrides.image_size=64"]
SMALL = {  # narrower models: two steps and one evaluation in seconds on a CPU
    "lvit_monuseg": ["model.overrides.base_width=8", "model.overrides.context_dim=32"],
    "unet_monuseg": SMALL_UNET,
    "kvasir": SMALL_DECODER,
    "kvasir_unet": SMALL_UNET,
    "busi": SMALL_DECODER,
    "busi_unet": SMALL_UNET,
    "clipseg_busi": ["model.overrides.decoder_dim=16", "model.overrides.image_size=64"],
    "clipseg_busi_aligned": ["model.overrides.decoder_dim=16"],
}


def import_manifest(path: Path, shared: Path, tmp_path: Path) -> Path:
    """Run the recipe's documented import command with the shared data and a temporary output."""
    (command,) = IMPORT_LINE.findall(path.read_text(encoding="utf-8"))
    args = shlex.split(command)[1:]  # without "medalign"
    args[3] = str(shared / Path(args[3]).relative_to("../shared/data"))
    out = tmp_path / Path(args[args.index("--out") + 1]).name
    args[args.index("--out") + 1] = str(out)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.realdata
@pytest.mark.parametrize(
    ("name", "dataset"),
    [
        ("lvit_monuseg", "monuseg-text"),
        ("unet_monuseg", "monuseg-text"),
        ("kvasir", "kvasir-seg"),
        ("kvasir_unet", "kvasir-seg"),
        ("busi", "busi"),
        ("busi_unet", "busi"),
        ("clipseg_busi", "busi"),
        ("clipseg_busi_aligned", "busi"),
    ],
)
def test_recipe_trains_on_real_data(
    name: str, dataset: str, shared_data: Path, real_dataset, tmp_path: Path
) -> None:
    real_dataset(dataset)
    manifest = import_manifest(recipe(name), shared_data, tmp_path)
    overrides = [
        f"out={tmp_path / 'run'}",
        f"data.manifest={manifest}",
        "data.batch_size=2",
        "data.num_workers=0",
        "train.max_steps=2",
        "train.progress=false",
        "train.precision=32-true",  # bf16 autocast is slow on a CPU
        *SMALL[name],
    ]
    if name == "clipseg_busi_aligned":  # a tiny aligned model stands in for the MedPix bundle
        from medalign.bundle import save_bundle

        save_bundle(create_model("align_tiny", in_channels=1, image_size=64), tmp_path / "aligned")
        overrides.append(f"model.init_from={tmp_path / 'aligned'}")
    config = load_config(recipe(name), overrides)
    run = run_training(config, echo=lambda *_: None)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == config.eval.split and metrics["train"]["steps"] == 2
    # every test image is scored and the headline is their mean (a 2-step smoke run: what it must
    # get right is the evaluation, not the score; learning is tested in tests/models/test_learns_toys.py)
    assert metrics["n_images"] == len(metrics["per_case"]) > 0
    for key in ("dice", "hd95", "nsd"):
        assert metrics[key] == pytest.approx(sum(c[key] for c in metrics["per_case"]) / metrics["n_images"]), key


@pytest.mark.parametrize("path", CURRICULA, ids=lambda p: p.name)
def test_curriculum_stages_build_on_one_encoder(path: Path) -> None:
    """Every stage validates and builds; all stages share one tower, so ablations compare starts only."""
    from medalign.pipeline.curriculum import load_curriculum, stage_config

    curriculum = load_curriculum(path)
    assert str(curriculum.out).startswith("runs/") and curriculum.headline
    stages = list(curriculum.stages)
    assert stages == [1, 2, 3]
    towers = []
    for number in stages:
        config = stage_config(curriculum, stages[: stages.index(number) + 1])
        validate_ranges(config)
        if config.data.manifest:
            commands = IMPORT_LINE.findall(path.read_text(encoding="utf-8"))
            assert any(f"--out {config.data.manifest}" in c for c in commands), path.name
        model = build_architecture(config)  # standalone: the chain's init_from does not exist yet
        channels = model.vision.model.config.num_channels  # one tower input (late fusion stacks several)
        towers.append(
            (model.config.vision.kind, model.vision.hf_config_dict()["hidden_size"], model.config.image_size,
             channels, model.vision.patch_size, model.vision.model.config.num_hidden_layers)
        )  # fmt: skip
    assert len(set(towers)) == 1, towers
    tasks = [stage_config(curriculum, stages[: i + 1]).task for i in range(len(stages))]
    assert tasks[:2] == ["pretrain", "align"] and tasks[2] in ("clinical", "report")

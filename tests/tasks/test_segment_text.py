"""Prompt-guided segmentation beyond the model: batches that hold one image with several prompts,
negatives, prompt dropout, flips that mirror the prompt, the true/shuffled/empty evaluation, and
Predictor / CLI predictions that equal the evaluation's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import medalign
from medalign.bundle import save_bundle
from medalign.cli import app
from medalign.config import PromptConfig, load_config
from medalign.data.dataset import Collator, DatasetConfig, ManifestDataset
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom, parse_prompt
from medalign.data.transforms import AugmentConfig, PreprocessConfig, mirror_words
from medalign.models import create_model
from medalign.models.towers import TINY_BERT
from medalign.tasks.segment import (
    PromptGroups,
    evaluate_segmentation,
    flatten_groups,
    image_groups,
    predict_probabilities,
    prompt_variant,
    segmentation_dataset,
    shuffled_donors,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
KEYS = ["image:a", "image:b"]
SMALL = {"in_channels": 2, "image_size": 64, "base_width": 4, "context_dim": 16, "text": TINY_BERT}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cases = generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=24, size=64))
    return cases.with_name("prompts.csv")


def dataset(prompts: Path, split: str = "train", augment: AugmentConfig | None = None) -> ManifestDataset:
    config = DatasetConfig(
        modalities=tuple(KEYS),
        mask="mask",
        label=None,
        preprocess=PreprocessConfig(size=(64, 64)),
        augment=augment,
    )
    return ManifestDataset(read_manifest(prompts), config, split=split)


def test_mirror_words_swaps_sides_for_the_flipped_axis_only() -> None:
    text = "The lesion in the Left upper zone, LEFT-sided; leftover right"
    assert mirror_words(text, (1,)) == "The lesion in the Right upper zone, RIGHT-sided; leftover left"
    assert mirror_words(text, (0,)) == "The lesion in the Left lower zone, LEFT-sided; leftover right"
    assert mirror_words("top left", (0, 1)) == "bottom right"
    assert mirror_words("left", (0,), dims=3) == "left"  # the depth axis of a volume names no side
    assert mirror_words("", (1,)) == ""


def test_a_flip_mirrors_the_prompt_and_the_attributes_with_the_image(prompts: Path) -> None:
    plain = dataset(prompts)
    flip = AugmentConfig(flip_axes=(1,), flip_prob=1.0, affine_prob=0.0, intensity_prob=0.0)
    flipped = dataset(prompts, augment=flip)
    for index in range(4):
        a, b = plain[index], flipped[index, 7]
        torch.testing.assert_close(b["image:a"], a["image:a"].flip(-1))
        torch.testing.assert_close(b["mask"], a["mask"].flip(-1))
        side, zone = parse_prompt(a["text"])
        assert parse_prompt(b["text"]) == ({"left": "right", "right": "left"}[side], zone)
        assert b["attrs"]["side"] == {"left": "right", "right": "left"}[a["attrs"]["side"]]
        assert b["attrs"]["zone"] == a["attrs"]["zone"]


def test_prompt_groups_show_one_image_with_several_prompts_and_targets(prompts: Path) -> None:
    always_flipped = AugmentConfig(flip_axes=(1,), flip_prob=1.0, rotate_degrees=5)
    base = dataset(prompts, augment=always_flipped)
    config = PromptConfig(per_image=3, negatives_from=["attr:side", "attr:zone"])
    groups = PromptGroups(base, config, "mask")
    assert len(groups) == len(image_groups(base)) < len(base)
    table = base.manifest.table
    for g in range(len(groups)):
        samples = groups[g, 11]
        assert len(samples) == 3
        rows = groups.groups[g]
        own = {parse_prompt(table["text"].iat[r]) for r in rows}
        for sample in samples:
            torch.testing.assert_close(sample["image:a"], samples[0]["image:a"])  # one augmentation draw
        for sample in samples[len(rows) :]:  # the slots its own prompts could not fill
            assert not sample["mask"].any()
        # every draw flips, and the prompts with it: mirrored back they name the manifest's cells
        named = [parse_prompt(mirror_words(s["text"], (1,))) for s in samples]
        assert set(named[: len(rows)]) <= own
        assert not set(named[len(rows) :]) & own  # negatives name cells without a lesion here
    again = PromptGroups(base, config, "mask")[0, 11]
    torch.testing.assert_close(again[0]["mask"], groups[0, 11][0]["mask"])  # a function of the seed


def test_prompt_dropout_asks_for_every_target_of_the_image(prompts: Path) -> None:
    base = dataset(prompts)
    groups = PromptGroups(base, PromptConfig(per_image=2, dropout=0.999), "mask")
    g = next(i for i, rows in enumerate(groups.groups) if len(rows) > 1)
    samples = groups[g, 3]
    union = torch.stack([base[r]["mask"] for r in groups.groups[g]]).amax(dim=0)
    for sample in samples:
        assert sample["text"] == "" and all(v == "" for v in sample["attrs"].values())
        torch.testing.assert_close(sample["mask"], union)
    batch = flatten_groups(Collator())([samples, samples])
    assert batch["mask"].shape[0] == 4


def test_shuffled_prompts_come_from_another_image_and_differ(prompts: Path) -> None:
    base = dataset(prompts, split="test")
    donors = shuffled_donors(base)
    group_of = {r: g for g, rows in enumerate(image_groups(base)) for r in rows}
    table = base.manifest.table
    assert all(group_of[d] != group_of[r] for r, d in enumerate(donors))
    assert all(table["text"].iat[d] != table["text"].iat[r] for r, d in enumerate(donors))
    shuffled, empty = prompt_variant(base, "shuffled"), prompt_variant(base, "empty")
    for r in range(len(base)):
        assert shuffled[r]["text"] == table["text"].iat[donors[r]]
        torch.testing.assert_close(shuffled[r]["mask"], base[r]["mask"])  # the true target stays
        assert empty[r]["text"] == ""


def test_evaluation_reports_true_shuffled_and_empty_prompts(prompts: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("text_guided", **SMALL).eval()
    config = load_config(REPO / "configs" / "segment" / "phantom_text.yaml", [f"data.manifest={prompts}"])
    manifest = read_manifest(prompts)
    metrics = evaluate_segmentation(model, manifest, config, KEYS, "test")
    ablation = metrics["prompt_ablation"]
    assert list(ablation) == ["true", "shuffled", "empty"]
    assert ablation["true"]["dice"] == metrics["dice"]
    assert all(v["n_images"] == metrics["n_images"] for v in ablation.values())
    image_only = create_model("unet", in_channels=2, image_size=64, channels=[4, 8, 16])
    assert "prompt_ablation" not in evaluate_segmentation(image_only, manifest, config, KEYS, "test")

    save_bundle(model, tmp_path / "bundle")
    args = ["eval", "segment", "--model", str(tmp_path / "bundle"), "--manifest", str(prompts),
            "--modality", "image:a", "--modality", "image:b", "--out", str(tmp_path / "m.json")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "shuffled" in result.output
    assert json.loads((tmp_path / "m.json").read_text())["prompt_ablation"] == ablation
    page = (tmp_path / "m.html").read_text()
    assert "Prompt ablation" in page and "shuffled" in page and "empty" in page


def test_predictor_and_cli_predict_what_evaluation_scores(prompts: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_bundle(create_model("text_guided", **SMALL), tmp_path / "bundle")
    predictor = medalign.load(str(tmp_path / "bundle"))
    config = load_config(REPO / "configs" / "segment" / "phantom_text.yaml", [f"data.manifest={prompts}"])
    manifest = read_manifest(prompts)
    test = segmentation_dataset(config, manifest, predictor.model, KEYS, "test", augment=False)
    row = test.manifest.table.iloc[0]
    files = {k.split(":")[1]: str(manifest.resolve(row[k])) for k in KEYS}
    for variant in ("true", "empty"):
        sample = prompt_variant(test, variant)[0]
        expected = predict_probabilities(predictor.model, Collator(predictor.tokenizer)([sample]), KEYS)[0]
        got = predictor.segment(files, text=sample["text"])
        np.testing.assert_allclose(got, expected, atol=1e-5)
        out = tmp_path / f"{variant}.png"
        args = ["predict", "segment", "--model", str(tmp_path / "bundle"), "--image", f"a={files['a']}",
                "--image", f"b={files['b']}", "--text", sample["text"], "--out", str(out)]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(out)) > 0, expected > 0.5)


def test_attribute_models_predict_from_findings(prompts: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    vocab = {"side": ["left", "right"], "zone": ["upper", "middle", "lower"]}
    save_bundle(
        create_model("text_guided", **{**SMALL, "text": None, "attributes_vocab": vocab}), tmp_path / "b"
    )
    predictor = medalign.load(str(tmp_path / "b"))
    row = read_manifest(prompts).table.iloc[0]
    files = [str(read_manifest(prompts).resolve(row[k])) for k in KEYS]
    left = predictor.segment(
        dict(zip("ab", files, strict=True)), attributes={"side": "left", "zone": "lower"}
    )
    right = predictor.segment(
        dict(zip("ab", files, strict=True)), attributes={"side": "right", "zone": "lower"}
    )
    assert left.shape == (64, 64) and not np.allclose(left, right)
    args = ["predict", "segment", "--model", str(tmp_path / "b"), "--image", f"a={files[0]}", "--image", f"b={files[1]}",
            "--attribute", "side=left", "--attribute", "zone=lower", "--out", str(tmp_path / "m.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, [*args[:-4], "--attribute", "side", "--out", str(tmp_path / "x.png")])
    assert bad.exit_code != 0 and "NAME=VALUE" in bad.output

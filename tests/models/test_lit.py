"""Dual encoders and clinical heads on pretrained CNN towers: LiT's locked / partly tuned image
tower, local alignment, adapters' refusal, export, index, zero-shot and probes on EfficientNet."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medalign.losses import ContrastiveLoss
from medalign.models import DualEncoder, apply_adapters, create_model, freeze_tower
from medalign.models.adapters import last_blocks
from medalign.models.towers import TINY_BERT

pytestmark = pytest.mark.usefixtures("one_thread")

LITE0 = {"source": "efficientnet-lite0"}


def _lit(**overrides: object) -> DualEncoder:
    """Locked ImageNet EfficientNet-Lite0 at 64 px + a tiny random text tower (fast)."""
    torch.manual_seed(0)
    base = {"text": TINY_BERT, "image_size": 64, "in_channels": 1, "embed_dim": 32}
    return create_model("align_effnet_minilm", **{**base, **overrides})


def _patterns(n: int, size: int = 64) -> torch.Tensor:
    """``n`` gray images that differ in stripe orientation, frequency and brightness."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(n):
        angle = torch.tensor(i * 0.7)
        wave = torch.sin((x * torch.cos(angle) + y * torch.sin(angle)) * (4 + 3 * i))
        images.append(0.5 + 0.4 * wave * (0.4 + 0.12 * i))
    return torch.stack(images)[:, None].clamp(0, 1)


def test_registered_lit_model_locks_its_pretrained_image_tower() -> None:
    model = _lit()
    assert model.config.vision.kind == "efficientnet_lite" and model.config.freeze_vision
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.image_proj.parameters())
    model.train()
    assert not model.vision.training and model.text.training  # locked: BatchNorm statistics stay


def test_trainable_blocks_leave_the_last_blocks_and_the_head_trainable() -> None:
    model = _lit(trainable_blocks={"vision": 2})
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    n_blocks = len(model.vision.blocks)
    assert {n.split(".")[1] for n in trainable if n.startswith("blocks.")} == {str(n_blocks - 2), str(n_blocks - 1)}
    assert {"head.weight", "head_norm.weight"} <= trainable and "stem.weight" not in trainable
    assert trainable == last_blocks(model.vision, 2)
    # the choice is part of the config: a rebuilt model (a bundle) freezes the same way
    rebuilt = DualEncoder(model.config)
    assert {n for n, p in rebuilt.vision.named_parameters() if p.requires_grad} == trainable
    # text towers count their transformer layers the same way
    text = _lit(freeze_text=True, trainable_blocks={"text": 1})
    tuned = {n for n, p in text.text.named_parameters() if p.requires_grad}
    assert tuned and all(".layer.1." in n for n in tuned)
    freeze_tower(text, "text")
    assert not any(p.requires_grad for p in text.text.parameters()) and text.config.trainable_blocks == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"freeze_vision": False, "trainable_blocks": {"vision": 2}}, "needs freeze_vision: true"),
        ({"trainable_blocks": {"vision": 0}}, "positive number of blocks"),
        ({"trainable_blocks": {"audio": 1}}, "not a tower"),
        ({"trainable_blocks": {"vision": 99}}, "between 1 and the tower's 16 blocks"),
    ],
)
def test_trainable_blocks_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _lit(**overrides)


@pytest.mark.parametrize("spec", [{"type": "mona"}, {"type": "lora", "r": 4}], ids=["mona", "lora"])
def test_adapters_refuse_a_convolutional_tower_and_name_the_alternatives(spec: dict) -> None:
    model = _lit()
    with pytest.raises(ValueError, match=r"efficientnet_lite.*trainable_blocks.*lr_multipliers"):
        apply_adapters(model, {"vision": spec})
    assert model.config.adapters == {}  # nothing recorded
    apply_adapters(model, {"text": {"type": "lora", "r": 4}})  # the transformer text tower takes one
    with pytest.raises(ValueError, match="efficientnet_lite"):
        DualEncoder(model.config.replace(adapters={"vision": spec}))


def test_locked_tower_lit_learns_to_pair_images_with_captions() -> None:
    """Only the projections, temperature and text tower train; global + local losses drop and
    in-batch retrieval goes from what random projections give to every pair right."""
    model = _lit()
    pixels = _patterns(6)
    captions = ["first", "second pattern", "third one here", "a fourth", "the fifth stripes", "six"]
    tokens = model.tokenize(captions)
    criterion = ContrastiveLoss(local_weight=0.5)
    frozen = copy.deepcopy(model.vision.state_dict())
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def step() -> tuple[torch.Tensor, float]:
        out = model(pixels, **tokens, return_tokens=True)
        accuracy = float((out["image_embeds"] @ out["text_embeds"].T).argmax(1).eq(torch.arange(6)).float().mean())
        return criterion(out)["loss"], accuracy

    model.train()
    first, accuracy_before = step()
    for _ in range(40):
        loss, _ = step()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        last, accuracy_after = step()
    assert float(last) < 0.3 * float(first.detach())
    assert accuracy_after == 1.0 and accuracy_before < 1.0
    for name, value in model.vision.state_dict().items():
        assert torch.equal(value, frozen[name]), name  # locked, BatchNorm statistics included


def test_partly_tuned_tower_moves_only_its_last_blocks() -> None:
    model = _lit(trainable_blocks={"vision": 1})
    before = copy.deepcopy(model.vision.state_dict())
    tokens = model.tokenize(["a", "b", "c"])
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = ContrastiveLoss()(model(_patterns(3), **tokens))["loss"]
    loss.backward()
    optimiser.step()
    moved = {n for n, v in model.vision.state_dict().items() if not torch.equal(v, before[n])}
    last = str(len(model.vision.blocks) - 1)
    assert moved and all(n.startswith((f"blocks.{last}.", "head")) for n in moved)
    assert not any("running_" in n for n in moved)  # BatchNorm statistics stay ImageNet's


def test_zero_shot_retrieval_and_tower_probe_on_a_cnn_model(tmp_path: Path) -> None:
    from medalign.data.dataset import dataset_for_model
    from medalign.data.manifest import read_manifest
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.evaluation import alignment as ev

    manifest = read_manifest(generate_phantom(tmp_path / "ph", PhantomConfig(n=24, size=64)))
    model = _lit().eval()
    keys = ["image:a"]
    test = ev.embed_split(model, dataset_for_model(manifest, model, "test", "label", keys))
    assert test.image.shape[1] == 32 and np.allclose(np.linalg.norm(test.image, axis=1), 1, atol=1e-2)  # bf16
    assert 0 <= ev.zero_shot(model, test, "phantom_diagnosis")["n"] == int((test.labels >= 0).sum())
    assert ev.retrieval(test)["image_to_text"]["n_queries"] == len(test.case_ids)
    tower = ev.embed_split(model, dataset_for_model(manifest, model, "test", "label", keys), features="tower")
    assert tower.image.shape == (len(test.case_ids), 1280) and tower.text is None
    with pytest.raises(ValueError, match="features must be one of"):
        ev.embed_split(model, dataset_for_model(manifest, model, "test", "label", keys), features="cls")


def test_onnx_export_of_the_cnn_vision_part_matches_pytorch(tmp_path: Path) -> None:
    """Export traces EfficientNet's static-padding convolutions, here at 96 px although the model
    was built for 64 (a CNN tower takes any multiple of 32; 80 px is refused). One export of a
    3.4M-parameter CNN with its ONNX Runtime check takes ~15 s."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from medalign.bundle import load_bundle, save_bundle
    from medalign.inference.export import ExportError, _session, export_onnx

    bundle = save_bundle(_lit(trainable_blocks={"vision": 1}).eval(), tmp_path / "bundle")
    with pytest.raises(ExportError, match="multiple of 32"):
        export_onnx(bundle, tmp_path / "onnx80", parts=["vision"], image_size=80)
    export_onnx(bundle, tmp_path / "onnx", parts=["vision"], image_size=96)
    info = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert info["parts"]["vision"]["max_abs_diff"] < 1e-4 and info["preprocessing"]["image_size"] == 96
    model = load_bundle(bundle)
    pixels = torch.rand(4, 1, 96, 96, generator=torch.Generator().manual_seed(1))
    got = _session(tmp_path / "onnx" / "vision.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        assert float(np.abs(got - model.encode_image(pixels).numpy()).max()) < 1e-4


def test_index_of_a_cnn_bundle_finds_each_case_itself(tmp_path: Path) -> None:
    import medalign
    from medalign.bundle import save_bundle
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.inference.case_index import EmbeddingIndex, build_from_manifest

    bundle = save_bundle(_lit().eval(), tmp_path / "bundle")
    manifest = generate_phantom(tmp_path / "ph", PhantomConfig(n=12, size=64))
    index = build_from_manifest(medalign.load(str(bundle)), manifest, column="image:a")
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    hits = loaded.search(np.asarray(loaded.embeddings[3:4], dtype=np.float32), 1)
    assert int(hits.indices[0, 0]) == 3 and float(hits.scores[0, 0]) == pytest.approx(1, abs=1e-3)


def test_aligned_cnn_bundle_starts_a_clinical_model_that_learns(tmp_path: Path) -> None:
    """init_from hands an EfficientNet tower across bundle kinds; the diagnosis head then fits a
    toy (bright vs dark patterns) that the untrained head gets at chance."""
    from medalign.bundle import save_bundle
    from medalign.config import RunConfig
    from medalign.pipeline.run import build_model

    aligned = _lit(trainable_blocks={"vision": 1})
    bundle = save_bundle(aligned.eval(), tmp_path / "aligned")
    config = RunConfig(task="clinical")
    config.model.name, config.model.init_from = "clinical_effnet", str(bundle)
    # partly tuned: the last block and the head train, BatchNorm keeps ImageNet's statistics
    config.model.overrides = {
        "hidden_size": 32, "dropout": 0.0, "freeze_vision": True, "trainable_blocks": {"vision": 1}
    }
    model = build_model(config)
    assert model.config.vision.kind == "efficientnet_lite" and model.config.image_stats() == aligned.config.image_stats()
    for name, value in aligned.vision.state_dict().items():
        assert torch.equal(model.vision.state_dict()[name], value), name

    pixels = _patterns(8)
    labels = torch.tensor([0, 1] * 4)
    pixels = torch.where(labels[:, None, None, None] == 1, pixels * 0.3, 0.7 + pixels * 0.3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    assert not model.vision.training
    with torch.no_grad():
        first = F.cross_entropy(model(pixels)["logits"], labels)
    for _ in range(25):
        loss = F.cross_entropy(model(pixels)["logits"], labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        logits = model(pixels)["logits"]
    assert float(F.cross_entropy(logits, labels)) < 0.2 * float(first)
    assert bool((logits.argmax(1) == labels).all())


def test_cli_probes_the_tower_of_a_clinical_bundle(tmp_path: Path) -> None:
    """``eval probe --features tower`` reads any bundle with a vision tower (a clinical one has no
    image embedding of its own); a model without one is refused in one line."""
    from typer.testing import CliRunner

    from medalign.bundle import save_bundle
    from medalign.cli import app
    from medalign.data.phantom import PhantomConfig, generate_phantom

    manifest = generate_phantom(tmp_path / "ph", PhantomConfig(n=40, size=64))
    model = create_model("clinical_effnet", image_size=64, num_classes=3).eval()
    bundle = save_bundle(model, tmp_path / "clinical")
    args = ["eval", "probe", "--model", str(bundle), "--manifest", str(manifest), "--modality", "image:a"]
    args += ["--features", "tower"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "probe.json")])
    assert result.exit_code == 0, result.output
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["n_features"] == 1280 and probe["n_test"] > 0 and "balanced_accuracy" in probe["test"]
    wrong = CliRunner().invoke(app, [*args[:-1], "cls"])
    assert wrong.exit_code != 0 and "features must be one of" in wrong.output

from __future__ import annotations

from pathlib import Path

import pytest

from medalign.data.manifest import Manifest, ManifestMeta, new_table
from medalign.evaluation.zeroshot import build_class_prompts, load_templates, resolve_classes
from medalign.tasks.align import texts_from_labels


def test_texts_from_labels_fills_only_empty_cells_deterministically(tmp_path: Path) -> None:
    rows = [
        {"case_id": f"c{i}", "image": "x.png", "label": "benign" if i % 2 else "malignant"} for i in range(6)
    ]
    rows[0]["text"] = "kept as written"
    manifest = Manifest(
        new_table(rows), tmp_path, ManifestMeta(classes={"label": ["benign", "malignant", "normal"]})
    )
    first = texts_from_labels(manifest, "busi", "label").table
    again = texts_from_labels(manifest, "busi", "label").table
    assert first["text"].tolist() == again["text"].tolist()
    assert first.at[0, "text"] == "kept as written"
    spec = load_templates("busi")
    prompts = dict(
        zip(
            ["benign", "malignant"],
            build_class_prompts(spec["templates"], resolve_classes(spec, ["benign", "malignant"])),
            strict=True,
        )
    )
    for text, label in zip(first["text"][1:], first["label"][1:], strict=True):
        assert text in prompts[label]
    assert len(set(first["text"][1:])) > 1  # templates vary across cases
    assert manifest.table["text"].tolist()[1] == ""  # the input manifest is not modified


def test_texts_from_labels_with_a_template_file_without_classes(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text('templates: ["an ultrasound of a {} lesion."]\n')
    manifest = Manifest(new_table([{"case_id": "a", "image": "x.png", "label": "cyst"}]), tmp_path)
    assert texts_from_labels(manifest, str(tmp_path / "t.yaml"), "label").table.at[0, "text"] == (
        "an ultrasound of a cyst lesion."
    )
    with pytest.raises(ValueError, match="not in the template file"):
        texts_from_labels(manifest, "busi", "label")


def test_modality_rows_and_nested_train_fractions(tmp_path: Path) -> None:
    from medalign.data.manifest import read_manifest
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.data.run_manifest import modality_rows, subsample_train

    manifest = read_manifest(generate_phantom(tmp_path / "ph", PhantomConfig(n=30, size=64)))
    rows = modality_rows(manifest, ["image:a", "image:b"])
    assert rows.image_columns == ["image"] and len(rows) == 2 * len(manifest)
    first = rows.table.iloc[:2]
    assert list(first["case_id"]) == ["ph0000/a", "ph0000/b"] and set(first["patient_id"]) == {"ph0000"}
    assert list(first["image"]) == list(manifest.table.loc[0, ["image:a", "image:b"]])
    assert list(first["attr:modality"]) == ["a", "b"] and first["text"].nunique() == 1

    def train_patients(fraction: float, seed: int = 0) -> set[str]:
        table = subsample_train(manifest, fraction, seed).table
        assert (table["split"] != "train").sum() == (manifest.table["split"] != "train").sum()
        return set(table.loc[table["split"] == "train", "patient_id"])

    n_train = (manifest.table["split"] == "train").sum()
    small, half, full = train_patients(0.1), train_patients(0.5), train_patients(1.0)
    assert len(small) == -(-n_train // 10) and len(half) == -(-n_train // 2) and len(full) == n_train
    assert small <= half <= full  # nested subsets
    assert train_patients(0.5, seed=1) != half  # the seed picks another subset


def test_training_from_shards_matches_training_from_the_manifest(tmp_path: Path) -> None:
    """One step on the whole train split (no augmentation): the same samples give the same loss."""
    import torch

    from medalign.config import load_config
    from medalign.data.manifest import read_manifest
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.data.shards import write_shards
    from medalign.pipeline.run import run_training

    source = generate_phantom(tmp_path / "ph", PhantomConfig(n=16, size=64))
    write_shards(read_manifest(source), tmp_path / "shards", 3)
    n_train = len(read_manifest(source).split("train"))
    repo = Path(__file__).resolve().parents[2]

    def train(out: str, *extra: str) -> dict:
        overrides = [
            f"out={tmp_path / out}", f"data.manifest={source}", "data.phantom=null", "model.name=align_tiny",
            "model.overrides={in_channels: 2, image_size: 64, freeze_text: true}", f"data.batch_size={n_train}",
            "data.augment=false", "data.num_workers=0", "train.epochs=1", "train.precision=32-true",
            "train.progress=false", "train.keep_checkpoints=true", "eval.zeroshot=null", "eval.retrieval=false", *extra,
        ]  # fmt: skip
        run = run_training(load_config(repo / "configs" / "align" / "phantom.yaml", overrides))
        return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)

    manifest, shards = train("manifest"), train("shards", f"data.shards={tmp_path / 'shards'}")
    assert shards["step"] == manifest["step"] == 1
    assert shards["history"][0]["loss"] == pytest.approx(manifest["history"][0]["loss"], rel=1e-5)  # the same samples in another order
    for key, value in manifest["model"].items():
        torch.testing.assert_close(shards["model"][key], value, rtol=1e-4, atol=1e-5)

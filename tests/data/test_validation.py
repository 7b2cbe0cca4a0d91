from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.manifest import Manifest, ManifestMeta, new_table, read_manifest, write_manifest
from medalign.data.validation import errors, validate_manifest


def _png(path: Path, shape: tuple[int, int], value: int = 128) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, dtype=np.uint8)).save(path)
    return path.name


def _five_problem_manifest(tmp_path: Path) -> Path:
    """Rows 2-6 each carry exactly one of the five problems the acceptance names."""
    for i in range(6):
        _png(tmp_path / f"img{i}.png", (32, 32))
        _png(tmp_path / f"mask{i}.png", (32, 32), 255)
    _png(tmp_path / "small_mask.png", (16, 16), 255)
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "img0.png").read_bytes()[:40])
    rows = [
        {"case_id": "ok", "image": "img0.png", "mask": "mask0.png", "label": "benign"},
        {"case_id": "missing", "image": "nowhere.png", "mask": "mask1.png", "label": "benign"},
        {"case_id": "corrupt", "image": "corrupt.png", "mask": "mask2.png", "label": "benign"},
        {"case_id": "badmask", "image": "img3.png", "mask": "small_mask.png", "label": "benign"},
        {"case_id": "ok", "image": "img4.png", "mask": "mask4.png", "label": "malignant"},
        {"case_id": "unknown", "image": "img5.png", "mask": "mask5.png", "label": "cancer?"},
    ]
    meta = ManifestMeta(classes={"label": ["benign", "malignant"]})
    return write_manifest(new_table(rows), tmp_path / "manifest.csv", meta=meta)


def test_all_five_problems_reported_at_once(tmp_path: Path) -> None:
    problems = errors(validate_manifest(read_manifest(_five_problem_manifest(tmp_path))))
    by_row = {p.row + 1: p for p in problems}
    assert sorted(by_row) == [2, 3, 4, 5, 6], [str(p) for p in problems]
    assert by_row[2].column == "image" and "does not exist" in by_row[2].reason
    assert by_row[3].column == "image" and "corrupt.png" in by_row[3].reason
    assert by_row[4].column == "mask" and "16x16" in by_row[4].reason and "32x32" in by_row[4].reason
    assert by_row[5].column == "case_id" and "duplicate" in by_row[5].reason and "row 1" in by_row[5].reason
    assert by_row[6].column == "label" and "'cancer?'" in by_row[6].reason


def test_cli_validate_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "validate", str(_five_problem_manifest(tmp_path))])
    assert result.exit_code == 1
    for row in (2, 3, 4, 5, 6):
        assert f"row {row} " in result.output
    assert "5 errors" in result.output


def test_cli_drop_invalid_writes_clean_manifest_and_log(tmp_path: Path) -> None:
    manifest = _five_problem_manifest(tmp_path)
    out = tmp_path / "clean.csv"
    result = CliRunner().invoke(app, ["data", "validate", str(manifest), "--drop-invalid", "--out", str(out)])
    assert result.exit_code == 0, result.output
    clean = read_manifest(out)
    assert clean.table["case_id"].tolist() == ["ok"]
    assert not errors(validate_manifest(clean))
    log = pd.read_csv(tmp_path / "clean.csv.dropped.csv")
    assert sorted(log["row"].tolist()) == [2, 3, 4, 5, 6]
    assert set(log["case_id"]) == {"missing", "corrupt", "badmask", "ok", "unknown"}


def test_mask_values_and_threshold(tmp_path: Path) -> None:
    _png(tmp_path / "img.png", (8, 8))
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tmp_path / "soft.png")
    table = new_table([{"case_id": "a", "image": "img.png", "mask": "soft.png"}])
    problems = errors(validate_manifest(Manifest(table, tmp_path)))
    assert len(problems) == 1 and "values other than 0/1/255" in problems[0].reason
    assert not errors(validate_manifest(Manifest(table, tmp_path, ManifestMeta(mask_threshold=127))))


def test_split_survival_and_schema_problems(tmp_path: Path) -> None:
    _png(tmp_path / "img.png", (8, 8))
    table = new_table(
        [
            {"case_id": "a", "split": "dev", "image": "img.png", "time": "-1", "event": "1", "oops": "x"},
            {"case_id": "", "split": "train", "image": "", "time": "4", "event": "yes"},
        ]
    )
    problems = validate_manifest(Manifest(table, tmp_path))
    reasons = [str(p) for p in problems]
    assert any("split 'dev'" in r for r in reasons)
    assert any("time '-1'" in r for r in reasons)
    assert any("event 'yes'" in r for r in reasons)
    assert any("empty case_id" in r for r in reasons)
    assert any("no image in any modality" in r for r in reasons)
    assert any(p.severity == "warning" and p.column == "oops" for p in problems)


def test_text_only_skips_files_but_requires_text(tmp_path: Path) -> None:
    table = new_table(
        [{"case_id": "a", "image": "gone.png", "text": ""}, {"case_id": "b", "image": "x.png", "text": "ok"}]
    )
    manifest = Manifest(table, tmp_path)
    assert any("does not exist" in p.reason for p in errors(validate_manifest(manifest)))
    text_only = errors(validate_manifest(manifest, text_only=True))
    assert [(p.row, p.column) for p in text_only] == [(0, "text")]


@pytest.mark.parametrize("drop", [False, True])
def test_table_level_error_cannot_be_dropped(tmp_path: Path, drop: bool) -> None:
    path = write_manifest(new_table([{"image": "a.png"}]), tmp_path / "m.csv")
    args = ["data", "validate", str(path)] + (["--drop-invalid"] if drop else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0


def test_bad_cells_are_reported_by_row_file_and_reason(tmp_path: Path) -> None:
    """Blank scans and empty text warn (training still runs); NaN pixels and paths that leave the
    root are errors; every message names the row and the file or reason."""
    _png(tmp_path / "data" / "blank.png", (8, 8), value=0)
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "data" / "ok.png")
    nan = np.ones((8, 8), np.float32)
    nan[0, 0] = np.nan
    np.save(tmp_path / "data" / "nan.npy", nan)
    Image.fromarray(np.eye(8, dtype=np.uint8)).save(tmp_path / "elsewhere.png")
    rows = [
        {"case_id": "ok", "image": "ok.png", "text": "a lesion"},
        {"case_id": "blank", "image": "blank.png", "text": "a lesion"},
        {"case_id": "notext", "image": "ok.png", "text": ""},
        {"case_id": "nan", "image": "nan.npy", "text": "x"},
        {"case_id": "up", "image": "../elsewhere.png", "text": "x"},
        {"case_id": "passwd", "image": "../../../../../../etc/passwd", "text": "x"},
        {"case_id": "abs", "image": str(tmp_path / "elsewhere.png"), "text": "x"},
    ]
    manifest = Manifest(new_table(rows), tmp_path / "data")
    found = {(p.case_id, p.severity): str(p) for p in validate_manifest(manifest)}
    assert set(found) == {
        ("blank", "warning"),
        ("notext", "warning"),
        ("nan", "error"),
        ("up", "error"),
        ("passwd", "error"),
        ("abs", "error"),
    }, found
    assert (
        "row 2 (case_id=blank)" in found["blank", "warning"]
        and "every pixel is 0" in found["blank", "warning"]
    )
    assert "row 3" in found["notext", "warning"] and "empty text" in found["notext", "warning"]
    assert "nan.npy" in found["nan", "error"] and "NaN/Inf" in found["nan", "error"]
    for case in ("up", "passwd", "abs"):
        assert (
            "outside the manifest root" in found[case, "error"]
            and "allow_outside_root" in found[case, "error"]
        )
    assert "'../../../../../../etc/passwd'" in found["passwd", "error"]
    manifest.meta.allow_outside_root = True  # opt-in: data that lives elsewhere is read and checked
    opted = {(p.case_id, p.severity) for p in errors(validate_manifest(manifest))}
    assert opted == {("nan", "error"), ("passwd", "error")}  # /etc/passwd is now read: not an image


def test_volumes_stored_in_another_orientation_are_flagged(tmp_path: Path) -> None:
    import nibabel as nib

    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # not blank: no warning of its own
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    for name, affine in [("a", np.eye(4)), ("b", np.eye(4)), ("c", flipped)]:
        nib.save(nib.Nifti1Image(volume, affine), str(tmp_path / f"{name}.nii.gz"))
    table = new_table([{"case_id": n, "image": f"{n}.nii.gz"} for n in "abc"])
    problems = validate_manifest(Manifest(table, tmp_path))
    assert [(p.case_id, p.severity) for p in problems] == [("c", "warning")]
    assert "stored LAS while 2 other volume(s) are RAS" in problems[0].reason


def test_shipped_importer_rows_stay_inside_their_root(tmp_path: Path) -> None:
    from medalign.data.importers import import_dataset

    for split, label in [("train", "a"), ("test", "b")]:
        _png(tmp_path / "src" / split / label / "x.png", (8, 8))
    written = import_dataset("folders", tmp_path / "src", tmp_path / "out" / "m.csv")
    assert not written.meta.allow_outside_root and not written.rows_outside_root()
    assert not errors(validate_manifest(written))


def _noise(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path.name


def test_masks_imported_as_images_are_a_warning(tmp_path: Path) -> None:
    """The trace of `folders` on images/ + masks/: binary images sharing stems with real ones."""
    rows = []
    (tmp_path / "masks").mkdir()
    for n in range(3):
        _noise(tmp_path / "images" / f"{n}.png", n)
        square = np.zeros((16, 16), np.uint8)
        square[4 : 8 + n, 5:9] = 255
        Image.fromarray(square).save(tmp_path / "masks" / f"{n}.png")
        rows += [
            {"case_id": f"i{n}", "image": f"images/{n}.png", "label": "images"},
            {"case_id": f"m{n}", "image": f"masks/{n}.png", "label": "masks"},
        ]
    _png(tmp_path / "masks" / "lonely.png", (16, 16), 255)  # binary, but no image shares its stem
    rows.append({"case_id": "lonely", "image": "masks/lonely.png", "label": "masks"})
    manifest = Manifest(new_table(rows), base_dir=tmp_path)
    warnings = [p for p in validate_manifest(manifest) if "look like masks" in p.reason]
    assert len(warnings) == 1 and warnings[0].severity == "warning" and warnings[0].column == "image"
    assert warnings[0].reason.startswith("3 image(s) look like masks")
    assert "'masks/0.png' ~ 'images/0.png'" in warnings[0].reason and "data import images" in warnings[0].reason
    clean = manifest.subset(manifest.table["label"] == "images")
    assert not [p for p in validate_manifest(clean) if "look like masks" in p.reason]


def test_missing_labels_and_leaky_frames_are_warnings(tmp_path: Path) -> None:
    rows = [
        {"case_id": f"s{s}f{f}", "image": f"seq{s}_frame{f:02d}.png", "split": split, "label": label}
        for s, (split, label) in enumerate([("train", "a"), ("test", "None"), ("train", "b")])
        for f in range(2)
    ]
    rows[-1]["split"] = "val"  # seq2's frames in train and val
    manifest = Manifest(new_table(rows), base_dir=tmp_path, meta=ManifestMeta(classes={"label": ["a", "b"]}))
    problems = validate_manifest(manifest, check_images=False)
    assert not [p for p in problems if p.severity == "error"]  # 'None' is a missing label, not a bad class
    (labels,) = [p for p in problems if p.column == "label"]
    assert labels.reason.startswith("2 of 6 rows have no label (case_id s1f0, s1f1); written as 'None'")
    (leak,) = [p for p in problems if p.column == "split"]
    assert "'seq2_frame#': train 1 (seq2_frame00), val 1 (seq2_frame01)" in leak.reason
    grouped = manifest.table.assign(patient_id=[r["case_id"][:2] for r in rows], split=["train"] * 6)
    assert not [p for p in validate_manifest(Manifest(grouped, tmp_path), check_images=False) if p.column == "split"]

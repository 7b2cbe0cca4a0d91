"""What every importer shares: discoverable options, grouping into patients, what the sidecar says."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from medalign.data.importers import IMPORTERS, DatasetImportError, load_dataset
from medalign.data.importers.options import INTERNAL_PARAMETERS
from medalign.data.importers.registry import COMMON_OPTIONS, import_warnings


def kvasir_like(root: Path, layouts, n: int) -> Path:
    for i in range(n):
        layouts.picture(root / "images" / f"id{i:02d}.png", i)
        layouts.mask(root / "masks" / f"id{i:02d}.png")
    return root


def test_every_option_of_every_importer_has_a_type_default_and_meaning() -> None:
    for name, spec in IMPORTERS.items():
        parameters = {
            p.name
            for p in inspect.signature(spec.fn).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in INTERNAL_PARAMETERS
        }
        assert {o.name for o in spec.options} == parameters, name
        for option in spec.all_options:
            assert option.type_label and option.default_label and len(option.help.split()) >= 4, (
                name,
                option,
            )
    assert {o.name for o in COMMON_OPTIONS} == {"group_by", "group_regex"}


def test_an_option_of_another_importer_is_a_one_line_error(tmp_path: Path, layouts) -> None:
    kvasir_like(tmp_path, layouts, 3)
    with pytest.raises(DatasetImportError) as error:
        load_dataset("kvasir", tmp_path, images="images")  # the raw TypeError, now named
    assert str(error.value) == (
        "unknown option 'images' for the 'kvasir' importer; valid options: seed, fractions, "
        "group_by, group_regex"
    )
    with pytest.raises(
        DatasetImportError, match=r"unknown import format 'kvasr' \(did you mean 'kvasir'\?\)"
    ):
        load_dataset("kvasr", tmp_path)


def test_grouping_redoes_a_seeded_split_by_patient(tmp_path: Path, layouts) -> None:
    """Kvasir has no patient ids; a file-name pattern makes them, and the seeded split follows."""
    src = kvasir_like(tmp_path, layouts, 12)
    plain = load_dataset("kvasir", src)
    assert plain.table["patient_id"].tolist() == plain.table["case_id"].tolist()
    grouped = load_dataset("kvasir", src, group_regex=r"id(?P<group>\d)")  # id00..id09 -> 0, id10, id11 -> 1
    table = grouped.table
    assert table["patient_id"].tolist() == ["0"] * 10 + ["1"] * 2
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    assert grouped.meta.extra["groups"] == {
        "source": "regex 'id(?P<group>\\d)' on the file names of 'image'",
        "groups": 2,
    }
    assert grouped.meta.extra["split_source"].endswith(
        "by regex 'id(?P<group>\\d)' on the file names of 'image'"
    )
    assert grouped.meta.extra["importer"]["options"] == {"group_regex": r"id(?P<group>\d)"}
    with pytest.raises(DatasetImportError, match="no column 'patient' to group by"):
        load_dataset("kvasir", src, group_by="patient")
    with pytest.raises(DatasetImportError, match="not a valid regular expression"):
        load_dataset("kvasir", src, group_regex="(")
    with pytest.raises(DatasetImportError, match="gives no group for any row"):
        load_dataset("kvasir", src, group_regex="^zzz")


def test_a_release_split_that_separates_a_group_is_reported(tmp_path: Path, layouts) -> None:
    for split, frames in (("train", (1, 2)), ("test", (3,))):
        for frame in frames:
            layouts.picture(tmp_path / split / "polyp" / f"seq1_f{frame}.png", frame)
        layouts.picture(tmp_path / split / "normal" / f"other{split}.png", 9)
    manifest = load_dataset("folders", tmp_path, group_regex=r"^(seq\d+)_")
    assert manifest.meta.extra["groups_across_splits"] == {"seq1": ["test", "train"]}
    assert manifest.table["split"].tolist().count("test") == 2  # the release split is kept as released
    assert import_warnings(manifest.meta) == [
        "the regex '^(seq\\d+)_' on the file names of 'image' gives no group for 2 case(s); each stays a "
        "patient of its own: test_normal_othertest, train_normal_othertrain",
        "the release split puts 1 group(s) in several splits: seq1 (test/train)",
    ]


def test_the_sidecar_says_what_was_imported(tmp_path: Path, layouts) -> None:
    """The kvasir importer on other data: source and description name that data, not Kvasir-SEG."""
    other = tmp_path / "CVC-ClinicDB"
    for n in range(1, 4):
        layouts.picture(other / "images" / f"{n}.png", n)
        layouts.mask(other / "masks" / f"{n}.png")
    manifest = load_dataset("kvasir", other)
    assert manifest.meta.source == str(other.resolve())
    assert manifest.meta.description == (
        "'CVC-ClinicDB' imported with the 'kvasir' importer: Kvasir-SEG layout (images/ + masks/): 3 images, 3 masks"
    )
    assert manifest.meta.extra["importer"] == {"format": "kvasir", "options": {}}


def test_folders_refuses_an_image_folder_and_its_mask_folder(tmp_path: Path, layouts) -> None:
    src = layouts.colonoscopy(tmp_path / "cvc")
    (src / "Ground Truth" / "1.gif").rename(src / "Ground Truth" / "1.png")
    with pytest.raises(DatasetImportError) as refused:
        load_dataset("folders", src)
    message = str(refused.value)
    assert (
        "class folders 'Original' and 'Ground Truth' share 6 file stems and 'Ground Truth' holds masks"
        in message
    )
    assert f"medalign data import images '{src}' -o MANIFEST -O 'images=Original' -O 'masks=Ground Truth'" in message
    assert "-O force=true" in message
    forced = load_dataset("folders", src, force=True)
    assert forced.meta.classes == {"label": ["Ground Truth", "Original"]}  # what the user asked for


def test_folders_refuses_a_folder_of_stem_mask_files_with_the_images_command(tmp_path: Path, layouts) -> None:
    src = layouts.ultrasound(tmp_path / "us")
    (src / "diagnosis.csv").unlink()
    with pytest.raises(DatasetImportError) as refused:
        load_dataset("folders", src, force=True)  # no force makes masks without images into a class
    assert str(refused.value) == (
        "class folder 'masks' holds only <stem>_mask files: it is a mask folder, not a class. Import images "
        f"and masks with: medalign data import images '{src}' -o MANIFEST -O 'images=images' -O 'masks=masks' "
        "-O mask_suffix=_mask"
    )


def test_folders_with_shared_stems_but_no_masks_are_classes(tmp_path: Path, layouts) -> None:
    """Numbered files in each class folder (cat/1.png, dog/1.png) are a common, legitimate layout."""
    for label, offset in (("cat", 0), ("dog", 10)):
        for n in range(1, 4):
            layouts.picture(tmp_path / label / f"{n}.png", n + offset)
    assert load_dataset("folders", tmp_path).meta.classes == {"label": ["cat", "dog"]}


def test_mask_like_images_need_a_mostly_black_and_white_gray_picture() -> None:
    from medalign.data.validation import looks_like_mask

    square = np.zeros((20, 20), np.uint8)
    square[5:10, 5:12] = 255
    assert looks_like_mask(square) and looks_like_mask(np.zeros((4, 4), np.uint8))
    assert looks_like_mask(np.stack([square] * 3, axis=-1)) and looks_like_mask(square // 255)
    noisy = np.clip(square.astype(int) + np.random.default_rng(0).integers(-6, 7, square.shape), 0, 255)
    assert looks_like_mask(noisy.astype(np.uint8))  # JPEG-like noise around 0 and 255
    rng = np.random.default_rng(1)
    assert not looks_like_mask(rng.integers(0, 256, (20, 20), dtype=np.uint8))
    colour = np.zeros((20, 20, 3), np.uint8)
    colour[..., 0] = square
    assert not looks_like_mask(colour)
    assert not looks_like_mask(np.full((4, 4), 200, np.uint8))

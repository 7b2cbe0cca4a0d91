from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medalign.data.manifest import (
    Manifest,
    ManifestError,
    ManifestMeta,
    assign_splits,
    meta_path_for,
    new_table,
    read_manifest,
    summarize,
    write_manifest,
)


def _table() -> pd.DataFrame:
    return new_table(
        [
            {
                "case_id": "007",
                "patient_id": "p1",
                "image:ct": "a.png",
                "label": "NA",
                "attr:count": 2,
                "time": 3.0,
            },
            {
                "case_id": "008",
                "patient_id": "p1",
                "image:ct": "b.png",
                "label": "tumour",
                "attr:count": None,
            },
        ]
    )


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_round_trip_keeps_strings_exactly(tmp_path: Path, suffix: str) -> None:
    path = write_manifest(
        _table(), tmp_path / f"m{suffix}", meta=ManifestMeta(classes={"label": ["NA", "tumour"]})
    )
    loaded = read_manifest(path)
    assert loaded.table["case_id"].tolist() == ["007", "008"]  # leading zeros survive
    assert loaded.table["label"].tolist() == ["NA", "tumour"]  # "NA" is a label, not missing
    assert loaded.table["attr:count"].tolist() == ["2", ""]
    assert loaded.table["time"].tolist() == ["3", ""]
    assert loaded.meta.classes == {"label": ["NA", "tumour"]}
    assert loaded.image_columns == ["image:ct"] and loaded.modalities == ["ct"]


def test_contract_columns_come_first(tmp_path: Path) -> None:
    table = new_table(
        [{"text": "x", "mask": "m.png", "image:b": "b.png", "case_id": "c", "image:a": "a.png"}]
    )
    assert list(table.columns)[:4] == ["case_id", "image:b", "image:a", "mask"]


def test_root_is_stored_relative_and_resolves(tmp_path: Path) -> None:
    data = tmp_path / "data" / "set"
    data.mkdir(parents=True)
    path = write_manifest(_table(), tmp_path / "manifests" / "m.csv", root=data)
    sidecar = json.loads(meta_path_for(path).read_text())
    assert sidecar["root"] == "../data/set"
    loaded = read_manifest(path)
    assert Path(loaded.resolve("a.png")) == data.resolve() / "a.png"
    assert loaded.resolve("vol.nii.gz#slice=3").endswith("set/vol.nii.gz#slice=3")


def test_unsupported_and_missing_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"unsupported manifest format '\.txt'"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "m.csv")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"case_id,text\n1,\xff\xfe\n")
    with pytest.raises(ManifestError, match=rf"'{bad}' is not valid UTF-8 \(line 2, byte 15\)"):
        read_manifest(bad)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"case_id": "a", "text": "caf\xe9"}\n')
    with pytest.raises(ManifestError, match=rf"'{bad_jsonl}' is not valid UTF-8 \(line 1, byte 29\)"):
        read_manifest(bad_jsonl)


def test_paths_outside_the_root_are_refused_unless_the_sidecar_allows_them(tmp_path: Path) -> None:
    table = new_table(
        [
            {"case_id": "in", "image": "sub/../a.png#slice=2"},
            {"case_id": "up", "image": "../a.png"},
            {"case_id": "abs", "image": "/etc/passwd"},
        ]
    )
    path = write_manifest(table, tmp_path / "data" / "m.csv")
    manifest = read_manifest(path)
    root = (tmp_path / "data").resolve()
    assert manifest.resolve("sub/../a.png#slice=2") == str(root / "sub/../a.png#slice=2")
    assert manifest.rows_outside_root() == [(1, "image", "../a.png"), (2, "image", "/etc/passwd")]
    with pytest.raises(ManifestError, match=r"path '/etc/passwd' points outside the manifest root"):
        manifest.resolve("/etc/passwd")
    with pytest.raises(ManifestError, match=r"2 path cell\(s\).*row 2 \(case_id=up\).*row 3 \(case_id=abs\)"):
        manifest.require_inside_root()
    sidecar = meta_path_for(path)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "allow_outside_root": True}))
    allowed = read_manifest(path)
    assert allowed.meta.allow_outside_root and not allowed.rows_outside_root()
    assert allowed.resolve("/etc/passwd") == "/etc/passwd"


def test_assign_splits_is_patient_level_deterministic_and_order_free() -> None:
    rows = [{"case_id": f"c{i}", "patient_id": f"p{i // 3}", "label": "ab"[i % 2]} for i in range(90)]
    table = new_table(rows)
    first = assign_splits(table, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    again = assign_splits(table, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    shuffled = table.sample(frac=1.0, random_state=1)
    reordered = assign_splits(shuffled, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    assert first.tolist() == again.tolist()
    assert dict(zip(shuffled["case_id"], reordered, strict=True)) == dict(
        zip(table["case_id"], first, strict=True)
    )
    per_patient = pd.DataFrame({"p": table["patient_id"], "s": first}).groupby("p")["s"].nunique()
    assert (per_patient == 1).all()
    assert first.value_counts().to_dict() == {"train": 54, "val": 18, "test": 18}  # 18/6/6 patients
    assert assign_splits(table, seed=4).tolist() != first.tolist()


def test_assign_splits_stratified_keeps_rare_class_in_each_split() -> None:
    rows = [{"case_id": f"c{i}", "label": "rare" if i < 10 else "common"} for i in range(100)]
    table = new_table(rows)
    splits = assign_splits(table, {"train": 0.6, "val": 0.2, "test": 0.2}, stratify="label")
    rare = splits[table["label"] == "rare"].value_counts().to_dict()
    assert rare == {"train": 6, "val": 2, "test": 2}


def test_assign_splits_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(_table(), {"train": 0.5, "test": 0.2})


def test_split_and_summary() -> None:
    table = _table()
    table["split"] = ["train", "test"]
    manifest = Manifest(table)
    assert manifest.split("test").table["case_id"].tolist() == ["008"]
    summary = summarize(manifest)
    assert summary["cases"] == 2 and summary["patients"] == 1
    assert summary["splits"] == {"train": 1, "val": 0, "test": 1}
    # "NA" spells a missing label unless the sidecar declares it: counted apart, never a class
    assert summary["labels"] == {"label": {"tumour": 1}} and summary["missing_labels"] == {"label": 1}
    assert manifest.classes("label") == ["tumour"]
    declared = summarize(Manifest(table, meta=ManifestMeta(classes={"label": ["NA", "tumour"]})))
    assert declared["labels"] == {"label": {"NA": 1, "tumour": 1}} and declared["missing_labels"] == {"label": 0}


def test_assign_splits_accepts_a_list_of_fractions() -> None:
    table = new_table([{"case_id": f"c{i}"} for i in range(10)])
    assert assign_splits(table, [0.8, 0.1, 0.1]).value_counts().to_dict() == {"train": 8, "val": 1, "test": 1}


# --------------------------------------------------------------------------------------------------
# Regressions found by benchmarks/fuzz.py and tests/data/test_fuzz_properties.py
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sidecar",
    [
        "[]",
        '"text"',
        '{"root": ["a"]}',
        '{"classes": ["label"]}',
        '{"classes": {"label": 5}}',
        '{"classes": {"label": [{"a": 1}]}}',
        '{"mask_threshold": "127"}',
        '{"mask_threshold": true}',
        '{"text_only": "no"}',
        '{"extra": [1]}',
    ],
)
def test_sidecar_with_wrong_types_is_named(tmp_path: Path, sidecar: str) -> None:
    path = write_manifest(_table(), tmp_path / "m.csv")
    meta_path_for(path).write_text(sidecar, encoding="utf-8")
    with pytest.raises(
        ManifestError, match=r"m\.meta\.json'.*wrong type|m\.meta\.json'.*classes|JSON object"
    ):
        read_manifest(path)


def test_parquet_with_corrupt_pandas_metadata_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"case_id": ["a"]}).replace_schema_metadata({b"pandas": b'{"columns": [{"x": 1}]}'})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match=r"cannot parse manifest '.*m\.parquet'"):
        read_manifest(tmp_path / "m.parquet")


def test_csv_cell_with_carriage_return_round_trips(tmp_path: Path) -> None:
    """The csv module quotes only the "\\n" terminator; a bare "\\r" used to split the row in two."""
    table = new_table([{"case_id": "a", "text": "line one\rline two"}, {"case_id": "b", "text": "x"}])
    back = read_manifest(write_manifest(table, tmp_path / "m.csv")).table
    pd.testing.assert_frame_equal(back, table)


def test_summarize_without_case_id_column() -> None:
    manifest = Manifest(pd.DataFrame({"patient_id": ["p1", ""], "image": ["a.png", "b.png"]}))
    assert summarize(manifest)["patients"] == 1


def test_stratified_split_ignores_row_order() -> None:
    """Patient p1 has one 'a' and one 'b' case: the tie used to go to whichever row came first."""
    table = pd.DataFrame(
        {
            "case_id": [f"c{k}" for k in range(8)],
            "patient_id": ["p1", "p1", "p2", "p3", "p4", "p5", "p6", "p7"],
            "label": ["a", "b", "a", "a", "b", "b", "a", "b"],
        }
    )
    forward = assign_splits(table, seed=0, stratify="label")
    backward = assign_splits(table.iloc[::-1], seed=0, stratify="label").sort_index()
    assert forward.tolist() == backward.tolist()


def test_duplicate_column_names_are_named(tmp_path: Path) -> None:
    """Found by benchmarks/fuzz.py: 'label' and ' label' became one name and crashed normalisation."""
    (tmp_path / "m.csv").write_text("case_id,label, label\na,x,y\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"m\.csv'.*duplicate column name\(s\) \['label'\]"):
        read_manifest(tmp_path / "m.csv")


def test_symbolic_links_out_of_the_root_are_outside_unless_allowed(tmp_path: Path) -> None:
    """A link inside the dataset folder that points elsewhere leaves the root; links inside it do not."""
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "secret.png").write_bytes(b"x")
    (root / "real" / "a.png").write_bytes(b"x")
    (root / "leak.png").symlink_to(elsewhere / "secret.png")
    (root / "leaky_dir").symlink_to(elsewhere, target_is_directory=True)
    (root / "inner.png").symlink_to(root / "real" / "a.png")
    table = new_table(
        [{"case_id": str(i), "image": ref} for i, ref in enumerate(
            ["real/a.png", "inner.png", "leak.png", "leaky_dir/secret.png", "leak.png#frame=0"]
        )]
    )  # fmt: skip
    manifest = Manifest(table, base_dir=root)
    assert [row for row, _, _ in manifest.rows_outside_root()] == [2, 3, 4]
    with pytest.raises(ManifestError, match="outside the manifest root"):
        manifest.resolve("leak.png")
    linked_root = tmp_path / "link_to_root"  # the root itself behind a link (../shared/data is one)
    linked_root.symlink_to(root, target_is_directory=True)
    assert [row for row, _, _ in Manifest(table, base_dir=linked_root).rows_outside_root()] == [2, 3, 4]
    allowed = Manifest(table, base_dir=root, meta=ManifestMeta(allow_outside_root=True))
    assert not allowed.rows_outside_root() and allowed.resolve("leak.png") == str(root / "leak.png")


def test_missing_label_words_are_missing_unless_declared() -> None:
    table = new_table([{"case_id": str(i), "label": v} for i, v in enumerate(["a", "None", "", "nan", "b", "none"])])
    manifest = Manifest(table)
    assert manifest.missing_labels("label").tolist() == [False, True, True, True, False, False]
    assert manifest.classes("label") == ["a", "b", "none"]  # lower-case "none" can be a finding
    declared = Manifest(table, meta=ManifestMeta(classes={"label": ["a", "b", "None"]}))
    assert declared.missing_labels("label").tolist() == [False, False, True, True, False, False]

"""`medalign data ...` on generated layouts: discoverable options, the import summary, grouped splits."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medalign.cli import app
from medalign.data.importers import IMPORTERS
from medalign.data.manifest import read_manifest

runner = CliRunner()


def test_formats_prints_every_option_with_type_default_and_meaning() -> None:
    result = runner.invoke(app, ["data", "formats", "images"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for option in IMPORTERS["images"].all_options:
        (line,) = [n for n, text in enumerate(lines) if text.startswith(f"  {option.name}  ")]
        assert f"{option.type_label}; default: {option.default_label}" in lines[line]
        assert lines[line + 1].strip() == option.help
    assert "  header  one of auto|yes|no; default: auto" in lines
    assert "  recursive  true/false; default: false" in lines
    assert "usage: medalign data import images SRC -o MANIFEST [-O name=value ...]" in lines
    misspelled = runner.invoke(app, ["data", "formats", "imags"])
    assert misspelled.exit_code == 1
    assert "unknown import format 'imags' (did you mean 'images'?)" in misspelled.output


def test_import_prints_the_accounting_and_warnings(tmp_path: Path, layouts) -> None:
    src = layouts.tricky(tmp_path / "tricky")
    out = tmp_path / "tricky.csv"
    args = [
        "data",
        "import",
        "images",
        str(src),
        "-o",
        str(out),
        "-O",
        "images=frames",
        "--option",
        "labels=scores.csv",
    ]
    result = runner.invoke(app, [*args, "-O", "label_columns=3", "-O", "seed=3"])
    assert result.exit_code == 0, result.output
    output = result.output
    assert "  image files in 'frames': 13, imported 12, not imported 1" in output
    assert "  rows of the label table 'scores.csv': 13, imported 9, not imported 4" in output
    assert "  rows written: 12 (4 incomplete)" in output
    assert "not imported (5; listed in the sidecar under import_report):" in output
    assert (
        "  no image with this id (2): scores.csv line 11 'seq9_f001.png', scores.csv line 12 'ghost'"
        in output
    )
    assert "  no row in the label table (3): seq1_f004, seq2_f004, seq3_f004" in output
    assert "missing_labels: label=4" in output and "None" not in output.split("import summary")[0]
    assert "warning: " in output and "near-duplicate file stems" in output
    sidecar = json.loads((tmp_path / "tricky.meta.json").read_text())
    assert len(sidecar["extra"]["import_report"]["not_imported"]) == 5

    grouped = runner.invoke(
        app, ["data", "split", str(out), "-o", str(tmp_path / "g.csv"), "--group-regex", "^(seq\\d+)_"]
    )
    assert grouped.exit_code == 0, grouped.output
    assert "(3 groups by regex '^(seq\\d+)_' on the file names of 'image')" in grouped.output
    assert "warning" not in grouped.output
    table = read_manifest(tmp_path / "g.csv").table
    assert table.assign(seq=table["case_id"].str[:4]).groupby("seq")["split"].nunique().max() == 1
    per_frame = runner.invoke(app, ["data", "split", str(out), "-o", str(tmp_path / "p.csv"), "--seed", "3"])
    assert "warning: " in per_frame.output and "--group-regex" in per_frame.output
    by_column = runner.invoke(
        app, ["data", "split", str(out), "-o", str(tmp_path / "c.csv"), "--group-by", "2"]
    )
    assert by_column.exit_code == 0 and "groups by column 'attr:column2'" in by_column.output
    assert (
        "warning: the column 'attr:column2' gives no group for 3 case(s); each stays a patient of its own: "
        "seq1_f004, seq2_f004, seq3_f004" in by_column.output
    )


def test_import_errors_are_one_line(tmp_path: Path, layouts) -> None:
    src = layouts.colonoscopy(tmp_path / "cvc")
    out = str(tmp_path / "m.csv")
    cases = {
        ("images", str(src), "-o", out, "-O", "images=Original", "-O", "mask=Ground Truth"): (
            "unknown option 'mask' for the 'images' importer; did you mean masks?"
        ),
        ("images", str(src), "-o", out, "-O", "seed"): "option 'seed' of the 'images' importer is not name=value",
        ("images", str(src), "-o", out, "-O", "seed="): "option seed expects an integer, got ''",
        ("images", str(src), "-o", out, "-O", "seed=1", "-O", "seed=2"): "option seed is given 2 times",
        ("images", str(src), "-o", out, "-O", "recursive=maybe"): "option recursive expects yes/no",
        ("folders", str(src), "-o", out): "look like an image folder and its mask folder",
    }
    for args, message in cases.items():
        result = runner.invoke(app, ["data", "import", *args])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    ok = runner.invoke(app, ["data", "import", "images", str(src), "-o", out, "-O", "images=Original",
                             "-O", "masks=Ground Truth", "-O", "recursive=true", "-O", "fractions=0.5,0.5,0"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "splits: train=3, val=3, test=0" in ok.output and "rows written: 6" in ok.output

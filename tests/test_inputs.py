"""Bundles that know their inputs: the record (medalign.inputs), old bundles, and the refusal of a
missing modality in the Python API, the CLI, `eval`, ONNX export and the demo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import medalign
from medalign.bundle import load_bundle, save_bundle
from medalign.cli import app
from medalign.data.dataset import dataset_for_model
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.inputs import InputError, InputSpec, input_spec, parse_image_options
from medalign.models import create_model
from medalign.predict import PredictorError

pytestmark = pytest.mark.usefixtures("one_thread")
STACKED = InputSpec("stacked", ("a", "b"), 1, columns=("image:a", "image:b"))
NAMES = ["normal", "benign", "malignant"]
MISSING_B = r"takes modalities a \+ b stacked as 2 channels .*'b' is missing\. Pass --image a=FILE --image b=FILE"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=16, size=64))


@pytest.fixture(scope="module")
def case(phantom: Path) -> dict[str, str]:
    return {m: str(phantom.parent / "images" / f"ph0001_{m}.png") for m in ("a", "b")}


@pytest.fixture(scope="module")
def stacked_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An aligner trained (here: built) on a + b stacked as two channels, as the quickstart's."""
    torch.manual_seed(0)
    return save_bundle(create_model("align_tiny", in_channels=2, image_size=32), tmp_path_factory.mktemp("ab") / "bundle", inputs=STACKED)


def test_every_layout_arranges_or_names_what_is_missing() -> None:
    assert STACKED.arrange({"b": 2, "a": 1}) == {"a": 1, "b": 2}  # model order, whatever the dict's
    with pytest.raises(InputError, match=r"'b' is missing\. Pass --image a=FILE --image b=FILE on the command line, "
                       r"a manifest with columns image:a, image:b, or \{'a': image, 'b': image\} in Python"):  # fmt: skip
        STACKED.arrange({"a": 1})
    with pytest.raises(InputError, match="one image was given without naming its modality"):
        STACKED.arrange("scan.png")
    with pytest.raises(InputError, match="'c' is not one of its modalities"):
        STACKED.arrange({"a": 1, "b": 2, "c": 3})
    single = InputSpec("single", ("image",), 3)
    assert single.arrange("x.png") == {"image": "x.png"} and single.arrange({"image": 1}) == {"image": 1}
    fusion = InputSpec("modalities", ("a", "b"), 1, missing_allowed=True)
    assert fusion.arrange({"b": 2}) == {"b": 2}
    assert InputSpec("modalities", ("a", "b"), 1).describe().endswith("all required)")
    rows = InputSpec("any", ("a", "b"), 1)
    assert rows.arrange("x") == {"*": "x"} and rows.arrange({"b": 1}) == {"b": 1}
    with pytest.raises(InputError, match="give one image at a time"):
        rows.arrange({"a": 1, "b": 2})
    assert InputSpec.from_dict(STACKED.to_dict()) == STACKED


def test_columns_come_from_the_record_or_are_chosen_in_order() -> None:
    assert STACKED.columns_for(["image:a", "image:b", "mask"]) == ["image:a", "image:b"]
    assert STACKED.columns_for(["image:x", "image:y"], ["image:y", "image:x"]) == ["image:y", "image:x"]
    with pytest.raises(InputError, match=r"lacks column\(s\) \['image:b'\].*--modality"):
        STACKED.columns_for(["image:a"])
    with pytest.raises(InputError, match="1 column"):
        STACKED.columns_for(["image:a", "image:b"], ["image:a"])
    assert InputSpec("single", ("image",), 1).columns_for(["image:t1"]) == ["image:t1"]  # its one column


def test_image_options_are_all_named_or_all_plain(tmp_path: Path) -> None:
    assert parse_image_options(["a=x.png", "b=y.png"]) == {"a": "x.png", "b": "y.png"}
    assert parse_image_options(["x.png"]) == ["x.png"]
    (tmp_path / "odd=name.png").write_bytes(b"")
    assert parse_image_options([str(tmp_path / "odd=name.png")]) == [str(tmp_path / "odd=name.png")]
    with pytest.raises(InputError, match="name every --image"):
        parse_image_options(["a=x.png", "y.png"])


def test_python_api_refuses_one_modality_and_stacks_two_in_order(stacked_bundle: Path, case, phantom) -> None:
    model = medalign.load(stacked_bundle)
    assert model.inputs == STACKED
    with pytest.raises(PredictorError, match=MISSING_B):
        model.classify({"a": case["a"]}, labels=NAMES)
    with pytest.raises(PredictorError, match="one image was given without naming its modality"):
        model.embed_image(case["a"])  # the old silent path: a repeated into both channels
    manifest = read_manifest(phantom)
    sample = dataset_for_model(manifest, model.model, None)[1]  # the recorded columns, as training reads them
    with torch.no_grad():
        expected = model.model.encode_image(torch.cat([sample["image:a"], sample["image:b"]])[None]).numpy()
    np.testing.assert_allclose(model.embed_image({"b": case["b"], "a": case["a"]}), expected, atol=1e-5)


def test_a_single_modality_bundle_still_takes_one_file(tmp_path: Path, case) -> None:
    bundle = save_bundle(create_model("align_tiny", in_channels=1, image_size=32), tmp_path / "one")
    model = medalign.load(bundle)
    assert model.inputs.layout == "single" and model.classify(case["a"], labels=NAMES)[0].keys() == set(NAMES)
    result = CliRunner().invoke(app, ["predict", "classify", "-m", str(bundle), case["a"], "-l", "x", "-l", "y", "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output


def test_cli_refuses_one_modality_and_takes_named_images_or_a_manifest(stacked_bundle: Path, case, phantom, tmp_path) -> None:
    base = ["predict", "classify", "-m", str(stacked_bundle), "--templates", "phantom_diagnosis"]
    one = CliRunner().invoke(app, [*base, case["a"], "-o", str(tmp_path / "one")])
    assert one.exit_code == 1 and "one image was given without naming its modality" in one.output
    assert "--image a=FILE --image b=FILE" in one.output and not (tmp_path / "one").exists()
    half = CliRunner().invoke(app, [*base, "--image", f"a={case['a']}", "-o", str(tmp_path / "half")])
    assert half.exit_code == 1 and "'b' is missing" in half.output
    named = CliRunner().invoke(app, [*base, "--image", f"a={case['a']}", "--image", f"b={case['b']}", "-o", str(tmp_path / "ab")])
    assert named.exit_code == 0, named.output
    row = json.loads((tmp_path / "ab" / "results.json").read_text())["results"][0]
    expected = medalign.load(stacked_bundle).classify(case, templates="phantom_diagnosis")[0]
    assert row["inputs"] == "a+b" and row["p:normal"] == pytest.approx(expected["normal"], abs=1e-6)
    rows = CliRunner().invoke(app, [*base, "--manifest", str(phantom), "--split", "test", "-o", str(tmp_path / "m")])
    assert rows.exit_code == 0, rows.output
    results = json.loads((tmp_path / "m" / "results.json").read_text())["results"]
    assert results and {r["inputs"] for r in results} == {"a+b"}


def test_eval_reads_every_recorded_column(stacked_bundle: Path, phantom, tmp_path) -> None:
    result = CliRunner().invoke(app, ["eval", "retrieval", "-m", str(stacked_bundle), "--manifest", str(phantom), "-o", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    one = CliRunner().invoke(app, ["eval", "retrieval", "-m", str(stacked_bundle), "--manifest", str(phantom), "--modality", "image:a"])
    assert one.exit_code == 1 and "1 column(s) ['image:a'] were chosen for 2 modalities" in one.output


def test_old_bundles_are_read_from_their_run_or_refuse_what_is_ambiguous(tmp_path: Path, case) -> None:
    def strip_record(bundle: Path) -> None:
        config = json.loads((bundle / "config.json").read_text())
        config.pop("inputs")
        (bundle / "config.json").write_text(json.dumps(config))

    run = tmp_path / "run"  # an old run folder: config.yaml beside bundle/ names the stacked columns
    bundle = save_bundle(create_model("align_tiny", in_channels=2, image_size=32), run / "bundle")
    strip_record(bundle)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "align", "data": {"modalities": ["image:a", "image:b"]}}))
    spec = input_spec(load_bundle(bundle))
    assert (spec.layout, spec.modalities, spec.channels, spec.source) == ("stacked", ("a", "b"), 1, "run config")

    moved = save_bundle(create_model("align_tiny", in_channels=3, image_size=32), tmp_path / "moved")
    strip_record(moved)  # no run beside it: 3 channels could be RGB or three stacked modalities
    model = medalign.load(moved)
    assert model.inputs.layout == "unrecorded" and model.inputs.source == "model config"
    with pytest.raises(PredictorError, match=r"layout not recorded.* have 1 channel\(s\) in all, the model takes 3"):
        model.embed_image(case["a"])  # grey: never repeated into 3 channels on a guess
    assert model.embed_image(np.zeros((32, 32, 3), np.uint8)).shape[0] == 1  # exactly 3 channels: fine


def test_onnx_export_records_the_layout_and_stacks_named_arrays(stacked_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from medalign.export import OnnxPredictor, export_onnx

    export_onnx(stacked_bundle, tmp_path / "onnx", parts=["vision"])
    recorded = json.loads((tmp_path / "onnx" / "export.json").read_text())["inputs"]
    assert (recorded["layout"], recorded["modalities"]) == ("stacked", ["a", "b"])
    onnx = OnnxPredictor(tmp_path / "onnx")
    a, b = np.random.default_rng(0).random((2, 1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(onnx.embed_image({"b": b, "a": a}), onnx.embed_image(np.concatenate([a, b], 1)), atol=1e-6)
    with pytest.raises(InputError, match="'b' is missing"):
        onnx.embed_image({"a": a})
    with pytest.raises(ValueError, match="the model takes modalities a \\+ b stacked"):
        onnx.embed_image(a)

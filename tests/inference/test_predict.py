"""The Predictor API: every method on the bundle kinds that support it, input forms, batching,
training-identical preprocessing, DICOM/NIfTI inputs and the errors for wrong kinds and inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import medalign
from medalign.bundle import load_bundle, save_bundle
from medalign.data.dataset import dataset_for_model
from medalign.data.manifest import read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.data.readers import ImageReadError
from medalign.inference.predict import DEFAULT_TEMPLATES, Predictor, PredictorError
from medalign.models import create_model
from medalign.models.towers import TINY_BERT

NAMES = ["normal", "benign", "malignant"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory):
    return read_manifest(generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=8, size=64)))


def paths(manifest, column: str = "image:a") -> list[Path]:
    return [manifest.resolve(p) for p in manifest.table[column]]


def bundle(tmp_path_factory: pytest.TempPathFactory, name: str, extra: dict | None = None, **overrides):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(name) / "bundle"
    save_bundle(create_model(name, **overrides), directory, extra=extra)
    return directory


@pytest.fixture(scope="module")
def align(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return medalign.load(str(bundle(tmp_path_factory, "align_tiny", in_channels=1, image_size=32)))


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return medalign.load(str(bundle(tmp_path_factory, "unet", image_size=32, channels=[4, 8, 16])))


def test_load_returns_a_predictor_that_forwards_to_the_model(align: Predictor) -> None:
    assert isinstance(align, Predictor) and align.kind == "DualEncoder"
    assert align.config is align.model.config and align.tokenizer is align.model.tokenizer
    pixels = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = align(pixel_values=pixels, **align.tokenize(["a", "b"]))  # calls the model
    torch.testing.assert_close(out["image_embeds"], align.model.encode_image(pixels).detach())
    with pytest.raises(AttributeError):
        align.no_such_attribute  # noqa: B018


def test_path_array_and_tensor_give_identical_embeddings(align: Predictor, phantom) -> None:
    path = paths(phantom)[0]
    array = np.asarray(Image.open(path))
    assert array.dtype == np.uint8 and array.ndim == 2
    from_path = align.embed_image(path)
    assert from_path.shape == (1, align.config.embed_dim)
    np.testing.assert_array_equal(align.embed_image(str(path)), from_path)
    np.testing.assert_array_equal(align.embed_image(array), from_path)
    np.testing.assert_array_equal(align.embed_image(torch.tensor(array)), from_path)
    np.testing.assert_array_equal(align.embed_image(array[None]), from_path)  # (C, H, W)
    rgb = np.repeat(array[..., None], 3, axis=-1)  # (H, W, C): grey by the mean, as in training
    np.testing.assert_array_equal(align.embed_image(rgb), from_path)
    floats = array.astype(np.float32) / 255  # floats are taken as already in [0, 1]
    # uint8 is resized in 8 bits, floats in float32: pixels agree within one level (1/255)
    np.testing.assert_allclose(align.embed_image(floats), from_path, atol=5e-3)


def test_batched_equals_one_by_one(align: Predictor, phantom) -> None:
    images = paths(phantom)[:5]
    small = Predictor(align.model, batch_size=2)
    batched = small.embed_image(images)
    single = np.concatenate([align.embed_image(p) for p in images])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    stacked = torch.stack([torch.tensor(np.asarray(Image.open(p)))[None] for p in images])  # (B, C, H, W)
    np.testing.assert_allclose(small.embed_image(stacked), single, atol=1e-6)


def test_preprocessing_equals_the_training_dataset(align: Predictor, phantom) -> None:
    dataset = dataset_for_model(phantom, align.model, None, None, ["image:a"], augment=False)
    for index in (0, 3):
        sample = dataset[index]["image:a"]
        assert sample.shape == (1, 32, 32)  # 64 px phantom resized to the model's 32
        with torch.no_grad():
            expected = align.model.encode_image(sample[None]).numpy()
        np.testing.assert_allclose(align.embed_image(paths(phantom)[index]), expected, atol=1e-6)


def _dicom(path: Path, pixels: np.ndarray) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "CT", *pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def test_dicom_and_nifti_inputs(align: Predictor, phantom, tmp_path: Path) -> None:
    import nibabel as nib

    array = np.asarray(Image.open(paths(phantom)[1]))
    expected = align.embed_image(array)
    dicom = _dicom(tmp_path / "scan.dcm", array)
    np.testing.assert_array_equal(align.embed_image(dicom), expected)
    volume = np.stack([np.zeros_like(array), array, array // 2], axis=-1).transpose(1, 0, 2)  # (X, Y, Z)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "ct.nii.gz"))
    np.testing.assert_array_equal(align.embed_image(f"{tmp_path / 'ct.nii.gz'}#slice=1"), expected)
    with pytest.raises(PredictorError, match=r"is a volume .*select one slice"):
        align.embed_image(tmp_path / "ct.nii.gz")


def test_zero_shot_classification_matches_the_prompt_ensemble(align: Predictor, phantom) -> None:
    images = paths(phantom)[:3]
    result = align.classify(images, labels=NAMES)
    assert len(result) == 3 and all(list(r) == NAMES for r in result)
    # by hand: per class the renormalised mean of normalised prompt embeddings, softmax of scale x cosine
    weights = []
    for name in NAMES:
        prompts = align.embed_text([t.replace("{}", name) for t in DEFAULT_TEMPLATES])
        mean = F.normalize(torch.from_numpy(prompts), dim=-1).mean(0)
        weights.append(F.normalize(mean, dim=0))
    scale = float(align.model.logit_scale.detach().exp())
    expected = torch.softmax(scale * torch.from_numpy(align.embed_image(images)) @ torch.stack(weights).T, -1)
    got = np.array([[r[n] for n in NAMES] for r in result])
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    shipped = align.classify(images[0], templates="phantom_diagnosis")
    assert list(shipped[0]) == NAMES and abs(sum(shipped[0].values()) - 1) < 1e-5
    assert list(
        align.classify(images[0], labels=["malignant", "normal"], templates="phantom_diagnosis")[0]
    ) == [
        "malignant",
        "normal",
    ]
    with pytest.raises(PredictorError, match="give labels"):
        align.classify(images[0])


def test_retrieval_text_to_image_and_image_to_image(align: Predictor, phantom) -> None:
    images = paths(phantom)
    texts = list(phantom.table["text"][:3])
    index = align.build_index(images)
    np.testing.assert_allclose(np.linalg.norm(index, axis=1), 1.0, atol=1e-5)
    hits = align.retrieve(texts, images, k=3)
    scores = align.embed_text(texts) @ align.embed_image(images).T
    for row, (query_hits, query_scores) in enumerate(zip(hits, scores, strict=True)):
        assert [j for j, _ in query_hits] == list(np.argsort(-query_scores)[:3]), row
        np.testing.assert_allclose([s for _, s in query_hits], np.sort(query_scores)[::-1][:3], atol=1e-5)
    precomputed = align.retrieve(texts, index, k=3)  # a precomputed index answers alike
    assert [[j for j, _ in q] for q in precomputed] == [[j for j, _ in q] for q in hits]
    np.testing.assert_allclose(
        [[s for _, s in q] for q in precomputed], [[s for _, s in q] for q in hits], atol=1e-6
    )
    self_hits = align.retrieve([images[2], images[5]], index, k=1)
    assert [h[0][0] for h in self_hits] == [2, 5] and abs(self_hits[0][0][1] - 1) < 1e-5
    assert [j for j, _ in align.retrieve(images[0], texts, k=3)[0]] == list(
        np.argsort(-(align.embed_image(images[0]) @ align.embed_text(texts).T)[0])
    )
    with pytest.raises(PredictorError, match="mix of texts and images"):
        align.retrieve("a cyst", [images[0], "no lesion"])


def test_segment_returns_the_source_size(unet: Predictor, phantom) -> None:
    path = paths(phantom)[0]
    array = np.asarray(Image.open(path))
    probabilities = unet.segment(path)
    assert probabilities.shape == (64, 64) and ((probabilities >= 0) & (probabilities <= 1)).all()
    np.testing.assert_array_equal(unet.segment(torch.tensor(array)), probabilities)
    large = np.tile(array, (2, 3))[:100, :150]  # not a multiple of the 32 px window
    assert unet.segment(large).shape == (100, 150)
    maps = unet.segment([array, large])
    assert [m.shape for m in maps] == [(64, 64), (100, 150)]
    np.testing.assert_allclose(maps[0], probabilities, atol=1e-6)
    window = array[:32, :32]  # exactly one window: the plain forward pass
    with torch.no_grad():
        logits = unet.model(pixel_values=torch.from_numpy(window / np.float32(255))[None, None])["logits"]
    np.testing.assert_allclose(unet.segment(window), torch.sigmoid(logits)[0, 0].numpy(), atol=1e-5)
    with pytest.raises(PredictorError, match="not text-guided"):
        unet.segment(path, text="the cyst")


def test_text_guided_segmentation(tmp_path_factory: pytest.TempPathFactory, phantom) -> None:
    overrides = dict(image_size=32, text=TINY_BERT, base_width=4, depth=2, decoder_fusion=[1, 2], context_dim=16)
    model = medalign.load(bundle(tmp_path_factory, "text_unet", **overrides))
    path = paths(phantom)[0]
    cyst, none = model.segment(path, text="the cyst in the left upper zone"), model.segment(path, text="no")
    assert cyst.shape == (64, 64) and not np.allclose(cyst, none)
    assert [m.shape for m in model.segment([path, path], text=["a", "b"])] == [(64, 64)] * 2
    with pytest.raises(ValueError, match="text-guided"):
        model.segment(path)


def test_fusion_segmentation_takes_a_dict_of_modalities(tmp_path_factory, phantom) -> None:
    model = medalign.load(bundle(tmp_path_factory, "fuse_adf", image_size=32, modality_dropout=0.3))
    assert model.inputs.layout == "modalities" and model.inputs.missing_allowed  # trained for missing ones
    a, b = paths(phantom)[0], paths(phantom, "image:b")[0]
    both = model.segment({"a": a, "b": b})
    only_a = model.segment({"a": a})
    assert both.shape == only_a.shape == (64, 64) and not np.allclose(both, only_a)
    crop = {m: np.asarray(Image.open(p))[:32, :32] for m, p in (("a", a), ("b", b))}
    pixels = {m: torch.from_numpy(x / np.float32(255))[None, None] for m, x in crop.items()}
    with torch.no_grad():
        expected = torch.sigmoid(model.model(pixel_values=pixels)["logits"])[0, 0].numpy()
    np.testing.assert_allclose(model.segment(crop), expected, atol=1e-5)
    with pytest.raises(PredictorError, match=r"'c' is not one of its modalities"):
        model.segment({"c": a})
    with pytest.raises(PredictorError, match="one image was given without naming its modality"):
        model.segment(a)
    with pytest.raises(PredictorError, match="use classify"):
        medalign.load(
            bundle(tmp_path_factory, "fuse_early", image_size=32, task_head="classify", num_classes=3)
        ).segment(a)


def test_clinical_classify_risk_and_embed(tmp_path_factory: pytest.TempPathFactory, phantom) -> None:
    extra = {"metrics": {"diagnosis": {"class_names": NAMES}}}
    overrides = dict(image_size=32, modalities=["a", "b"], num_classes=3, survival="discrete")
    directory = bundle(tmp_path_factory, "clinical_tiny", extra, time_bins=[0, 12, 24, 36], **overrides)
    model = medalign.load(directory)
    case = {"a": paths(phantom)[0], "b": paths(phantom, "image:b")[0]}
    result = model.risk(case)
    dataset = dataset_for_model(phantom, model.model, None, None, ["image:a", "image:b"])
    sample = dataset[0]
    with torch.no_grad():
        out = model.model(images={"a": sample["image:a"][None], "b": sample["image:b"][None]})
    hazards = torch.sigmoid(out["hazard_logits"][0])
    np.testing.assert_allclose(result["survival"]["probability"], torch.cumprod(1 - hazards, 0), atol=1e-6)
    assert result["survival"]["time"] == [12.0, 24.0, 36.0]
    np.testing.assert_allclose(result["risk"], F.softplus(out["hazard_logits"][0]).sum(), atol=1e-5)
    assert list(result["diagnosis"]) == NAMES
    np.testing.assert_allclose(list(result["diagnosis"].values()), out["logits"][0].softmax(-1), atol=1e-6)
    probs = model.classify({"a": paths(phantom)[:2], "b": paths(phantom, "image:b")[:2]})
    assert len(probs) == 2 and probs[0] == pytest.approx(result["diagnosis"], abs=1e-6)
    features = model.embed_image(case)
    np.testing.assert_allclose(features, out["features"].numpy(), atol=1e-5)
    with pytest.raises(PredictorError, match=r"without naming its modality\. Pass --image a=FILE --image b=FILE"):
        model.risk(case["a"])
    with pytest.raises(PredictorError, match=r"'b' is missing"):  # trained on both: no silent half answer
        model.classify({"a": paths(phantom)[0]})
    with pytest.raises(PredictorError, match="no text tower"):
        model.risk(case, text="a cyst")
    with pytest.raises(PredictorError, match="one case"):
        model.risk({"a": paths(phantom)[:2], "b": paths(phantom, "image:b")[:2]})


def test_report_uses_the_bundle_decoding_defaults(tmp_path_factory, phantom) -> None:
    extra = {"metrics": {"decoding": {"decoding": "greedy", "beam_size": 1, "max_new_tokens": 6}}}
    model = medalign.load(bundle(tmp_path_factory, "report_tiny", extra, image_size=32))
    assert model.decoding_defaults()["decoding"] == "greedy"
    path = paths(phantom)[0]
    text = model.report(path)
    pixels = torch.stack([dataset_for_model(phantom, model.model, None)[0]["image:a"]])
    expected = model.model.generate(pixels, "greedy", 1, 6, 1.0, no_repeat_ngram_size=3)
    assert isinstance(text, str) and text == expected[0]
    beams = model.report([path, path], decoding="beam", beam_size=2, max_new_tokens=4)
    assert len(beams) == 2 and beams[0] == beams[1]
    with pytest.raises(PredictorError, match=r"unknown decoding options \['temperature'\]"):
        model.report(path, temperature=0.7)
    assert model.embed_image(path).shape[0] == 1


def test_mae_embeddings_are_its_pooled_encoder_features(tmp_path_factory, phantom) -> None:
    model = medalign.load(bundle(tmp_path_factory, "mae_tiny", image_size=32))
    sample = dataset_for_model(phantom, model.model, None)[2]["image:a"]
    assert sample.shape[0] == 3  # grey phantom repeated to the MAE's 3 channels, as in training
    with torch.no_grad():
        expected = model.model.encode(sample[None]).numpy()
    np.testing.assert_allclose(model.embed_image(paths(phantom)[2]), expected, atol=1e-5)


def test_wrong_kinds_and_bad_inputs_raise_clear_errors(align: Predictor, unet: Predictor, tmp_path) -> None:
    with pytest.raises(
        PredictorError,
        match=r"segment\(\) needs a segmentation or fusion bundle; this is a "
        r"'DualEncoder' bundle, which can do: embed_image",
    ):
        align.segment(np.zeros((32, 32), np.uint8))
    with pytest.raises(PredictorError, match=r"'segmentation' bundle, which can do: segment"):
        unet.classify(np.zeros((32, 32), np.uint8), labels=NAMES)
    for call in (unet.embed_image, unet.report, unet.risk):
        with pytest.raises(PredictorError, match="this is a 'segmentation' bundle"):
            call(np.zeros((32, 32), np.uint8))
    with pytest.raises(PredictorError, match=r"must be \(H, W\), \(C, H, W\) or \(H, W, C\)"):
        align.embed_image(np.zeros((8, 32, 32), np.uint8))
    with pytest.raises(PredictorError, match="cannot read an image from int"):
        align.embed_image(3)
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        align.embed_image(tmp_path / "missing.png")
    with pytest.raises(PredictorError, match="no images given"):
        align.embed_image([])
    with pytest.raises(PredictorError, match="takes 3 channel"):
        Predictor(load_bundle(_rgb_bundle(tmp_path))).embed_image(np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(PredictorError, match="not a medalign bundle model"):
        Predictor(torch.nn.Linear(2, 2))


def _rgb_bundle(tmp_path: Path) -> Path:
    """A 3-channel dual encoder bundle (2 channels cannot become 3)."""
    return save_bundle(create_model("align_tiny", in_channels=3, image_size=32), tmp_path / "rgb")


def test_from_bundle_repeats_the_recorded_normalisation(tmp_path: Path) -> None:
    from medalign.bundle import save_bundle
    from medalign.models import create_model

    model = create_model("align_tiny", in_channels=1, image_size=32)
    save_bundle(model, tmp_path / "plain")
    save_bundle(model, tmp_path / "minmax", extra={"preprocess": {"normalisation": "minmax"}})
    assert medalign.load(tmp_path / "plain").normalisation == "dtype"
    assert medalign.load(tmp_path / "minmax").normalisation == "minmax"
    assert medalign.load(tmp_path / "minmax", normalisation="zscore").normalisation == "zscore"

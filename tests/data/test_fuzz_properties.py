"""Property-based tests of the data layer's input contract (hypothesis, small budgets for CI).

Robustness: mutated bytes of a valid file of every format (``medalign.data.fuzzing.TARGETS``) give
a result or the target's own error naming the file. Round trips: arrays written by the usual
libraries read back unchanged, selectors parse back, manifests survive every table format with
strings kept as strings, and patient-level splits are deterministic and never split a patient.
``benchmarks/fuzz.py`` runs the same targets for minutes instead of seconds.
"""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from medalign.data.fuzzing import TARGETS, mutate, run_case
from medalign.data.manifest import SPLITS, assign_splits, new_table, read_manifest, write_manifest
from medalign.data.readers import SELECTOR_KEYS, ImageReadError, parse_image_ref, read_image

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _seeds(name: str) -> tuple[bytes, ...]:
    return tuple(TARGETS[name].seeds())


def _folder() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="medalign-prop-")


# --------------------------------------------------------------------------------------------------
# Robustness: mutated inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutated_input_gives_result_or_named_error(name: str, seed: int) -> None:
    target = TARGETS[name]
    rng = random.Random(seed)
    pool = [s for other in ("read_image:png", "read_image:dicom", "read_image:nifti") for s in _seeds(other)]
    data = mutate(rng.choice(_seeds(name)), rng, [*_seeds(name), *pool])
    with _folder() as folder:
        file = target.setup(Path(folder))
        outcome = run_case(target, file, data)
    assert outcome.status in ("ok", "expected"), outcome.detail


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_is_valid(name: str) -> None:
    """A seed that already fails would make the mutations above test only the error path."""
    target = TARGETS[name]
    with _folder() as folder:
        file = target.setup(Path(folder))
        assert [run_case(target, file, seed).status for seed in _seeds(name)] == ["ok"] * len(_seeds(name))


def test_run_case_flags_foreign_errors_and_missing_file_names(tmp_path: Path) -> None:
    target = TARGETS["read_image:npy"]
    file = target.setup(tmp_path)
    assert run_case(target, file, b"not an array").status == "expected"
    foreign = type(target)("x", target.setup, target.seeds, lambda f: {}["k"], ImageReadError)
    assert run_case(foreign, file, b"").signature.startswith("KeyError at ")
    nameless = type(target)("x", target.setup, target.seeds, _raise_nameless, ImageReadError)
    assert "without file name" in run_case(nameless, file, b"").signature


def _raise_nameless(file: Path) -> None:
    raise ImageReadError("broken")


def test_mutate_is_deterministic_and_changes_input() -> None:
    seed = _seeds("read_image:png")[0]
    first = [mutate(seed, random.Random(k)) for k in range(20)]
    assert first == [mutate(seed, random.Random(k)) for k in range(20)]
    assert sum(m != seed for m in first) >= 18


# --------------------------------------------------------------------------------------------------
# Round trips: readers
# --------------------------------------------------------------------------------------------------


def _image(dtype: type, shape: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[np.ndarray]:
    elements = st.floats(-1e6, 1e6, width=32) if np.dtype(dtype).kind == "f" else None
    return hnp.arrays(dtype, shape, elements=elements)


@FAST
@given(
    array=st.one_of(
        _image(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, max_side=16)),
        _image(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=16)),
        _image(np.uint8, st.tuples(st.integers(1, 12), st.integers(1, 12), st.sampled_from([3, 4]))),
    )
)
def test_png_round_trip(array: np.ndarray) -> None:
    with _folder() as folder:
        path = Path(folder) / "x.png"
        Image.fromarray(array).save(path)
        image = read_image(path)
    assert image.array.dtype == array.dtype
    np.testing.assert_array_equal(image.array, array)
    assert image.spacing == (1.0, 1.0)


@FAST
@given(
    array=st.one_of(
        _image(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12)),
        _image(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12)),
        _image(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=12)),
        _image(np.uint16, st.tuples(st.integers(2, 4), st.integers(2, 8), st.integers(5, 8))),
    )
)
def test_tiff_round_trip(array: np.ndarray) -> None:
    with _folder() as folder:
        path = Path(folder) / "x.tif"
        tifffile.imwrite(path, array, photometric="minisblack")
        image = read_image(path)
    assert image.array.dtype == array.dtype and image.is_3d == (array.ndim == 3)
    np.testing.assert_array_equal(image.array, array)


@FAST
@given(
    data=st.one_of(
        _image(np.int16, st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 5))),
        _image(np.float32, st.tuples(st.integers(2, 6), st.integers(2, 6), st.integers(2, 5))),
    ),
    zooms=st.tuples(*[st.floats(0.125, 5.0, width=32)] * 3),
)
def test_nifti_round_trip_reverses_axes(data: np.ndarray, zooms: tuple[float, float, float]) -> None:
    with _folder() as folder:
        path = Path(folder) / "x.nii"
        img = nib.Nifti1Image(data, np.diag([*zooms, 1.0]))
        img.header.set_zooms(zooms)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(path))
        image = read_image(path)
    assert image.array.dtype == data.dtype
    np.testing.assert_array_equal(image.array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(image.spacing, zooms[::-1], rtol=1e-6)


@FAST
@given(
    array=st.one_of(
        _image(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=10)),
        _image(np.int16, st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(5, 7))),
        _image(np.uint8, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(2, 4))),
    )
)
def test_npy_round_trip(array: np.ndarray) -> None:
    with _folder() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, array)
        image = read_image(path)
    np.testing.assert_array_equal(image.array, array)
    channels_last = array.ndim == 3 and array.shape[-1] <= 4
    assert len(image.spacing) == (2 if array.ndim == 2 or channels_last else 3)


@FAST
@given(
    volume=_image(np.uint8, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(5, 6))),
    axis=st.integers(0, 2),
    index=st.integers(-2, 6),
)
def test_slice_selector_equals_take_or_names_range(volume: np.ndarray, axis: int, index: int) -> None:
    with _folder() as folder:
        path = Path(folder) / "v.npy"
        np.save(path, volume)
        ref = f"{path}#slice={index}&axis={axis}"
        if 0 <= index < volume.shape[axis]:
            np.testing.assert_array_equal(read_image(ref).array, np.take(volume, index, axis=axis))
        else:
            with pytest.raises(ImageReadError, match=r"v\.npy.*out of range"):
                read_image(ref)


_NAME = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1)


@FAST
@given(
    name=_NAME,
    selectors=st.dictionaries(st.sampled_from(SELECTOR_KEYS), st.integers(-(10**6), 10**6), min_size=1),
)
def test_selectors_round_trip(name: str, selectors: dict[str, int]) -> None:
    ref = name + "#" + "&".join(f"{key}={value}" for key, value in selectors.items())
    assert parse_image_ref(ref) == (Path(name), selectors)


@FAST
@given(name=_NAME.filter(lambda n: "#" not in n))
def test_ref_without_selector_is_the_path(name: str) -> None:
    assert parse_image_ref(name) == (Path(name), {})


# --------------------------------------------------------------------------------------------------
# Round trips: manifests and splits
# --------------------------------------------------------------------------------------------------

_CELL = st.one_of(
    st.sampled_from(["", "007", "NA", "nan", "None", "null", "True", "1.0", "1e3", "-0", "a,b", 'say "hi"']),
    st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12).map(
        str.strip
    ),
)


@st.composite
def _tables(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 6))
    ids = draw(st.lists(st.text("abc0179", min_size=1, max_size=4), min_size=n, max_size=n, unique=True))
    rows = [
        {
            "case_id": case_id,
            "patient_id": draw(st.sampled_from(["p1", "p2", "007", ""])),
            "split": draw(st.sampled_from(SPLITS)),
            "image": draw(_CELL),
            "label": draw(_CELL),
            "text": draw(_CELL),
            "attr:site": draw(_CELL),
        }
        for case_id in ids
    ]
    return new_table(rows)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=_tables(), suffix=st.sampled_from([".csv", ".jsonl", ".parquet"]))
def test_manifest_round_trip_keeps_strings(table: pd.DataFrame, suffix: str) -> None:
    with _folder() as folder:
        path = write_manifest(table, Path(folder) / f"m{suffix}")
        back = read_manifest(path).table
    pd.testing.assert_frame_equal(back, table)


@st.composite
def _patients(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 40))
    patients = draw(st.lists(st.sampled_from([f"p{k}" for k in range(12)] + [""]), min_size=n, max_size=n))
    labels = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    return pd.DataFrame({"case_id": [f"c{k}" for k in range(n)], "patient_id": patients, "label": labels})


@settings(max_examples=40, deadline=None)
@given(table=_patients(), seed=st.integers(0, 2**16), stratify=st.sampled_from([None, "label"]))
def test_patient_split_is_deterministic_complete_and_leak_free(
    table: pd.DataFrame, seed: int, stratify: str | None
) -> None:
    splits = assign_splits(table, seed=seed, stratify=stratify)
    assert splits.tolist() == assign_splits(table, seed=seed, stratify=stratify).tolist()
    assert splits.isin(SPLITS).all() and len(splits) == len(table)
    patients = table["patient_id"].where(table["patient_id"] != "", table["case_id"])
    assert (splits.groupby(patients).nunique() == 1).all()
    shuffled = table.sample(frac=1.0, random_state=seed)
    again = assign_splits(shuffled, seed=seed, stratify=stratify)
    assert again.sort_index().tolist() == splits.tolist()  # row order does not change any assignment

"""Shards: the same samples as the manifest, split over ranks and workers without loss."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medalign.data.dataset import DatasetConfig, ManifestDataset
from medalign.data.manifest import Manifest, new_table, read_manifest
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.data.shards import ShardDataset, ShardError, iter_tar, write_shards
from medalign.data.transforms import PreprocessConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = DatasetConfig(preprocess=PreprocessConfig(size=(32, 32)))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return read_manifest(generate_phantom(tmp_path_factory.mktemp("phantom"), PhantomConfig(n=16, size=64)))


def _by_case(samples: object) -> dict[str, dict]:
    return {s["case_id"]: s for s in samples}


def _assert_same(expected: dict[str, dict], got: dict[str, dict]) -> None:
    assert sorted(got) == sorted(expected)
    for case, sample in expected.items():
        assert sorted(got[case]) == sorted(sample), case
        for key, value in sample.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[case][key], value), (case, key)
            else:
                assert got[case][key] == value, (case, key)


@pytest.mark.parametrize("split", ["train", "test"])
def test_shards_yield_the_manifest_datasets_samples(phantom: Manifest, tmp_path: Path, split: str) -> None:
    write_shards(phantom, tmp_path / "shards", 3)
    expected = ManifestDataset(phantom, CONFIG, split=split)
    shards = ShardDataset(tmp_path / "shards", CONFIG, split=split)
    assert len(shards) == len(expected) and shards.classes == expected.classes
    _assert_same(_by_case(expected[i] for i in range(len(expected))), _by_case(shards))


def test_shard_layout_is_webdataset(phantom: Manifest, tmp_path: Path) -> None:
    index = json.loads(write_shards(phantom, tmp_path / "s", 5).read_text())
    assert [s["file"] for s in index["shards"]][:2] == ["shard-000000.tar", "shard-000001.tar"]
    assert {s["split"] for s in index["shards"]} == set(index["splits"]) == {"train", "val", "test"}
    assert sum(s["samples"] for s in index["shards"]) == index["samples"] == len(phantom)
    assert index["meta"]["classes"]["label"] == ["normal", "benign", "malignant"]
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        names = tar.getnames()
    first = names[0].split(".")[0]
    assert sorted(n.removeprefix(first) for n in names if n.startswith(first)) == sorted(
        [".json", ".image-a.png", ".image-b.png", ".mask.png", ".txt", ".label.cls"]
    )
    row = phantom.table.iloc[int(first)]
    _, files = next(iter_tar(tmp_path / "s" / "shard-000000.tar"))
    assert files["image-a.png"] == Path(phantom.resolve(row["image:a"])).read_bytes()  # bytes as stored
    assert json.loads(files["json"])["case_id"] == row["case_id"] and files["txt"].decode() == row["text"]


def test_selected_slices_and_channels_are_stored_as_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "vol.npy", rng.normal(size=(3, 40, 40)).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    rows = [
        {
            "case_id": f"c{i}",
            "split": "train",
            "image": f"vol.npy#slice={i}",
            "image:rgb": f"rgb.png#channel={i}",
        }
        for i in range(3)
    ]
    manifest = Manifest(new_table(rows), tmp_path)
    write_shards(manifest, tmp_path / "s", 2)
    with tarfile.open(tmp_path / "s" / "shard-000000.tar") as tar:
        members = tar.getnames()
    assert "000000000.image.npy" in members and "000000000.image-rgb.png" in members
    config = DatasetConfig(preprocess=PreprocessConfig(size=(32, 32), normalisation="none"))
    expected = ManifestDataset(manifest, config, split="train")
    _assert_same(
        _by_case(expected[i] for i in range(3)), _by_case(ShardDataset(tmp_path / "s", config, "train"))
    )


def _tiny_manifest(folder: Path, n: int) -> Manifest:
    for i in range(n):
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(folder / f"{i}.png")
    return Manifest(
        new_table([{"case_id": f"c{i:02d}", "split": "train", "image": f"{i}.png"} for i in range(n)]), folder
    )


def _ranks_times_workers(folder: Path, ranks: int, workers: int, **kwargs: object) -> list[list[str]]:
    seen = []
    for rank in range(ranks):
        dataset = ShardDataset(folder, CONFIG, "train", **kwargs)
        dataset.set_distributed(rank, ranks)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        seen.append([s["case_id"] for s in loader])
        assert len(seen[-1]) == len(dataset)
    return seen


@pytest.mark.parametrize("shard_size", [3, 12])  # 4 shards (one per reader), 1 shard (split by sample)
def test_two_ranks_times_two_workers_read_every_sample_once(tmp_path: Path, shard_size: int) -> None:
    write_shards(_tiny_manifest(tmp_path, 12), tmp_path / "s", shard_size)
    seen = _ranks_times_workers(tmp_path / "s", 2, 2)
    assert sorted(seen[0] + seen[1]) == [f"c{i:02d}" for i in range(12)]


def test_uneven_shards_pad_ranks_to_the_same_length_and_drop_nothing(tmp_path: Path) -> None:
    write_shards(_tiny_manifest(tmp_path, 12), tmp_path / "s", 5)  # shards of 5, 5, 2 over 2 ranks
    seen = _ranks_times_workers(tmp_path / "s", 2, 2)
    assert len(seen[0]) == len(seen[1]) == 7
    counts = Counter(seen[0] + seen[1])
    assert set(counts) == {f"c{i:02d}" for i in range(12)} and sum(counts.values()) == 14


def test_epochs_reshuffle_deterministically_and_resampling_keeps_rank_lengths(tmp_path: Path) -> None:
    write_shards(_tiny_manifest(tmp_path, 12), tmp_path / "s", 2)
    dataset = ShardDataset(tmp_path / "s", CONFIG, "train", seed=3, buffer=4)

    def order(epoch: int) -> list[str]:
        dataset.set_epoch(epoch)
        return [s["case_id"] for s in dataset]

    assert order(0) == order(0) and sorted(order(0)) == sorted(order(1)) and order(0) != order(1)
    assert order(0) != sorted(order(0))  # the buffer mixes samples across shards
    seen = _ranks_times_workers(tmp_path / "s", 2, 2, resample=True)
    assert len(seen[0]) == len(seen[1]) == 6 and set(seen[0] + seen[1]) <= {f"c{i:02d}" for i in range(12)}


def test_bad_input_is_named(phantom: Manifest, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ShardError, match="not empty"):
        write_shards(phantom, tmp_path / "full", 4)
    broken = Manifest(new_table([{"case_id": "a", "image": "missing.png"}]), tmp_path)
    with pytest.raises(ShardError, match=r"row 1, column 'image'.*missing\.png"):
        write_shards(broken, tmp_path / "b", 4)
    write_shards(phantom, tmp_path / "ok", 4)
    with pytest.raises(ShardError, match="no split 'tune'"):
        ShardDataset(tmp_path / "ok", CONFIG, "tune")
    (tmp_path / "ok" / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"missing: \['shard-000001.tar'\]"):
        ShardDataset(tmp_path / "ok", CONFIG, "train")


def test_cli_data_shard(phantom: Manifest, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medalign.cli import app

    source = Path(phantom.base_dir) / "manifest.csv"
    result = CliRunner().invoke(
        app, ["data", "shard", str(source), "--out", str(tmp_path / "s"), "--shard-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "samples (train=" in result.output and (tmp_path / "s" / "index.json").is_file()

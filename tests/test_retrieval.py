"""Similar-case index: exact chunked top-k equals a full sort, the folder round-trips, the CLI
builds from a manifest and finds each case first for its own image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medalign.bundle import save_bundle
from medalign.cli import app
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.models import create_model
from medalign.retrieval import EmbeddingIndex, SearchIndexError, exact_top_k

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ keys.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("chunk_rows", [7, 64, 1000])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_chunked_top_k_equals_a_full_sort(chunk_rows: int, k: int) -> None:
    rng = np.random.default_rng(k + chunk_rows)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    keys[100] = keys[10]  # exact ties: the lower row must come first
    queries = np.concatenate([rng.normal(size=(4, 16)), keys[10:11]]).astype(np.float32)
    scores, indices = exact_top_k(keys, queries, k, chunk_rows)
    want_scores, want = brute_force(keys, queries, k)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(indices[:4], want[:4])
    assert list(indices[4, :2]) == [10, 100][:k]


def test_index_round_trip_mmap_float16_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(50, 8)) * 3
    index = EmbeddingIndex.from_embeddings(
        raw, [f"c{i}" for i in range(50)], [{"text": f"case {i}"} for i in range(50)], dtype="float16"
    )
    np.testing.assert_allclose(np.linalg.norm(index.embeddings.astype(np.float32), axis=1), 1, atol=1e-3)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert isinstance(loaded.embeddings, np.memmap) and loaded.embeddings.dtype == np.float16
    assert loaded.ids == index.ids and loaded.metadata[3] == {"text": "case 3"} and loaded.info["count"] == 50
    hit = loaded.search(raw[7] * 5, k=3)  # scale does not matter: cosine
    assert hit.ids[0][0] == "c7" and hit.scores[0][0] == pytest.approx(1, abs=1e-3)
    assert not (tmp_path / "idx.tmp").exists()


def test_index_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SearchIndexError, match="duplicate id 'a'"):
        EmbeddingIndex.from_embeddings(np.eye(3), ["a", "b", "a"])
    with pytest.raises(SearchIndexError, match="2 ids for 3 embeddings"):
        EmbeddingIndex.from_embeddings(np.eye(3), ["a", "b"])
    with pytest.raises(SearchIndexError, match="finite"):
        EmbeddingIndex.from_embeddings(np.full((2, 2), np.nan))
    index = EmbeddingIndex.from_embeddings(np.eye(3))
    with pytest.raises(SearchIndexError, match="queries have 2 dimensions, the index 3"):
        index.search(np.ones(2))
    with pytest.raises(SearchIndexError, match="not an index folder"):
        EmbeddingIndex.load(tmp_path)
    index.save(tmp_path / "i")
    np.save(tmp_path / "i" / "embeddings.npy", np.eye(4, dtype=np.float32))
    with pytest.raises(SearchIndexError, match=r"shape \(4, 4\)"):
        EmbeddingIndex.load(tmp_path / "i")


def test_faiss_backend_gives_the_exact_answers() -> None:
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    index = EmbeddingIndex.from_embeddings(rng.normal(size=(500, 32)))
    queries = rng.normal(size=(6, 32))
    exact, faiss = index.search(queries, 10), index.search(queries, 10, backend="faiss")
    np.testing.assert_array_equal(exact.indices, faiss.indices)
    np.testing.assert_allclose(exact.scores, faiss.scores, atol=1e-5)


def test_cli_builds_from_a_manifest_and_finds_each_case_itself(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = tmp_path / "align" / "bundle"
    save_bundle(create_model("align_tiny", in_channels=1, image_size=32), bundle)
    manifest = generate_phantom(tmp_path / "phantom", PhantomConfig(n=16, size=64))
    runner = CliRunner()
    built = runner.invoke(
        app, ["index", "build", "--model", str(bundle), "--manifest", str(manifest), "--column", "image:a",
              "--out", str(tmp_path / "idx")],
    )  # fmt: skip
    assert built.exit_code == 0, built.output
    assert "16 rows" in built.output
    image = sorted((tmp_path / "phantom" / "images").glob("ph0005_a.png"))[0]
    out = tmp_path / "hits.json"
    searched = runner.invoke(
        app, ["index", "search", "--index", str(tmp_path / "idx"), "--image", str(image), "-k", "3", "--out", str(out)]
    )
    assert searched.exit_code == 0, searched.output
    hits = json.loads(out.read_text())
    assert hits[0]["matches"][0]["id"] == "ph0005" and hits[0]["matches"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert {"split", "text", "label", "image:a"} <= set(hits[0]["matches"][0])
    by_text = runner.invoke(app, ["index", "search", "--index", str(tmp_path / "idx"), "--text", "a cyst", "-k", "2"])
    assert by_text.exit_code == 0, by_text.output  # a text query against an image index (DualEncoder)
    assert by_text.output.splitlines()[0] == "a cyst" and len(by_text.output.splitlines()) == 3
    both = runner.invoke(app, ["index", "search", "--index", str(tmp_path / "idx")])
    assert both.exit_code == 1 and "error: give exactly one of" in both.output

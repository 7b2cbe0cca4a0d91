"""Similar-case search: an on-disk embedding index with exact top-k by chunked matrix products.

Exact search is the default because it has no recall to tune and, in chunks, it is fast enough
on one CPU for a million cases (BENCHMARKS.md, *Similar-case search*): the index is scored one
block of rows at a time against a batch of queries, each block's top-k kept and merged, so the
``[queries, N]`` score matrix never exists and memory stays at one block. FAISS (extra
``[faiss]``) is used when asked for and installed; its flat inner-product index gives the same
answers.

An index folder holds ``embeddings.npy`` (float32 or float16 unit rows, memory-mapped on load),
``ids.json`` (one id per row), optional ``metadata.jsonl`` (one JSON object per row: paths,
captions, labels) and ``index.json`` (count, dimension, dtype, the model that made it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.json"
METADATA_FILE = "metadata.jsonl"
FORMAT_VERSION = 1


class SearchIndexError(ValueError):
    """A missing, inconsistent or mismatched index."""


def _unit(array: np.ndarray) -> np.ndarray:
    from medalign.metrics import unit_rows

    return unit_rows(np.asarray(array, dtype=np.float32)).astype(np.float32, copy=False)


@dataclass
class SearchResult:
    """Per query, the ``k`` best rows: ``indices`` and ``scores`` are ``[Q, k]``, ids their names."""

    indices: np.ndarray
    scores: np.ndarray
    ids: list[list[str]]


@dataclass
class EmbeddingIndex:
    """Unit-length embeddings with an id (and optional metadata) per row."""

    embeddings: np.ndarray
    ids: list[str]
    metadata: list[dict[str, Any]] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2:
            raise SearchIndexError(f"embeddings must be [N, D], got shape {self.embeddings.shape}")
        if len(self.ids) != len(self.embeddings):
            raise SearchIndexError(f"{len(self.ids)} ids for {len(self.embeddings)} embeddings")
        if len(set(self.ids)) != len(self.ids):
            seen: set[str] = set()
            dup = next(i for i in self.ids if i in seen or seen.add(i))  # type: ignore[func-returns-value]
            raise SearchIndexError(f"duplicate id {dup!r}: every row needs its own id")
        if self.metadata is not None and len(self.metadata) != len(self.ids):
            raise SearchIndexError(f"{len(self.metadata)} metadata rows for {len(self.ids)} embeddings")

    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str] | None = None,
        metadata: Sequence[dict[str, Any]] | None = None,
        *,
        dtype: str = "float32",
        info: dict[str, Any] | None = None,
    ) -> EmbeddingIndex:
        """Rows are normalised here, so scores are cosine similarities; ``dtype`` float16 halves the file."""
        if dtype not in ("float32", "float16"):
            raise SearchIndexError(f"dtype must be float32 or float16, got {dtype!r}")
        array = np.asarray(embeddings)
        if array.ndim != 2 or not np.isfinite(array).all():
            raise SearchIndexError(f"embeddings must be a finite [N, D] array, got shape {array.shape}")
        unit = _unit(array).astype(dtype)
        names = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(unit))]
        return cls(unit, names, list(metadata) if metadata is not None else None, dict(info or {}))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    # -- disk -----------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the folder; a temporary sibling is renamed into place, so a crash leaves no half index."""
        import shutil

        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        np.save(tmp / EMBEDDINGS_FILE, np.ascontiguousarray(self.embeddings))
        (tmp / IDS_FILE).write_text(json.dumps(self.ids), encoding="utf-8")
        if self.metadata is not None:
            with (tmp / METADATA_FILE).open("w", encoding="utf-8") as handle:
                for row in self.metadata:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        info = {
            **self.info,
            "format_version": FORMAT_VERSION,
            "count": len(self),
            "dim": self.dim,
            "dtype": str(self.embeddings.dtype),
            "metadata": self.metadata is not None,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, mmap: bool = True) -> EmbeddingIndex:
        directory = Path(directory)
        if not (directory / INDEX_FILE).is_file():
            raise SearchIndexError(f"'{directory}' is not an index folder (no {INDEX_FILE})")
        info = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        if info.get("format_version") != FORMAT_VERSION:
            raise SearchIndexError(f"'{directory}': index format {info.get('format_version')} is not {FORMAT_VERSION}")
        embeddings = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None, allow_pickle=False)
        if embeddings.shape != (info["count"], info["dim"]):
            raise SearchIndexError(
                f"'{directory}': {EMBEDDINGS_FILE} has shape {embeddings.shape}, {INDEX_FILE} says "
                f"({info['count']}, {info['dim']})"
            )
        ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
        metadata = None
        if info.get("metadata"):
            with (directory / METADATA_FILE).open(encoding="utf-8") as handle:
                metadata = [json.loads(line) for line in handle]
        return cls(embeddings, ids, metadata, info)

    # -- search ---------------------------------------------------------------------------------

    def search(
        self, queries: np.ndarray, k: int = 10, *, chunk_rows: int = 131_072, backend: str = "exact"
    ) -> SearchResult:
        """Top-``k`` rows by cosine similarity for each query row (queries are normalised here).

        ``backend="exact"``: chunked products in float32 (torch, all cores); ``"faiss"``: a flat
        inner-product FAISS index (exact too), if ``faiss`` is installed.
        """
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise SearchIndexError(f"queries have {queries.shape[1]} dimensions, the index {self.dim}")
        if k < 1:
            raise SearchIndexError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        queries = _unit(queries)
        if backend == "faiss":
            scores, indices = self._faiss().search(queries, k)
        elif backend == "exact":
            scores, indices = exact_top_k(self.embeddings, queries, k, chunk_rows)
        else:
            raise SearchIndexError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        return SearchResult(indices, scores, [[self.ids[j] for j in row] for row in indices])

    def _faiss(self) -> Any:
        try:
            import faiss
        except ImportError as err:
            raise SearchIndexError('the faiss backend needs faiss: pip install -e ".[faiss]"') from err
        if getattr(self, "_faiss_index", None) is None:
            index = faiss.IndexFlatIP(self.dim)
            index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
            self._faiss_index = index
        return self._faiss_index


def exact_top_k(
    keys: np.ndarray, queries: np.ndarray, k: int, chunk_rows: int = 131_072
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, indices)``, each ``[Q, k]``, best first; ties keep the lower row first.

    Keys are scored one ``chunk_rows`` block at a time (a memory-mapped index is read once per
    call, block by block) and each block's top-k merged into the running best.
    """
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    best_scores = torch.full((len(q), 0), float("-inf"))
    best_index = torch.zeros((len(q), 0), dtype=torch.long)
    with torch.inference_mode():
        for start in range(0, len(keys), chunk_rows):
            block = _read_only_tensor(keys[start : start + chunk_rows])
            scores = q @ block.T
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + start], dim=1)
            # stable order: by score, then by row, so equal scores come back in row order
            order = torch.argsort(merged_index, dim=1)
            merged_scores, merged_index = merged_scores.gather(1, order), merged_index.gather(1, order)
            keep = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
            best_scores, best_index = merged_scores.gather(1, keep), merged_index.gather(1, keep)
    return best_scores.numpy(), best_index.numpy()


def _read_only_tensor(rows: np.ndarray) -> torch.Tensor:
    """float32 rows as a tensor without copying a memory-mapped float32 index (never written to)."""
    import warnings

    array = np.ascontiguousarray(rows, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def build_from_manifest(
    predictor: Any,
    manifest_path: str | os.PathLike,
    *,
    column: str | None = None,
    split: str | None = None,
    dtype: str = "float32",
    batch: int = 256,
) -> EmbeddingIndex:
    """Embed a manifest's images (or texts, ``column="text"``) with a bundle's Predictor.

    Images come from the columns the bundle records (a bundle trained on modalities *a* and *b*
    embeds both of each case); ``column`` picks the one column of a one-image bundle.
    """
    from medalign.data.manifest import read_manifest
    from medalign.inputs import modality_name
    from medalign.progress import progress

    manifest = read_manifest(manifest_path)
    if split:
        manifest = manifest.split(split)
    if not len(manifest):
        raise SearchIndexError(f"'{manifest_path}': no rows{f' in split {split!r}' if split else ''}")
    table = manifest.table
    is_text = column == "text" or (column is None and not manifest.image_columns)
    if is_text:
        if "text" not in table.columns:
            raise SearchIndexError(f"'{manifest_path}': no 'text' column and no image column to index")
        keys, values = ["text"], {"text": [str(v) for v in table["text"]]}
    else:
        spec = predictor.inputs
        try:
            keys = spec.columns_for(manifest.image_columns, [column] if column else None)
        except ValueError as err:
            raise SearchIndexError(f"'{manifest_path}': {err}") from err
        if spec.layout in ("single", "any", "unrecorded"):
            keys = keys[:1]
        values = {modality_name(k): [manifest.resolve(v) for v in table[k]] for k in keys}
    single = len(values) == 1
    parts = []
    for start in progress(range(0, len(table), batch), desc="embedding", unit="batch"):
        chunk = {k: v[start : start + batch] for k, v in values.items()}
        if is_text:
            parts.append(predictor.embed_text(chunk["text"]))
        else:
            parts.append(predictor.embed_image(next(iter(chunk.values())) if single else chunk))
    keep = [c for c in ("split", "text", *manifest.label_columns, *keys) if c in table.columns]
    metadata = [{c: str(row[c]) for c in dict.fromkeys(keep)} for _, row in table.iterrows()]
    info = {"column": "+".join(keys), "manifest": str(Path(manifest_path).resolve()), "split": split}
    return EmbeddingIndex.from_embeddings(
        np.concatenate(parts), [str(c) for c in table["case_id"]], metadata, dtype=dtype, info=info
    )


def read_ids(lines: Iterable[str]) -> list[str]:
    """One id per non-empty line (for ``medalign index build --embeddings F --ids F``)."""
    return [line.strip() for line in lines if line.strip()]

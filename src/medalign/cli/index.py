"""``medalign index ...``: similar-case search over a bundle's embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medalign.cli.app import index_app
from medalign.cli_grammar import fail


@index_app.command("build")
def index_build(
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder to write.")],
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Bundle that embeds the manifest's images (or texts).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="Manifest of the cases to index.")] = None,
    column: Annotated[
        str | None, typer.Option(help="Image column for a one-image bundle, or 'text' (default: the columns the bundle records).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Index only this split (default: every row).")] = None,
    embeddings: Annotated[
        Path | None, typer.Option(help="Precomputed [N, D] embeddings (.npy) instead of --model/--manifest.")
    ] = None,
    ids: Annotated[Path | None, typer.Option(help="With --embeddings: a text file with one id per line.")] = None,
    float16: Annotated[bool, typer.Option("--float16", help="Store half-precision rows (half the disk).")] = False,
) -> None:
    """Embed a manifest with a bundle (or take precomputed embeddings) and save a searchable index.

    Rows are L2-normalised, so search scores are cosine similarities; the folder keeps each
    row's id (case_id) and metadata (split, text, labels, path) and the model that made it.

    Examples:

        medalign index build --model runs/align_medpix/bundle --manifest data/medpix.csv --out indexes/medpix
        medalign index build --embeddings emb.npy --ids ids.txt --out indexes/big --float16
    """
    import numpy as np

    from medalign.inference import case_index as retrieval

    dtype = "float16" if float16 else "float32"
    if embeddings is not None:
        if model is not None or manifest is not None:
            raise fail("give either --embeddings or --model with --manifest, not both")
        names = retrieval.read_ids(ids.read_text(encoding="utf-8").splitlines()) if ids else None
        index = retrieval.EmbeddingIndex.from_embeddings(
            np.load(embeddings, mmap_mode="r", allow_pickle=False), names, dtype=dtype, info={"source": str(embeddings)}
        )
    elif model is not None and manifest is not None:
        import medalign

        index = retrieval.build_from_manifest(medalign.load(str(model)), manifest, column=column, split=split, dtype=dtype)
        index.info["model"] = str(model.resolve())
    else:
        raise fail("give --model and --manifest (or --embeddings)")
    index.save(out)
    typer.echo(f"wrote {out}: {len(index)} rows x {index.dim} dims ({dtype})")


@index_app.command("search")
def index_search(
    index: Annotated[Path, typer.Option(help="Index folder (medalign index build).")],
    image: Annotated[
        list[str] | None,
        typer.Option(help="Query image(s), repeat for several; one case of a several-modality bundle: --image a=F --image b=F."),
    ] = None,
    text: Annotated[list[str] | None, typer.Option(help="Query text(s) (needs an alignment bundle).")] = None,
    queries: Annotated[Path | None, typer.Option(help="Precomputed [Q, D] query embeddings (.npy).")] = None,
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Bundle that embeds the queries (default: the one that built the index).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Results per query.")] = 10,
    backend: Annotated[str, typer.Option(help="exact (chunked products) or faiss (extra [faiss]).")] = "exact",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the results JSON here.")] = None,
) -> None:
    """The k most similar indexed cases for each query image, text or embedding.

    Examples:

        medalign index search --index indexes/medpix --image scan.png -k 5
        medalign index search --index indexes/medpix --text "axial CT of the chest" --out hits.json
    """
    import json

    import numpy as np

    from medalign.inference import case_index as retrieval

    found = retrieval.EmbeddingIndex.load(index)
    given = [name for name, value in (("--image", image), ("--text", text), ("--queries", queries)) if value]
    if len(given) != 1:
        raise fail("give exactly one of --image, --text, --queries")
    labels: list[str]
    if queries is not None:
        vectors = np.load(queries, allow_pickle=False)
        labels = [f"query {i}" for i in range(len(np.atleast_2d(vectors)))]
    else:
        source = model or found.info.get("model")
        if source is None:
            raise fail("this index records no model: give --model to embed the queries")
        import medalign
        from medalign.bundle.inputs import parse_image_options

        predictor = medalign.load(str(source))
        if image:
            try:
                parsed = parse_image_options(image)
                vectors = predictor.embed_image(parsed)
            except ValueError as err:
                raise fail(str(err)) from err
            labels = [" ".join(f"{k}={v}" for k, v in parsed.items())] if isinstance(parsed, dict) else list(parsed)
        else:
            vectors, labels = predictor.embed_text(list(text or [])), list(text or [])
    result = found.search(vectors, k, backend=backend)
    rows = []
    for query, hits, scores, ids in zip(labels, result.indices, result.scores, result.ids, strict=True):
        matches = [
            {"id": name, "score": round(float(score), 5), **(found.metadata[int(row)] if found.metadata else {})}
            for name, score, row in zip(ids, scores, hits, strict=True)
        ]
        rows.append({"query": query, "matches": matches})
        typer.echo(query)
        for rank, match in enumerate(matches, 1):
            typer.echo(f"  {rank:>2}. {match['id']}  {match['score']:.4f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2), encoding="utf-8")

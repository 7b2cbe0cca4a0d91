"""``medalign serve``: the Typer command (FastAPI and uvicorn are imported only when it runs)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from medalign.serve.uploads import UploadLimits


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: Annotated[
        list[Path],
        typer.Option("--model", "-m", help="A bundle folder; repeat to serve several (each answers what it can)."),
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind. The default accepts only this machine; 0.0.0.0 exposes the demo.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="MEDALIGN_PORT", help="TCP port (0 picks a free one).")] = 8000,
    labels: Annotated[
        list[str] | None, typer.Option("--label", "-l", help="Zero-shot class names (repeat, or comma-separated).")
    ] = None,
    templates: Annotated[
        str | None, typer.Option(help="Zero-shot template file (shipped name such as phantom_diagnosis, or a path).")
    ] = None,
    cases: Annotated[
        Path | None, typer.Option(help="Manifest of known cases for similar-case search (embedded at start-up).")
    ] = None,
    cases_column: Annotated[
        str | None,
        typer.Option(help="Image column of --cases for a one-image bundle (default: the columns the bundle records)."),
    ] = None,
    cases_split: Annotated[str, typer.Option(help="Split of --cases to index ('' for all rows).")] = "test",
    max_cases: Annotated[int, typer.Option(help="Index at most this many cases.")] = 1000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted file, MiB.")] = 16.0,
    max_side: Annotated[int, typer.Option(help="Largest accepted image side, pixels.")] = 4096,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads for inference (1 is fastest for small models on a busy CPU).")
    ] = None,
) -> None:
    """Start the web demo: upload a scan (and other modalities), type a prompt, see what the bundles say.

    One page shows, per served bundle, what its kind can do: zero-shot or trained diagnosis with
    probabilities, a segmentation overlay (text-guided models use the prompt), similar cases from
    --cases, a generated report and a risk score. The page asks for one upload per modality the
    bundles record (a bundle trained on a and b needs both) and every answer names the uploads it used. Uploads are typed by their content, capped in
    bytes and pixels, written only to the server's own temporary folder and deleted after each
    request. Needs the demo extra: pip install -c constraints-cpu.txt -e ".\\[demo]".

    Examples:

        medalign serve --model quickstart_out/align/bundle --model quickstart_out/segment_text/bundle \\
            --templates phantom_diagnosis --cases quickstart_out/phantom/manifest.csv

        medalign serve -m runs/segment_kvasir/bundle --port 8080
    """
    try:
        import uvicorn
    except ImportError as err:
        raise RuntimeError(
            'the web demo needs its extra: pip install -c constraints-cpu.txt -e ".[demo]"'
        ) from err
    from medalign.serve.app import create_app
    from medalign.serve.service import DemoService

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    names = [part.strip() for item in labels or [] for part in item.split(",") if part.strip()]
    limits = UploadLimits(
        max_file_bytes=int(max_upload_mb * 2**20),
        max_request_bytes=int(max_upload_mb * 2**20) * UploadLimits.max_files + 2**16,
        max_side=max_side,
        max_pixels=max_side * max_side,
    )
    service = DemoService.from_bundles(
        model,
        labels=names or None,
        templates=templates,
        cases=cases,
        cases_column=cases_column,
        cases_split=cases_split or None,
        max_cases=max_cases,
    )
    if not is_loopback(host):
        typer.secho(
            f"warning: binding {host} exposes the demo to the network; it has no authentication",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"medalign demo: {', '.join(f'{m.name} ({m.kind})' for m in service.models)}")
    typer.echo(f"uploads: {', '.join(u['field'] for u in service.upload_fields())}; serving http://{host}:{port}/")
    uvicorn.run(create_app(service, limits), host=host, port=port, log_level="warning")

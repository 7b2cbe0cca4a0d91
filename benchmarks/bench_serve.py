"""Web demo under load: N concurrent clients on loopback for a fixed time against `medalign serve`.

Ours: requests/s and p50/p99 latency of ``POST /api/analyse`` through HTTP (uvicorn, multipart
upload checks, temp files, JSON with base64 PNGs), every answer checked (status 200, a diagnosis,
an overlay, five similar cases). Reference: the same ``DemoService.analyse`` called in-process
back to back on the same images (no HTTP, no upload handling), so the ratio is what serving adds.
The load is bounded in time and count and only targets 127.0.0.1.

    python benchmarks/bench_serve.py [--clients 20 --seconds 60] [--write]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchlib

MAX_REQUESTS = 100_000  # a hard bound on top of the time limit


def build(root: Path) -> dict[str, Path]:
    import torch

    from medalign.bundle import save_bundle
    from medalign.data.phantom import PhantomConfig, generate_phantom
    from medalign.models import create_model

    torch.manual_seed(0)
    save_bundle(create_model("align_tiny", in_channels=1, image_size=64), root / "align" / "bundle")
    save_bundle(create_model("unet", image_size=64, channels=[8, 16, 32]), root / "unet" / "bundle")
    manifest = generate_phantom(root / "phantom", PhantomConfig(n=200, size=128, seed=0))
    return {"align": root / "align" / "bundle", "unet": root / "unet" / "bundle", "manifest": manifest}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url + "healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def check(body: dict) -> bool:
    return "classify" in body and body.get("segment", {}).get("overlay", "").startswith("data:image/png") and len(
        body.get("similar", [])
    ) == 5


def load(url: str, images: list[bytes], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.monotonic() < stop and len(latencies) + len(errors) < MAX_REQUESTS:
                data = rng.choice(images)
                start = time.perf_counter()
                try:
                    response = http.post("api/analyse", files={"image": ("case.png", data, "image/png")})
                    ok = response.status_code == 200 and check(response.json())
                    problem = None if ok else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - start
                with lock:
                    (errors.append(problem) if problem else latencies.append(elapsed))

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
    }


def direct(files: dict[str, Path], paths: list[Path], seconds: float) -> dict:
    import torch

    from medalign.serve.service import DemoService

    torch.set_num_threads(1)  # as the server (--threads 1)
    service = DemoService.from_bundles(
        [files["align"], files["unet"]], templates="phantom_diagnosis", cases=files["manifest"], cases_column="image:a"
    )
    rng = random.Random(0)
    times = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        start = time.perf_counter()
        assert check(service.analyse({"image": str(rng.choice(paths))}))
        times.append(time.perf_counter() - start)
    return {"requests": len(times), "rps": len(times) / sum(times), "p50_ms": 1000 * float(np.median(times))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--write", action="store_true", help="save the results file and rewrite the block")
    args = parser.parse_args()
    root = benchlib.RUNS / "serve"
    files = build(root)
    paths = sorted((root / "phantom" / "images").glob("*_a.png"))[:50]
    images = [p.read_bytes() for p in paths]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    command = [
        sys.executable, "-m", "medalign.cli", "serve", "--model", str(files["align"]), "--model", str(files["unet"]),
        "--templates", "phantom_diagnosis", "--cases", str(files["manifest"]), "--cases-column", "image:a",
        "--port", str(port), "--threads", "1",
    ]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_healthy(url, server)
        load(url, images, 2, 5)  # warm-up
        ours = load(url, images, args.clients, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    reference = direct(files, paths, min(args.seconds, 20))
    results = {"ours": ours, "reference": reference, "seconds": args.seconds, "machine": benchlib.machine()}
    if args.write:
        print(benchlib.publish("bench_serve_load", results, render, "## Web demo under load (`benchmarks/bench_serve.py load`)"))
    else:
        print(render(results))


def render(results: dict[str, Any]) -> str:
    ours, reference = results["ours"], results["reference"]
    ratio = ours["rps"] / reference["rps"]
    return (
        f"`POST /api/analyse` from {ours['clients']} concurrent clients (threads, one keep-alive connection "
        f"each) for {results['seconds']:.0f} s on loopback against `medalign serve` serving two bundles "
        "(align_tiny 64 px with zero-shot `phantom_diagnosis` templates, U-Net 64 px; random weights: this "
        "measures serving, not accuracy) and a 40-case similar-case gallery; uploads are 128 px phantom "
        "PNGs; every answer is checked (HTTP 200, diagnosis, overlay, 5 similar cases). Reference: the same "
        "`DemoService.analyse` called in-process back to back (no HTTP, no upload checks). Inference is "
        f"serialised in the server (one model call at a time), 1 torch thread on both sides. Machine: "
        f"{results['machine']}; the load generator runs on the same 2 cores.\n\n"
        "| path | requests | errors | requests/s | p50 latency | p99 latency | ratio |\n|---|---|---|---|---|---|---|\n"
        f"| HTTP, {ours['clients']} clients | {ours['requests']} | {ours['errors']} | {ours['rps']:.1f} | "
        f"{ours['p50_ms']:.0f} ms | {ours['p99_ms']:.0f} ms | {ratio:.2f}x |\n"
        f"| in-process `analyse` (reference) | {reference['requests']} | 0 | {reference['rps']:.1f} | "
        f"{reference['p50_ms']:.0f} ms | – | 1.00x |"
    )


def blocks() -> dict[str, str]:
    return benchlib.rendered({"bench_serve_load": render})


if __name__ == "__main__":
    main()

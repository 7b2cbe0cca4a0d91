"""Bundles and phantom images shared by the demo tests (random weights: the tests check plumbing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medalign.bundle import save_bundle
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.models import create_model


@pytest.fixture(scope="package")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    save_bundle(create_model("align_tiny", in_channels=1, image_size=32), root / "align" / "bundle")
    save_bundle(create_model("unet", image_size=32, channels=[4, 8, 16]), root / "unet" / "bundle")
    manifest = generate_phantom(root / "phantom", PhantomConfig(n=24, size=64))
    return {
        "align": root / "align" / "bundle",
        "unet": root / "unet" / "bundle",
        "manifest": manifest,
        "image": sorted((root / "phantom" / "images").glob("*_a.png"))[0],
    }


@pytest.fixture(scope="package")
def demo_service(demo_files: dict[str, Path]):
    from medalign.serve.service import DemoService

    return DemoService.from_bundles(
        [demo_files["align"], demo_files["unet"]],
        templates="phantom_diagnosis",
        cases=demo_files["manifest"],
        cases_column="image:a",
        cases_split=None,
    )

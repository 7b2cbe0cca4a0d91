"""Bundles and phantom images shared by the demo tests (random weights: the tests check plumbing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medalign.bundle import save_bundle
from medalign.data.phantom import PhantomConfig, generate_phantom
from medalign.inputs import InputSpec
from medalign.models import create_model


@pytest.fixture(scope="package")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    save_bundle(create_model("align_tiny", in_channels=1, image_size=32), root / "align" / "bundle")
    save_bundle(create_model("unet", image_size=32, channels=[4, 8, 16]), root / "unet" / "bundle")
    stacked = InputSpec("stacked", ("a", "b"), 1, columns=("image:a", "image:b"))  # as the quickstart trains them
    save_bundle(create_model("align_tiny", in_channels=2, image_size=32), root / "align_ab" / "bundle", inputs=stacked)
    unet = create_model("unet", in_channels=2, image_size=32, channels=[4, 8, 16])
    save_bundle(unet, root / "unet_ab" / "bundle", inputs=stacked)
    manifest = generate_phantom(root / "phantom", PhantomConfig(n=24, size=64))
    image_a = sorted((root / "phantom" / "images").glob("*_a.png"))[0]
    return {
        "align": root / "align" / "bundle",
        "unet": root / "unet" / "bundle",
        "align_ab": root / "align_ab" / "bundle",
        "unet_ab": root / "unet_ab" / "bundle",
        "manifest": manifest,
        "image": image_a,
        "image_b": image_a.with_name(image_a.name.replace("_a.png", "_b.png")),
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


@pytest.fixture(scope="package")
def stacked_service(demo_files: dict[str, Path]):
    """The README's demo in small: two bundles trained on modalities a + b stacked as channels."""
    from medalign.serve.service import DemoService

    return DemoService.from_bundles(
        [demo_files["align_ab"], demo_files["unet_ab"]],
        templates="phantom_diagnosis",
        cases=demo_files["manifest"],
        cases_split=None,
    )

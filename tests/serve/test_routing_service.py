"""The demo with a typed request: routed to one answer (chat included), or every answer on fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medalign.bundle import save_bundle
from medalign.inference.routing import Router
from medalign.models import create_model
from medalign.serve.service import DemoService

pytestmark = pytest.mark.usefixtures("one_thread")


def keyword_encoder(texts):
    words = ("outline", "many", "diagnosis", "prognosis")
    rows = np.array([[float(w in t.lower()) for w in words] for t in texts])
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def service(demo_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> DemoService:
    torch.manual_seed(0)
    bundle = tmp_path_factory.mktemp("instruct") / "bundle"
    save_bundle(create_model("instruct_tiny", in_channels=1, image_size=32).eval(), bundle)
    demo = DemoService.from_bundles(
        [demo_files["align"], demo_files["unet"], bundle], templates="phantom_diagnosis"
    )
    examples = {
        "segment": ["outline"],
        "chat": ["how many"],
        "classify": ["diagnosis"],
        "risk": ["prognosis"],
    }
    demo.router = Router(examples, threshold=0.5, encoder=keyword_encoder)
    return demo


def test_a_request_gets_only_the_answer_it_routes_to(service: DemoService, demo_files) -> None:
    image = {"image": str(demo_files["image"])}
    chat = service.analyse(image, request="How many lesions?")
    assert chat["route"]["route"] == "chat" and isinstance(chat["chat"]["answer"], str)
    assert not {"classify", "segment"} & set(chat)
    segment = service.analyse(image, request="outline it")
    assert "segment" in segment and "chat" not in segment and "classify" not in segment


def test_an_unrouted_request_keeps_the_old_behaviour_with_a_note(service: DemoService, demo_files) -> None:
    image = {"image": str(demo_files["image"])}
    result = service.analyse(image, request="hello there")
    assert result["route"]["fallback"] and {"classify", "segment"} <= set(result)
    assert any("not understood" in note for note in result["notes"])
    risk = service.analyse(image, request="prognosis please")  # no clinical bundle is served
    assert (
        any("routed to risk, which no served bundle does" in n for n in risk["notes"]) and "segment" in risk
    )
    plain = service.analyse(image)  # no request: as before, and no chat without a question
    assert "route" not in plain and "chat" not in plain and "classify" in plain

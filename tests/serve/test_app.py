"""The demo's HTTP API: answers per bundle, refusals with status codes, and where files go."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medalign.serve.app import create_app
from medalign.serve.command import is_loopback
from medalign.serve.uploads import UploadLimits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def served(demo_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A client plus the folders to watch: the app's temp root and the system temp folder."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))  # where a spooled upload would land
    root = tmp_path / "serve-root"
    root.mkdir()
    app = create_app(demo_service, UploadLimits(max_request_bytes=200_000, max_file_bytes=100_000), temp_root=root)
    with TestClient(app) as client:
        yield client, app.state.upload_dir, system_tmp
    assert not app.state.upload_dir.exists()  # removed at shutdown


def test_page_and_info(served) -> None:
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and '<form id="form">' in page.text and "api/analyse" in page.text
    info = client.get("/api/info").json()
    assert [m["name"] for m in info["models"]] == ["align", "unet"]
    assert info["models"][0]["can"] == ["classify", "embed"] and info["models"][1]["can"] == ["segment"]
    assert info["gallery"]["cases"] == 24 and info["templates"] == "phantom_diagnosis"
    assert info["limits"]["max_file_bytes"] == 100_000


def test_analyse_answers_with_every_capability(served, demo_files) -> None:
    client, upload_dir, system_tmp = served
    data = demo_files["image"].read_bytes()
    response = client.post("/api/analyse", files={"image": ("case.png", data, "image/png")}, data={"labels": ""})
    assert response.status_code == 200, response.text
    body = response.json()
    probs = body["classify"]["probabilities"]
    assert set(probs) == {"normal", "benign", "malignant"} and abs(sum(probs.values()) - 1) < 1e-3
    assert body["segment"]["overlay"].startswith("data:image/png;base64,")
    assert 0 <= body["segment"]["foreground_fraction"] <= 1
    similar = body["similar"]
    assert len(similar) == 5 and similar[0]["case_id"] == demo_files["image"].name.split("_")[0]
    assert similar[0]["score"] == pytest.approx(1.0, abs=1e-3)  # the case itself is in the gallery
    assert body["uploads"] == [{"field": "image", "name": "case.png", "format": "png", "width": 64, "height": 64}]
    assert list(upload_dir.iterdir()) == [] and list(system_tmp.iterdir()) == []
    named = client.post(
        "/api/analyse", files={"image": ("case.png", data, "image/png")}, data={"labels": "cyst, no lesion"}
    ).json()
    assert set(named["classify"]["probabilities"]) == {"cyst", "no lesion"}


@pytest.mark.parametrize(
    ("files", "fields", "status", "message"),
    [
        ({}, {"prompt": "x"}, 400, "no image"),
        ({"image": ("notes.png", b"hello, this is text", "image/png")}, {}, 415, "'notes.png': not an image"),
        ({"attachment": ("a.png", b"x", "image/png")}, {}, 400, "unexpected file field 'attachment'"),
        ({"image": ("big.png", bytes(150_000), "image/png")}, {}, 413, "limit"),
        ({}, {"comment": "hi"}, 400, "unexpected form field 'comment'"),
    ],
)
def test_refusals(served, files, fields, status: int, message: str) -> None:
    client, upload_dir, system_tmp = served
    parts = {**files, **{k: (None, v) for k, v in fields.items()}}  # always multipart, as the page sends
    response = client.post("/api/analyse", files=parts)
    assert response.status_code == status and message in response.json()["error"]
    assert list(upload_dir.iterdir()) == [] and list(system_tmp.iterdir()) == []


def test_body_limit_holds_for_declared_and_streamed_bodies(served) -> None:
    client, _, _ = served
    declared = client.post("/api/analyse", content=bytes(300_000), headers={"content-type": "multipart/form-data; boundary=x"})
    assert declared.status_code == 413

    def chunks():
        for _ in range(30):
            yield bytes(10_000)

    streamed = client.post("/api/analyse", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413
    assert client.post("/api/analyse", json={"image": "x"}).status_code == 415


def test_unreadable_pixels_are_named_by_the_client_name(served) -> None:
    client, _, _ = served
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    truncated = buffer.getvalue()[:2000]  # a valid header, then the pixel data stops
    response = client.post("/api/analyse", files={"image": ("cut.png", truncated, "image/png")})
    assert response.status_code == 422 and "cut.png" in response.json()["error"]
    assert "serve-root" not in response.json()["error"]  # server paths stay private


def test_binds_loopback_by_default() -> None:
    import inspect

    from medalign.serve.command import serve_command

    assert inspect.signature(serve_command).parameters["host"].default == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")

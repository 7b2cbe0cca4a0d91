"""The demo with bundles trained on modalities a + b stacked: it asks for each, refuses one alone
(naming what is missing) and says which uploads every answer used."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medalign.predict import PredictorError
from medalign.serve.app import create_app

pytestmark = pytest.mark.usefixtures("one_thread")


def _file(path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png")


def test_info_lists_each_modality_and_one_upload_per_modality(stacked_service) -> None:
    with TestClient(create_app(stacked_service)) as client:
        info = client.get("/api/info").json()
    assert info["modalities"] == ["a", "b"]
    assert [(u["field"], u["required"]) for u in info["uploads"]] == [("image:a", True), ("image:b", True)]
    assert all(m["modalities"] == ["a", "b"] and "stacked" in m["takes"] for m in info["models"])


def test_one_modality_is_refused_and_two_are_both_used(stacked_service, demo_files, tmp_path) -> None:
    with TestClient(create_app(stacked_service, temp_root=tmp_path)) as client:
        only_a = client.post("/api/analyse", files={"image:a": _file(demo_files["image"])})
        plain = client.post("/api/analyse", files={"image": _file(demo_files["image"])})
        both = client.post(
            "/api/analyse",
            files={"image:a": _file(demo_files["image"]), "image:b": _file(demo_files["image_b"])},
            data={"prompt": "the lesion"},
        )
    assert only_a.status_code == 422 and "'b' is missing" in only_a.json()["error"]
    assert "--image a=FILE --image b=FILE" in only_a.json()["error"]
    assert plain.status_code == 422 and "'a' and 'b' are missing" in plain.json()["error"]  # never repeated
    assert both.status_code == 200, both.text
    body = both.json()
    for answer in ("classify", "segment"):
        assert body[answer]["inputs"] == ["image:a", "image:b"]
    assert all(hit["inputs"] == ["image:a", "image:b"] for hit in body["similar"])
    assert not any("not used" in note for note in body["notes"])


def test_the_service_refuses_one_modality_from_python_too(stacked_service, demo_files) -> None:
    with pytest.raises(PredictorError, match=r"no served model could use this input: classify: .*'b' is missing"):
        stacked_service.analyse({"a": str(demo_files["image"])})
    answer = stacked_service.analyse({"a": str(demo_files["image"]), "b": str(demo_files["image_b"]), "image": str(demo_files["image"])})
    assert "uploads not used by any answer: image" in answer["notes"]

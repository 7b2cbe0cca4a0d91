"""The web demo's HTTP layer (FastAPI, the ``[demo]`` extra; imported only by ``medalign serve``): a page, ``/api/info``, ``/api/analyse``, ``/healthz``.

Safety is here, not in the page: the request body is capped while it streams in (413), a
multipart form may hold only ``max_files`` files and a few short fields, uploads are parsed in
memory and written only into the server's own temporary folder (created at start-up, emptied
per request, removed at shutdown), and nothing the client names becomes a path. Inference runs
in a worker thread so the server keeps answering while a model works.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from medalign.inference.predict import PredictorError
from medalign.serve.service import DemoService
from medalign.serve.uploads import StoredUpload, UploadError, UploadLimits, store_upload

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

MAX_FIELD_BYTES = 4096  # prompt and labels: short text


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _plain(send, 413, f"request body over the {self.limit} byte limit")
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise UploadError(f"request body over the {self.limit} byte limit", status=413)
            return message

        await self.app(scope, counted, send)


async def _plain(send: Any, status: int, text: str) -> None:
    body = f'{{"error": "{text}"}}'.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _page() -> str:
    return resources.files("medalign.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(
    service: DemoService, limits: UploadLimits | None = None, temp_root: str | Path | None = None
) -> Any:
    """The ASGI app serving ``service``; uploads live in a fresh folder under ``temp_root``."""
    limits = limits or UploadLimits()
    upload_dir = Path(tempfile.mkdtemp(prefix="medalign-serve-", dir=temp_root)).resolve()

    class InMemoryParser(MultiPartParser):
        spool_max_size = limits.max_file_bytes + 1  # never spills to the system temp folder

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        shutil.rmtree(upload_dir, ignore_errors=True)

    app = FastAPI(title="medalign demo", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.upload_dir, app.state.limits, app.state.service = upload_dir, limits, service

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(_page(), headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {**service.info(), "limits": limits.__dict__}

    @app.post("/api/analyse")
    async def analyse(request: Request) -> JSONResponse:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error(415, "send multipart/form-data: files 'image' or 'image:<modality>', fields 'prompt', 'labels', 'request'")
        stored: list[StoredUpload] = []
        try:
            parser = InMemoryParser(
                request.headers, request.stream(), max_files=limits.max_files, max_fields=8, max_part_size=MAX_FIELD_BYTES
            )
            form = await parser.parse()
            fields: dict[str, str] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image" and not key.startswith("image:"):
                        raise UploadError(f"unexpected file field {key!r}; use 'image' or 'image:<modality>'")
                    if any(s.field == key for s in stored):
                        raise UploadError(f"two files for {key!r}")
                    data = await value.read()
                    stored.append(store_upload(data, value.filename or key, key, upload_dir, limits))
                elif key in ("prompt", "labels", "request"):
                    fields[key] = str(value)
                else:
                    raise UploadError(f"unexpected form field {key!r}; known: prompt, labels, request")
            if not stored:
                return error(400, "no image: upload a file in the field 'image' (or 'image:<modality>')")
            images = {s.field.removeprefix("image:") if s.field != "image" else "image": s.ref for s in stored}
            labels = [x for x in fields.get("labels", "").split(",") if x.strip()] or None
            result = await run_in_threadpool(
                service.analyse, images, fields.get("prompt"), labels, fields.get("request")
            )
            result["uploads"] = [
                {"field": s.field, "name": s.filename, "format": s.format, "width": s.width, "height": s.height,
                 **({"slice": f"{s.depth // 2} of {s.depth}"} if s.depth else {})}
                for s in stored
            ]
            return JSONResponse(result)
        except UploadError as exc:
            return error(exc.status, str(exc))
        except MultiPartException as exc:
            return error(400, f"bad form: {exc}")
        except PredictorError as exc:
            return error(422, str(exc))
        except ValueError as exc:  # ImageReadError and friends: the upload's pixels are unusable
            message = str(exc)
            for s in stored:  # name the file as the client knows it, not its server-side path
                message = message.replace(str(s.path), s.filename)
            return error(422, message)
        finally:
            for s in stored:
                s.path.unlink(missing_ok=True)

    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    return app

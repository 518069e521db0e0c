"""The scoring service: the cloud endpoint's request and response, on FastAPI and uvicorn.

``POST /score`` takes image uploads (multipart fields ``file`` or ``files``) or the cloud
service's JSON ``{"input_data": {"columns": ["image"], "data": ["<base64>", ...]}}`` and
answers ``[{"filename", "boxes": [{"box": {"topX", "topY", "bottomX", "bottomY"}, "label",
"score"}]}]``. ``/health`` and ``/ready`` stay open for load balancers and orchestrators;
``/score`` and ``/metadata`` need the key in ``VISIONAUTOML_API_KEY`` when it is set.

Untrusted input is bounded before it costs anything: the body size is checked against
``Content-Length`` and again while it streams in, the pixel count is read from the image
header before decoding, and a request waits for inference at most ``timeout_s``. The
model runs on a bounded thread pool, never on the event loop, so health checks answer
while images are scored, and requests beyond the pool and its queue get 503 at once
instead of piling up.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import os
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from visionautoml.config import Thresholds
from visionautoml.data.images import decode_image_bytes
from visionautoml.deploy.runtime import LoadedModel, ModelLocation, default_threads, load_located
from visionautoml.errors import DataError
from visionautoml.models.predictor import automl_boxes

log = logging.getLogger(__name__)

API_KEY_ENV = "VISIONAUTOML_API_KEY"
_WORKER_ENV = "VISIONAUTOML_SERVE_WORKER"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Limits of one server process; every one of them protects it from a client."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 16
    timeout_s: float = 30.0
    concurrency: int = 2
    queue: int = 16
    threads: int | None = None

    def inference_threads(self) -> int:
        """Cores per inference, so that ``concurrency`` inferences together use the cores once."""
        return self.threads or max(1, default_threads() // self.concurrency)


class Box(BaseModel):
    topX: float
    topY: float
    bottomX: float
    bottomY: float


class Detection(BaseModel):
    box: Box
    label: str
    score: float


class ImageResult(BaseModel):
    filename: str
    boxes: list[Detection]


class ErrorMessage(BaseModel):
    detail: str


class Metadata(BaseModel):
    model_name: str
    registered_model: str | None
    version: str | None
    source: str
    backend: str
    labels: list[str]
    thresholds: Thresholds


_SCORE_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "one image"},
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "several images",
                    },
                },
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["input_data"],
                "properties": {
                    "input_data": {
                        "type": "object",
                        "required": ["data"],
                        "properties": {
                            "columns": {"type": "array", "items": {"type": "string"}},
                            "data": {
                                "type": "array",
                                "items": {"type": "string", "format": "byte"},
                                "description": "base64-encoded image files",
                            },
                        },
                    }
                },
            },
            "example": {"input_data": {"columns": ["image"], "data": ["<base64 of a JPEG or PNG file>"]}},
        },
    },
}

_ERRORS = {
    400: "a malformed multipart body or Content-Length",
    401: "missing or wrong API key",
    413: "body, image count or image pixels over the limit",
    415: "not an image, or not multipart/form-data or JSON",
    422: "undecodable image, bad base64 or a malformed request",
    503: "the server is busy; retry later",
    504: "inference took longer than the request timeout",
}


class _InferencePool:
    """A fixed set of inference threads with a bounded queue in front of it."""

    def __init__(self, settings: ServeSettings) -> None:
        self._executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="inference")
        self._capacity = settings.concurrency + settings.queue
        self._timeout = settings.timeout_s
        self._pending = 0
        self._lock = threading.Lock()

    async def run(self, work: Callable[[], _T]) -> _T:
        with self._lock:
            if self._pending >= self._capacity:
                raise HTTPException(
                    503, "the server is busy; retry in a moment", headers={"Retry-After": "1"}
                )
            self._pending += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self._timeout)
        except TimeoutError:
            future.cancel()
            raise HTTPException(
                504, f"inference took longer than {self._timeout:g} s; send fewer or smaller images"
            ) from None

    def _release(self, _future: object) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def create_app(loaded: LoadedModel, settings: ServeSettings, api_key: str | None = None) -> FastAPI:
    """The scoring app around an already loaded model; ``api_key`` None leaves it open."""
    pool = _InferencePool(settings)
    bearer = HTTPBearer(auto_error=False, description=f"the key in {API_KEY_ENV}")
    header_key = APIKeyHeader(name="x-api-key", auto_error=False, description=f"the key in {API_KEY_ENV}")

    async def authorise(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
        x_api_key: str | None = Depends(header_key),
    ) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else x_api_key
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="visionautoml scoring service",
        version="1",
        description=(
            f"Object detection with `{loaded.spec.model_name}` ({loaded.backend}). "
            "Send images to `POST /score` as multipart uploads (`file` or `files`) or as the cloud "
            'service\'s JSON `{"input_data": {"columns": ["image"], "data": ["<base64>"]}}`. '
            f"Box coordinates are fractions of the image size. With {API_KEY_ENV} set, `/score` and "
            "`/metadata` need the key; `/health` and `/ready` stay open."
        ),
    )
    error_responses = {code: {"model": ErrorMessage, "description": text} for code, text in _ERRORS.items()}

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and can score")
    async def ready() -> dict[str, str]:
        return {"status": "ready", "backend": loaded.backend}

    @app.get(
        "/metadata",
        response_model=Metadata,
        dependencies=[Depends(authorise)],
        responses={401: error_responses[401]},
        summary="The model behind the service: name, registry version, labels, thresholds",
    )
    async def metadata() -> dict[str, Any]:
        return loaded.metadata()

    @app.post(
        "/score",
        response_model=list[ImageResult],
        dependencies=[Depends(authorise)],
        responses=error_responses,
        openapi_extra={"requestBody": _SCORE_REQUEST_BODY},
        summary="Detect objects in one or more images",
    )
    async def score(request: Request) -> list[dict[str, Any]]:
        body = await _read_body(request, settings.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            images = await _multipart_images(request, body, settings.max_images)
        elif content_type == "application/json" or content_type.endswith("+json"):
            images = _json_images(body)
        else:
            raise HTTPException(415, "send multipart/form-data (field `file` or `files`) or application/json")
        if not images:
            raise HTTPException(
                422, "no image in the request: send field `file` or `files`, or input_data.data"
            )
        if len(images) > settings.max_images:
            raise HTTPException(
                413, f"{len(images)} images in one request; the limit is {settings.max_images}"
            )
        return await pool.run(lambda: _score(loaded, images, settings.max_pixels))

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"the body has {int(declared):,} bytes; the limit is {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"the body is larger than the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_images(request: Request, body: bytes, max_images: int) -> list[tuple[str, bytes]]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=max_images + 1, max_fields=100)
    try:
        images: list[tuple[str, bytes]] = []
        for key in ("file", "files"):
            for value in form.getlist(key):
                if not isinstance(value, UploadFile):
                    raise HTTPException(
                        422, f"multipart field `{key}` must be a file upload, not a text value"
                    )
                images.append((value.filename or f"{key}[{len(images)}]", await value.read()))
        if not images:
            fields = ", ".join(f"`{name}`" for name in form) or "none"
            raise HTTPException(422, f"no multipart field `file` or `files` (fields sent: {fields})")
        return images
    finally:
        await form.close()


def _json_images(body: bytes) -> list[tuple[str, bytes]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise HTTPException(422, f"the body is not valid JSON ({str(error)[:200]})") from None
    data = payload.get("input_data") if isinstance(payload, dict) else None
    rows = data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise HTTPException(
            422, 'expected {"input_data": {"columns": ["image"], "data": ["<base64>", ...]}} as the body'
        )
    columns = data.get("columns")
    if columns is not None and columns != ["image"]:
        raise HTTPException(422, f'input_data.columns must be ["image"], got {json.dumps(columns)[:100]}')
    images = []
    for index, row in enumerate(rows):
        # pandas' "split" orientation sends each row as a one-element list.
        value = row[0] if isinstance(row, list) and len(row) == 1 else row
        if not isinstance(value, str):
            raise HTTPException(422, f"input_data.data[{index}] must be a base64 string")
        try:
            images.append((f"data[{index}]", base64.b64decode("".join(value.split()), validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"input_data.data[{index}] is not valid base64") from None
    return images


def _score(loaded: LoadedModel, images: list[tuple[str, bytes]], max_pixels: int) -> list[dict[str, Any]]:
    """Runs on an inference thread: decoding is CPU work too."""
    decoded = [(name, _decode(name, data, max_pixels)) for name, data in images]
    detections = loaded.predictor.predict([pixels for _, pixels in decoded])
    return [
        {"filename": name, "boxes": automl_boxes(found, width=pixels.shape[2], height=pixels.shape[1])}
        for (name, pixels), found in zip(decoded, detections, strict=True)
    ]


def _decode(name: str, data: bytes, max_pixels: int) -> torch.Tensor:
    """415 for what is no image, 413 for too many pixels (read from the header), 422 if it fails to decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{name}: refused, too many pixels (decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise HTTPException(
            415, f"{name}: not an image; send JPEG, PNG, BMP, GIF, TIFF or WebP files"
        ) from None
    if width * height > max_pixels:
        raise HTTPException(
            413, f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}; downscale it first"
        )
    try:
        return decode_image_bytes(data, name=name, max_pixels=max_pixels)
    except DataError as error:
        raise HTTPException(422, str(error)) from None


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process of a multi-worker server (``--workers N``)."""
    raw = json.loads(os.environ[_WORKER_ENV])
    settings = ServeSettings(**raw["settings"])
    loaded = load_located(ModelLocation.from_json(raw["location"]), threads=settings.inference_threads())
    return create_app(loaded, settings, api_key_from_environment())


def api_key_from_environment() -> str | None:
    """The key, from the environment only: a command-line flag would show in `ps` and shell history."""
    key = os.environ.get(API_KEY_ENV, "")
    return key or None


def serve(
    location: ModelLocation,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    settings: ServeSettings | None = None,
) -> None:
    """Run the service until interrupted; the model is loaded before the port opens."""
    import uvicorn

    settings = settings or ServeSettings()
    if api_key_from_environment() is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without %s: anyone who reaches the port can score images", host, API_KEY_ENV
        )
    if workers > 1:
        os.environ[_WORKER_ENV] = json.dumps({"location": location.to_json(), "settings": asdict(settings)})
        uvicorn.run(
            "visionautoml.deploy.serve:app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="info",
        )
        return
    loaded = load_located(location, threads=settings.inference_threads())
    uvicorn.run(
        create_app(loaded, settings, api_key_from_environment()), host=host, port=port, log_level="info"
    )

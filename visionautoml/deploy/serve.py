"""The scoring service: the cloud endpoint's request and response, on FastAPI and uvicorn.

``POST /score`` takes image uploads (multipart fields ``file`` or ``files``) or the cloud
service's JSON ``{"input_data": {"columns": ["image"], "data": ["<base64>", ...]}}`` and
answers ``[{"filename", "boxes": [{"box": {"topX", "topY", "bottomX", "bottomY"}, "label",
"score"}]}]``. ``/health`` and ``/ready`` stay open for load balancers and orchestrators;
everything else (``/score``, ``/metadata``, ``/metrics``, ``/docs``, ``/openapi.json``) needs
the key in ``VISIONAUTOML_API_KEY`` when it is set (``public_docs`` opens the two docs routes).

Untrusted input is bounded before it costs anything: the body size is checked against
``Content-Length`` and again while it streams in, the pixel count of every image is read
from its header before any is decoded (per image and per request, which bounds the memory a
request can take), and a request waits at most ``timeout_s``. Images are decoded by
:mod:`visionautoml.data.images` (Pillow only: a bad file is a 4xx, never a crash) and scored
on a bounded set of inference threads (:mod:`visionautoml.deploy.batching`) that gather
concurrent requests into one inference call, never on the event loop, so health checks
answer while images are scored. ``serve`` runs the app in a worker process under uvicorn's
supervisor, which starts a new worker when one dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visionautoml.deploy.api import ERRORS, SCORE_REQUEST_BODY, ErrorMessage, ImageResult, Metadata
from visionautoml.deploy.batching import Batcher
from visionautoml.deploy.inputs import check_pixels, decode_all, json_images, multipart_images, read_body
from visionautoml.deploy.metrics import CONTENT_TYPE, ServiceMetrics
from visionautoml.deploy.runtime import LoadedModel, ModelLocation, default_threads, load_located
from visionautoml.errors import VisionAutoMLError, first_line
from visionautoml.models.predictor import Detections, automl_boxes

log = logging.getLogger(__name__)

API_KEY_ENV = "VISIONAUTOML_API_KEY"
_WORKER_ENV = "VISIONAUTOML_SERVE_WORKER"
_ROUTES = ("/score", "/metadata", "/metrics", "/health", "/ready", "/docs", "/openapi.json")


@dataclass(frozen=True, slots=True)
class ServeSettings:
    """Limits of one server process; every one of them protects it from a client.

    ``max_batch`` images from concurrent requests go into one inference call, gathered for at
    most ``batch_wait_s`` (1 turns batching off); ``concurrency`` such calls run at a time.
    """

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_request_pixels: int = 40_000_000
    max_images: int = 16
    timeout_s: float = 30.0
    concurrency: int = 2
    queue: int = 16
    threads: int | None = None
    max_batch: int = 8
    batch_wait_s: float = 0.005
    public_docs: bool = False

    def inference_threads(self) -> int:
        """Cores per inference, so that ``concurrency`` inferences together use the cores once."""
        return self.threads or max(1, default_threads() // self.concurrency)


def create_app(loaded: LoadedModel, settings: ServeSettings, api_key: str | None = None) -> FastAPI:
    """The scoring app around an already loaded model; ``api_key`` None leaves it open."""
    metrics = ServiceMetrics()
    batcher: Batcher[torch.Tensor, Detections] = Batcher(
        loaded.predictor.predict,
        threads=settings.concurrency,
        queue_size=settings.queue,
        timeout_s=settings.timeout_s,
        max_batch=settings.max_batch,
        wait_s=settings.batch_wait_s,
        on_batch=metrics.batch_done,
    )
    decoder = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="decode")
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
        batcher.shutdown()
        decoder.shutdown(wait=False, cancel_futures=True)

    guarded = "`/score`, `/metadata`, `/metrics`" + (
        "" if settings.public_docs else ", `/docs`, `/openapi.json`"
    )
    app = FastAPI(
        lifespan=lifespan,
        title="visionautoml scoring service",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description=(
            f"Object detection with `{loaded.spec.model_name}` ({loaded.backend}). "
            "Send images to `POST /score` as multipart uploads (`file` or `files`) or as the cloud "
            'service\'s JSON `{"input_data": {"columns": ["image"], "data": ["<base64>"]}}`. '
            f"Box coordinates are fractions of the image size. With {API_KEY_ENV} set, {guarded} "
            "need the key; `/health` and `/ready` stay open."
        ),
    )
    app.add_middleware(_Measured, metrics=metrics)
    error_responses = {code: {"model": ErrorMessage, "description": text} for code, text in ERRORS.items()}
    docs_guard = [] if settings.public_docs else [Depends(authorise)]

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_guard)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title}: docs")

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and can score")
    async def ready() -> dict[str, str]:
        return {"status": "ready", "backend": loaded.backend}

    @app.get(
        "/metrics",
        dependencies=[Depends(authorise)],
        responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {}}}, 401: error_responses[401]},
        response_class=Response,
        summary="Prometheus metrics: requests, latency, batch sizes, errors",
    )
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get(
        "/metadata",
        response_model=Metadata,
        dependencies=[Depends(authorise)],
        responses={401: error_responses[401]},
        summary="The model behind the service: name, registry version, labels, thresholds, tiling",
    )
    async def metadata() -> dict[str, Any]:
        return loaded.metadata()

    @app.post(
        "/score",
        response_model=list[ImageResult],
        dependencies=[Depends(authorise)],
        responses=error_responses,
        openapi_extra={"requestBody": SCORE_REQUEST_BODY},
        summary="Detect objects in one or more images",
    )
    async def score(request: Request) -> list[dict[str, Any]]:
        body = await read_body(request, settings.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            images = await multipart_images(request, body, settings.max_images)
        elif content_type == "application/json" or content_type.endswith("+json"):
            images = json_images(body)
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
        check_pixels(images, settings.max_pixels, settings.max_request_pixels)
        deadline = time.monotonic() + settings.timeout_s
        ticket = batcher.admit()
        try:
            decoding = asyncio.get_running_loop().run_in_executor(
                decoder, decode_all, images, settings.max_pixels
            )
            try:
                pixels = await asyncio.wait_for(decoding, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(504, f"decoding took longer than {settings.timeout_s:g} s") from None
            found = await batcher.run(ticket, pixels, deadline)
        finally:
            batcher.leave(ticket)
        return [
            {"filename": name, "boxes": automl_boxes(detections, width=image.shape[2], height=image.shape[1])}
            for (name, _), image, detections in zip(images, pixels, found, strict=True)
        ]

    return app


class _Measured:
    """ASGI middleware counting every HTTP request by route and status, and timing it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ROUTES else "other"
            self.metrics.request_finished(
                scope.get("method", ""), endpoint, status, time.perf_counter() - started
            )


def app_from_environment() -> FastAPI:
    """uvicorn's factory in each worker process (the supervisor starts them, and restarts a dead one).

    A model that does not load exits with uvicorn's startup-failure code, which stops the
    supervisor instead of making it restart the worker forever.
    """
    from uvicorn.config import STARTUP_FAILURE

    raw = json.loads(os.environ[_WORKER_ENV])
    settings = ServeSettings(**raw["settings"])
    try:
        loaded = load_located(ModelLocation.from_json(raw["location"]), threads=settings.inference_threads())
    except VisionAutoMLError as error:
        print(f"error: {first_line(error)}", file=sys.stderr, flush=True)
        sys.exit(STARTUP_FAILURE)
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
    """Run the service until interrupted: ``workers`` processes under uvicorn's supervisor.

    The supervisor holds the listening socket and starts a new worker when one dies (a
    native crash, the kernel's OOM killer, a ``kill``), so even the default single worker
    comes back; connections wait in the socket's backlog meanwhile. A worker that fails
    while starting (the model does not load) stops the service instead of looping.
    """
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    settings = settings or ServeSettings()
    if api_key_from_environment() is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without %s: anyone who reaches the port can score images", host, API_KEY_ENV
        )
    os.environ[_WORKER_ENV] = json.dumps({"location": location.to_json(), "settings": asdict(settings)})
    config = uvicorn.Config(
        "visionautoml.deploy.serve:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        timeout_worker_healthcheck=30,
    )
    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        raise VisionAutoMLError(
            f"the server could not load {location.source} (the reason is above); export the model again "
            "or serve it with --backend pytorch"
        )

"""`visionautoml export`, `predict` and `serve`: a model to ONNX, to files of boxes, to an endpoint."""

from __future__ import annotations

from dataclasses import replace
from enum import StrEnum
from pathlib import Path

import typer
from rich.text import Text

from visionautoml.cli.common import (
    TILE_GRID_HELP,
    TILE_NMS_HELP,
    TILE_OVERLAP_HELP,
    console,
    err_console,
    parse_duration,
    tiling_overrides,
)


class ExportFormat(StrEnum):
    onnx = "onnx"


class Precision(StrEnum):
    none = "none"
    int8 = "int8"


class Calibration(StrEnum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Backend(StrEnum):
    auto = "auto"
    onnx = "onnx"
    openvino = "openvino"
    pytorch = "pytorch"


class PredictionFormat(StrEnum):
    jsonl = "jsonl"
    csv = "csv"


MODEL_ARGUMENT_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a saved-model folder or an ONNX export "
    "folder. The tracking store is MLFLOW_TRACKING_URI, else ./.visionautoml/mlflow.db."
)
BACKEND_HELP = (
    "auto: ONNX Runtime when an export is found (--onnx, the model's onnx/ folder), else PyTorch; "
    "openvino: OpenVINO on the same export (pip install 'visionautoml[openvino]')."
)


def export(
    model: str = typer.Argument(..., help=MODEL_ARGUMENT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx, labels.json, settings.json."),
    to: ExportFormat = typer.Option(
        ExportFormat.onnx, "--to", help="Export format; onnx is the one there is."
    ),
    images: list[Path] = typer.Option(
        [],
        "--images",
        help="Images or folders for the parity check (repeatable); with --quantize int8 an annotated "
        "dataset (VOC, COCO, YOLO, JSONL) to calibrate and gate on. Default: the run's validation data.",
    ),
    attach: bool = typer.Option(
        False, "--attach", help="Also upload the export into the tracked model, where `serve` finds it."
    ),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Largest box difference (px) parity accepts."),
    quantize: Precision = typer.Option(
        Precision.none, "--quantize", help="int8: static quantization, guarded by the accuracy gate."
    ),
    gate_tolerance: float = typer.Option(
        0.01, "--gate-tolerance", min=0.0, help="Largest mAP@0.5 an int8 export may lose against fp32."
    ),
    calibration: Calibration = typer.Option(
        Calibration.minmax, "--calibration", help="How int8 activation ranges are calibrated."
    ),
) -> None:
    """Export a trained detector to ONNX and check it predicts what PyTorch predicts.

    The whole inference path (resize, NMS, box scaling) is in the graph; it takes one float
    CHW image of any size. Parity: ONNX Runtime and PyTorch must give the same labels and
    boxes (within `--tolerance` px) for the top detections of sample images: `--images`, else the
    model's validation images, else synthetic ones. SSD models also get a batched path (a core graph
    with a batch axis), checked against the one-image graph. The result goes to `parity.json` and,
    for a tracked model, to tags on the model version. Nothing is written if parity fails.

    `--quantize int8` quantizes the backbone and heads (per-channel int8 weights; resize, box decoding
    and NMS stay fp32), calibrated on the model's validation images (or `--images DATASET`). Instead
    of box parity an accuracy gate guards it: its mAP@0.5 on those images must be within
    `--gate-tolerance` of the fp32 graph's, else nothing is written and the miss is reported.

    Examples:

    * `visionautoml export models:/raccoon@champion --to onnx --out exports/raccoon`
    * `visionautoml export runs:/3f2a.../model --out exports/trial --images data/raccoon/images`
    * `visionautoml export models:/raccoon/3 --out exports/raccoon-3 --attach`
    * `visionautoml export models:/raccoon/3 --out exports/raccoon-int8 --quantize int8`
    """
    from visionautoml.deploy.export import export_model

    result = export_model(
        model,
        out,
        images=images,
        attach=attach,
        tolerance_px=tolerance,
        quantize=quantize.value,  # type: ignore[arg-type]
        gate_tolerance=gate_tolerance,
        calibration=calibration.value,  # type: ignore[arg-type]
    )
    console.print(result.summary(), soft_wrap=True)
    for record in result.recorded_on:
        console.print(record, soft_wrap=True)
    console.print(f"wrote {result.directory}", soft_wrap=True)


def predict(
    model: str = typer.Argument(..., help=MODEL_ARGUMENT_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.jsonl/.csv (and images/)."),
    output_format: PredictionFormat = typer.Option(
        PredictionFormat.jsonl, "--to", help="jsonl (one /score answer a line) or csv."
    ),
    draw: bool = typer.Option(False, "--draw", help="Also write each image with its boxes to OUT/images/."),
    onnx: Path | None = typer.Option(None, "--onnx", help="An export folder to run instead of the model."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help=BACKEND_HELP),
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        min=1,
        help="Images decoded and scored together: one call of the export's batched graph (SSD models).",
    ),
    tile_grid_size: str | None = typer.Option(None, "--tile-grid-size", help=TILE_GRID_HELP),
    tile_overlap_ratio: float | None = typer.Option(None, "--tile-overlap-ratio", help=TILE_OVERLAP_HELP),
    tile_nms_threshold: float | None = typer.Option(
        None, "--tile-predictions-nms-threshold", help=TILE_NMS_HELP
    ),
) -> None:
    """Score images in batch; boxes in the cloud service's format (fractions of the image size).

    Unreadable images are listed in `OUT/skipped.jsonl` and skipped; the rest are scored. With an
    export that has a batched path (SSD models), each `--batch-size` images run as one batch. A model
    trained with tiling answers for the whole image and its tiles, merged; `--tile-grid-size` (and the
    overlap and merge threshold) replace its own grid, `--tile-grid-size none` turns it off.

    Examples:

    * `visionautoml predict models:/raccoon@champion data/new-photos --out predictions/`
    * `visionautoml predict ./model photo1.jpg photo2.png --out out/ --to csv --draw`
    * `visionautoml predict models:/raccoon/3 data/ --out out/ --onnx exports/raccoon-3`
    """
    from visionautoml.deploy.predict import predict_images
    from visionautoml.deploy.runtime import load_for_inference

    tiling = tiling_overrides(tile_grid_size, tile_overlap_ratio, tile_nms_threshold)
    loaded = load_for_inference(
        model,
        onnx=onnx,
        backend=backend.value,  # type: ignore[arg-type]
        batch_size=batch_size,
        tiling=tiling,
    )
    tiles = f", tiles {loaded.tiling.tile_grid_size}" if loaded.tiling.grid else ""
    err_console.print(f"scoring with {loaded.spec.model_name} on {loaded.backend}{tiles}", soft_wrap=True)
    summary = predict_images(
        loaded,
        images,
        out,
        output_format=output_format,
        draw=draw,
        batch_size=batch_size,
        console=err_console,
    )
    for name, reason in summary.skipped:
        err_console.print(Text.assemble(("skipped ", "yellow"), f"{name}: {reason}"), soft_wrap=True)
    console.print(
        f"scored {summary.scored} images ({summary.boxes} boxes), skipped {len(summary.skipped)}: "
        f"{summary.output}",
        soft_wrap=True,
    )


def serve(
    model: str = typer.Argument(..., help=MODEL_ARGUMENT_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 means every one."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes, each loads the model."),
    onnx: Path | None = typer.Option(None, "--onnx", help="An export folder to run instead of the model."),
    backend: Backend = typer.Option(Backend.auto, "--backend", help=BACKEND_HELP),
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Inference threads per process."),
    max_batch: int = typer.Option(
        8,
        "--max-batch",
        min=1,
        help="Most images of concurrent requests scored in one call (1: no batching).",
    ),
    batch_wait: str = typer.Option(
        "0.005s",
        "--batch-wait",
        help="How long a batch waits for more requests on their way: 0.005s, 0.02 (seconds) ...",
    ),
    timeout: str = typer.Option(
        "30s", "--timeout", help="How long a request may wait (else 504): 30s, 2m ..."
    ),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.001, help="Largest request body (413)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Largest image, in pixels (413)."),
    max_request_pixels: int = typer.Option(
        40_000_000, "--max-request-pixels", min=1, help="Most pixels of all images of one request (413)."
    ),
    max_images: int = typer.Option(16, "--max-images", min=1, help="Most images in one request (413)."),
    public_docs: bool = typer.Option(
        False, "--public-docs", help="Serve /docs and /openapi.json without the API key."
    ),
    tile_grid_size: str | None = typer.Option(None, "--tile-grid-size", help=TILE_GRID_HELP),
    tile_overlap_ratio: float | None = typer.Option(None, "--tile-overlap-ratio", help=TILE_OVERLAP_HELP),
    tile_nms_threshold: float | None = typer.Option(
        None, "--tile-predictions-nms-threshold", help=TILE_NMS_HELP
    ),
) -> None:
    """Serve the model over HTTP with the cloud endpoint's request and response.

    `POST /score` takes multipart uploads (field `file` or `files`) or the JSON
    `{"input_data": {"columns": ["image"], "data": ["<base64>", ...]}}` and returns
    `[{"filename", "boxes": [{"box": {"topX", "topY", "bottomX", "bottomY"}, "label", "score"}]}]`.
    Also `GET /health`, `/ready`, `/metadata`, `/metrics` (Prometheus) and the OpenAPI docs at `/docs`.

    Concurrent requests are gathered into one inference call of up to `--max-batch` images (waiting
    at most `--batch-wait` for requests already on their way). The server runs as a worker process
    under a supervisor that starts a new one if it dies. A model trained with tiling (its export
    records the grid) answers for the whole image and its tiles, merged, as it was validated;
    `--tile-grid-size` replaces the grid, `--tile-grid-size none` turns tiling off.

    Set `VISIONAUTOML_API_KEY` in the environment to require `Authorization: Bearer KEY` or
    `x-api-key: KEY` on everything but `/health` and `/ready`, which stay open for probes (401
    otherwise); `--public-docs` opens `/docs` and `/openapi.json` too. There is no flag for the key
    on purpose: flags show in `ps` and shell history.

    Examples:

    * `VISIONAUTOML_API_KEY=$(openssl rand -hex 16) visionautoml serve models:/raccoon@champion`
    * `VISIONAUTOML_API_KEY=... visionautoml serve models:/raccoon/3 --host 0.0.0.0 --workers 2`
    * `curl -F file=@raccoon.jpg http://127.0.0.1:8080/score`
    """
    from visionautoml.deploy.runtime import locate_model
    from visionautoml.deploy.serve import API_KEY_ENV, ServeSettings, api_key_from_environment
    from visionautoml.deploy.serve import serve as run_server

    tiling = tiling_overrides(tile_grid_size, tile_overlap_ratio, tile_nms_threshold)
    location = replace(locate_model(model, onnx=onnx, backend=backend.value), tiling=tiling)  # type: ignore[arg-type]
    settings = ServeSettings(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_request_pixels=max_request_pixels,
        max_images=max_images,
        timeout_s=parse_duration(timeout),
        concurrency=concurrency,
        max_batch=max_batch,
        batch_wait_s=parse_duration(batch_wait, "--batch-wait"),
        public_docs=public_docs,
    )
    key = "required" if api_key_from_environment() else f"not required (set {API_KEY_ENV} to require one)"
    address = f"http://{host}:{port}"
    err_console.print(
        f"serving {location.source} ({location.backend}) on {address}, docs at {address}/docs, API key {key}",
        soft_wrap=True,
    )
    run_server(location, host=host, port=port, workers=workers, settings=settings)

"""Batch prediction: score a folder of images into the cloud service's response format.

Each line of ``predictions.jsonl`` is what ``POST /score`` answers for that image
(``{"filename", "boxes": [{"box": {"topX", ...}, "label", "score"}]}``), so downstream code
reads batch and online results alike. An unreadable image is reported in ``skipped.jsonl``
and on the console, and the rest are still scored.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from torchvision.utils import draw_bounding_boxes

from visionautoml.data.images import decode_image_file
from visionautoml.deploy.runtime import LoadedModel
from visionautoml.errors import DataError
from visionautoml.files import atomic_path, atomic_write_bytes, atomic_write_text
from visionautoml.models.predictor import Detections, automl_boxes
from visionautoml.progress import progress_bar

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
OutputFormat = Literal["jsonl", "csv"]
CSV_COLUMNS = ("filename", "label", "score", "topX", "topY", "bottomX", "bottomY")


@dataclass(slots=True)
class PredictSummary:
    output: Path
    scored: int = 0
    boxes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    drawn: Path | None = None


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    path: Path


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(name, path) of every image: files as given, folders searched recursively by suffix.

    The name is the file name, or the path relative to the folder given, so outputs of
    two images with the same file name in different subfolders do not collide.
    """
    found: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            found.extend((file.relative_to(path).as_posix(), file) for file in files)
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise DataError(f"{path}: no such file or folder; give image files or folders of images")
    if not found:
        listed = ", ".join(str(item) for item in inputs)
        raise DataError(f"no images found in {listed} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def predict_images(
    loaded: LoadedModel,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    output_format: OutputFormat = "jsonl",
    draw: bool = False,
    batch_size: int = 8,
    console: Console | None = None,
) -> PredictSummary:
    """Score every image under ``inputs`` into ``out_dir/predictions.{jsonl,csv}`` (atomically)."""
    out_dir = Path(out_dir)
    images = [_Input(name, path) for name, path in collect_images(inputs)]
    summary = PredictSummary(output=out_dir / f"predictions.{output_format}")
    if draw:
        summary.drawn = out_dir / "images"
    with (
        atomic_path(summary.output) as temporary,
        temporary.open("w", encoding="utf-8", newline="") as handle,
    ):
        writer = _writer(handle, output_format)
        with _progress(console) as progress:
            task = progress.add_task("predicting", total=len(images))
            for batch in _batches(images, batch_size):
                decoded = []
                for item in batch:
                    try:
                        decoded.append((item, decode_image_file(item.path)))
                    except DataError as error:
                        summary.skipped.append((item.name, str(error)))
                for (item, pixels), detections in zip(
                    decoded, loaded.predictor.predict([pixels for _, pixels in decoded]), strict=True
                ):
                    boxes = automl_boxes(detections, width=pixels.shape[2], height=pixels.shape[1])
                    writer(item.name, boxes)
                    summary.scored += 1
                    summary.boxes += len(boxes)
                    if summary.drawn is not None:
                        _draw(pixels, detections, summary.drawn / _drawn_name(item.name))
                progress.advance(task, len(batch))
    if summary.skipped:
        lines = (json.dumps({"filename": name, "error": error}) for name, error in summary.skipped)
        atomic_write_text(out_dir / "skipped.jsonl", "\n".join(lines) + "\n")
    return summary


def _writer(handle: io.TextIOBase, output_format: OutputFormat):
    if output_format == "jsonl":

        def write_jsonl(name: str, boxes: list[dict]) -> None:
            handle.write(json.dumps({"filename": name, "boxes": boxes}) + "\n")

        return write_jsonl
    table = csv.writer(handle)
    table.writerow(CSV_COLUMNS)

    def write_csv(name: str, boxes: list[dict]) -> None:
        # An image without detections still gets a row, so every scored image is listed.
        if not boxes:
            table.writerow([name, "", "", "", "", "", ""])
        for item in boxes:
            box = item["box"]
            table.writerow(
                [name, item["label"], item["score"], box["topX"], box["topY"], box["bottomX"], box["bottomY"]]
            )

    return write_csv


def _batches(items: list[_Input], size: int) -> Iterator[list[_Input]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _drawn_name(name: str) -> str:
    return str(Path(name).with_suffix(".jpg"))


def _draw(pixels: torch.Tensor, detections: Detections, target: Path) -> None:
    scores = detections.scores.tolist()
    captions = [f"{label} {score:.2f}" for label, score in zip(detections.labels, scores, strict=True)]
    width = max(1, round(max(pixels.shape[1:]) / 300))
    drawn = draw_bounding_boxes(pixels, detections.boxes, labels=captions, colors="red", width=width)
    buffer = io.BytesIO()
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=90)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())


def _progress(console: Console | None) -> Progress:
    return progress_bar(console, eta=True)

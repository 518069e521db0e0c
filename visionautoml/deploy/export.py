"""ONNX export of a saved detector, checked against PyTorch before anyone serves it.

torchvision detectors export with the legacy TorchScript-based exporter (``dynamo=False``,
opset 17), which keeps the whole inference path in the graph: resizing, normalisation,
box decoding, NMS and scaling the boxes back to the input size. The dynamo exporter fails
on their ``batched_nms``. The graph takes one float CHW image in [0, 1] of any height and
width; the runtime loops over a batch, as the PyTorch model does inside.

The graph is exported with a low score threshold (:data:`RAW_SCORE_THRESHOLD`) and the
model's own threshold is applied by the runtime from ``settings.json``. NMS is greedy by
score, so every box above the model's threshold survives exactly as it would in PyTorch;
meanwhile the parity check sees the model's top detections even on images where none
would pass the real threshold, and a service can raise the threshold without a re-export.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.ops.poolers
from torch import nn

from visionautoml.data.images import decode_image_file
from visionautoml.deploy.predict import collect_images
from visionautoml.deploy.runtime import (
    LABELS_FILE,
    ONNX_FILE,
    PARITY_FILE,
    SETTINGS_FILE,
    ExportSettings,
    make_session,
    quiet_downloads,
)
from visionautoml.errors import DataError, TrackingError, VisionAutoMLError, first_line
from visionautoml.files import atomic_path, atomic_write_text
from visionautoml.models.saved import load_model
from visionautoml.models.zoo import RAW_SCORE_THRESHOLD, score_threshold, score_threshold_at_most

log = logging.getLogger(__name__)

OPSET = 17
PARITY_TOLERANCE_PX = 0.01
PARITY_TOP_K = 10
PARITY_IMAGES = 4
# Scores of matching detections differ by float rounding only; a larger gap means another box.
_SCORE_TOLERANCE = 1e-4


class ExportError(VisionAutoMLError):
    """The model cannot be exported, or its export does not predict what PyTorch predicts."""


class _SingleImageDetector(nn.Module):
    """Tensors in and out, as ONNX needs: one image in, the output dict's tensors in ``keys`` order."""

    def __init__(self, detector: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.detector = detector
        self.keys = tuple(keys)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.detector([image])[0]
        return tuple(output[key] for key in self.keys)


@dataclass(frozen=True, slots=True)
class ParityReport:
    """ONNX Runtime against PyTorch on the same images: the top detections must be the same boxes."""

    images: int
    compared: int
    unmatched: int
    max_box_diff_px: float
    max_score_diff: float
    count_differences: int
    tolerance_px: float
    sample_source: str
    scope: str = "all"

    @property
    def passed(self) -> bool:
        return self.compared > 0 and self.unmatched == 0 and self.max_box_diff_px <= self.tolerance_px

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"parity {verdict}: {self.compared} top detections ({self.scope}) on {self.images} "
            f"{self.sample_source} image(s), max box difference {self.max_box_diff_px:.2g} px "
            f"(tolerance {self.tolerance_px:g}), max score difference {self.max_score_diff:.2g}, "
            f"{self.unmatched} without a match"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@dataclass(frozen=True, slots=True)
class ExportResult:
    directory: Path
    settings: ExportSettings
    parity: ParityReport
    recorded_on: list[str] = field(default_factory=list)


def export_detector(detector: nn.Module, path: Path, sample: torch.Tensor, *, model_name: str) -> list[str]:
    """Write the ONNX graph of ``detector`` to ``path``; returns its output names (the dict's keys)."""
    detector.eval()
    with torch.no_grad():
        keys = list(detector([sample])[0].keys())
    wrapper = _SingleImageDetector(detector, keys).eval()
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _quiet_exporter(), _roi_levels_merged_by_gather(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                (sample,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=keys,
                dynamic_axes={"image": {1: "height", 2: "width"}, **{key: {0: "detections"} for key in keys}},
                do_constant_folding=True,
            )
    except Exception as error:
        raise ExportError(
            f"{model_name} does not export to ONNX ({type(error).__name__}: {first_line(error)}). "
            "Serve or predict with PyTorch instead: `visionautoml serve MODEL` uses PyTorch when no "
            "export exists"
        ) from None
    path.write_bytes(buffer.getvalue())
    return keys


def check_parity(
    detector: nn.Module,
    session: Any,
    output_names: Sequence[str],
    images: Sequence[torch.Tensor],
    *,
    sample_source: str,
    min_score: float = 0.0,
    top_k: int = PARITY_TOP_K,
    tolerance_px: float = PARITY_TOLERANCE_PX,
) -> ParityReport:
    """Match PyTorch's top ``top_k`` detections of each image to ONNX ones with the same label and score.

    The detections compared are those a user sees (score above ``min_score``); only if no
    image has any are the best ones below it compared instead. Low-score boxes are left out
    because near-equal ones overlap: a rounding difference upstream can make NMS keep the
    other one of a pair, which says nothing about the export. Detections are matched, not
    compared by rank, as equal scores may come out in either order.
    """
    runs = []
    detector.eval()
    for image in images:
        pixels = image.float() / 255.0
        with torch.no_grad():
            expected = {key: value.numpy() for key, value in detector([pixels])[0].items()}
        actual = dict(zip(output_names, session.run(None, {"image": pixels.numpy()}), strict=True))
        runs.append((expected, actual))
    floor = min_score if any((expected["scores"] > min_score).any() for expected, _ in runs) else -1.0
    compared = unmatched = count_differences = 0
    max_box = max_score = 0.0
    for expected, actual in runs:
        count_differences += int(np.sum(expected["scores"] > floor) != np.sum(actual["scores"] > floor))
        order = np.argsort(-expected["scores"], kind="stable")
        for index in order[expected["scores"][order] > floor][:top_k]:
            compared += 1
            candidates = np.flatnonzero(
                (actual["labels"] == expected["labels"][index])
                & (np.abs(actual["scores"] - expected["scores"][index]) <= _SCORE_TOLERANCE)
            )
            if candidates.size == 0:
                unmatched += 1
                continue
            box_diffs = np.abs(actual["boxes"][candidates] - expected["boxes"][index]).max(axis=1)
            best = candidates[int(np.argmin(box_diffs))]
            max_box = max(max_box, float(box_diffs.min()))
            max_score = max(max_score, float(abs(actual["scores"][best] - expected["scores"][index])))
    return ParityReport(
        images=len(images),
        compared=compared,
        unmatched=unmatched,
        max_box_diff_px=max_box,
        max_score_diff=max_score,
        count_differences=count_differences,
        tolerance_px=tolerance_px,
        sample_source=sample_source,
        scope=f"score > {min_score:g}" if floor == min_score else f"best below the threshold {min_score:g}",
    )


def export_saved_model(
    detector: nn.Module,
    settings: ExportSettings,
    out_dir: str | Path,
    images: Sequence[torch.Tensor],
    *,
    sample_source: str,
    tolerance_px: float = PARITY_TOLERANCE_PX,
) -> ExportResult:
    """Export, check parity and write the export folder; nothing is written unless parity passes.

    ``settings`` carry the model's own thresholds; the graph gets the lower
    :data:`RAW_SCORE_THRESHOLD` (see the module docstring). ``detector`` is left as it was.
    """
    if not images:
        raise DataError("the parity check needs at least one sample image")
    out_dir = Path(out_dir)
    graph_threshold = min(RAW_SCORE_THRESHOLD, settings.thresholds.box_score_threshold)
    with score_threshold_at_most(detector, graph_threshold), atomic_path(out_dir, directory=True) as folder:
        sample = images[0].float() / 255.0
        outputs = export_detector(detector, folder / ONNX_FILE, sample, model_name=settings.model_name)
        settings = settings.with_graph(
            outputs=outputs, opset=OPSET, graph_score_threshold=score_threshold(detector)
        )
        session = make_session(folder / ONNX_FILE)
        parity = check_parity(
            detector,
            session,
            outputs,
            images,
            sample_source=sample_source,
            min_score=settings.thresholds.box_score_threshold,
            tolerance_px=tolerance_px,
        )
        atomic_write_text(folder / PARITY_FILE, json.dumps(parity.to_dict(), indent=2) + "\n")
        if parity.compared == 0:
            raise ExportError(
                f"{settings.model_name}: no detections on the {len(images)} sample image(s), so the "
                "export could not be checked; pass images that show the objects (--images)"
            )
        if not parity.passed:
            raise ExportError(
                f"{settings.model_name}: the ONNX export does not match PyTorch, so it was not written "
                f"to {out_dir}: {parity.summary()}. Serve the model with PyTorch, and report the model "
                "and torch version"
            )
        atomic_write_text(folder / LABELS_FILE, json.dumps(settings.labels, indent=2) + "\n")
        atomic_write_text(folder / SETTINGS_FILE, settings.to_json())
        folder.chmod(0o755)
    log.info("exported %s to %s: %s", settings.model_name, out_dir, parity.summary())
    return ExportResult(out_dir, settings, parity)


def export_model(
    model: str,
    out_dir: str | Path,
    *,
    images: Sequence[str | Path] = (),
    attach: bool = False,
    tolerance_px: float = PARITY_TOLERANCE_PX,
) -> ExportResult:
    """Export ``model`` (a registry or run URI, or a saved-model folder) and check it against PyTorch.

    Parity runs on ``images``, else on the model's validation images when its run
    recorded where they are, else on synthetic images. For a tracked model the result is
    recorded as tags on the logged model and the registry version; ``attach`` also
    uploads the export into the model's artifacts, where serving and prediction find it.
    """
    from visionautoml.tracking.workspace import current_tracking_uri, use_tracking_uri

    quiet_downloads()
    with use_tracking_uri(current_tracking_uri()):
        return _export_model(model, out_dir, images=images, attach=attach, tolerance_px=tolerance_px)


def _export_model(
    model: str, out_dir: str | Path, *, images: Sequence[str | Path], attach: bool, tolerance_px: float
) -> ExportResult:
    from visionautoml.tracking.models import resolve_model

    detector, spec = load_model(resolve_model(model))
    samples, sample_source = sample_images(model, images)
    result = export_saved_model(
        detector,
        ExportSettings.from_spec(spec),
        out_dir,
        samples,
        sample_source=sample_source,
        tolerance_px=tolerance_px,
    )
    if _is_tracked(model):
        result.recorded_on.extend(_record(model, result, attach=attach))
    elif attach:
        raise ExportError(f"{model}: --attach needs a tracked model (runs:/ or models:/ URI), not a folder")
    return result


def sample_images(model: str, images: Sequence[str | Path] = ()) -> tuple[list[torch.Tensor], str]:
    """Up to :data:`PARITY_IMAGES` decoded parity images and where they came from."""
    if images:
        paths = [path for _, path in collect_images(images)][:PARITY_IMAGES]
        return [decode_image_file(path) for path in paths], "given"
    dataset_images = _validation_images(model) if _is_tracked(model) else []
    decoded = []
    for path in dataset_images[:PARITY_IMAGES]:
        with contextlib.suppress(DataError):
            decoded.append(decode_image_file(path))
    if decoded:
        return decoded, "validation"
    return synthetic_images(), "synthetic"


def synthetic_images() -> list[torch.Tensor]:
    """Noise at three sizes and both orientations: textured, so no two detections tie on score."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(240, 320), (320, 240), (375, 500)]
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in sizes]


def _is_tracked(model: str) -> bool:
    return model.startswith(("runs:/", "models:/"))


def _validation_images(model: str) -> list[Path]:
    """Images of the dataset the model's run validated on (its ``dataset.validation.path`` tag)."""
    from visionautoml.data.formats import read_dataset
    from visionautoml.tracking.models import model_run_tags
    from visionautoml.tracking.schema import Tag

    recorded = model_run_tags(model).get(Tag.dataset("validation", "path"), "")
    # A split-off validation set is recorded as "PATH (validation_data_size F)": its images are in PATH.
    path = Path(recorded.split(" (validation_data_size", 1)[0])
    if not recorded or not path.exists():
        return []
    try:
        dataset = read_dataset(path).sorted()
    except DataError:
        return []
    return [image.path for image in dataset.images if image.boxes]


def _record(model: str, result: ExportResult, *, attach: bool) -> list[str]:
    """Tag the logged model and the registry version with the parity result; optionally upload the export."""
    from visionautoml.tracking.models import record_export
    from visionautoml.tracking.schema import Tag

    parity = result.parity
    tags = {
        Tag.ONNX_PARITY: "passed" if parity.passed else "failed",
        f"{Tag.ONNX_PARITY}.max_box_diff_px": f"{parity.max_box_diff_px:.6g}",
        f"{Tag.ONNX_PARITY}.compared": str(parity.compared),
        f"{Tag.ONNX_PARITY}.images": f"{parity.images} {parity.sample_source}",
        "onnx.opset": str(result.settings.opset),
    }
    try:
        return record_export(model, tags, result.directory if attach else None)
    except TrackingError as error:
        raise TrackingError(f"exported to {result.directory}, but: {error}") from None


def _merge_levels_by_gather(levels: torch.Tensor, unmerged_results: list[torch.Tensor]) -> torch.Tensor:
    """Pooled ROI features of all pyramid levels, back in ROI order.

    torchvision's ONNX version scatters every element into a zero tensor (ScatterElements:
    measured 43% of Faster R-CNN's time in ONNX Runtime, which made it slower than PyTorch);
    concatenating the levels and gathering whole rows gives the same tensor for a fraction.
    """
    order = torch.cat([torch.where(levels == level)[0] for level in range(len(unmerged_results))])
    return torch.cat(unmerged_results)[torch.argsort(order)]


@contextlib.contextmanager
def _roi_levels_merged_by_gather() -> Iterator[None]:
    """Swap in :func:`_merge_levels_by_gather` while tracing; the parity check verifies the result."""
    original = getattr(torchvision.ops.poolers, "_onnx_merge_levels", None)
    if original is None:
        yield
        return
    torchvision.ops.poolers._onnx_merge_levels = _merge_levels_by_gather
    try:
        yield
    finally:
        torchvision.ops.poolers._onnx_merge_levels = original


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the legacy exporter: its log chatter, and the whole TorchScript graph it prints from C++
    when an operator fails (the ExportError says what failed instead).
    """
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:
        with open(os.devnull, "w") as devnull:
            for fd in saved:
                os.dup2(devnull.fileno(), fd)
        yield
    finally:
        for fd, original in saved.items():
            os.dup2(original, fd)
            os.close(original)
        logger.setLevel(level)

"""ONNX export of a saved detector, checked against PyTorch before anyone serves it.

torchvision detectors export with the legacy TorchScript-based exporter (``dynamo=False``,
opset 17), which keeps the whole inference path in the graph: resizing, normalisation,
box decoding, NMS and scaling the boxes back to the input size. The dynamo exporter fails
on their ``batched_nms``. ``model.onnx`` takes one float CHW image in [0, 1] of any height
and width; the SSD family also gets a batched path (:mod:`visionautoml.deploy.graphs`),
checked against the one-image graph image by image.

The graph is exported with a low score threshold (:data:`RAW_SCORE_THRESHOLD`) and the
model's own threshold is applied by the runtime from ``settings.json``. NMS is greedy by
score, so every box above the model's threshold survives exactly as it would in PyTorch;
meanwhile the parity check sees the model's top detections even on images where none
would pass the real threshold, and a service can raise the threshold without a re-export.

``--quantize int8`` then replaces the checked fp32 graphs by int8 ones, guarded by the
accuracy gate of :mod:`visionautoml.deploy.quantize` instead of box parity.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torchvision.ops.poolers
from torch import nn

from visionautoml.data.images import decode_image_file
from visionautoml.deploy.graphs import OPSET, export_batched_path, has_batched_path, trace_to_onnx
from visionautoml.deploy.parity import (
    PARITY_TOLERANCE_PX,
    PARITY_TOP_K,
    ParityReport,
    check_against,
    check_parity,
)
from visionautoml.deploy.predict import collect_images
from visionautoml.deploy.quantize import (
    GATE_TOLERANCE,
    CalibrationMethod,
    ValidationSet,
    quantize_export,
    validation_set,
)
from visionautoml.deploy.runtime import (
    LABELS_FILE,
    ONNX_FILE,
    PARITY_FILE,
    SETTINGS_FILE,
    AccuracyGate,
    BatchedPath,
    ExportSettings,
    OnnxPredictor,
    make_session,
    quiet_downloads,
)
from visionautoml.errors import DataError, TrackingError, VisionAutoMLError, first_line
from visionautoml.files import atomic_path, atomic_write_text
from visionautoml.models.saved import load_model
from visionautoml.models.zoo import RAW_SCORE_THRESHOLD, score_threshold, score_threshold_at_most

__all__ = ["OPSET", "PARITY_TOLERANCE_PX", "PARITY_TOP_K", "ParityReport", "check_parity"]

log = logging.getLogger(__name__)

PARITY_IMAGES = 4
Quantize = Literal["none", "int8"]


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
class ExportResult:
    directory: Path
    settings: ExportSettings
    parity: ParityReport
    batched_parity: ParityReport | None = None
    gate: AccuracyGate | None = None
    recorded_on: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [self.parity.summary()]
        if self.batched_parity is not None:
            lines.append(f"batched path: {self.batched_parity.summary()} (against the one-image graph)")
        if self.gate is not None:
            lines.append(self.gate.summary())
        return "\n".join(lines)


def export_detector(detector: nn.Module, path: Path, sample: torch.Tensor, *, model_name: str) -> list[str]:
    """Write the ONNX graph of ``detector`` to ``path``; returns its output names (the dict's keys)."""
    detector.eval()
    with torch.no_grad():
        keys = list(detector([sample])[0].keys())
    wrapper = _SingleImageDetector(detector, keys).eval()
    axes = {"image": {1: "height", 2: "width"}, **{key: {0: "detections"} for key in keys}}
    try:
        with _roi_levels_merged_by_gather():
            graph = trace_to_onnx(wrapper, (sample,), ["image"], keys, axes)
    except Exception as error:
        raise ExportError(
            f"{model_name} does not export to ONNX ({type(error).__name__}: {first_line(error)}). "
            "Serve or predict with PyTorch instead: `visionautoml serve MODEL` uses PyTorch when no "
            "export exists"
        ) from None
    path.write_bytes(graph)
    return keys


def export_saved_model(
    detector: nn.Module,
    settings: ExportSettings,
    out_dir: str | Path,
    images: Sequence[torch.Tensor],
    *,
    sample_source: str,
    tolerance_px: float = PARITY_TOLERANCE_PX,
    quantize: Quantize = "none",
    validation: ValidationSet | None = None,
    gate_tolerance: float = GATE_TOLERANCE,
    calibration: CalibrationMethod = "minmax",
) -> ExportResult:
    """Export, check parity (and the int8 gate) and write the export folder; nothing is written on failure.

    ``settings`` carry the model's own thresholds; the graph gets the lower
    :data:`RAW_SCORE_THRESHOLD` (see the module docstring). ``detector`` is left as it was.
    ``quantize="int8"`` needs ``validation``: the annotated images it calibrates and gates on.
    """
    if not images:
        raise DataError("the parity check needs at least one sample image")
    if quantize == "int8" and validation is None:
        raise DataError("an int8 export needs annotated validation images for its accuracy gate")
    out_dir = Path(out_dir)
    graph_threshold = min(RAW_SCORE_THRESHOLD, settings.thresholds.box_score_threshold)
    batched_parity = gate = None
    with score_threshold_at_most(detector, graph_threshold), atomic_path(out_dir, directory=True) as folder:
        sample = images[0].float() / 255.0
        outputs = export_detector(detector, folder / ONNX_FILE, sample, model_name=settings.model_name)
        settings = settings.with_graph(
            outputs=outputs, opset=OPSET, graph_score_threshold=score_threshold(detector)
        )
        session = make_session(folder / ONNX_FILE)
        min_score = settings.thresholds.box_score_threshold
        parity = check_parity(
            detector,
            session,
            outputs,
            images,
            sample_source=sample_source,
            min_score=min_score,
            tolerance_px=tolerance_px,
        )
        record: dict[str, Any] = parity.to_dict()
        atomic_write_text(folder / PARITY_FILE, json.dumps(record, indent=2) + "\n")
        _refuse_unless(parity, settings, out_dir, len(images), against="PyTorch")
        if has_batched_path(detector):
            settings, batched_parity = _add_batched_path(detector, folder, settings, images, outputs, parity)
            record["batched"] = batched_parity.to_dict()
            _refuse_unless(batched_parity, settings, out_dir, len(images), against="the one-image graph")
        if quantize == "int8":
            assert validation is not None
            settings, gate = quantize_export(
                folder, settings, validation, tolerance=gate_tolerance, method=calibration
            )
            record["accuracy_gate"] = gate.to_dict()
            if not gate.passed:
                raise ExportError(
                    f"{settings.model_name}: the int8 export loses {gate.drop:.4f} mAP@0.5 against fp32 "
                    f"on {gate.images} {gate.source} images ({gate.summary()}), missing the tolerance "
                    f"of {gate.tolerance:g} by {gate.drop - gate.tolerance:.4f}, so nothing was written "
                    f"to {out_dir}. "
                    "Export in fp32 (no --quantize), or try --calibration entropy or percentile"
                )
        atomic_write_text(folder / PARITY_FILE, json.dumps(record, indent=2) + "\n")
        atomic_write_text(folder / LABELS_FILE, json.dumps(settings.labels, indent=2) + "\n")
        atomic_write_text(folder / SETTINGS_FILE, settings.to_json())
        folder.chmod(0o755)
    result = ExportResult(out_dir, settings, parity, batched_parity, gate)
    log.info("exported %s to %s: %s", settings.model_name, out_dir, result.summary())
    return result


def _refuse_unless(report: ParityReport, settings: ExportSettings, out_dir: Path, count: int, against: str):
    if report.compared == 0:
        raise ExportError(
            f"{settings.model_name}: no detections on the {count} sample image(s), so the "
            "export could not be checked; pass images that show the objects (--images)"
        )
    if not report.passed:
        raise ExportError(
            f"{settings.model_name}: the ONNX export does not match {against}, so it was not written "
            f"to {out_dir}: {report.summary()}. Serve the model with PyTorch, and report the model "
            "and torch version"
        )


def _add_batched_path(
    detector: nn.Module,
    folder: Path,
    settings: ExportSettings,
    images: Sequence[torch.Tensor],
    outputs: list[str],
    parity: ParityReport,
) -> tuple[ExportSettings, ParityReport]:
    """Export the three graphs of the batched path; check them, all images in one batch, per image."""
    sample = images[0].float() / 255.0
    try:
        export_batched_path(detector, folder, sample, outputs)  # type: ignore[arg-type]
    except Exception as error:
        raise ExportError(
            f"{settings.model_name}: the batched path does not export ({type(error).__name__}: "
            f"{first_line(error)}); report the model and torch version"
        ) from None
    size = tuple(int(value) for value in detector.transform.fixed_size)  # type: ignore[union-attr]
    settings = settings.model_copy(update={"batched": BatchedPath(image_size=(size[1], size[0]))})
    predictor = OnnxPredictor(folder, settings=settings)
    one = predictor.raw_one
    batched = check_against(
        lambda image: one((image.float() / 255.0).numpy()),
        lambda batch: predictor.raw_batched([(image.float() / 255.0).numpy() for image in batch]),
        images,
        reference_name="the one-image graph",
        sample_source=parity.sample_source,
        min_score=settings.thresholds.box_score_threshold,
        tolerance_px=parity.tolerance_px,
    )
    return settings, batched


def export_model(
    model: str,
    out_dir: str | Path,
    *,
    images: Sequence[str | Path] = (),
    attach: bool = False,
    tolerance_px: float = PARITY_TOLERANCE_PX,
    quantize: Quantize = "none",
    gate_tolerance: float = GATE_TOLERANCE,
    calibration: CalibrationMethod = "minmax",
) -> ExportResult:
    """Export ``model`` (a registry or run URI, or a saved-model folder) and check it against PyTorch.

    Parity runs on ``images``, else on the model's validation images when its run
    recorded where they are, else on synthetic images. An int8 export calibrates and gates
    on annotated images: ``images`` naming a dataset, else the run's validation data. For a
    tracked model the result is recorded as tags on the logged model and the registry
    version; ``attach`` also uploads the export into the model's artifacts, where serving
    and prediction find it.
    """
    from visionautoml.tracking.workspace import current_tracking_uri, use_tracking_uri

    quiet_downloads()
    with use_tracking_uri(current_tracking_uri()):
        return _export_model(
            model,
            out_dir,
            images=images,
            attach=attach,
            tolerance_px=tolerance_px,
            quantize=quantize,
            gate_tolerance=gate_tolerance,
            calibration=calibration,
        )


def _export_model(
    model: str,
    out_dir: str | Path,
    *,
    images: Sequence[str | Path],
    attach: bool,
    tolerance_px: float,
    quantize: Quantize,
    gate_tolerance: float,
    calibration: CalibrationMethod,
) -> ExportResult:
    from visionautoml.tracking.models import resolve_model

    if attach and not _is_tracked(model):
        raise ExportError(f"{model}: --attach needs a tracked model (runs:/ or models:/ URI), not a folder")
    detector, spec = load_model(resolve_model(model))
    validation = None
    if quantize == "int8":
        validation = gate_images(model, images, list(spec.labels))
        samples, sample_source = validation.images[:PARITY_IMAGES], "given" if images else "validation"
    else:
        samples, sample_source = sample_images(model, images)
    result = export_saved_model(
        detector,
        ExportSettings.from_spec(spec),
        out_dir,
        samples,
        sample_source=sample_source,
        tolerance_px=tolerance_px,
        quantize=quantize,
        validation=validation,
        gate_tolerance=gate_tolerance,
        calibration=calibration,
    )
    if _is_tracked(model):
        result.recorded_on.extend(_record(model, result, attach=attach))
    return result


def gate_images(model: str, images: Sequence[str | Path], labels: list[str]) -> ValidationSet:
    """The annotated images an int8 export calibrates and gates on: ``images`` as datasets, else the run's."""
    from visionautoml.data.annotations import Dataset
    from visionautoml.data.formats import read_dataset

    if images:
        records, classes = [], []
        for path in images:
            try:
                dataset = read_dataset(path)
            except DataError as error:
                raise DataError(
                    f"--images {path}: the int8 accuracy gate needs annotated images (a VOC, COCO, YOLO or "
                    f"JSONL dataset), and this is not one: {first_line(error)}"
                ) from None
            records += dataset.images
            classes += [name for name in dataset.classes if name not in classes]
        return validation_set(Dataset(records, classes), labels, source="given")
    dataset = _validation_dataset(model) if _is_tracked(model) else None
    if dataset is None:
        raise DataError(
            f"{model}: an int8 export calibrates and checks its accuracy on the model's validation data, "
            "and none is recorded for it (or it is no longer there); pass --images DATASET "
            "(the VOC, COCO, YOLO or JSONL data to check on)"
        )
    return validation_set(dataset, labels, source="validation")


def sample_images(model: str, images: Sequence[str | Path] = ()) -> tuple[list[torch.Tensor], str]:
    """Up to :data:`PARITY_IMAGES` decoded parity images and where they came from."""
    if images:
        paths = [path for _, path in collect_images(images)][:PARITY_IMAGES]
        return [decode_image_file(path) for path in paths], "given"
    dataset = _validation_dataset(model) if _is_tracked(model) else None
    decoded = []
    for image in dataset.images if dataset is not None else []:
        if len(decoded) == PARITY_IMAGES:
            break
        if image.boxes:
            with contextlib.suppress(DataError):
                decoded.append(decode_image_file(image.path))
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


def _validation_dataset(model: str) -> Any:
    """The dataset the model's run validated on (its ``dataset.validation.path`` tag), sorted; else None.

    A split-off validation set is recorded as "PATH (validation_data_size F)": its images are
    somewhere in PATH, which is then used whole.
    """
    from visionautoml.data.formats import read_dataset
    from visionautoml.tracking.models import model_run_tags
    from visionautoml.tracking.schema import Tag

    recorded = model_run_tags(model).get(Tag.dataset("validation", "path"), "")
    path = Path(recorded.split(" (validation_data_size", 1)[0])
    if not recorded or not path.exists():
        return None
    try:
        return read_dataset(path).sorted()
    except DataError:
        return None


def _record(model: str, result: ExportResult, *, attach: bool) -> list[str]:
    """Tag the logged model and its registry version with the checks' results; maybe attach the export."""
    from visionautoml.tracking.models import record_export
    from visionautoml.tracking.schema import Tag

    parity = result.parity
    tags = {
        Tag.ONNX_PARITY: "passed" if parity.passed else "failed",
        f"{Tag.ONNX_PARITY}.max_box_diff_px": f"{parity.max_box_diff_px:.6g}",
        f"{Tag.ONNX_PARITY}.compared": str(parity.compared),
        f"{Tag.ONNX_PARITY}.images": f"{parity.images} {parity.sample_source}",
        "onnx.opset": str(result.settings.opset),
        "onnx.precision": result.settings.precision,
        "onnx.batch_axis": "dynamic" if result.settings.batched is not None else "none",
    }
    if result.batched_parity is not None:
        tags[f"{Tag.ONNX_PARITY}.batched"] = "passed" if result.batched_parity.passed else "failed"
    gate = result.gate
    if gate is not None:
        tags |= {
            "onnx.accuracy_gate": "passed" if gate.passed else "failed",
            "onnx.accuracy_gate.map50_fp32": f"{gate.fp32:.6g}",
            "onnx.accuracy_gate.map50_int8": f"{gate.int8:.6g}",
            "onnx.accuracy_gate.drop": f"{gate.drop:.6g}",
            "onnx.accuracy_gate.images": f"{gate.images} {gate.source}",
        }
        if gate.int8_batched is not None:
            tags["onnx.accuracy_gate.map50_int8_batched"] = f"{gate.int8_batched:.6g}"
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

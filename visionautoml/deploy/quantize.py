"""int8 exports: static quantization calibrated on the model's validation images, and the accuracy gate.

Quantized convolutions do not give the same boxes as fp32 (that is the point), so the
box-parity check cannot guard them; what must hold is the accuracy a user gets. The gate
scores the fp32 graph and each quantized path (the one-image graph and the batched path)
on the same validation images with the project's own metric (VOC AP at IoU 0.5,
:mod:`visionautoml.evaluation.metrics`) and refuses the export when the quantized mAP falls
more than the tolerance below fp32.

Only the feature extractor is quantized: the nodes on a path from the first convolution to a
last one (backbone and heads). The in-graph resize and normalisation before it, and the box
decoding, NMS and scaling after it, stay fp32: they are cheap, and box coordinates in int8
would lose whole pixels. Weights are quantized per output channel (QDQ format, signed
int8), activations per tensor (unsigned int8), with ranges calibrated on the same images the
gate uses: the model's own validation images, as the data it will see.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from visionautoml.data.annotations import Dataset
from visionautoml.data.images import decode_image_file
from visionautoml.deploy.runtime import ONNX_FILE, AccuracyGate, ExportSettings, OnnxPredictor
from visionautoml.errors import DataError
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth, evaluate_detections

log = logging.getLogger(__name__)

GATE_TOLERANCE = 0.01
"""Largest mAP@0.5 an int8 export may lose against fp32 on the validation images."""
GATE_IOU = 0.5
MAX_VALIDATION_IMAGES = 200
"""Images scored by the gate (and used for calibration): enough for a stable mAP, minutes at most."""
CalibrationMethod = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True, slots=True)
class ValidationSet:
    """Annotated images for calibration and the gate; labels are indices into the model's labels (+1)."""

    images: list[torch.Tensor]
    ground_truths: list[ImageGroundTruth]
    source: str


def validation_set(
    dataset: Dataset, labels: Sequence[str], *, source: str, limit: int = MAX_VALIDATION_IMAGES
) -> ValidationSet:
    """The first ``limit`` annotated, decodable images of ``dataset``, boxes in the model's label ids.

    Boxes of classes the model does not know are left out (the model cannot find them either);
    an image that does not decode is skipped with a warning, as ``predict`` skips it.
    """
    ids = {label: index + 1 for index, label in enumerate(labels)}
    images, truths = [], []
    for record in dataset.sorted().images:
        if len(images) >= limit:
            break
        boxes = [box for box in record.boxes if box.label in ids]
        if not boxes:
            continue
        try:
            pixels = decode_image_file(record.path)
        except DataError as error:
            log.warning("accuracy gate: skipped %s", error)
            continue
        images.append(pixels)
        truths.append(
            ImageGroundTruth(
                np.array([[box.xmin, box.ymin, box.xmax, box.ymax] for box in boxes]),
                np.array([ids[box.label] for box in boxes]),
                np.array([box.iscrowd for box in boxes]),
                width=int(pixels.shape[2]),
                height=int(pixels.shape[1]),
                name=record.name,
            )
        )
    if not images:
        raise DataError(
            f"{source}: no annotated image with the model's classes ({', '.join(labels)}); the int8 "
            "accuracy gate needs the validation data: pass --images DATASET (VOC, COCO, YOLO or JSONL)"
        )
    return ValidationSet(images, truths, source)


def map50(predictor_raw: Sequence[dict[str, np.ndarray]], validation: ValidationSet, classes: int) -> float:
    """VOC AP at IoU 0.5 over every detection the graph keeps, averaged over classes."""
    detections = [ImageDetections(raw["boxes"], raw["scores"], raw["labels"]) for raw in predictor_raw]
    metrics = evaluate_detections(
        validation.ground_truths,
        detections,
        [str(index) for index in range(classes)],
        metric_type="voc",
        iou_threshold=GATE_IOU,
    )
    return float(metrics["map_voc"])


def feature_nodes(model: Any) -> set[str]:
    """Names of the nodes on a path from a convolution to a convolution: backbone and heads, nothing else."""
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    producer: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
        for name in node.output:
            producer[name] = index
    convolutions = {index for index, node in enumerate(nodes) if node.op_type == "Conv"}

    def reach(step) -> set[int]:
        seen, stack = set(convolutions), list(convolutions)
        while stack:
            for following in step(stack.pop()):
                if following not in seen:
                    seen.add(following)
                    stack.append(following)
        return seen

    after = reach(lambda i: [c for name in nodes[i].output for c in consumers.get(name, [])])
    before = reach(lambda i: [producer[name] for name in nodes[i].input if name in producer])
    return {nodes[index].name for index in after & before}


def quantize_graph(
    source: Path, target: Path, calibration: Sequence[dict[str, np.ndarray]], method: CalibrationMethod
) -> None:
    """Write the int8 (QDQ) version of ``source`` to ``target``; all but :func:`feature_nodes` stays fp32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(source))
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    keep = feature_nodes(model)
    excluded = [node.name for node in model.graph.node if node.name not in keep]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds: Iterator[dict[str, np.ndarray]] = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with tempfile.TemporaryDirectory(prefix="visionautoml-quantize-") as scratch, _quiet_root_logger():
        prepared = Path(scratch) / "prepared.onnx"
        onnx.save(model, str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantizer logs advice (pre-processing, bias layout) on the root logger that users cannot act on."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_export(
    folder: Path,
    settings: ExportSettings,
    validation: ValidationSet,
    *,
    tolerance: float = GATE_TOLERANCE,
    method: CalibrationMethod = "minmax",
) -> tuple[ExportSettings, AccuracyGate]:
    """Replace the fp32 graphs in ``folder`` by int8 ones and score both; the caller refuses a failed gate.

    ``folder`` holds the checked fp32 export (its ``settings.json`` not yet written:
    ``settings`` describes it). Returns the int8 settings, with the gate's numbers in them.
    """
    fp32 = OnnxPredictor(folder, settings=settings, intra_op_threads=None)
    pixels = [image.numpy().astype(np.float32) / np.float32(255.0) for image in validation.images]
    classes = len(settings.labels)
    fp32_map = map50([fp32.raw_one(image) for image in pixels], validation, classes)

    with tempfile.TemporaryDirectory(prefix="visionautoml-int8-") as scratch:
        staged = Path(scratch)
        quantize_graph(
            folder / ONNX_FILE, staged / ONNX_FILE, [{settings.input_name: p} for p in pixels], method
        )
        if settings.batched is not None:
            pre = fp32.batched_sessions()[0]
            resized = [{"images": pre.run(None, {"image": image})[0][None]} for image in pixels]
            core = settings.batched.core
            quantize_graph(folder / core, staged / core, resized, method)
        del fp32
        for graph in staged.glob("*.onnx"):
            graph.replace(folder / graph.name)

    int8 = OnnxPredictor(folder, settings=settings, intra_op_threads=None)
    int8_map = map50([int8.raw_one(image) for image in pixels], validation, classes)
    batched_map = None
    if int8.batched:
        batched_map = map50(int8.raw_batched(pixels), validation, classes)
    gate = AccuracyGate(
        images=len(pixels),
        source=validation.source,
        fp32=fp32_map,
        int8=int8_map,
        int8_batched=batched_map,
        tolerance=tolerance,
        calibration_images=len(pixels),
        calibration_method=method,
    )
    return settings.model_copy(update={"precision": "int8", "accuracy_gate": gate}), gate

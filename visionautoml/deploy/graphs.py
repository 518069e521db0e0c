"""Tracing detectors to ONNX, and the batched path of the detectors that resize to a fixed size.

The one-image graph (``model.onnx``) holds the whole inference path but takes one image:
torchvision's detectors loop over a batch in Python, and tracing unrolls that loop. For the
SSD family, which resize every image to one fixed size, the path is cut where the images
meet: ``preprocess.onnx`` (one image of any size in, normalised and resized out), ``core.onnx``
(backbone and heads, with a batch axis) and ``postprocess.onnx`` (one image's box decoding,
NMS and scaling back). Each part is torchvision's own code, traced, so the batched path
computes what the one-image graph computes, and the export checks that it does. Two-stage
and variable-size detectors (Faster R-CNN, RetinaNet, FCOS, YOLOX) have no batched path:
their predictor runs the one-image graph per image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD

OPSET = 17
PREPROCESS_FILE = "preprocess.onnx"
CORE_FILE = "core.onnx"
POSTPROCESS_FILE = "postprocess.onnx"
CORE_OUTPUTS = ["bbox_regression", "cls_logits"]


def trace_to_onnx(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> bytes:
    """The legacy (TorchScript) exporter, quiet: it keeps torchvision's NMS, which dynamo does not."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), quiet_exporter(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def has_batched_path(detector: nn.Module) -> bool:
    """SSD and SSDlite: every image is resized to ``transform.fixed_size`` before the backbone."""
    return isinstance(detector, SSD) and getattr(detector.transform, "fixed_size", None) is not None


class _Preprocess(nn.Module):
    def __init__(self, detector: SSD) -> None:
        super().__init__()
        self.transform = detector.transform

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform([image])[0].tensors[0]


class _Core(nn.Module):
    def __init__(self, detector: SSD) -> None:
        super().__init__()
        self.backbone = detector.backbone
        self.head = detector.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(images)
        features = [features] if isinstance(features, torch.Tensor) else list(features.values())
        outputs = self.head(features)
        return outputs["bbox_regression"], outputs["cls_logits"]


class _Postprocess(nn.Module):
    """Box decoding and NMS of one image (torchvision's), then its boxes scaled to the original size.

    The anchors depend only on the fixed input size, so they are computed once and stored in
    the graph; the scaling repeats ``transform.postprocess``'s float32 arithmetic exactly.
    """

    def __init__(self, detector: SSD, anchors: torch.Tensor, size: tuple[int, int], keys: Sequence[str]):
        super().__init__()
        self.detector = detector
        self.register_buffer("anchors", anchors)
        self.size = size
        self.keys = tuple(keys)

    def forward(
        self, bbox_regression: torch.Tensor, cls_logits: torch.Tensor, original_size: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        head = {"bbox_regression": bbox_regression[None], "cls_logits": cls_logits[None]}
        found = self.detector.postprocess_detections(head, [self.anchors], [self.size])[0]
        ratio = original_size.to(torch.float32) / torch.tensor(self.size, dtype=torch.float32)
        xmin, ymin, xmax, ymax = found["boxes"].unbind(1)
        found["boxes"] = torch.stack(
            (xmin * ratio[1], ymin * ratio[0], xmax * ratio[1], ymax * ratio[0]), dim=1
        )
        return tuple(found[key] for key in self.keys)


def export_batched_path(detector: SSD, folder: Path, sample: torch.Tensor, keys: Sequence[str]) -> None:
    """Write the three graphs of the batched path for ``detector`` (in eval mode) into ``folder``."""
    with torch.no_grad():
        images, _ = detector.transform([sample])
        features = detector.backbone(images.tensors)
        features = [features] if isinstance(features, torch.Tensor) else list(features.values())
        anchors = detector.anchor_generator(images, features)[0]
        size = tuple(int(value) for value in images.image_sizes[0])
        resized = images.tensors[0]
        bbox_regression, cls_logits = _Core(detector)(torch.stack([resized, resized.flip(-1)]))
    graphs: list[tuple[str, nn.Module, tuple[torch.Tensor, ...], list[str], list[str], dict[str, Any]]] = [
        (
            PREPROCESS_FILE,
            _Preprocess(detector),
            (sample,),
            ["image"],
            ["resized"],
            {"image": {1: "h", 2: "w"}},
        ),
        (
            CORE_FILE,
            _Core(detector),
            (torch.stack([resized, resized.flip(-1)]),),
            ["images"],
            CORE_OUTPUTS,
            {name: {0: "batch"} for name in ["images", *CORE_OUTPUTS]},
        ),
        (
            POSTPROCESS_FILE,
            _Postprocess(detector, anchors, size, keys),  # type: ignore[arg-type]
            (bbox_regression[0], cls_logits[0], torch.tensor(sample.shape[-2:], dtype=torch.int64)),
            [*CORE_OUTPUTS, "original_size"],
            list(keys),
            {key: {0: "detections"} for key in keys},
        ),
    ]
    for name, module, args, inputs, outputs, axes in graphs:
        (folder / name).write_bytes(trace_to_onnx(module.eval(), args, inputs, outputs, axes))


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
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

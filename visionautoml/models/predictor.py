"""Run a trained detector on decoded images and shape the answer like the cloud service's.

Batch prediction, the MLflow pyfunc and the scoring service share this class, so they
return the same boxes for the same image. Images go in at their original size (the
model resizes internally), so boxes come back in the image's own pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionautoml.models.saved import ModelSpec, load_model
from visionautoml.models.zoo import RAW_SCORE_THRESHOLD, set_score_threshold

BOX_DECIMALS = 4
"""Normalised coordinates keep 4 decimals: a tenth of a pixel on a 1000-pixel image."""


@dataclass(slots=True)
class Detections:
    """One image's detections: absolute pixel ``xyxy`` boxes, scores and class names, best first."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)


class Predictor:
    """A detector in eval mode with its labels; ``predict`` takes uint8 CHW RGB tensors.

    The module runs at :data:`RAW_SCORE_THRESHOLD`, as the ONNX graph does, and the spec's
    :class:`~visionautoml.config.Thresholds` pick what is reported, so both backends apply one
    rule to the same detections.
    """

    def __init__(self, module: nn.Module, spec: ModelSpec, *, batch_size: int = 4) -> None:
        self.module = module.eval()
        set_score_threshold(self.module, min(RAW_SCORE_THRESHOLD, spec.thresholds.box_score_threshold))
        self.spec = spec
        self.batch_size = batch_size
        self.device = next(module.parameters()).device

    @classmethod
    def from_directory(cls, path: str | Path, device: str = "cpu", *, batch_size: int = 4) -> Predictor:
        module, spec = load_model(path, device=device)
        return cls(module, spec, batch_size=batch_size)

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        results: list[Detections] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = [self._prepare(image) for image in images[start : start + self.batch_size]]
                results.extend(self._detections(output) for output in self.module(batch))
        return results

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 tensor of shape (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        return image.to(self.device, torch.float32) / 255.0

    def _detections(self, output: dict[str, torch.Tensor]) -> Detections:
        ids = output["labels"].cpu()
        # Label 0 is background; a detector never predicts it, but a corrupt head must not crash serving.
        known = (
            self.spec.thresholds.keep(output["scores"].cpu()) & (ids >= 1) & (ids <= len(self.spec.labels))
        )
        order = torch.argsort(output["scores"].cpu()[known], descending=True)
        return Detections(
            boxes=output["boxes"].cpu().float()[known][order],
            scores=output["scores"].cpu().float()[known][order],
            labels=[self.spec.labels[int(i) - 1] for i in ids[known][order]],
        )


def automl_boxes(detections: Detections, width: int, height: int) -> list[dict[str, Any]]:
    """The cloud service's per-image box list: coordinates normalised to [0, 1], clipped, rounded."""
    boxes = []
    for (x0, y0, x1, y1), score, label in zip(
        detections.boxes.tolist(), detections.scores.tolist(), detections.labels, strict=True
    ):
        boxes.append(
            {
                "box": {
                    "topX": _normalised(x0, width),
                    "topY": _normalised(y0, height),
                    "bottomX": _normalised(x1, width),
                    "bottomY": _normalised(y1, height),
                },
                "label": label,
                "score": round(float(score), BOX_DECIMALS),
            }
        )
    return boxes


def _normalised(value: float, extent: int) -> float:
    return round(min(max(value / extent, 0.0), 1.0), BOX_DECIMALS)

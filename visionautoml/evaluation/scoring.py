"""Scoring detections against ground truth, and the files that let anyone check the score.

Pure computation on :mod:`visionautoml.evaluation.metrics`' records: no model runs here, so
the trainer, ``visionautoml evaluate``, the export's accuracy gate and the reports all
score the same way. :func:`write_evaluation` leaves the inputs of the numbers next to them
(COCO ground truth and detections), so anyone can re-score them with pycocotools and get
``metrics.json`` back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from visionautoml.config import TrainingParameters
from visionautoml.errors import VisionAutoMLError
from visionautoml.evaluation.metrics import (
    ImageDetections,
    ImageGroundTruth,
    coco_detections,
    coco_ground_truth,
    evaluate_detections,
)
from visionautoml.files import atomic_write_text

EVALUATION_SCORE_FLOOR = 0.001
"""Validation keeps detections down to this score, whatever the model's ``box_score_threshold``.

Average precision ranks every detection, as COCO's and torchvision's references score it: a
deployment threshold such as the default 0.3 would cut the precision-recall curve's tail and
understate mAP. ``precision``, ``recall``, the confusion matrix and the drawn predictions still
count only detections at ``box_score_threshold``.
"""


@dataclass
class Evaluation:
    """One validation run: what was expected, what was found, and how it scored (under which settings)."""

    classes: list[str]
    ground_truths: list[ImageGroundTruth]
    detections: list[ImageDetections]
    metrics: dict[str, Any]
    metric_type: str
    iou_threshold: float
    score_threshold: float


def evaluate_predictions(
    ground_truths: list[ImageGroundTruth],
    detections: list[ImageDetections],
    classes: list[str],
    params: TrainingParameters,
) -> Evaluation:
    """Score predictions with the metric settings of ``params`` (the cloud service's names)."""
    metrics = evaluate_detections(
        ground_truths,
        detections,
        classes,
        metric_type=params.validation_metric_type,
        iou_threshold=params.validation_iou_threshold,
        score_threshold=params.box_score_threshold,
    )
    return Evaluation(
        classes=list(classes),
        ground_truths=list(ground_truths),
        detections=list(detections),
        metrics=metrics,
        metric_type=params.validation_metric_type,
        iou_threshold=params.validation_iou_threshold,
        score_threshold=params.box_score_threshold,
    )


def write_evaluation(out_dir: str | Path, evaluation: Evaluation) -> list[Path]:
    """Write ``ground_truth.json`` (COCO instances), ``detections.json`` (COCO results), ``metrics.json``.

    Each file is written atomically and ``metrics.json`` last, so a folder holding it holds the
    complete set. Re-scoring the two COCO files with pycocotools reproduces the COCO numbers.
    """
    out_dir = Path(out_dir)
    ground_truth = coco_ground_truth(evaluation.ground_truths, evaluation.classes)
    record = {
        **evaluation.metrics,
        "evaluation": {
            "metric_type": evaluation.metric_type,
            "primary_metric": "map_voc" if evaluation.metric_type == "voc" else "map",
            "iou_threshold": evaluation.iou_threshold,
            "score_threshold": evaluation.score_threshold,
            "images": len(evaluation.ground_truths),
            "classes": evaluation.classes,
        },
    }
    try:
        return [
            atomic_write_text(out_dir / "ground_truth.json", _json(ground_truth)),
            atomic_write_text(out_dir / "detections.json", _json(coco_detections(evaluation.detections))),
            atomic_write_text(out_dir / "metrics.json", json.dumps(record, indent=2, allow_nan=False) + "\n"),
        ]
    except OSError as error:
        raise VisionAutoMLError(
            f"{out_dir}: cannot write the evaluation there ({error.strerror or error}); choose another folder"
        ) from None


def summary_table(evaluation: Evaluation) -> Table:
    """The headline numbers and per-class AP, for the terminal."""
    metrics = evaluation.metrics
    table = Table(
        title=f"mean_average_precision ({evaluation.metric_type}) {metrics['mean_average_precision']:.4f}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("map", "map_50", "map_75", "mar_100", "map_voc", "precision", "recall"):
        table.add_row(key, f"{metrics[key]:.4f}")
    for name, ap in metrics["per_class"].items():
        table.add_row(f"AP {name}", "n/a (no boxes)" if ap < 0 else f"{ap:.4f}")
    return table


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False) + "\n"

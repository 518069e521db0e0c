"""Running a detector over validation data and scoring it: the one implementation of "validate".

The trainer calls :func:`predict_loader` + :func:`evaluate_predictions` after every evaluation
epoch, and ``visionautoml evaluate`` calls :func:`evaluate_model` on a saved or registered model,
so the numbers a sweep optimised are the numbers a user re-computes later. :func:`write_evaluation`
leaves the inputs of those numbers next to them (COCO ground truth and detections), so anyone can
re-score them with pycocotools and get ``metrics.json`` back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionautoml.config import TrainingParameters
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.errors import ConfigError, VisionAutoMLError
from visionautoml.files import atomic_write_text
from visionautoml.models.saved import load_model
from visionautoml.models.zoo import score_threshold_at_most
from visionautoml.tracking.models import resolve_model
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.metrics import (
    ImageDetections,
    ImageGroundTruth,
    coco_detections,
    coco_ground_truth,
    evaluate_detections,
)

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]

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


def predict_loader(
    module: torch.nn.Module,
    loader: Iterable[Batch],
    device: str | torch.device,
    *,
    console: Console | None = None,
) -> tuple[list[ImageGroundTruth], list[ImageDetections]]:
    """Run a torchvision-style detector over ``(images, targets)`` batches, in loader order.

    Images are float CHW tensors in [0, 1] at their original size, targets dicts with ``boxes``
    (xyxy pixels), ``labels`` (class index + 1) and optionally ``iscrowd`` and ``name``. The
    module's train/eval mode is restored afterwards, so the trainer can call this mid-training.
    """
    ground_truths: list[ImageGroundTruth] = []
    detections: list[ImageDetections] = []
    was_training = module.training
    module.eval()
    total = len(loader) if isinstance(loader, Sized) else None
    try:
        with (
            torch.inference_mode(),
            score_threshold_at_most(module, EVALUATION_SCORE_FLOOR),
            _progress(console) as progress,
        ):
            task = progress.add_task("validating", total=total)
            for images, targets in loader:
                outputs = module([image.to(device, non_blocking=True) for image in images])
                for image, target, output in zip(images, targets, outputs, strict=True):
                    ground_truths.append(_ground_truth(image, target))
                    detections.append(
                        ImageDetections(
                            _numpy(output["boxes"]), _numpy(output["scores"]), _numpy(output["labels"])
                        )
                    )
                progress.advance(task)
    finally:
        module.train(was_training)
    return ground_truths, detections


def _ground_truth(image: torch.Tensor, target: dict[str, Any]) -> ImageGroundTruth:
    labels = _numpy(target["labels"])
    iscrowd = _numpy(target["iscrowd"]) if "iscrowd" in target else np.zeros(len(labels), dtype=bool)
    name = target.get("name", "")
    return ImageGroundTruth(
        _numpy(target["boxes"]),
        labels,
        iscrowd,
        width=int(image.shape[-1]),
        height=int(image.shape[-2]),
        name=name if isinstance(name, str) else "",
    )


def _numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().to("cpu", torch.float64 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value)


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


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=console is None,
        transient=True,
    )


def evaluate_model(
    model: str | Path,
    data: str | Path,
    params: TrainingParameters | None = None,
    *,
    device: str | torch.device | None = None,
    console: Console | None = None,
) -> tuple[Evaluation, Dataset]:
    """Score a saved or registered model on a labelled dataset; returns the evaluation and the data read.

    ``model`` is ``runs:/RUN_ID/model``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a
    saved-model folder. The metric settings come from ``params``; a ``box_score_threshold`` not set
    explicitly there is the model's own. The dataset's classes are read in the model's label order,
    so class ``i`` of the data is label ``i + 1`` of the model.
    """
    device = _device(device)
    module, spec = load_model(resolve_model(str(model)), device=device)
    params = params or TrainingParameters()
    if "box_score_threshold" not in params.model_fields_set:
        params = params.model_copy(update={"box_score_threshold": spec.box_score_threshold})
    classes = list(spec.labels)
    dataset = read_dataset(Path(data), classes=classes)
    # Decoding is cheap next to inference: no loader processes unless asked for.
    workers = params.number_of_workers if "number_of_workers" in params.model_fields_set else 0
    loader_params = params.model_copy(update={"model_name": spec.model_name, "number_of_workers": workers})
    loader = make_data_loader(dataset, loader_params, train=False)
    ground_truths, found = predict_loader(module, loader, device, console=console)
    named = [
        replace(truth, name=record.name) for truth, record in zip(ground_truths, dataset.images, strict=True)
    ]
    return evaluate_predictions(named, found, classes, params), dataset


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {str(device)!r} is not a torch device; use cpu, cuda or cuda:N") from None

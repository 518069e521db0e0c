"""Running a detector over validation data: the one implementation of "validate".

The trainer calls :func:`predict_loader` and then
:func:`~visionautoml.evaluation.scoring.evaluate_predictions` after every evaluation epoch, and
``visionautoml evaluate`` calls :func:`evaluate_model` on a saved or registered model, so the
numbers a sweep optimised are the numbers a user re-computes later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sized
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

from visionautoml.config import Tiling, TrainingParameters, parse_config
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.errors import ConfigError
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth
from visionautoml.evaluation.scoring import EVALUATION_SCORE_FLOOR, Evaluation, evaluate_predictions
from visionautoml.models.saved import load_model
from visionautoml.models.tiling import detect_tiled
from visionautoml.models.zoo import score_threshold_at_most
from visionautoml.progress import progress_bar
from visionautoml.tracking.models import resolve_model
from visionautoml.training.dataset import make_data_loader

Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


def predict_loader(
    module: torch.nn.Module,
    loader: Iterable[Batch],
    device: str | torch.device,
    *,
    console: Console | None = None,
    tiling: Tiling | None = None,
    detections_per_image: int | None = None,
) -> tuple[list[ImageGroundTruth], list[ImageDetections]]:
    """Run a torchvision-style detector over ``(images, targets)`` batches, in loader order.

    Images are float CHW tensors in [0, 1] at their original size, targets dicts with ``boxes``
    (xyxy pixels), ``labels`` (class index + 1) and optionally ``iscrowd`` and ``name``. The
    module's train/eval mode is restored afterwards, so the trainer can call this mid-training.
    With ``tiling``, each image's detections are those of whole image + tiles, merged as at
    inference (:func:`~visionautoml.models.tiling.detect_tiled`), at most ``detections_per_image``.
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
                on_device = [image.to(device, non_blocking=True) for image in images]
                outputs = detect_tiled(module, on_device, tiling, detections_per_image)
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


def _progress(console: Console | None) -> Progress:
    return progress_bar(console or Console(stderr=True, quiet=True))


def evaluation_parameters(
    *,
    metric_type: str | None = None,
    iou_threshold: float | None = None,
    score_threshold: float | None = None,
    tile_grid_size: str | None = None,
    tile_overlap_ratio: float | None = None,
    tile_predictions_nms_threshold: float | None = None,
) -> TrainingParameters:
    """Training parameters holding only the given metric settings, validated as a config would be.

    A setting left out stays unset, so :func:`evaluate_model` can tell "not given" (take the
    model's own threshold) from a value that happens to equal the default.
    """
    chosen = {
        "validation_metric_type": metric_type,
        "validation_iou_threshold": iou_threshold,
        "box_score_threshold": score_threshold,
        "tile_grid_size": tile_grid_size,
        "tile_overlap_ratio": tile_overlap_ratio,
        "tile_predictions_nms_threshold": tile_predictions_nms_threshold,
    }
    raw = {"training_parameters": {key: value for key, value in chosen.items() if value is not None}}
    return parse_config(raw, source="command line").training_parameters


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
    saved-model folder. The metric settings come from ``params``; a ``box_score_threshold`` or tiling
    setting not set explicitly there is the model's own. The dataset's classes are read in the model's
    label order, so class ``i`` of the data is label ``i + 1`` of the model.
    """
    device = _device(device)
    module, spec = load_model(resolve_model(str(model)), device=device)
    params = params or TrainingParameters()
    if "box_score_threshold" not in params.model_fields_set:
        params = params.model_copy(update={"box_score_threshold": spec.thresholds.box_score_threshold})
    classes = list(spec.labels)
    dataset = read_dataset(Path(data), classes=classes)
    # Decoding is cheap next to inference: no loader processes unless asked for.
    workers = params.number_of_workers if "number_of_workers" in params.model_fields_set else 0
    loader_params = params.model_copy(update={"model_name": spec.model_name, "number_of_workers": workers})
    loader = make_data_loader(dataset, loader_params, train=False)
    given = {name: getattr(params, name) for name in Tiling.model_fields if name in params.model_fields_set}
    tiling = Tiling.model_validate({**spec.tiling.model_dump(), **given})
    ground_truths, found = predict_loader(
        module,
        loader,
        device,
        console=console,
        tiling=tiling,
        detections_per_image=spec.thresholds.box_detections_per_image,
    )
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

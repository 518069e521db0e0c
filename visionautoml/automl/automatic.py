"""The automatic mode: a search space chosen from the dataset, the machine and the time limit.

A user with a new dataset gives ``limits`` and nothing else (the cloud service's AutoMode).
The space is decided from what can be measured before training, each choice with its reason,
printed and logged to the sweep's run:

- **object size** (each box's side relative to its image): small objects need more input
  pixels (a larger ``image_size``), and tiling once they are tiny; large objects make mosaic
  cut them apart, so it is used only when objects are small enough to survive it;
- **images and classes**: small datasets get the light single-stage models, more epochs and
  the averaged weights; large ones on a GPU get the stronger models;
- **the machine and the time limit**: each trial's epochs are sized to end inside its share of
  ``timeout_minutes`` (so the cosine schedule anneals instead of being cut off), from the
  measured throughput of each model on this kind of machine.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from visionautoml.config import ParameterDistribution
from visionautoml.data.annotations import Dataset

SubSpace = dict[str, ParameterDistribution]

# Training images a second per CPU core at 320 px, evaluations included: epochs x 160 images over the
# trial's seconds in bench_quality.py's sweep on 2 cores, a core a trial (benchmarks/RESULTS.md,
# 2026-12-03: nano 36 epochs in 404 s, tiny 15 in 361 s, SSDlite 24 in 467 s). Other sizes scale
# with the pixel count. A GPU trains ~40x faster.
CPU_IMAGES_PER_SECOND = {"yolox_nano": 14.0, "yolox_tiny": 6.5, "ssdlite320_mobilenet_v3_large": 8.0}
GPU_SPEED_UP = 40.0
SETUP_SECONDS = 45.0
"""A trial's data loading, evaluation and model logging, besides its epochs."""


@dataclass(frozen=True)
class DataProfile:
    """What the automatic mode reads from the training data before any training."""

    images: int
    classes: int
    boxes: int
    median_relative_side: float
    """Median of sqrt(box area / image area): 0.5 is a box a quarter of its image."""
    small_share: float
    """Share of boxes whose side is under 3% of their image's (a few pixels at 320 px)."""

    @classmethod
    def of(cls, dataset: Dataset) -> DataProfile:
        sides = [
            math.sqrt(max(box.area, 0.0) / max(1.0, image.width * image.height))
            for image in dataset.images
            for box in image.boxes
        ]
        return cls(
            images=len(dataset.images),
            classes=len(dataset.classes),
            boxes=len(sides),
            median_relative_side=statistics.median(sides) if sides else 0.0,
            small_share=sum(side < 0.03 for side in sides) / len(sides) if sides else 0.0,
        )


@dataclass
class AutomaticPlan:
    subspaces: list[SubSpace]
    fixed: dict[str, Any]
    """Training parameters set for every trial (epochs, time per trial, recipe)."""
    reasons: list[str] = field(default_factory=list)


def automatic_plan(
    profile: DataProfile,
    *,
    cpus: float,
    gpus: float,
    timeout_minutes: float | None,
    max_trials: int,
    max_concurrent: int,
    available: list[str],
    choose_start: bool = False,
) -> AutomaticPlan:
    """The space and fixed settings for ``profile`` on this machine (see the module docstring).

    With ``choose_start`` (the job did not set ``pretrained``) the start is chosen too: COCO
    weights where every chosen model has them here or can download them, else from scratch.
    """
    reasons: list[str] = []
    models = _models(profile, gpus, available, reasons)
    image_size = _image_size(profile, reasons)
    fixed: dict[str, Any] = {"image_size": image_size, "weights_ema": True, "early_stopping": False}
    if choose_start:
        fixed["pretrained"] = _start(models, reasons)
    mosaic = profile.median_relative_side < 0.25
    fixed["apply_mosaic_for_yolo"] = mosaic
    why = "small enough to survive a mosaic's cuts" if mosaic else "a mosaic would cut most objects apart"
    reasons.append(
        f"mosaic {'on' if mosaic else 'off'}: the median object is {profile.median_relative_side:.0%} of its "
        f"image's side ({why})"
    )
    if timeout_minutes:
        rounds = math.ceil(max_trials / max(1, max_concurrent))
        minutes = max(1.0, timeout_minutes / rounds - 1.0)
        cores = max(1.0, cpus / max(1, max_concurrent))
        fixed["max_minutes"] = round(minutes, 1)
        epochs = {name: _epochs(name, profile, image_size, minutes, cores, gpus > 0) for name in models}
        reasons.append(
            f"{rounds} round(s) of {max_concurrent} trial(s) in {timeout_minutes:g} min: {minutes:.1f} min "
            f"and {cores:g} core(s) a trial; epochs sized to end inside it: "
            + ", ".join(f"{name} {count}" for name, count in epochs.items())
        )
    else:
        epochs = dict.fromkeys(models, 60)
        reasons.append("no timeout_minutes: 60 epochs a trial")
    subspaces = [_subspace(name, epochs[name], profile) for name in models]
    return AutomaticPlan(subspaces, fixed, reasons)


def _models(profile: DataProfile, gpus: float, available: list[str], reasons: list[str]) -> list[str]:
    if gpus > 0:
        models = ["yolox_s", "yolox_tiny"] if profile.images < 5000 else ["yolox_m", "yolox_s"]
        reasons.append(f"a GPU: {', '.join(models)} (real-time single-stage, strong on any dataset size)")
    else:
        models = ["yolox_nano", "ssdlite320_mobilenet_v3_large"]
        reasons.append(
            f"CPU only: the two fastest detectors here, {', '.join(models)}, so trials train enough epochs"
        )
    return [name for name in models if name in available]


def _start(models: list[str], reasons: list[str]) -> str:
    from visionautoml.errors import VisionAutoMLError
    from visionautoml.models.weights import pretrained_source
    from visionautoml.models.zoo import get_entry

    for name in models:
        try:
            pretrained_source(get_entry(name), "coco")
        except VisionAutoMLError:  # no such weights, or offline and not in the cache
            reasons.append(
                f"pretrained none: no COCO weights for {name} in the torch cache and none to download "
                "(set training_parameters.pretrained to choose the start)"
            )
            return "none"
    reasons.append("pretrained coco: every chosen model's COCO weights are here")
    return "coco"


def _image_size(profile: DataProfile, reasons: list[str]) -> int:
    if profile.small_share > 0.3 or profile.median_relative_side < 0.05:
        size = 640
    elif profile.median_relative_side < 0.15:
        size = 416
    else:
        size = 320
    reasons.append(
        f"image_size {size}: the median object is {profile.median_relative_side:.0%} of its image's side and "
        f"{profile.small_share:.0%} of the objects are tiny (under 3%)"
    )
    return size


def _epochs(name: str, profile: DataProfile, size: int, minutes: float, cores: float, gpu: bool) -> int:
    rate = CPU_IMAGES_PER_SECOND.get(name, 3.0) * cores * (320 / size) ** 2 * (GPU_SPEED_UP if gpu else 1.0)
    seconds = max(60.0, minutes * 60 - SETUP_SECONDS)
    return int(max(5, min(300, seconds * rate * 0.8 / max(1, profile.images))))


def _subspace(name: str, epochs: int, profile: DataProfile) -> SubSpace:
    if name.startswith("yolox"):
        # YOLOX's own recipe: SGD with nesterov momentum, lr 0.01 for 64 images, weight decay 5e-4.
        return {
            "model_name": ParameterDistribution(type="choice", values=[name]),
            "number_of_epochs": ParameterDistribution(type="choice", values=[epochs]),
            "optimizer": ParameterDistribution(type="choice", values=["sgd"]),
            "training_batch_size": ParameterDistribution(type="choice", values=[16]),
            "learning_rate": ParameterDistribution(type="loguniform", min_value=0.0015, max_value=0.006),
            "weight_decay": ParameterDistribution(type="choice", values=[0.0005]),
            "warmup_cosine_lr_warmup_epochs": ParameterDistribution(
                type="choice", values=[max(1, epochs // 20)]
            ),
        }
    return {
        "model_name": ParameterDistribution(type="choice", values=[name]),
        "number_of_epochs": ParameterDistribution(type="choice", values=[epochs]),
        "optimizer": ParameterDistribution(type="choice", values=["adamw"]),
        "training_batch_size": ParameterDistribution(
            type="choice", values=[4 if profile.images < 500 else 8]
        ),
        "learning_rate": ParameterDistribution(type="loguniform", min_value=0.0007, max_value=0.003),
        "weight_decay": ParameterDistribution(type="choice", values=[0.0001]),
    }

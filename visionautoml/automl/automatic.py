"""The automatic mode: a search space chosen from the dataset, the machine and the time limit.

A user with a new dataset gives ``limits`` and nothing else (the cloud service's AutoMode).
The space is decided from what can be measured before training, each choice with its reason,
printed and logged to the sweep's run:

- **object size** (each box's side relative to its image): small objects need more input
  pixels (a larger ``image_size``), and tiling once they are tiny; large objects make mosaic
  cut them apart, so it is used only when objects are small enough to survive it;
- **images and classes**: small datasets get the light single-stage models, more epochs and
  the averaged weights; large ones on a GPU get the stronger models;
- **the machine and the time limit**: on CPUs alone, as few trials as try each chosen model
  once (from scratch, epochs buy more than variety); where the objects are large, one model,
  SSDlite, on every core: from scratch on CPUs it learns fastest of the zoo, and one trial on
  both cores of a 2-core machine trains 1.5x the epochs of each of two side by side (raccoon:
  0.87 mAP@0.5 alone against 0.84 beside yolox_nano, which reached 0.75). Each trial gets its
  share of ``timeout_minutes`` as ``max_minutes``, over which the trainer plans its schedule
  from the measured epoch time, so the cosine anneals instead of being cut off;
- **early termination**: where trials wait for a turn (more trials than run at once) and the
  job sets no ``sweep.early_termination``, ASHA from the second evaluation: in
  ``benchmarks/bench_sweep.py`` it kept the best trial at 60% of the compute, the closest of
  the policies to the 50% goal (the cloud service's bandit: 61-69%; RESULTS.md). Trials that
  all start at once have no queued trial to hand a freed slot to, so they run without.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from visionautoml.config import EarlyTermination, ParameterDistribution
from visionautoml.data.annotations import Dataset

SubSpace = dict[str, ParameterDistribution]

SSDLITE = "ssdlite320_mobilenet_v3_large"

MAX_EPOCHS = 300
"""Upper bound of a trial's epochs: its ``max_minutes`` re-plans the schedule to the epochs that fit."""
WARMUP_EPOCHS = 3
"""Linear warm-up of the learning rate, as YOLOX and Ultralytics start from scratch."""
TRIAL_OVERHEAD_MINUTES = 1.0
"""A trial's start-up, data loading, final evaluation and model logging, besides its epochs."""
MOSAIC_MEDIAN_SIDE = 0.25
"""Median object side (relative to its image) under which a mosaic keeps most objects whole."""
EARLY_TERMINATION = EarlyTermination(type="asha", evaluation_interval=1, delay_evaluation=2)
"""The policy where trials queue: the closest to half the compute with the best kept (bench_sweep)."""


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
    trials: int
    """How many trials to run (at most ``limits.max_trials``), one sub-space after the other."""
    concurrent: int
    """How many run at once: ``limits.max_concurrent_trials`` where the job sets it, else chosen."""
    reasons: list[str] = field(default_factory=list)
    early_termination: EarlyTermination | None = None
    """The policy chosen where trials queue and the job has none (see the module docstring)."""


def automatic_plan(
    profile: DataProfile,
    *,
    cpus: float,
    gpus: float,
    timeout_minutes: float | None,
    max_trials: int,
    max_concurrent: int | None,
    available: list[str],
    choose_start: bool = False,
    early_termination: EarlyTermination | None = None,
) -> AutomaticPlan:
    """The space and fixed settings for ``profile`` on this machine (see the module docstring).

    With ``choose_start`` (the job did not set ``pretrained``) the start is chosen too: COCO
    weights where every chosen model has them here or can download them, else from scratch.
    ``max_concurrent`` None (the job did not set it): chosen, a trial a core on CPUs alone.
    ``early_termination`` is the job's policy; without one, one is chosen where trials queue.
    """
    reasons: list[str] = []
    models = _models(profile, gpus, available, reasons)
    image_size = _image_size(profile, reasons)
    fixed: dict[str, Any] = {"image_size": image_size, "weights_ema": True, "early_stopping": False}
    if choose_start:
        fixed["pretrained"] = _start(models, reasons)
    mosaic = profile.median_relative_side < MOSAIC_MEDIAN_SIDE
    fixed["apply_mosaic_for_yolo"] = mosaic
    why = "small enough to survive a mosaic's cuts" if mosaic else "a mosaic would cut most objects apart"
    reasons.append(
        f"mosaic {'on' if mosaic else 'off'}: the median object is {profile.median_relative_side:.0%} of its "
        f"image's side ({why})"
    )
    if max_concurrent is None:
        max_concurrent = _concurrency(len(models), cpus, gpus, max_trials, reasons)
    trials = _trials(len(models), gpus, max_trials, max_concurrent, reasons)
    fixed["number_of_epochs"] = MAX_EPOCHS
    if timeout_minutes:
        rounds = math.ceil(trials / max(1, max_concurrent))
        minutes = max(1.0, timeout_minutes / rounds - TRIAL_OVERHEAD_MINUTES)
        fixed["max_minutes"] = round(minutes, 1)
        reasons.append(
            f"{rounds} round(s) of {min(trials, max_concurrent)} trial(s) in {timeout_minutes:g} min: "
            f"{minutes:.1f} min a trial, its schedule planned over the epochs that fit (at most {MAX_EPOCHS})"
        )
    else:
        fixed["number_of_epochs"] = 60
        reasons.append("no timeout_minutes: 60 epochs a trial")
    subspaces = [_subspace(name, profile) for name in models]
    policy = early_termination or _early_termination(trials, max_concurrent, reasons)
    return AutomaticPlan(subspaces, fixed, trials, max_concurrent, reasons, policy)


def _early_termination(trials: int, max_concurrent: int, reasons: list[str]) -> EarlyTermination | None:
    if trials <= max_concurrent:
        reasons.append(
            f"no early termination: all {trials} trial(s) start at once, so a stopped one frees a slot "
            "no trial is waiting for"
        )
        return None
    reasons.append(
        f"early termination asha from evaluation {EARLY_TERMINATION.delay_evaluation} (reduction factor 3): "
        f"{trials} trials take turns {max_concurrent} at a time, and the ones behind at a rung give their "
        "turn to the next (bench_sweep: the best kept at 60% of the compute, bandit 61-69%)"
    )
    return EARLY_TERMINATION


def _concurrency(models: int, cpus: float, gpus: float, max_trials: int, reasons: list[str]) -> int:
    """A trial per GPU; on CPUs alone a trial per core up to one per model, since one process per
    core trains small models faster in all than one process using every core."""
    if gpus > 0:
        return 1
    concurrent = max(1, min(models, int(cpus), max_trials))
    if concurrent == 1:
        reasons.append(
            f"1 trial at a time on {cpus:g} CPU(s) (limits.max_concurrent_trials not set): one model to "
            "train, on every core"
        )
        return 1
    reasons.append(
        f"{concurrent} trial(s) at a time on {cpus:g} CPU(s) (limits.max_concurrent_trials not set): "
        "a process a core trains small models faster in all than one process on every core"
    )
    return concurrent


def _trials(models: int, gpus: float, max_trials: int, max_concurrent: int, reasons: list[str]) -> int:
    """On a GPU, ``max_trials``; on CPUs alone, as few rounds as try every chosen model once.

    From scratch on a CPU a trial's quality is bought with epochs: four 4-minute trials
    end before any of them has learnt much, where two of 9 minutes have.
    """
    if gpus > 0 or models == 0:
        return max_trials
    rounds = math.ceil(models / max(1, max_concurrent))
    trials = min(max_trials, rounds * max_concurrent)
    if trials < max_trials:
        reasons.append(
            f"{trials} of limits.max_trials={max_trials} trials: on CPUs alone epochs matter more than "
            "variety, so each chosen model is tried once, with the time of the trials not run"
        )
    return trials


def _models(profile: DataProfile, gpus: float, available: list[str], reasons: list[str]) -> list[str]:
    if gpus > 0:
        models = ["yolox_s", "yolox_tiny"] if profile.images < 5000 else ["yolox_m", "yolox_s"]
        reasons.append(f"a GPU: {', '.join(models)} (real-time single-stage, strong on any dataset size)")
    elif profile.median_relative_side >= MOSAIC_MEDIAN_SIDE and SSDLITE in available:
        models = [SSDLITE]
        reasons.append(
            f"CPU only and large objects: {SSDLITE} alone, on every core (from scratch on CPUs it learns "
            "fastest of the zoo on such objects, and one trial on every core trains more epochs than two "
            "side by side: on raccoon, 2 cores, 20 minutes, 0.87 mAP@0.5 alone against 0.84 beside "
            "yolox_nano, which reached 0.75)"
        )
    else:
        models = ["yolox_nano", SSDLITE]
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


def _subspace(name: str, profile: DataProfile) -> SubSpace:
    if name.startswith("yolox"):
        # AdamW, as Ultralytics trains short runs from scratch (lr 0.002), weight decay 5e-4 as YOLOX:
        # 0.18 against SGD's 0.11 (lr 0.004) for yolox_nano with mosaic on raccoon, 7 minutes side by side.
        return {
            "model_name": ParameterDistribution(type="choice", values=[name]),
            "optimizer": ParameterDistribution(type="choice", values=["adamw"]),
            "training_batch_size": ParameterDistribution(type="choice", values=[16]),
            "learning_rate": ParameterDistribution(type="loguniform", min_value=0.0015, max_value=0.003),
            "weight_decay": ParameterDistribution(type="choice", values=[0.0005]),
            "warmup_cosine_lr_warmup_epochs": ParameterDistribution(type="choice", values=[WARMUP_EPOCHS]),
        }
    # AdamW at 0.9e-3 to 1.6e-3: on raccoon from scratch (20 minutes, 12-04) SSDlite reached 0.84 and 0.87
    # mAP@0.5 at 1.3e-3, and 0.80 and 0.77 at 2.0e-3 and 2.2e-3 (bench_quality, RESULTS.md).
    return {
        "model_name": ParameterDistribution(type="choice", values=[name]),
        "optimizer": ParameterDistribution(type="choice", values=["adamw"]),
        "training_batch_size": ParameterDistribution(
            type="choice", values=[4 if profile.images < 500 else 8]
        ),
        "learning_rate": ParameterDistribution(type="loguniform", min_value=0.0009, max_value=0.0016),
        "weight_decay": ParameterDistribution(type="choice", values=[0.0001]),
    }

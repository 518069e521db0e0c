"""Detection metrics: COCO's through faster-coco-eval, the cloud service's VOC mAP, precision and recall.

Two families are reported side by side because users compare against both:

* COCO (``map``, ``map_50``, ``map_75``, ``mar_100`` and the other COCO stats): computed by
  faster-coco-eval, which gives the same 12 numbers as pycocotools 3-5x faster. We feed it the very
  dicts :func:`coco_ground_truth` / :func:`coco_detections` produce, so the JSON files written from
  them reproduce ``metrics.json`` exactly when re-scored by pycocotools.
* VOC (``map_voc``): the cloud service's default validation metric, the Pascal VOC devkit rule at IoU
  ``validation_iou_threshold`` with all-point interpolation. Detections are matched per image and
  class in descending score order to the ground-truth box they overlap most; at IoU >= threshold an
  unmatched box makes a true positive, an already-matched box a false positive (a duplicate). Boxes
  use the canonical continuous pixel coordinates, so there is none of the devkit's ``+1``.

Crowd boxes are ignored the COCO way in the COCO family; in the VOC family they behave like VOC's
``difficult``: they are not counted as objects to find, and a detection whose best match is a crowd
box is neither a true nor a false positive.

``precision`` and ``recall`` count detections with score >= ``box_score_threshold`` matched by the VOC
rule at the VOC IoU threshold, per class, then averaged over the classes that have ground truth.

A class without ground-truth boxes has no defined AP: like COCO it reports ``-1`` and is left out of
every mean (its false positives therefore cost nothing). If the whole validation set has no
ground truth, the headline numbers are 0.0 rather than undefined, so a sweep can still rank the trial;
COCO's area-range stats (``map_small`` ...) keep COCO's ``-1`` for "no such objects".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

MetricType = Literal["voc", "coco", "coco_voc"]

UNDEFINED = -1.0

# The 12 stats of COCOeval.summarize(), in its order.
COCO_STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
HEADLINE_KEYS = ("map", "map_50", "map_75", "mar_100", "map_voc", "precision", "recall")


@dataclass(frozen=True, eq=False)
class ImageGroundTruth:
    """The labelled boxes of one validation image.

    ``boxes`` are (N, 4) absolute xyxy pixels, ``labels`` class index + 1 (0 is background),
    ``iscrowd`` marks regions that are neither to be found nor to be penalised. ``name`` only
    labels the image in the files and plots.
    """

    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray
    width: int
    height: int
    name: str = ""

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "iscrowd", np.asarray(self.iscrowd, dtype=bool).reshape(-1))
        if not len(self.labels) == len(self.iscrowd) == len(boxes):
            raise ValueError("ImageGroundTruth: boxes, labels and iscrowd must have the same length")


@dataclass(frozen=True, eq=False)
class ImageDetections:
    """A model's output for one image: (M, 4) xyxy pixel boxes, scores, labels (class index + 1)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float64).reshape(-1))
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if not len(self.boxes) == len(self.scores) == len(self.labels):
            raise ValueError("ImageDetections: boxes, scores and labels must have the same length")


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, (len(a), len(b)); degenerate boxes overlap nothing."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


def match_image(
    ground_truth: ImageGroundTruth, detections: ImageDetections, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The VOC-rule outcome of every detection of one image, and the ground-truth box it hit.

    Returns ``(outcome, matched)``: ``outcome`` is TRUE_POSITIVE, FALSE_POSITIVE or IGNORED per
    detection, ``matched`` the index of the ground-truth box it was matched to (its crowd box when
    IGNORED) or -1. Matching runs in descending score order within each class, so the outcome of a
    detection never depends on lower-scored ones: thresholding by score afterwards is the same as
    before.
    """
    outcome = np.full(len(detections.scores), FALSE_POSITIVE, dtype=np.int8)
    matched = np.full(len(detections.scores), -1, dtype=np.int64)
    for label in np.unique(detections.labels):
        gt_index = np.flatnonzero(ground_truth.labels == label)
        if len(gt_index) == 0:
            continue
        det_index = np.flatnonzero(detections.labels == label)
        det_index = det_index[np.argsort(-detections.scores[det_index], kind="stable")]
        iou = box_iou(detections.boxes[det_index], ground_truth.boxes[gt_index])
        best = iou.argmax(axis=1)
        hit = iou[np.arange(len(det_index)), best] >= iou_threshold
        on_crowd = hit & ground_truth.iscrowd[gt_index[best]]
        outcome[det_index[on_crowd]] = IGNORED
        matched[det_index[on_crowd]] = gt_index[best[on_crowd]]
        rows = np.flatnonzero(hit & ~on_crowd)
        # The highest-scored detection on a box takes it; the later ones are duplicates.
        _, first = np.unique(best[rows], return_index=True)
        winners = rows[first]
        outcome[det_index[winners]] = TRUE_POSITIVE
        matched[det_index[winners]] = gt_index[best[winners]]
    return outcome, matched


@dataclass(frozen=True)
class ClassCurve:
    """One class's ranked detections over the whole set: what a precision-recall curve is drawn from."""

    scores: np.ndarray
    true_positive: np.ndarray
    ground_truth_count: int

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """Precision and recall after each ranked detection (empty arrays without detections)."""
        tp = np.cumsum(self.true_positive, dtype=np.float64)
        precision = tp / np.arange(1, len(tp) + 1)
        recall = tp / self.ground_truth_count if self.ground_truth_count else np.zeros_like(tp)
        return precision, recall

    def average_precision(self) -> float:
        """All-point interpolated AP (VOC 2010+); -1 when the class has no ground truth."""
        if self.ground_truth_count == 0:
            return UNDEFINED
        precision, recall = self.precision_recall()
        recall = np.concatenate(([0.0], recall, [1.0]))
        precision = np.concatenate(([0.0], precision, [0.0]))
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.flatnonzero(recall[1:] != recall[:-1])
        return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))

    def at_threshold(self, score_threshold: float) -> tuple[float, float, int]:
        """(precision, recall, detection count) over detections scoring >= the threshold."""
        kept = self.scores >= score_threshold
        count = int(kept.sum())
        tp = float(self.true_positive[kept].sum())
        precision = tp / count if count else 0.0
        recall = tp / self.ground_truth_count if self.ground_truth_count else 0.0
        return precision, recall, count


def class_curves(
    ground_truths: Sequence[ImageGroundTruth],
    detections: Sequence[ImageDetections],
    num_classes: int,
    iou_threshold: float,
) -> list[ClassCurve]:
    """Per class (index 0 = label 1), the VOC-matched ranked detections; ignored ones are dropped."""
    _check_lengths(ground_truths, detections)
    scores, labels, hits = [np.zeros(0)], [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=bool)]
    counts = np.zeros(num_classes, dtype=np.int64)
    for truth, found in zip(ground_truths, detections, strict=True):
        outcome, _ = match_image(truth, found, iou_threshold)
        kept = outcome != IGNORED
        scores.append(found.scores[kept])
        labels.append(found.labels[kept])
        hits.append(outcome[kept] == TRUE_POSITIVE)
        counted = truth.labels[~truth.iscrowd]
        counts += np.bincount(counted[(counted >= 1) & (counted <= num_classes)] - 1, minlength=num_classes)
    all_scores, all_labels, all_hits = np.concatenate(scores), np.concatenate(labels), np.concatenate(hits)
    curves = []
    for index in range(num_classes):
        mine = all_labels == index + 1
        order = np.argsort(-all_scores[mine], kind="stable")
        curves.append(ClassCurve(all_scores[mine][order], all_hits[mine][order], int(counts[index])))
    return curves


def coco_ground_truth(ground_truths: Sequence[ImageGroundTruth], classes: Sequence[str]) -> dict[str, Any]:
    """COCO instances JSON of the ground truth: image ids 1..N, category id = class index + 1."""
    images, annotations = [], []
    for image_id, truth in enumerate(ground_truths, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": truth.name or f"image-{image_id}",
                "width": int(truth.width),
                "height": int(truth.height),
            }
        )
        for box, label, crowd in zip(
            truth.boxes.tolist(), truth.labels.tolist(), truth.iscrowd.tolist(), strict=True
        ):
            width, height = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], width, height],
                    "area": width * height,
                    "iscrowd": int(crowd),
                }
            )
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_detections(detections: Sequence[ImageDetections]) -> list[dict[str, Any]]:
    """COCO results JSON of the detections, image ids matching :func:`coco_ground_truth`."""
    results = []
    for image_id, found in enumerate(detections, start=1):
        for box, score, label in zip(
            found.boxes.tolist(), found.scores.tolist(), found.labels.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    return results


def _silent(*_args: object, **_kwargs: object) -> None:
    """faster-coco-eval's print hook: evaluation runs every epoch and must not flood the log."""


@dataclass(frozen=True)
class CocoResult:
    """COCO's 12 stats by name, and per class (index 0 = label 1) AP@[.5:.95] and AP@.5."""

    stats: dict[str, float]
    per_class_ap: np.ndarray = field(repr=False)
    per_class_ap_50: np.ndarray = field(repr=False)


def coco_evaluate(ground_truth: dict[str, Any], results: list[dict[str, Any]]) -> CocoResult:
    """The 12 COCO bbox stats and per-class AP@[.5:.95] / AP@.5 (-1 where a class has no ground truth)."""
    num_classes = len(ground_truth["categories"])
    if not ground_truth["annotations"]:
        undefined = np.full(num_classes, UNDEFINED)
        return CocoResult(dict.fromkeys(COCO_STAT_NAMES, UNDEFINED), undefined, undefined.copy())
    truth = COCO(copy.deepcopy(ground_truth), print_function=_silent)
    found = truth.loadRes(copy.deepcopy(results)) if results else _empty_results(truth)
    found.print_function = _silent
    evaluator = COCOeval_faster(truth, found, iouType="bbox", print_function=_silent)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = {name: float(value) for name, value in zip(COCO_STAT_NAMES, evaluator.stats[:12], strict=True)}
    # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    return CocoResult(stats, _mean_defined(precision, axis=(0, 1)), _mean_defined(precision[0], axis=0))


def _empty_results(truth: COCO) -> COCO:
    """A result set without detections (``loadRes`` of pycocotools cannot build one)."""
    found = COCO(print_function=_silent)
    found.dataset = {
        "images": list(truth.dataset["images"]),
        "annotations": [],
        "categories": copy.deepcopy(truth.dataset["categories"]),
    }
    found.createIndex()
    return found


def _mean_defined(values: np.ndarray, axis: tuple[int, ...] | int) -> np.ndarray:
    """COCO's mean over entries > -1, -1 where there are none."""
    defined = values > -1
    total = np.where(defined, values, 0.0).sum(axis=axis)
    count = defined.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), UNDEFINED)


def _mean_of_defined(values: Sequence[float] | np.ndarray) -> float:
    defined = [float(value) for value in values if value > UNDEFINED]
    return float(np.mean(defined)) if defined else 0.0


def evaluate_detections(
    ground_truths: Sequence[ImageGroundTruth],
    detections: Sequence[ImageDetections],
    classes: Sequence[str],
    *,
    metric_type: MetricType = "voc",
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> dict[str, Any]:
    """Score detections against ground truth: COCO stats, VOC mAP, precision/recall, per-class AP.

    ``mean_average_precision`` is the primary metric named by ``metric_type`` (``voc``: ``map_voc``;
    ``coco`` and ``coco_voc``: ``map``), and ``per_class`` maps each class name to that same kind of
    AP (-1 without ground truth), so ``mean_average_precision`` is the mean of its defined values.
    ``per_class_metrics`` holds every per-class number. All values are plain floats (JSON-ready).
    """
    if metric_type not in ("voc", "coco", "coco_voc"):
        raise ValueError(f"metric_type must be voc, coco or coco_voc, not {metric_type!r}")
    _check_lengths(ground_truths, detections)
    coco = coco_evaluate(coco_ground_truth(ground_truths, classes), coco_detections(detections))
    curves = class_curves(ground_truths, detections, len(classes), iou_threshold)
    voc_ap = [curve.average_precision() for curve in curves]
    at_threshold = [curve.at_threshold(score_threshold) for curve in curves]
    per_class_metrics = {
        name: {
            "ap_voc": voc_ap[index],
            "ap_coco": float(coco.per_class_ap[index]),
            "ap_50": float(coco.per_class_ap_50[index]),
            "precision": at_threshold[index][0] if curve.ground_truth_count else UNDEFINED,
            "recall": at_threshold[index][1] if curve.ground_truth_count else UNDEFINED,
            "ground_truth_boxes": curve.ground_truth_count,
            "detections_above_threshold": at_threshold[index][2],
        }
        for index, (name, curve) in enumerate(zip(classes, curves, strict=True))
    }

    metrics: dict[str, Any] = dict(coco.stats)
    metrics["map_voc"] = _mean_of_defined(voc_ap)
    metrics["precision"] = _mean_of_defined([values["precision"] for values in per_class_metrics.values()])
    metrics["recall"] = _mean_of_defined([values["recall"] for values in per_class_metrics.values()])
    for key in HEADLINE_KEYS:
        metrics[key] = max(float(metrics[key]), 0.0)
    metrics["mean_average_precision"] = metrics["map_voc" if metric_type == "voc" else "map"]
    primary = "ap_voc" if metric_type == "voc" else "ap_coco"
    metrics["per_class"] = {name: values[primary] for name, values in per_class_metrics.items()}
    metrics["per_class_metrics"] = per_class_metrics
    return metrics


def _check_lengths(ground_truths: Sequence[ImageGroundTruth], detections: Sequence[ImageDetections]) -> None:
    if len(ground_truths) != len(detections):
        raise ValueError(
            f"{len(ground_truths)} ground-truth images but {len(detections)} detection lists: "
            "pass one ImageDetections per validation image, in the same order"
        )

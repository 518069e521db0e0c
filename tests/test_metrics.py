"""Metrics against pycocotools (the reference implementation) and against hand-computed VOC numbers."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionautoml.evaluation.metrics import (
    COCO_STAT_NAMES,
    ImageDetections,
    ImageGroundTruth,
    coco_detections,
    coco_ground_truth,
    evaluate_detections,
)

CLASSES = ["cat", "dog", "bird"]


def truth(boxes, labels, crowd=None, size=(200, 100)) -> ImageGroundTruth:
    crowd = [False] * len(labels) if crowd is None else crowd
    return ImageGroundTruth(np.array(boxes, float).reshape(-1, 4), labels, crowd, *size)


def found(boxes, scores, labels) -> ImageDetections:
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), scores, labels)


def pycocotools_reference(ground_truths, detections, classes) -> tuple[dict[str, float], list[float]]:
    """The 12 stats and per-class AP@[.5:.95] as pycocotools computes them from our COCO dicts."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_ground_truth(ground_truths, classes)
        gt.createIndex()
        results = coco_detections(detections)
        if results:
            dt = gt.loadRes(results)
        else:  # pycocotools' loadRes cannot take an empty list
            dt = COCO()
            dt.dataset = {
                "images": gt.dataset["images"],
                "annotations": [],
                "categories": gt.dataset["categories"],
            }
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = [float(p[p > -1].mean()) if (p > -1).any() else -1.0 for p in np.moveaxis(precision, 2, 0)]
    return dict(zip(COCO_STAT_NAMES, map(float, evaluator.stats), strict=True)), per_class


def assert_coco_parity(ground_truths, detections, classes=CLASSES) -> dict:
    metrics = evaluate_detections(ground_truths, detections, classes, metric_type="coco")
    stats, per_class = pycocotools_reference(ground_truths, detections, classes)
    for name, value in stats.items():
        ours = metrics[name]
        if name in ("map", "map_50", "map_75", "mar_100"):
            value = max(value, 0.0)
        assert ours == pytest.approx(value, abs=1e-12), name
    for name, value in zip(classes, per_class, strict=True):
        assert metrics["per_class_metrics"][name]["ap_coco"] == pytest.approx(value, abs=1e-12), name
        assert metrics["per_class"][name] == pytest.approx(value, abs=1e-12), name
    return metrics


def test_no_detections_scores_zero_everywhere():
    gts = [truth([[10, 10, 50, 50]], [1]), truth([[20, 20, 80, 60], [100, 10, 150, 90]], [2, 2])]
    dets = [found([], [], []), found([], [], [])]
    metrics = assert_coco_parity(gts, dets)
    for key in (
        "map",
        "map_50",
        "map_75",
        "mar_100",
        "map_voc",
        "precision",
        "recall",
        "mean_average_precision",
    ):
        assert metrics[key] == 0.0, key
    assert metrics["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": -1.0}
    json.dumps(metrics, allow_nan=False)


def test_perfect_detections_score_one():
    gts = [truth([[10, 10, 50, 50], [60, 5, 190, 95]], [1, 2]), truth([[5, 5, 40, 30]], [3])]
    dets = [
        found([[10, 10, 50, 50], [60, 5, 190, 95]], [0.9, 0.8], [1, 2]),
        found([[5, 5, 40, 30]], [0.99], [3]),
    ]
    metrics = assert_coco_parity(gts, dets)
    for key in ("map", "map_50", "map_75", "mar_100", "map_voc", "precision", "recall"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["per_class"] == {name: pytest.approx(1.0) for name in CLASSES}


def test_class_without_ground_truth_is_undefined_and_left_out_of_the_mean():
    gts = [truth([[10, 10, 50, 50]], [1]), truth([[20, 20, 80, 60]], [2])]
    dets = [
        found([[10, 10, 50, 50], [100, 10, 150, 60]], [0.9, 0.95], [1, 3]),  # bird: no ground truth anywhere
        found([[22, 20, 80, 60], [0, 0, 10, 10]], [0.7, 0.8], [2, 2]),
    ]
    metrics = assert_coco_parity(gts, dets)
    assert metrics["per_class"]["bird"] == -1.0
    assert metrics["per_class_metrics"]["bird"]["ap_voc"] == -1.0
    defined = [ap for ap in metrics["per_class"].values() if ap >= 0]
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(defined))

    voc = evaluate_detections(gts, dets, CLASSES, metric_type="voc")
    # dog: FP at 0.8 then TP at 0.7 -> precision 1/2 at recall 1; cat: 1.0. Bird's FP costs nothing.
    assert voc["per_class"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(0.5), "bird": -1.0}
    assert voc["map_voc"] == voc["mean_average_precision"] == pytest.approx(0.75)


def test_crowd_boxes_are_ignored_the_coco_way_and_like_voc_difficult():
    gts = [
        truth([[10, 10, 50, 50], [100, 10, 190, 90]], [1, 1], crowd=[False, True]),
        truth([[30, 30, 70, 80]], [1]),
    ]
    dets = [
        found([[10, 10, 50, 50], [105, 15, 185, 85], [120, 20, 160, 60]], [0.9, 0.95, 0.85], [1, 1, 1]),
        found([[30, 30, 70, 80]], [0.6], [1]),
    ]
    metrics = assert_coco_parity(gts, dets)
    assert metrics["map"] == pytest.approx(1.0)
    voc = evaluate_detections(gts, dets, CLASSES, metric_type="voc", score_threshold=0.5)
    assert voc["per_class_metrics"]["cat"]["ground_truth_boxes"] == 2
    # VOC matches crowd boxes by plain IoU, like `difficult`: the 0.95 detection (IoU 0.79 with the crowd)
    # is ignored, the small 0.85 one inside it (IoU 0.22; COCO's crowd overlap 1.0) is a false positive.
    # Ranked: 0.9 TP, 0.85 FP, 0.6 TP -> AP = 1/2 * 1 + 1/2 * 2/3.
    assert voc["map_voc"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc["precision"] == pytest.approx(2 / 3)
    assert voc["recall"] == pytest.approx(1.0)
    only_crowd_hit = [found([[10, 10, 50, 50], [105, 15, 185, 85]], [0.9, 0.95], [1, 1]), dets[1]]
    assert evaluate_detections(gts, only_crowd_hit, CLASSES)["map_voc"] == pytest.approx(1.0)


def test_voc_average_precision_matches_a_hand_computed_all_point_example():
    gts = [
        truth([[0, 0, 40, 40], [100, 0, 140, 40]], [1, 1]),
        truth([[0, 0, 40, 40], [50, 50, 90, 90]], [1, 1]),
    ]
    dets = [
        # ranked: 0.9 TP, 0.8 FP (duplicate of a matched box), 0.7 TP, 0.6 FP (nothing there), 0.5 TP
        found([[0, 0, 40, 40], [1, 1, 40, 40], [100, 0, 140, 40]], [0.9, 0.8, 0.5], [1, 1, 1]),
        found([[0, 0, 40, 40], [150, 50, 190, 90]], [0.7, 0.6], [1, 1]),
    ]
    # precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/4, 1/4, 2/4, 2/4, 3/4; the 4th box is never found.
    # All-point: 1/4 * 1 + 1/4 * 2/3 + 1/4 * 3/5 (11-point would give 6.2/11 = 0.5636).
    expected = 0.25 + 0.25 * 2 / 3 + 0.25 * 0.6
    metrics = evaluate_detections(gts, dets, ["cat"], metric_type="voc", score_threshold=0.65)
    assert metrics["map_voc"] == pytest.approx(expected, abs=1e-12)
    assert metrics["per_class"]["cat"] == pytest.approx(expected, abs=1e-12)
    assert metrics["mean_average_precision"] == metrics["map_voc"]
    assert metrics["precision"] == pytest.approx(2 / 3)  # 0.9 TP, 0.8 FP, 0.7 TP
    assert metrics["recall"] == pytest.approx(2 / 4)
    assert_coco_parity(gts, dets, ["cat"])


def test_validation_iou_threshold_decides_what_counts_as_found():
    gts = [truth([[0, 0, 100, 100]], [1])]
    dets = [found([[0, 0, 100, 60]], [0.9], [1])]  # IoU 0.6
    assert evaluate_detections(gts, dets, ["cat"], iou_threshold=0.5)["map_voc"] == pytest.approx(1.0)
    assert evaluate_detections(gts, dets, ["cat"], iou_threshold=0.7)["map_voc"] == 0.0


@pytest.mark.parametrize(
    ("metric_type", "primary"), [("voc", "map_voc"), ("coco", "map"), ("coco_voc", "map")]
)
def test_metric_type_selects_the_primary_metric(metric_type, primary):
    gts = [truth([[10, 10, 50, 50], [60, 10, 100, 50]], [1, 2])]
    dets = [found([[12, 10, 50, 52], [60, 10, 90, 50], [0, 0, 20, 20]], [0.9, 0.6, 0.7], [1, 2, 2])]
    metrics = evaluate_detections(gts, dets, CLASSES, metric_type=metric_type)
    assert metrics["map"] != metrics["map_voc"]
    assert metrics["mean_average_precision"] == metrics[primary]
    defined = [ap for ap in metrics["per_class"].values() if ap >= 0]
    assert metrics["mean_average_precision"] == pytest.approx(np.mean(defined))


def random_case(seed: int) -> tuple[list[ImageGroundTruth], list[ImageDetections]]:
    """Boxes near ground truth (hits at varied IoU), some noise, duplicates, crowds and empty images."""
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(rng.integers(1, 6)):
        count = int(rng.integers(0, 6))
        corner = rng.uniform(0, 150, (count, 2))
        boxes = np.hstack([corner, corner + rng.uniform(4, 120, (count, 2))])
        gts.append(truth(boxes, rng.integers(1, 4, count), rng.random(count) < 0.15, size=(300, 280)))
        hits = boxes[rng.integers(0, count, rng.integers(0, 8))] if count else np.zeros((0, 4))
        noise = rng.uniform(0, 200, (rng.integers(0, 3), 4))
        candidates = np.vstack([hits + rng.normal(0, 6, hits.shape), noise])
        candidates[:, 2:] = np.maximum(candidates[:, 2:], candidates[:, :2] + 1)
        scores = np.round(rng.random(len(candidates)), 2)  # rounding makes score ties happen
        dets.append(found(candidates, scores, rng.integers(1, 4, len(candidates))))
    return gts, dets


@pytest.mark.parametrize("seed", range(30))
def test_random_cases_match_pycocotools(seed):
    gts, dets = random_case(seed)
    metrics = assert_coco_parity(gts, dets)
    json.dumps(metrics, allow_nan=False)
    assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float))
    for key in ("map", "map_50", "map_voc", "precision", "recall"):
        assert 0.0 <= metrics[key] <= 1.0


def voc_devkit_ap(ground_truths, detections, label: int, iou_threshold: float) -> float:
    """The Pascal VOC devkit's voc_eval loop for one class, with crowd boxes as `difficult`.

    Only the coordinate convention differs from the devkit: continuous pixels (no +1) and IoU >=.
    """
    objects = {}
    positives = 0
    for image, truth in enumerate(ground_truths):
        mine = truth.labels == label
        objects[image] = (truth.boxes[mine], truth.iscrowd[mine], [False] * int(mine.sum()))
        positives += int((~truth.iscrowd[mine]).sum())
    ranked = [
        (score, image, box)
        for image, found in enumerate(detections)
        for box, score, box_label in zip(found.boxes, found.scores, found.labels, strict=True)
        if box_label == label
    ]
    ranked.sort(key=lambda item: -item[0])
    tp, fp = [], []
    for _, image, box in ranked:
        boxes, difficult, taken = objects[image]
        best, best_iou = -1, -np.inf
        for index, other in enumerate(boxes):
            width = max(min(box[2], other[2]) - max(box[0], other[0]), 0.0)
            height = max(min(box[3], other[3]) - max(box[1], other[1]), 0.0)
            inter = width * height
            union = (
                (box[2] - box[0]) * (box[3] - box[1]) + (other[2] - other[0]) * (other[3] - other[1]) - inter
            )
            if inter / union > best_iou:
                best, best_iou = index, inter / union
        if best_iou >= iou_threshold and difficult[best]:
            continue
        hit = best_iou >= iou_threshold and not taken[best]
        if hit:
            taken[best] = True
        tp.append(int(hit))
        fp.append(int(not hit))
    if positives == 0:
        return -1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for index in range(len(mpre) - 1, 0, -1):
        mpre[index - 1] = max(mpre[index - 1], mpre[index])
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_random_cases_match_the_voc_devkit_loop(seed, iou_threshold):
    gts, dets = random_case(seed)
    metrics = evaluate_detections(gts, dets, CLASSES, iou_threshold=iou_threshold)
    for label, name in enumerate(CLASSES, start=1):
        expected = voc_devkit_ap(gts, dets, label, iou_threshold)
        assert metrics["per_class"][name] == pytest.approx(expected, abs=1e-12), name


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same order"):
        evaluate_detections([truth([], [])], [], CLASSES)
    with pytest.raises(ValueError, match="same length"):
        ImageDetections(np.zeros((2, 4)), [0.5], [1, 1])

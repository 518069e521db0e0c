"""Validation scoring on a COCO-sized run: faster-coco-eval (ours) against pycocotools (the reference).

The trainer scores the validation set after every evaluation epoch, so the metric code runs
hundreds of times per sweep. Both COCO evaluators get the same dicts built by
``visionautoml.evaluation.metrics``; their 12 stats are checked to agree, and the table gives the
ratio. A third row is the whole :func:`evaluate_detections` (COCO through faster-coco-eval plus
the VOC mAP, precision and recall), against the same baseline.

    .venv/bin/python benchmarks/bench_metrics.py [--images 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionautoml.evaluation.metrics import (
    ImageDetections,
    ImageGroundTruth,
    coco_detections,
    coco_evaluate,
    coco_ground_truth,
    evaluate_detections,
)

CLASSES = [f"class-{index}" for index in range(10)]


def generate(images: int, seed: int = 0) -> tuple[list[ImageGroundTruth], list[ImageDetections]]:
    """~7 objects and 100 detections per image (a detector's output cap), half of them near an object."""
    rng = np.random.default_rng(seed)
    truths, found = [], []
    for _ in range(images):
        count = int(rng.integers(1, 14))
        corner = rng.uniform(0, 500, (count, 2))
        boxes = np.hstack([corner, corner + rng.uniform(8, 300, (count, 2))])
        labels = rng.integers(1, len(CLASSES) + 1, count)
        truths.append(ImageGroundTruth(boxes, labels, rng.random(count) < 0.02, 800, 800))
        near = boxes[rng.integers(0, count, 50)] + rng.normal(0, 10, (50, 4))
        corner = rng.uniform(0, 600, (50, 2))
        far = np.hstack([corner, corner + rng.uniform(8, 200, (50, 2))])
        candidates = np.vstack([near, far])
        candidates[:, 2:] = np.maximum(candidates[:, 2:], candidates[:, :2] + 1)
        found.append(ImageDetections(candidates, rng.random(100), rng.integers(1, len(CLASSES) + 1, 100)))
    return truths, found


def pycocotools_stats(ground_truth: dict, results: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = copy.deepcopy(ground_truth)
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def timed(function: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result): on a shared machine CPU time shows the work without waiting."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    truths, found = generate(args.images)
    ground_truth, results = coco_ground_truth(truths, CLASSES), coco_detections(found)
    contenders: dict[str, Callable[[], object]] = {
        "pycocotools": lambda: pycocotools_stats(ground_truth, results),
        "faster-coco-eval": lambda: coco_evaluate(ground_truth, results).stats,
        "evaluate_detections": lambda: evaluate_detections(truths, found, CLASSES, metric_type="coco_voc"),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    outputs: dict[str, object] = {}
    for attempt in range(args.repeat):
        order = list(contenders) if attempt % 2 == 0 else list(reversed(contenders))
        for name in order:
            wall, cpu, outputs[name] = timed(contenders[name])
            runs[name].append((wall, cpu))

    reference = np.asarray(outputs["pycocotools"])
    ours = np.array(list(outputs["faster-coco-eval"].values()))
    difference = float(np.abs(reference - ours).max())
    wall = {name: statistics.median(run[0] for run in values) for name, values in runs.items()}
    cpu = {name: statistics.median(run[1] for run in values) for name, values in runs.items()}
    print(
        f"\nCOCO bbox evaluation, {args.images} images, {len(results)} detections, "
        f"{len(ground_truth['annotations'])} boxes, median of {args.repeat} runs (seconds)\n"
    )
    print(f"{'scorer':<20} {'wall':>7} {'speed-up':>9} {'CPU':>7} {'speed-up':>9}   wall runs")
    for name, values in runs.items():
        listed = ", ".join(f"{run[0]:.2f}" for run in values)
        print(
            f"{name:<20} {wall[name]:>7.2f} {wall['pycocotools'] / wall[name]:>8.2f}x {cpu[name]:>7.2f} "
            f"{cpu['pycocotools'] / cpu[name]:>8.2f}x   {listed}"
        )
    print(f"\nlargest difference between the 12 stats of both COCO evaluators: {difference:.1e}")
    print(f"mAP@[.5:.95] {reference[0]:.4f}, mAP@.5 {reference[1]:.4f}")
    if difference > 1e-9:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Per-trial diagnostics a user opens in MLflow to see *how* a model fails, not only how much.

:func:`write_trial_plots` writes, from one validation run:

* ``precision_recall.png``: a precision-recall curve per class at IoU 0.5 (VOC matching, the same
  ranking that gives ``map_voc``);
* ``confusion_matrix.png`` / ``.csv``: rows are ground-truth classes plus ``background`` (missed
  objects), columns predicted classes plus ``background`` (false alarms); see
  :func:`confusion_matrix`;
* ``validation_images.png``: validation images with ground truth (green) and predictions above the
  score threshold (orange), the worst images by per-image recall first;
* ``per_class_ap.md``: the per-class AP table.

Figures are drawn on a private Agg canvas, never through ``pyplot``: training runs in worker threads
and processes where a global backend or a display must not matter.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from visionautoml.config import Tiling
from visionautoml.data.annotations import Dataset
from visionautoml.data.images import decode_image_file
from visionautoml.errors import DataError, first_line
from visionautoml.evaluation.metrics import (
    FALSE_POSITIVE,
    IGNORED,
    TRUE_POSITIVE,
    UNDEFINED,
    ImageDetections,
    ImageGroundTruth,
    box_iou,
    class_curves,
    match_image,
)
from visionautoml.files import atomic_write_bytes, atomic_write_text
from visionautoml.models.tiling import image_tiles

if TYPE_CHECKING:
    from visionautoml.evaluation.scoring import Evaluation

PLOT_IOU_THRESHOLD = 0.5
BACKGROUND = "background"
GROUND_TRUTH_COLOUR = "#1a9850"
PREDICTION_COLOUR = "#f46d43"
TILE_COLOUR = "#4575b4"
THUMBNAIL_SIZE = 480
MAX_BOXES_DRAWN = 20  # per image: more labels than this only hide the picture


def write_trial_plots(
    out_dir: str | Path,
    evaluation: Evaluation,
    dataset: Dataset | None = None,
    *,
    max_images: int = 16,
    tiling: Tiling | None = None,
) -> list[Path]:
    """Write every diagnostic of a validation run into ``out_dir``; returns the files written.

    ``dataset`` supplies the validation images, in the order of ``evaluation.ground_truths``;
    without it the image grid is skipped. With ``tiling`` the images show the tiles the model
    also looked at.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = list(evaluation.classes)
    truths, found = evaluation.ground_truths, evaluation.detections
    threshold = evaluation.score_threshold
    written = [
        _save_figure(out_dir / "precision_recall.png", precision_recall_figure(truths, found, classes)),
    ]
    matrix = confusion_matrix(truths, found, len(classes), score_threshold=threshold)
    written.append(atomic_write_text(out_dir / "confusion_matrix.csv", confusion_matrix_csv(matrix, classes)))
    written.append(_save_figure(out_dir / "confusion_matrix.png", confusion_matrix_figure(matrix, classes)))
    if dataset is not None and dataset.images:
        figure = validation_images_figure(
            truths, found, classes, dataset, threshold, max_images=max_images, tiling=tiling
        )
        written.append(_save_figure(out_dir / "validation_images.png", figure))
    written.append(atomic_write_text(out_dir / "per_class_ap.md", per_class_ap_table(evaluation)))
    return written


def precision_recall_figure(
    ground_truths: Sequence[ImageGroundTruth], detections: Sequence[ImageDetections], classes: Sequence[str]
) -> Figure:
    figure = Figure(figsize=(8, 5), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    curves = class_curves(ground_truths, detections, len(classes), PLOT_IOU_THRESHOLD)
    for name, curve in zip(classes, curves, strict=True):
        ap = curve.average_precision()
        if ap == UNDEFINED:
            continue
        precision, recall = curve.precision_recall()
        envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
        if len(recall):
            recall, envelope = np.concatenate(([0.0], recall)), np.concatenate((envelope[:1], envelope))
        axes.plot(recall, envelope, drawstyle="steps-pre", label=f"{name} (AP {ap:.3f})")
    axes.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    axes.set_title(f"Precision-recall per class, IoU {PLOT_IOU_THRESHOLD}")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    else:
        axes.text(0.5, 0.5, "no ground truth", ha="center", va="center")
    return figure


def confusion_matrix(
    ground_truths: Sequence[ImageGroundTruth],
    detections: Sequence[ImageDetections],
    num_classes: int,
    *,
    score_threshold: float,
    iou_threshold: float = PLOT_IOU_THRESHOLD,
) -> np.ndarray:
    """Counts of (ground-truth class, predicted class) pairs; index ``num_classes`` is background.

    Only detections scoring >= ``score_threshold`` take part. First each detection is matched to a
    box of its own class by the VOC rule (so the diagonal holds exactly the true positives behind
    ``precision``/``recall``); then the remaining detections, highest score first, take the
    still-unmatched box of another class they overlap most at IoU >= ``iou_threshold``. What is left
    is a missed object (column background) or a false alarm (row background). Crowd boxes, and
    detections matched to them, are not counted anywhere. Row sums are the ground-truth counts,
    column sums the detection counts.
    """
    background = num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    for truth, found in zip(ground_truths, detections, strict=True):
        keep = (found.scores >= score_threshold) & (found.labels >= 1) & (found.labels <= num_classes)
        kept = ImageDetections(found.boxes[keep], found.scores[keep], found.labels[keep])
        outcome, matched = match_image(truth, kept, iou_threshold)
        countable = ~truth.iscrowd & (truth.labels >= 1) & (truth.labels <= num_classes)
        unmatched_truth = countable.copy()
        for detection in np.flatnonzero(outcome == TRUE_POSITIVE):
            label = kept.labels[detection] - 1
            matrix[label, label] += 1
            unmatched_truth[matched[detection]] = False
        leftovers = np.flatnonzero(outcome == FALSE_POSITIVE)
        leftovers = leftovers[np.argsort(-kept.scores[leftovers], kind="stable")]
        iou = box_iou(kept.boxes[leftovers], truth.boxes)
        for row, detection in enumerate(leftovers):
            predicted = kept.labels[detection] - 1
            candidates = (
                unmatched_truth & (truth.labels != kept.labels[detection]) & (iou[row] >= iou_threshold)
            )
            if candidates.any():
                hit = int(np.argmax(np.where(candidates, iou[row], -1.0)))
                matrix[truth.labels[hit] - 1, predicted] += 1
                unmatched_truth[hit] = False
            else:
                matrix[background, predicted] += 1
        for index in np.flatnonzero(unmatched_truth):
            matrix[truth.labels[index] - 1, background] += 1
    return matrix


def confusion_matrix_csv(matrix: np.ndarray, classes: Sequence[str]) -> str:
    names = [*classes, BACKGROUND]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ground_truth \\ predicted", *names])
    for name, row in zip(names, matrix.tolist(), strict=True):
        writer.writerow([name, *row])
    return buffer.getvalue()


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str]) -> Figure:
    names = [*classes, BACKGROUND]
    side = min(4 + 0.5 * len(names), 20)
    figure = Figure(figsize=(side, side * 0.9), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, names, rotation=45, ha="right")
    axes.set_yticks(ticks, names)
    axes.set(xlabel="predicted", ylabel="ground truth")
    axes.set_title(f"Confusion matrix (IoU {PLOT_IOU_THRESHOLD})")
    if len(names) <= 30:
        bright = matrix.max() / 2 if matrix.size else 0
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if count > bright else "black"
            axes.text(column, row, str(count), ha="center", va="center", color=colour, fontsize="small")
    return figure


def image_recall(
    ground_truth: ImageGroundTruth, detections: ImageDetections, score_threshold: float
) -> tuple[float, int]:
    """(recall, false positives) of one image at the score threshold; recall 1.0 without objects."""
    keep = detections.scores >= score_threshold
    kept = ImageDetections(detections.boxes[keep], detections.scores[keep], detections.labels[keep])
    outcome, _ = match_image(ground_truth, kept, PLOT_IOU_THRESHOLD)
    objects = int((~ground_truth.iscrowd).sum())
    found = int((outcome == TRUE_POSITIVE).sum())
    false_positives = int(len(outcome) - found - (outcome == IGNORED).sum())
    return (found / objects if objects else 1.0), false_positives


def worst_images(
    ground_truths: Sequence[ImageGroundTruth], detections: Sequence[ImageDetections], score_threshold: float
) -> list[tuple[int, float, int]]:
    """``(image index, recall, false positives)`` of every image: lowest recall first, then most false
    positives, then dataset order."""
    ranking = []
    for index, (truth, found) in enumerate(zip(ground_truths, detections, strict=True)):
        recall, false_positives = image_recall(truth, found, score_threshold)
        ranking.append((recall, -false_positives, index))
    return [(index, recall, -negative) for recall, negative, index in sorted(ranking)]


def validation_images_figure(
    ground_truths: Sequence[ImageGroundTruth],
    detections: Sequence[ImageDetections],
    classes: Sequence[str],
    dataset: Dataset,
    score_threshold: float,
    *,
    max_images: int = 16,
    tiling: Tiling | None = None,
) -> Figure:
    """A grid of the worst validation images (lowest recall, then most false positives) first.

    With ``tiling``, each image shows its tile grid (thin blue rectangles): which tile saw an
    object is what explains a small one found or missed.
    """
    if len(dataset.images) != len(ground_truths):
        raise ValueError(
            f"the dataset has {len(dataset.images)} images but the evaluation {len(ground_truths)}: "
            "pass the validation dataset the evaluation was run on"
        )
    chosen = worst_images(ground_truths, detections, score_threshold)[:max_images]
    columns = min(4, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    figure = Figure(figsize=(4 * columns, 3.4 * rows), dpi=100, layout="constrained")
    for slot, (index, recall, false_positives) in enumerate(chosen, start=1):
        axes = figure.add_subplot(rows, columns, slot)
        record = dataset.images[index]
        _draw_image(axes, record.path)
        if tiling is not None and tiling.grid is not None:
            _draw_tiles(axes, record.width, record.height, tiling)
        _draw_boxes(axes, ground_truths[index].boxes, ground_truths[index].labels, None, classes, "gt")
        found = detections[index]
        shown = np.argsort(-found.scores, kind="stable")[:MAX_BOXES_DRAWN]
        shown = shown[found.scores[shown] >= score_threshold]
        _draw_boxes(axes, found.boxes[shown], found.labels[shown], found.scores[shown], classes, "pred")
        title = f"{record.name}\nrecall {recall:.2f}, false positives {false_positives}"
        hidden = int((found.scores >= score_threshold).sum()) - len(shown)
        axes.set_title(title + (f" ({hidden} weaker boxes not drawn)" if hidden else ""), fontsize=8)
        axes.set_axis_off()
    grid = f", tiles {tiling.tile_grid_size} (blue)" if tiling is not None and tiling.grid else ""
    figure.suptitle(
        f"Ground truth (green) and predictions >= {score_threshold:g} (orange){grid}, worst first",
        fontsize=10,
    )
    return figure


def _draw_tiles(axes: Axes, width: int, height: int, tiling: Tiling) -> None:
    for tile in image_tiles(width, height, tiling):
        axes.add_patch(
            Rectangle(
                (tile.left, tile.top),
                tile.width,
                tile.height,
                fill=False,
                edgecolor=TILE_COLOUR,
                linewidth=0.8,
                alpha=0.7,
            )
        )


def _draw_image(axes: Axes, path: Path) -> None:
    """Show the image downscaled but in its original pixel coordinates, so boxes need no rescaling."""
    try:
        pixels = decode_image_file(path).permute(1, 2, 0).numpy()
    except DataError as error:
        axes.text(0.5, 0.5, f"unreadable: {first_line(error, limit=60)}", ha="center", va="center", wrap=True)
        return
    stride = max(1, math.ceil(max(pixels.shape[:2]) / THUMBNAIL_SIZE))
    shown_height, shown_width = pixels.shape[:2]
    axes.imshow(
        pixels[::stride, ::stride], extent=(0, shown_width, shown_height, 0), interpolation="bilinear"
    )
    axes.set_xlim(0, shown_width)
    axes.set_ylim(shown_height, 0)


def _draw_boxes(
    axes: Axes,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None,
    classes: Sequence[str],
    kind: str,
) -> None:
    colour = GROUND_TRUTH_COLOUR if kind == "gt" else PREDICTION_COLOUR
    for position, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        name = classes[label - 1] if 1 <= label <= len(classes) else str(label)
        text = name if scores is None else f"{name} {scores[position]:.2f}"
        axes.add_patch(
            Rectangle(
                (box[0], box[1]),
                box[2] - box[0],
                box[3] - box[1],
                fill=False,
                edgecolor=colour,
                linewidth=1.5,
                linestyle="-" if kind == "gt" else "--",
            )
        )
        anchor_y = box[1] if kind == "gt" else box[3]
        axes.text(
            box[0],
            anchor_y,
            text,
            color="white",
            fontsize=6,
            va="bottom" if kind == "gt" else "top",
            bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.8},
        )


def per_class_ap_table(evaluation: Evaluation) -> str:
    """Markdown table of every per-class number; ``n/a`` where a class has no ground truth."""
    metrics = evaluation.metrics
    primary = "VOC AP" if evaluation.metric_type == "voc" else "COCO AP@[.5:.95]"
    lines = [
        f"Primary metric ({evaluation.metric_type}): mean_average_precision = "
        f"{metrics['mean_average_precision']:.4f}. VOC AP at IoU {evaluation.iou_threshold:g} (all-point "
        f"interpolation); precision and recall at score >= {evaluation.score_threshold:g}.",
        "",
        f"| class | AP ({primary}) | VOC AP | COCO AP@[.5:.95] | COCO AP@.5 | precision | recall | boxes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, values in metrics["per_class_metrics"].items():
        cells = [
            metrics["per_class"][name],
            values["ap_voc"],
            values["ap_coco"],
            values["ap_50"],
            values["precision"],
            values["recall"],
        ]
        shown = " | ".join("n/a" if value == UNDEFINED else f"{value:.4f}" for value in cells)
        escaped = name.replace("|", "\\|")
        lines.append(f"| {escaped} | {shown} | {values['ground_truth_boxes']} |")
    return "\n".join(lines) + "\n"


def _save_figure(path: Path, figure: Figure) -> Path:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return atomic_write_bytes(path, buffer.getvalue())

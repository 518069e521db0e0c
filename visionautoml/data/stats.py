"""What is in a dataset: counts per class, boxes per image, box sizes and shapes, sample images.

Class imbalance, images without boxes and tiny boxes are what most often explain a
detector that does not learn, so ``data stats`` shows them before any training is paid
for. The numbers are one plain dataclass (:func:`compute_stats`) so that the terminal
tables here and an HTML overview elsewhere render the same values.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.data.images import preview_image
from visionautoml.errors import DataError
from visionautoml.files import atomic_path

SAMPLE_SIDE = 320
"""Longest side of a sample image in the plot, in pixels."""

# COCO's object-size buckets, by box area in pixels.
COCO_SMALL_AREA = 32**2
COCO_MEDIUM_AREA = 96**2
BOXES_PER_IMAGE_CAP = 10
MOST_COMMON_IMAGE_SIZES = 10

_RELATIVE_EDGES = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
_RELATIVE_LABELS = ["<5%", "5-10%", "10-20%", "20-30%", "30-50%", "50-70%", ">=70%"]
_ASPECT_EDGES = [1 / 3, 1 / 2, 3 / 4, 4 / 3, 2, 3]
_ASPECT_LABELS = ["<1:3", "1:3-1:2", "1:2-3:4", "3:4-4:3 (square)", "4:3-2:1", "2:1-3:1", ">=3:1"]


@dataclass(slots=True)
class DatasetStats:
    """Every count is a plain int keyed by a display label, in display order (JSON-ready)."""

    image_count: int
    box_count: int
    classes: list[str]
    boxes_per_class: dict[str, int]
    images_per_class: dict[str, int]
    crowd_boxes: int
    images_without_boxes: int
    boxes_per_image: dict[str, int]
    image_sizes: dict[str, int]
    box_area_buckets: dict[str, int]
    relative_box_size: dict[str, int]
    box_aspect_ratio: dict[str, int]
    median_box_width: float
    median_box_height: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_stats(dataset: Dataset) -> DatasetStats:
    boxes = [(image, box) for image in dataset.images for box in image.boxes]
    classes = list(dataset.classes) + sorted({box.label for _, box in boxes} - set(dataset.classes))
    per_class = Counter(box.label for _, box in boxes)
    images_per_class = Counter(
        label for image in dataset.images for label in {box.label for box in image.boxes}
    )

    per_image = Counter(min(len(image.boxes), BOXES_PER_IMAGE_CAP) for image in dataset.images)
    boxes_per_image = {
        (f"{count}+" if count == BOXES_PER_IMAGE_CAP else str(count)): per_image[count]
        for count in sorted(per_image)
    }
    sizes = Counter(f"{image.width}x{image.height}" for image in dataset.images)
    image_sizes = dict(sizes.most_common(MOST_COMMON_IMAGE_SIZES))
    if len(sizes) > MOST_COMMON_IMAGE_SIZES:
        image_sizes["other"] = len(dataset.images) - sum(image_sizes.values())

    areas = Counter()
    relative = Counter()
    aspect = Counter()
    for image, box in boxes:
        area = box.area
        areas[
            "small (<32²px)" if area < COCO_SMALL_AREA else "medium" if area < COCO_MEDIUM_AREA else "large"
        ] += 1
        image_area = max(image.width * image.height, 1)
        relative[_RELATIVE_LABELS[bisect.bisect_right(_RELATIVE_EDGES, math.sqrt(area / image_area))]] += 1
        ratio = max(box.width, 0.0) / box.height if box.height > 0 else math.inf
        aspect[_ASPECT_LABELS[bisect.bisect_right(_ASPECT_EDGES, ratio)]] += 1

    return DatasetStats(
        image_count=len(dataset.images),
        box_count=len(boxes),
        classes=classes,
        boxes_per_class={label: per_class[label] for label in classes},
        images_per_class={label: images_per_class[label] for label in classes},
        crowd_boxes=sum(box.iscrowd for _, box in boxes),
        images_without_boxes=sum(not image.boxes for image in dataset.images),
        boxes_per_image=boxes_per_image,
        image_sizes=image_sizes,
        box_area_buckets={key: areas[key] for key in ("small (<32²px)", "medium", "large")},
        relative_box_size={label: relative[label] for label in _RELATIVE_LABELS},
        box_aspect_ratio={label: aspect[label] for label in _ASPECT_LABELS},
        median_box_width=statistics.median([box.width for _, box in boxes]) if boxes else 0.0,
        median_box_height=statistics.median([box.height for _, box in boxes]) if boxes else 0.0,
    )


def stats_tables(stats: DatasetStats) -> list[Table]:
    """The terminal rendering: one rich table per question a user asks of a dataset."""
    overview = Table("dataset", "value", title="Overview")
    overview.add_row("images", str(stats.image_count))
    overview.add_row("boxes", str(stats.box_count))
    overview.add_row("classes", str(len(stats.classes)))
    overview.add_row("images without boxes", str(stats.images_without_boxes))
    overview.add_row("crowd / difficult boxes", str(stats.crowd_boxes))
    overview.add_row("median box size (px)", f"{stats.median_box_width:.0f} x {stats.median_box_height:.0f}")
    overview.add_row(
        "image sizes", ", ".join(f"{size} ({count})" for size, count in stats.image_sizes.items())
    )

    per_class = Table("class", "boxes", "share", "images", title="Boxes per class")
    for label in stats.classes:
        count = stats.boxes_per_class[label]
        per_class.add_row(
            label, str(count), _share(count, stats.box_count), str(stats.images_per_class[label])
        )

    tables = [overview, per_class]
    for title, heading, counts, total in (
        ("Boxes per image", "boxes in image", stats.boxes_per_image, stats.image_count),
        ("Box area (COCO buckets)", "area", stats.box_area_buckets, stats.box_count),
        ("Box size relative to image (sqrt of area ratio)", "size", stats.relative_box_size, stats.box_count),
        ("Box aspect ratio (width:height)", "ratio", stats.box_aspect_ratio, stats.box_count),
    ):
        table = Table(heading, "count", "share", title=title)
        for key, count in counts.items():
            table.add_row(key, str(count), _share(count, total))
        tables.append(table)
    return tables


def plot_stats(dataset: Dataset, stats: DatasetStats, target: str | Path, samples: int = 8) -> Path:
    """Write a PNG with the histograms and a grid of sample images with their boxes drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    columns = 4
    sample_rows = math.ceil(min(samples, len(dataset.images)) / columns) if samples else 0
    figure = Figure(figsize=(4 * columns, 3.4 * (1 + sample_rows)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1 + sample_rows, columns)
    charts = (
        ("boxes per class", stats.boxes_per_class),
        ("boxes per image", stats.boxes_per_image),
        ("box size / image size", stats.relative_box_size),
        ("box aspect ratio (w:h)", stats.box_aspect_ratio),
    )
    for column, (title, counts) in enumerate(charts):
        axes = figure.add_subplot(grid[0, column])
        axes.bar(range(len(counts)), list(counts.values()), color="tab:blue")
        axes.set_xticks(
            range(len(counts)), [label.split(" ")[0] for label in counts], rotation=45, fontsize=7
        )
        axes.set_title(title, fontsize=10)

    colours = {label: f"C{index % 10}" for index, label in enumerate(stats.classes)}
    for index, image in enumerate(_sample(dataset, samples)):
        axes = figure.add_subplot(grid[1 + index // columns, index % columns])
        axes.set_axis_off()
        axes.set_title(image.name, fontsize=8)
        try:
            picture = preview_image(image.path, SAMPLE_SIDE)
        except DataError as error:
            reason = "too large" if "refused" in str(error) else "unreadable"
            axes.text(0.5, 0.5, f"image {reason}", ha="center", va="center", transform=axes.transAxes)
            continue
        scale = picture.width / max(image.width, 1)
        axes.imshow(picture)
        for box in image.boxes:
            colour = colours.get(box.label, "red")
            axes.add_patch(
                Rectangle(
                    (box.xmin * scale, box.ymin * scale),
                    box.width * scale,
                    box.height * scale,
                    fill=False,
                    edgecolor=colour,
                    linewidth=1.5,
                )
            )
            axes.text(
                box.xmin * scale,
                box.ymin * scale,
                box.label,
                color="white",
                fontsize=7,
                backgroundcolor=colour,
            )

    target = Path(target)
    with atomic_path(target) as temporary:
        figure.savefig(temporary, format="png", dpi=80)
    return target


def _sample(dataset: Dataset, count: int) -> list[ImageRecord]:
    """Evenly spread over the name-sorted images, preferring images with boxes: deterministic."""
    ordered = sorted(dataset.images, key=lambda image: image.name)
    candidates = [image for image in ordered if image.boxes] or ordered
    if count <= 0 or not candidates:
        return []
    step = len(candidates) / min(count, len(candidates))
    return [candidates[int(index * step)] for index in range(min(count, len(candidates)))]


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"

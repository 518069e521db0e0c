"""A dataset overview to open in a browser: the numbers of ``data stats`` as people look at data.

Class balance, box sizes and shapes, and sample images with their boxes drawn, so a
mislabelled class or boxes far smaller than the model's input are seen before any training
is paid for. Built on :mod:`visionautoml.reports.page`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.data.images import preview_image
from visionautoml.data.stats import DatasetStats, compute_stats
from visionautoml.errors import DataError, first_line
from visionautoml.reports.page import (
    Section,
    chart_label,
    escape,
    figure_uri,
    html_table,
    image_html,
    image_uri,
    note,
    palette,
    render_page,
    write_page,
)

SAMPLE_SIDE = 320  # px: the longer side of a sample image, large enough to read its labels
MAX_SCATTER_BOXES = 5000  # more points only slow the chart down without changing its picture


def write_overview(
    dataset: Dataset,
    out_path: str | Path,
    *,
    stats: DatasetStats | None = None,
    samples: int = 8,
    source: str = "",
) -> Path:
    """Write the dataset's HTML overview to ``out_path`` (atomically) and return the path."""
    return write_page(out_path, overview_html(dataset, stats, samples=samples, source=source))


def overview_html(
    dataset: Dataset, stats: DatasetStats | None = None, *, samples: int = 8, source: str = ""
) -> str:
    stats = stats or compute_stats(dataset)
    colours = dict(zip(stats.classes, palette(len(stats.classes)), strict=True))
    sections = [
        Section("summary", "Summary", _summary(stats)),
        Section("classes", "Class balance", _class_balance(stats, colours)),
        Section("boxes", "Box sizes and shapes", _box_sizes(dataset, stats, colours)),
        Section("samples", "Samples with boxes", _samples(dataset, stats, colours, samples)),
    ]
    name = source or "dataset"
    subtitle = f"{stats.image_count} images, {stats.box_count} boxes, {len(stats.classes)} classes"
    return render_page(f"Dataset overview: {name}", sections, subtitle=subtitle, footer=f"Source: {name}.")


def _summary(stats: DatasetStats) -> str:
    rows = [
        ("images", stats.image_count),
        ("boxes", stats.box_count),
        ("classes", len(stats.classes)),
        ("images without boxes", stats.images_without_boxes),
        ("crowd / difficult boxes", stats.crowd_boxes),
        ("median box size (px)", f"{stats.median_box_width:.0f} x {stats.median_box_height:.0f}"),
        ("image sizes", ", ".join(f"{size} ({count})" for size, count in stats.image_sizes.items())),
    ]
    return html_table(["measure", "value"], rows, table_id="summary-table")


def _class_balance(stats: DatasetStats, colours: dict[str, str]) -> str:
    rows = [
        (
            label,
            stats.boxes_per_class[label],
            _share(stats.boxes_per_class[label], stats.box_count),
            stats.images_per_class[label],
            _share(stats.images_per_class[label], stats.image_count),
        )
        for label in stats.classes
    ]
    if not stats.classes:
        return note("No classes: the dataset has no boxes.")
    table = html_table(
        ["class", "boxes", "share of boxes", "images", "share of images"],
        rows,
        table_id="class-table",
        numeric=["boxes", "share of boxes", "images", "share of images"],
    )
    counts = [stats.boxes_per_class, stats.images_per_class]
    figure = Figure(figsize=(10, max(2.4, 0.6 + 0.28 * len(stats.classes))), layout="constrained")
    for column, (title, values) in enumerate(
        zip(("boxes per class", "images per class"), counts, strict=True)
    ):
        axes = figure.add_subplot(1, 2, column + 1)
        labels = list(reversed(stats.classes))
        axes.barh(
            [chart_label(label) for label in labels],
            [values[label] for label in labels],
            color=[colours[label] for label in labels],
        )
        axes.set_title(title, fontsize=10)
        axes.grid(axis="x", alpha=0.3)
    chart = image_html(figure_uri(figure), "boxes and images per class")
    if len(stats.classes) < 2:
        return chart + table
    rarest = min(stats.classes, key=lambda label: stats.boxes_per_class[label])
    most = max(stats.boxes_per_class.values())
    hint = (
        f"The rarest class, {rarest}, has {stats.boxes_per_class[rarest]} boxes against {most} of the most "
        "common one; a ratio above about 10 usually needs more examples of the rare class."
    )
    return chart + note(hint) + table


def _box_sizes(dataset: Dataset, stats: DatasetStats, colours: dict[str, str]) -> str:
    if not stats.box_count:
        return note("No boxes.")
    figure = Figure(figsize=(12, 7), layout="constrained")
    grid = figure.add_gridspec(2, 3)
    scatter = figure.add_subplot(grid[:, 0])
    boxes = [(box.width, box.height, box.label) for image in dataset.images for box in image.boxes]
    step = max(1, len(boxes) // MAX_SCATTER_BOXES)
    for label in stats.classes:
        shown = [(w, h) for w, h, name in boxes[::step] if name == label]
        if shown:
            widths, heights = zip(*shown, strict=True)
            scatter.scatter(widths, heights, s=9, alpha=0.6, color=colours[label], label=chart_label(label))
    scatter.set(xlabel="box width (px)", ylabel="box height (px)", title="Box width against height")
    scatter.grid(alpha=0.3)
    if len(stats.classes) <= 12:
        scatter.legend(fontsize="small")
    charts = (
        ("Box side / image side", stats.relative_box_size),
        ("Box aspect ratio (w:h)", stats.box_aspect_ratio),
        ("Box area (COCO buckets)", stats.box_area_buckets),
        ("Boxes per image", stats.boxes_per_image),
    )
    for index, (title, counts) in enumerate(charts):
        axes = figure.add_subplot(grid[index // 2, 1 + index % 2])
        axes.bar(range(len(counts)), list(counts.values()), color="#2f6fbf")
        axes.set_xticks(
            range(len(counts)), [label.split(" (")[0] for label in counts], rotation=35, fontsize=7
        )
        axes.set_title(title, fontsize=10)
        axes.grid(axis="y", alpha=0.3)
    tables = "".join(
        f"<div><h3>{escape(title)}</h3>"
        + html_table(
            ["bucket", "count", "share"],
            [(key, count, _share(count, total)) for key, count in counts.items()],
            numeric=["count", "share"],
        )
        + "</div>"
        for title, counts, total in (
            (
                "Box side / image side (square root of the area ratio)",
                stats.relative_box_size,
                stats.box_count,
            ),
            ("Box aspect ratio (width:height)", stats.box_aspect_ratio, stats.box_count),
            ("Box area (small < 32² px <= medium < 96² px)", stats.box_area_buckets, stats.box_count),
            ("Boxes per image", stats.boxes_per_image, stats.image_count),
        )
    )
    return image_html(figure_uri(figure), "box sizes and shapes") + f'<div class="grid">{tables}</div>'


def _samples(dataset: Dataset, stats: DatasetStats, colours: dict[str, str], count: int) -> str:
    chosen = pick_samples(dataset, stats.classes, count)
    if not chosen:
        return note("No images with boxes to show.")
    cards = []
    for image in chosen:
        labels = ", ".join(sorted({box.label for box in image.boxes}))
        boxes = len(image.boxes)
        caption = f"{image.name}: {boxes} {'box' if boxes == 1 else 'boxes'} ({labels})"
        try:
            uri = image_uri(_draw_boxes(image, colours), "image/jpeg")
        except (OSError, DataError) as error:
            cards.append(f"<figure>{note(f'{image.name}: not shown ({first_line(error)})')}</figure>")
            continue
        cards.append(image_html(uri, f"sample {image.name}", caption))
    legend = "Boxes in their class's colour, with the class name; the samples cover as many classes as fit."
    return note(legend) + f'<div class="grid">{"".join(cards)}</div>'


def pick_samples(dataset: Dataset, classes: Sequence[str], count: int) -> list[ImageRecord]:
    """``count`` images with boxes, each class in at least one where possible, the rest evenly spread.

    Deterministic (name order), so the overview of the same data is the same picture every time.
    """
    ordered = sorted((image for image in dataset.images if image.boxes), key=lambda image: image.name)
    if count <= 0 or not ordered:
        return []
    chosen: dict[str, ImageRecord] = {}
    for label in classes:
        if len(chosen) >= count:
            break
        first = next(
            (i for i in ordered if i.name not in chosen and any(b.label == label for b in i.boxes)), None
        )
        if first is not None:
            chosen[first.name] = first
    rest = [image for image in ordered if image.name not in chosen]
    missing = min(count - len(chosen), len(rest))
    for index in range(missing):
        image = rest[int(index * len(rest) / missing)]
        chosen[image.name] = image
    return sorted(chosen.values(), key=lambda image: image.name)


def _draw_boxes(image: ImageRecord, colours: dict[str, str]) -> bytes:
    """The image, EXIF-upright and scaled to ``SAMPLE_SIDE``, with its boxes and labels, as JPEG bytes."""
    picture = preview_image(image.path, SAMPLE_SIDE)  # the guarded decoder: pixel limit, truncation
    if max(picture.size) < SAMPLE_SIDE:  # small images are enlarged, pixels kept sharp, to read the labels
        factor = SAMPLE_SIDE / max(picture.size)
        size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
        picture = picture.resize(size, Image.Resampling.NEAREST)
    scale = picture.width / image.width
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=12)
    for box in image.boxes:
        colour = colours.get(box.label, "#ff0000")
        corners = [box.xmin * scale, box.ymin * scale, box.xmax * scale, box.ymax * scale]
        draw.rectangle(corners, outline=colour, width=2)
        left, top, right, bottom = draw.textbbox((corners[0], corners[1]), box.label, font=font)
        lift = bottom - top + 2 if corners[1] - (bottom - top) - 2 >= 0 else 0
        draw.rectangle([left - 1, top - lift - 1, right + 1, bottom - lift + 1], fill=colour)
        draw.text((corners[0], corners[1] - lift), box.label, fill="white", font=font)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"

"""`data stats`: the numbers, the tables and the plot."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.stats import compute_stats, stats_tables


def small_dataset(root: Path) -> Dataset:
    root.mkdir(parents=True, exist_ok=True)
    records = []
    specs = {
        "a.jpg": [Box(0, 0, 100, 100, "cat"), Box(10, 10, 20, 20, "dog"), Box(0, 0, 200, 50, "cat", True)],
        "b.jpg": [Box(50, 50, 70, 110, "dog")],
        "c.jpg": [],
    }
    for name, boxes in specs.items():
        Image.new("RGB", (200, 100), (120, 120, 120)).save(root / name)
        records.append(ImageRecord(name, root / name, 200, 100, boxes))
    return Dataset(records, ["cat", "dog", "bird"])


def test_stats_count_classes_boxes_per_image_and_box_shapes(tmp_path: Path) -> None:
    stats = compute_stats(small_dataset(tmp_path))
    assert (stats.image_count, stats.box_count, stats.crowd_boxes, stats.images_without_boxes) == (3, 4, 1, 1)
    assert stats.boxes_per_class == {"cat": 2, "dog": 2, "bird": 0}
    assert stats.images_per_class == {"cat": 1, "dog": 2, "bird": 0}
    assert stats.boxes_per_image == {"0": 1, "1": 1, "3": 1}
    assert stats.image_sizes == {"200x100": 3}
    # areas: 10000 (large), 100 (small), 10000 (large), 1200 (medium)
    assert stats.box_area_buckets == {"small (<32²px)": 1, "medium": 1, "large": 2}
    # sqrt(area / 20000): 0.707, 0.0707, 0.707, 0.245
    assert stats.relative_box_size["5-10%"] == 1 and stats.relative_box_size["20-30%"] == 1
    assert stats.relative_box_size[">=70%"] == 2
    # width:height 1, 1, 4, 1/3
    assert stats.box_aspect_ratio["3:4-4:3 (square)"] == 2 and stats.box_aspect_ratio[">=3:1"] == 1
    assert stats.box_aspect_ratio["1:3-1:2"] == 1
    assert (stats.median_box_width, stats.median_box_height) == (60.0, 55.0)
    assert json.loads(json.dumps(stats.to_dict()))["boxes_per_class"]["cat"] == 2


def test_many_boxes_per_image_are_capped_and_empty_dataset_works(tmp_path: Path) -> None:
    boxes = [Box(i, i, i + 5, i + 5, "x") for i in range(12)]
    stats = compute_stats(Dataset([ImageRecord("a.jpg", tmp_path / "a.jpg", 64, 64, boxes)], ["x"]))
    assert stats.boxes_per_image == {"10+": 1}
    empty = compute_stats(Dataset([], []))
    assert (empty.image_count, empty.box_count, empty.median_box_width) == (0, 0, 0.0)
    assert len(stats_tables(empty)) == 6


def test_tables_render_the_numbers(tmp_path: Path) -> None:
    console = Console(record=True, width=150)
    for table in stats_tables(compute_stats(small_dataset(tmp_path))):
        console.print(table)
    text = console.export_text()
    assert "Boxes per class" in text and "cat" in text and "50.0%" in text
    assert "200x100 (3)" in text


def test_cli_stats_on_a_voc_folder_with_plot(tiny_voc: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["data", "stats", str(tiny_voc), "--plot", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "Boxes per class" in result.output and "red_square" in result.output
    with Image.open(tmp_path / "s.png") as png:
        assert png.format == "PNG" and png.size[0] > 1000 and png.size[1] > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png", "tiny_voc"]  # no temporary left


def test_plot_of_a_30000x30000_png_header_says_too_large_instead_of_crashing(tmp_path: Path) -> None:
    import struct
    import zlib

    from visionautoml.data.stats import plot_stats

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = tmp_path / "huge.png"
    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    dataset = small_dataset(tmp_path / "images")
    dataset.images.append(ImageRecord("huge.png", huge, 30_000, 30_000, [Box(0, 0, 10, 10, "cat")]))
    target = plot_stats(dataset, compute_stats(dataset), tmp_path / "plot.png", samples=4)
    with Image.open(target) as png:
        assert png.format == "PNG"


def test_the_html_overview_of_a_30000x30000_png_header_shows_it_as_not_shown(tmp_path: Path) -> None:
    import struct
    import zlib

    from visionautoml.reports.overview import write_overview

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    huge = tmp_path / "huge.png"
    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    huge.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )
    dataset = small_dataset(tmp_path / "images")
    dataset.images = [ImageRecord("huge.png", huge, 30_000, 30_000, [Box(0, 0, 10, 10, "cat")])]
    page = write_overview(dataset, tmp_path / "overview.html", samples=4).read_text(encoding="utf-8")
    assert "huge.png: not shown (" in page and "pixels" in page

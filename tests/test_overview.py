"""The dataset overview page: the numbers of ``compute_stats``, images that decode, escaped names."""

from __future__ import annotations

import base64
import io
import sys
from dataclasses import replace
from html.parser import HTMLParser

import pytest
from conftest import make_voc_dataset
from PIL import Image

from visionautoml.cli import main
from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.data.stats import compute_stats
from visionautoml.errors import VisionAutoMLError
from visionautoml.reports.overview import pick_samples, write_overview

HOSTILE = '<img src=x onerror="alert(1)">$x$'


class Page(HTMLParser):
    def __init__(self, text: str):
        super().__init__()
        self.images: list[str] = []
        self.captions: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: set[str] = set()
        self._table: str | None = None
        self._text: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.add(tag)
        if tag == "img":
            self.images.append(attributes["src"])
        elif tag == "table" and attributes.get("id"):
            self._table = attributes["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th", "figcaption"):
            self._text = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table and self._text is not None:
            self.tables[self._table][-1].append("".join(self._text))
        elif tag == "figcaption" and self._text is not None:
            self.captions.append("".join(self._text))
        elif tag == "table":
            self._table = None
        if tag in ("td", "th", "figcaption"):
            self._text = None

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def rows(self, table_id: str) -> dict[str, list[str]]:
        return {row[0]: row[1:] for row in self.tables[table_id][1:]}


def with_hostile_class(dataset: Dataset) -> Dataset:
    """A class name no annotation format would let a test write unescaped, put in after reading."""
    rename = {"blue_square": HOSTILE}
    for image in dataset.images:
        image.boxes = [replace(box, label=rename.get(box.label, box.label)) for box in image.boxes]
    return Dataset(dataset.images, [rename.get(label, label) for label in dataset.classes])


def test_the_overview_shows_the_stats_and_every_image_decodes(tmp_path):
    dataset = with_hostile_class(read_dataset(make_voc_dataset(tmp_path / "voc", n_images=7)))
    stats = compute_stats(dataset)
    path = write_overview(dataset, tmp_path / "out" / "overview.html", samples=4, source="<voc>")
    text = path.read_text(encoding="utf-8")
    page = Page(text)

    classes = page.rows("class-table")
    assert set(classes) == set(stats.classes)
    for label in stats.classes:
        boxes, box_share, images, _ = classes[label]
        assert int(boxes) == stats.boxes_per_class[label]
        assert int(images) == stats.images_per_class[label]
        assert box_share == f"{100 * stats.boxes_per_class[label] / stats.box_count:.1f}%"
    summary = page.rows("summary-table")
    assert summary["images"] == [str(stats.image_count)] and summary["boxes"] == [str(stats.box_count)]

    # class balance, box sizes, and four samples with their boxes drawn
    assert len(page.images) == 6
    for source in page.images:
        head, _, payload = source.partition(",")
        assert head in ("data:image/png;base64", "data:image/jpeg;base64")
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            image.load()
            assert min(image.size) >= 100
    samples = [caption.split(":")[0] for caption in page.captions if caption.startswith("img-")]
    assert samples == [image.name for image in pick_samples(dataset, stats.classes, 4)]

    assert "<img src=x" not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;$x$" in text
    assert "script" not in page.tags


def test_samples_show_every_class_even_a_rare_one_last_in_name_order(tmp_path):
    dataset = read_dataset(make_voc_dataset(tmp_path / "voc", n_images=9))
    for index, image in enumerate(dataset.images):  # a b a b ... and one c, in the last image
        label = "c" if index == len(dataset.images) - 1 else "ab"[index % 2]
        image.boxes = [replace(image.boxes[0], label=label)]
    chosen = pick_samples(dataset, ["a", "b", "c"], 3)
    assert len(chosen) == 3 and dataset.images[-1] in chosen
    assert {box.label for image in chosen for box in image.boxes} == {"a", "b", "c"}
    assert pick_samples(dataset, ["a", "b", "c"], 3) == chosen  # the same picture every time
    assert len(pick_samples(dataset, ["a", "b", "c"], 20)) == 9


def test_data_stats_writes_the_overview(tiny_voc, tmp_path, monkeypatch, capsys):
    out = tmp_path / "overview.html"
    monkeypatch.setattr(sys, "argv", ["visionautoml", "data", "stats", str(tiny_voc), "--html", str(out)])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 0, capsys.readouterr().err
    assert f"overview written to {out}" in capsys.readouterr().out
    assert Page(out.read_text(encoding="utf-8")).rows("summary-table")["images"] == ["10"]


def test_an_unwritable_target_is_an_error_naming_it_and_leaves_nothing(tiny_voc, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    with pytest.raises(VisionAutoMLError, match=f"{target}: cannot write the report there"):
        write_overview(read_dataset(tiny_voc), target, samples=0)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary file left
    assert not list(target.iterdir())

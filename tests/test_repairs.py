"""Imperfect real data: boxes repaired with a warning each, unrepairable images skipped on request."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from conftest import make_voc_dataset

from visionautoml.data.convert import convert
from visionautoml.data.formats import read_dataset
from visionautoml.data.problems import ProblemLog, Repair
from visionautoml.data.validate import validate_dataset
from visionautoml.data.versions import DatasetStore
from visionautoml.errors import DataError


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def edit(xml: Path, pattern: str, replacement: str) -> None:
    xml.write_text(re.sub(pattern, replacement, xml.read_text(), count=1, flags=re.S))


def imperfect_voc(root: Path) -> Path:
    """8 images: two zero-area boxes, one box hanging over the edge, nothing unrepairable."""
    make_voc_dataset(root, n_images=8)
    annotations = root / "annotations"
    for name in ("img-001.xml", "img-004.xml"):  # the first object of each gets zero width
        edit(
            annotations / name,
            r"<xmin>(\d+)</xmin>(.*?)<xmax>\d+</xmax>",
            r"<xmin>\1</xmin>\2<xmax>\1</xmax>",
        )
    edit(annotations / "img-002.xml", r"<xmax>\d+</xmax>", "<xmax>90</xmax>")  # the image is 64 wide
    return root


def test_zero_area_boxes_are_dropped_and_overhanging_ones_clipped_with_a_warning_each(tmp_path: Path) -> None:
    root = imperfect_voc(tmp_path / "voc")
    before = digests(root)
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems)
    assert not problems.errors
    dropped = [p for p in problems.warnings if p.repair is Repair.DROPPED_BOX]
    clipped = [p for p in problems.warnings if p.repair is Repair.CLIPPED]
    assert sorted(Path(p.file).name for p in dropped) == ["img-001.xml", "img-004.xml"]
    assert [p.field for p in dropped] == ["object[1]", "object[1]"]
    assert len(clipped) == 1 and clipped[0].field == "object[1]" and "clipped to" in clipped[0].message
    assert problems.summary() | {"warnings": 0} == {
        "errors": 0,
        "warnings": 0,
        "clipped_boxes": 1,
        "dropped_boxes": 2,
        "skipped_images": 0,
    }
    by_name = {image.name: image for image in dataset.images}
    assert len(dataset.images) == 8 and len(by_name["img-001.jpg"].boxes) == 1
    assert by_name["img-002.jpg"].boxes[0].xmax == 64
    result = convert(root, tmp_path / "out", "jsonl", validation_every=4)
    assert result.train_images + result.validation_images == 8
    assert result.summary["dropped_boxes"] == 2 and result.summary["clipped_boxes"] == 1
    assert digests(root) == before, "nothing of the source is modified"


def test_what_cannot_be_repaired_stays_an_error_and_drop_invalid_skips_those_images(tmp_path: Path) -> None:
    root = imperfect_voc(tmp_path / "voc")
    annotations = root / "annotations"
    edit(annotations / "img-003.xml", r"<xmin>\d+</xmin>", "<xmin>100</xmin>")  # wholly outside: xmin > 64
    edit(annotations / "img-003.xml", r"<xmax>\d+</xmax>", "<xmax>120</xmax>")
    (annotations / "img-005.xml").write_text("<annotation><filename>img-005.jpg")  # malformed
    (root / "images" / "img-006.jpg").write_bytes(b"")  # unreadable image
    before = digests(root)
    with pytest.raises(DataError) as raised:
        convert(root, tmp_path / "out", "jsonl")
    assert all(name in str(raised.value) for name in ("img-003.xml", "img-005.xml", "img-006.jpg"))
    assert "wholly outside" in str(raised.value)

    result = convert(root, tmp_path / "out", "jsonl", drop_invalid=True)
    assert result.train_images == 5 and result.summary["skipped_images"] == 3
    skipped = [p for p in result.warnings if p.repair is Repair.SKIPPED_IMAGE]
    assert {Path(p.file).name for p in skipped} == {"img-003.xml", "img-005.xml", "img-006.jpg"}
    written = (tmp_path / "out" / "train_annotations.jsonl").read_text()
    assert "img-003" not in written and "img-006" not in written and "img-000" in written

    report = validate_dataset(root, drop_invalid=True)
    assert not report.failed() and len(report.dataset.images) == 5
    assert json.loads(report.to_json())["summary"]["skipped_images"] == 3
    assert validate_dataset(root).failed()
    assert digests(root) == before


def test_a_registered_version_records_its_repairs(tmp_path: Path) -> None:
    root = imperfect_voc(tmp_path / "voc")
    (root / "images" / "img-007.jpg").write_text("not an image")
    store = DatasetStore(tmp_path / "store")
    with pytest.raises(DataError, match=r"img-007\.jpg"):
        store.register(root, "imperfect")
    version = store.register(root, "imperfect", drop_invalid=True)
    assert version.image_count == 7
    expected = {"clipped_boxes": 1, "dropped_boxes": 2, "skipped_images": 1}
    assert version.repairs == expected
    assert json.loads((Path(version.path) / "version.json").read_text())["repairs"] == expected
    assert store.get("imperfect").repairs == expected


def test_inverted_boxes_and_boxes_without_labels_are_not_guessed_at(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=2)
    edit(root / "annotations" / "img-000.xml", r"<xmin>(\d+)</xmin>", "<xmin>60</xmin>")  # xmin > xmax
    edit(root / "annotations" / "img-001.xml", r"<name>\w+</name>", "<name></name>")
    problems = ProblemLog()
    read_dataset(root, problems=problems)
    assert {Path(p.file).name for p in problems.errors} == {"img-000.xml", "img-001.xml"}
    assert any("negative area" in p.message for p in problems.errors)

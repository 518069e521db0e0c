"""`data validate`: every problem reported with its file, line and field; errors fail, warnings do not."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_voc_dataset
from PIL import Image

from visionautoml.data.validate import validate_dataset


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process: exit code, output and tracebacks as users see them."""
    command = [str(Path(sys.executable).with_name("visionautoml")), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={"COLUMNS": "200", "PATH": ""}
    )


def broken_voc(root: Path) -> Path:
    """A VOC folder with a truncated JPEG, a malformed XML, a box outside its image and a zero-area box."""
    make_voc_dataset(root, n_images=6)
    image = root / "images" / "img-000.jpg"
    image.write_bytes(image.read_bytes()[:300])
    (root / "annotations" / "img-001.xml").write_text("<annotation><filename>img-001.jpg</filename><size>")
    for name, pattern, replacement in (
        ("img-002.xml", r"<xmax>\d+</xmax>", "<xmax>500</xmax>"),
        ("img-003.xml", r"<xmin>(\d+)</xmin>(.*?)<xmax>\d+</xmax>", r"<xmin>\1</xmin>\2<xmax>\1</xmax>"),
    ):
        xml = root / "annotations" / name
        xml.write_text(re.sub(pattern, replacement, xml.read_text(), count=1, flags=re.S))
    return root


def test_cli_reports_all_four_problems_exits_1_without_traceback(tmp_path: Path) -> None:
    root = broken_voc(tmp_path / "voc")
    result = run_cli("data", "validate", str(root))
    assert result.returncode == 1, result.stdout + result.stderr
    for name in ("img-000.jpg", "img-001.xml", "img-002.xml", "img-003.xml"):
        assert name in result.stdout, name
    assert "clipped" in result.stdout and "zero area" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr

    as_json = run_cli("data", "validate", str(root), "--json")
    report = json.loads(as_json.stdout)
    # the truncated image and the malformed file are errors; the two boxes are repaired with a warning
    assert as_json.returncode == 1 and report["errors"] == 2 and report["images"] == 4
    assert sorted(p["repair"] for p in report["problems"] if p["repair"]) == ["clipped box", "dropped box"]
    assert {Path(problem["file"]).name for problem in report["problems"]} == {
        "img-000.jpg",
        "img-001.xml",
        "img-002.xml",
        "img-003.xml",
    }


def test_cli_bad_path_is_one_error_line(tmp_path: Path) -> None:
    result = run_cli("data", "validate", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_size_mismatch_real_size_wins(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=2)
    xml = root / "annotations" / "img-000.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>640</width>"))
    report = validate_dataset(root)
    [error] = report.problems.errors
    assert Path(error.file).name == "img-000.xml" and error.field == "size" and "640x48" in error.message
    image = next(image for image in report.dataset.images if image.name == "img-000.jpg")
    assert (image.width, image.height) == (64, 48)


def test_jsonl_size_mismatch_is_a_warning_and_boxes_scale(tmp_path: Path) -> None:
    Image.new("RGB", (100, 50)).save(tmp_path / "a.jpg")
    line = {
        "image_url": "a.jpg",
        "image_details": {"format": "jpg", "width": 10, "height": 5},
        "label": [{"label": "x", "topX": 0.1, "topY": 0.2, "bottomX": 0.5, "bottomY": 1.0}],
    }
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    report = validate_dataset(tmp_path / "data.jsonl")
    [warning] = report.problems.warnings
    assert not report.problems.errors and warning.line == 1 and warning.field == "image_details"
    box = report.dataset.images[0].boxes[0]
    assert [box.xmin, box.ymin, box.xmax, box.ymax] == pytest.approx([10, 10, 50, 50])


def test_warnings_png_named_jpg_exif_rotation_duplicates_and_strict(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=4, size=(64, 48))
    images = root / "images"
    Image.open(images / "img-000.jpg").save(images / "img-000.jpg", "PNG")
    rotated = Image.open(images / "img-001.jpg").transpose(Image.Transpose.ROTATE_90)  # stored 48x64
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated back: 64x48, as the annotation says
    rotated.save(images / "img-001.jpg", exif=exif)
    (images / "img-003.jpg").write_bytes((images / "img-002.jpg").read_bytes())
    report = validate_dataset(root)
    assert not report.problems.errors
    messages = {Path(p.file).name: p.message for p in report.problems.warnings}
    assert "PNG but named .jpg" in messages["img-000.jpg"]
    assert "EXIF orientation 6" in messages["img-001.jpg"]
    assert "same picture as" in messages["img-003.jpg"]
    assert not report.failed() and report.failed(strict=True)
    assert len(report.dataset.images) == 4


def test_missing_images_and_unknown_labels(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=3)
    (root / "images" / "img-002.jpg").unlink()
    report = validate_dataset(root, classes=["red_square"])
    fields = sorted((Path(p.file).name, p.field) for p in report.problems.errors)
    assert ("img-002.xml", "filename") in fields
    assert ("img-000.xml", "label") in fields or ("img-001.xml", "label") in fields


def test_raccoon_is_valid(raccoon_dir: Path) -> None:
    report = validate_dataset(raccoon_dir, classes=["raccoon"])
    assert not report.problems.errors
    assert len(report.dataset.images) == 200 and report.dataset.box_count == 217

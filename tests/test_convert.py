"""`data convert`: the cloud service's JSONL with the original split, byte-identical, all or nothing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_voc_dataset
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.data.convert import convert
from visionautoml.data.formats import read_dataset
from visionautoml.errors import DataError

BOX_KEYS = ["label", "topX", "topY", "bottomX", "bottomY", "isCrowd"]


def digests(folder: Path) -> dict[str, str]:
    """Every output file's digest; the hidden lock and provenance record are bookkeeping, not output."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def check_schema(line: str, out: Path) -> dict:
    entry = json.loads(line)
    assert list(entry) == ["image_url", "image_details", "label"]
    assert list(entry["image_details"]) == ["format", "width", "height"]
    assert entry["image_details"]["format"] == "jpg"
    assert (out / entry["image_url"]).is_file() and not Path(entry["image_url"]).is_absolute()
    for box in entry["label"]:
        assert list(box) == BOX_KEYS and box["isCrowd"] in (0, 1)
        assert 0 <= box["topX"] < box["bottomX"] <= 1 and 0 <= box["topY"] < box["bottomY"] <= 1
    return entry


def test_raccoon_to_jsonl_every_fifth_is_validation_and_byte_identical(
    raccoon_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = convert(raccoon_dir, out, "jsonl", validation_every=5)
    assert (result.train_images, result.validation_images, result.classes) == (160, 40, ["raccoon"])
    train = (out / "train_annotations.jsonl").read_text().splitlines()
    validation = (out / "validation_annotations.jsonl").read_text().splitlines()
    assert len(train) == 160 and len(validation) == 40
    names = sorted(path.name for path in (raccoon_dir / "images").iterdir())
    expected = [name for index, name in enumerate(names) if index % 5 == 0]
    assert [Path(check_schema(line, out)["image_url"]).name for line in validation] == expected
    for line in train:
        check_schema(line, out)
    first = json.loads(validation[0])
    assert first["image_details"] == {"format": "jpg", "width": 650, "height": 417}
    assert first["label"][0]["topX"] == 81 / 650 and first["label"][0]["bottomY"] == 408 / 417
    before = digests(out)
    convert(raccoon_dir, out, "jsonl", validation_every=5)
    assert digests(out) == before


def test_copy_images_makes_the_output_self_contained(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=6)
    out = tmp_path / "out"
    convert(source, out, "jsonl", validation_fraction=0.5, seed=1, copy_images=True)
    lines = [
        json.loads(line) for path in sorted(out.glob("*.jsonl")) for line in path.read_text().splitlines()
    ]
    assert sorted(line["image_url"] for line in lines) == [f"images/img-{i:03d}.jpg" for i in range(6)]
    moved = tmp_path / "moved"
    out.rename(moved)
    for path in moved.glob("*.jsonl"):
        assert all(image.path.is_relative_to(moved) for image in read_dataset(path).images)


def test_other_formats_with_a_split_get_train_and_validation_folders(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=5)
    result = convert(source, tmp_path / "out", "yolo", validation_every=2)
    assert [path.name for path in result.outputs] == ["train", "validation"]
    assert len(read_dataset(tmp_path / "out" / "train").images) == 2
    assert len(read_dataset(tmp_path / "out" / "validation").images) == 3


def test_convert_refuses_data_with_errors_and_writes_nothing(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=3)
    (source / "annotations" / "img-001.xml").write_text("<annotation>")
    with pytest.raises(DataError, match=r"img-001\.xml"):
        convert(source, tmp_path / "out", "coco")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="not both"):
        convert(source, tmp_path / "out", "jsonl", validation_every=5, validation_fraction=0.2)


def test_cli_convert_shows_warnings_and_summary(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=4)
    (source / "images" / "extra.jpg").write_bytes((source / "images" / "img-000.jpg").read_bytes())
    result = CliRunner().invoke(
        app,
        [
            "data",
            "convert",
            str(source),
            "--to",
            "jsonl",
            "--out",
            str(tmp_path / "out"),
            "--validation-every",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 training images, 2 for validation" in result.output
    assert "extra.jpg" in result.output and "no annotation file" in result.output


def test_cli_convert_error_is_one_message_without_traceback(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=2)
    (source / "annotations" / "img-000.xml").write_text("garbage")
    command = [
        str(Path(sys.executable).with_name("visionautoml")),
        "data",
        "convert",
        str(source),
        "--to",
        "jsonl",
        "--out",
    ]
    result = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "img-000.xml" in result.stderr and "data validate" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_without_a_split_removes_the_stale_validation_file(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=6)
    out = tmp_path / "out"
    convert(source, out, "jsonl", validation_every=3)
    assert (out / "validation_annotations.jsonl").is_file()
    result = convert(source, out, "jsonl")
    assert result.validation_images == 0 and not (out / "validation_annotations.jsonl").exists()
    assert len((out / "train_annotations.jsonl").read_text().splitlines()) == 6
    assert len(read_dataset(out).images) == 6


def test_a_killed_converts_staging_folders_are_removed_by_the_next_run(tmp_path: Path) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=4)
    out = tmp_path / "out"
    convert(source, out, "voc", validation_every=2)
    killed = [out / ".train.tmp-a1b2c3", out / ".images.old-4242", out / ".train_annotations.jsonl.tmp-x9"]
    for path in killed[:2]:
        (path / "annotations").mkdir(parents=True)
    killed[2].write_text("half a file")
    (out / ".mine").write_text("not ours")
    convert(source, out, "voc", validation_every=2)
    assert not any(path.exists() for path in killed)
    assert (out / ".mine").exists(), "only what a convert stages is removed"


@pytest.mark.parametrize("option", [{"validation_every": 5}, {"validation_fraction": 0.2}])
def test_one_image_cannot_be_split(tmp_path: Path, option: dict) -> None:
    source = make_voc_dataset(tmp_path / "voc", n_images=1)
    with pytest.raises(
        DataError, match=r"1 image\(s\) with .* leave no (training|validation) images; add images"
    ):
        convert(source, tmp_path / "out", "jsonl", **option)
    assert not (tmp_path / "out" / "train_annotations.jsonl").exists()

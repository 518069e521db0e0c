"""Paths that come from data stay inside their dataset, and writers inside their output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_voc_dataset
from PIL import Image

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.convert import convert
from visionautoml.data.formats import read_dataset, write_dataset
from visionautoml.data.formats._paths import PROVENANCE_FILE
from visionautoml.data.problems import ProblemLog
from visionautoml.data.versions import DatasetStore
from visionautoml.errors import DataError

CLI = str(Path(sys.executable).with_name("visionautoml"))


def picture(path: Path, size: tuple[int, int] = (16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def jsonl_line(url: str) -> str:
    box = {"label": "x", "topX": 0.1, "topY": 0.1, "bottomX": 0.5, "bottomY": 0.5, "isCrowd": 0}
    return json.dumps({"image_url": url, "image_details": {"width": 16, "height": 12}, "label": [box]})


def errors_of(path: Path, **options: object) -> list[str]:
    problems = ProblemLog()
    read_dataset(path, problems=problems, **options)
    return [str(problem) for problem in problems.errors]


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def test_register_of_a_jsonl_naming_etc_passwd_exits_1_and_copies_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    picture(data / "ok.jpg")
    (data / "evil.jsonl").write_text(jsonl_line("ok.jpg") + "\n" + jsonl_line("/etc/passwd") + "\n")
    store = tmp_path / "store"
    done = subprocess.run(
        [CLI, "data", "register", str(data / "evil.jsonl"), "--name", "evil", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "evil.jsonl:2" in done.stderr and "/etc/passwd" in done.stderr
    assert "Traceback" not in done.stderr
    assert not store.exists() or not [
        path for path in store.rglob("*") if path.is_file() and path.suffix != ""
    ]


@pytest.mark.parametrize(
    "url",
    [
        "/OUTSIDE",
        "../outside/secret.jpg",
        "../../../../../../OUTSIDE",
        "file:///OUTSIDE",
        "sub/../../outside/secret.jpg",
    ],
)
def test_jsonl_paths_that_leave_the_dataset_are_errors_naming_the_line(tmp_path: Path, url: str) -> None:
    secret = picture(tmp_path / "outside" / "secret.jpg")  # a real image: only the place is wrong
    url = url.replace("/OUTSIDE", str(secret))
    data = tmp_path / "data"
    picture(data / "ok.jpg")
    (data / "a.jsonl").write_text(jsonl_line("ok.jpg") + "\n" + jsonl_line(url) + "\n")
    found = errors_of(data / "a.jsonl")
    assert len(found) == 1 and f"{data / 'a.jsonl'}:2 [image_url]" in found[0], found
    assert "outside" in found[0] or "leaves" in found[0]
    assert not errors_of(data / "a.jsonl", image_root=tmp_path), "an explicit image root widens the rule"


def test_paths_inside_the_dataset_stay_readable_absolute_or_relative(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inside = picture(data / "images" / "a.jpg")
    picture(data / "images" / "b.jpg")
    (data / "a.jsonl").write_text(
        jsonl_line(str(inside)) + "\n" + jsonl_line("images/../images/b.jpg") + "\n"
    )
    assert sorted(image.name for image in read_dataset(data / "a.jsonl").images) == ["a.jpg", "b.jpg"]


def test_symlinks_that_leave_the_dataset_are_refused_in_every_format(tmp_path: Path) -> None:
    secret = picture(tmp_path / "outside" / "secret.jpg")
    voc = make_voc_dataset(tmp_path / "voc", n_images=2)
    target = voc / "images" / "img-000.jpg"
    target.unlink()
    target.symlink_to(secret)
    found = errors_of(voc)
    assert len(found) == 1 and "img-000.xml" in found[0] and "symbolic link" in found[0]
    (voc / "images" / "inside.jpg").symlink_to(voc / "images" / "img-001.jpg")  # inside: fine

    data = tmp_path / "jsonl"
    picture(data / "ok.jpg")
    (data / "link.jpg").symlink_to(secret)
    (data / "a.jsonl").write_text(jsonl_line("ok.jpg") + "\n" + jsonl_line("link.jpg") + "\n")
    assert ["symbolic link" in message for message in errors_of(data / "a.jsonl")] == [True]

    yolo = tmp_path / "yolo"
    picture(yolo / "images" / "ok.jpg")
    (yolo / "images" / "link.jpg").symlink_to(secret)
    (yolo / "labels").mkdir()
    (yolo / "classes.txt").write_text("x\n")
    found = errors_of(yolo)
    assert len(found) == 1 and "link.jpg" in found[0] and "symbolic link" in found[0]

    escaped = tmp_path / "escaped"
    (escaped / "annotations").mkdir(parents=True)
    shutil.copy(voc / "annotations" / "img-001.xml", escaped / "annotations")
    (escaped / "images").symlink_to(tmp_path / "outside")
    with pytest.raises(DataError, match="symbolic link"):
        read_dataset(escaped)


def test_voc_filename_absolute_or_escaping_is_an_error_and_path_is_never_read(tmp_path: Path) -> None:
    picture(tmp_path / "outside" / "photo.jpg")
    voc = make_voc_dataset(tmp_path / "a" / "b" / "voc", n_images=3)
    annotations = voc / "annotations"
    for name, filename in (
        ("img-000.xml", "/etc/hostname"),
        ("img-001.xml", "../../../../outside/photo.jpg"),
    ):
        xml = annotations / name
        xml.write_text(xml.read_text().replace(f"{xml.stem}.jpg</filename>", f"{filename}</filename>"))
    xml = annotations / "img-002.xml"
    xml.write_text(xml.read_text().replace("</filename>", "</filename><path>/etc/hostname</path>"))
    found = errors_of(voc)
    assert len(found) == 2
    assert "img-000.xml [filename]" in found[0] and "absolute path" in found[0]
    assert "img-001.xml [filename]" in found[1] and "leaves" in found[1]
    out = tmp_path / "out" / "c" / "d"
    with pytest.raises(DataError, match=r"img-001\.xml"):
        convert(voc, out, "voc")
    assert tree(tmp_path / "outside") == {"photo.jpg"} and not out.exists()


def test_writers_never_write_outside_out(tmp_path: Path) -> None:
    photo = picture(tmp_path / "src" / "photo.jpg")
    name = "../../../../outside/photo.jpg"
    dataset = Dataset([ImageRecord(name, photo, 16, 12, [Box(1, 1, 8, 8, "x")], "x.xml")], ["x"])
    out = tmp_path / "out" / "c" / "d"
    for fmt in ("voc", "yolo", "jsonl", "coco"):
        with pytest.raises(DataError, match="outside"):
            write_dataset(dataset, out, fmt, copy_images=True)
    assert not (tmp_path / "outside").exists()


def test_datastore_urls_stay_under_the_datastore_root(tmp_path: Path) -> None:
    picture(tmp_path / "secret.jpg")
    root = tmp_path / "datastore"
    picture(root / "data" / "ok.jpg")
    picture(root / "store" / "data" / "other.jpg")  # found under DIR/STORE/PATH
    lines = [
        jsonl_line(
            "azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/store/paths/data/ok.jpg"
        ),
        jsonl_line("AmlDatastore://store/data/other.jpg"),
        jsonl_line(
            "azureml://subscriptions/s/resourcegroups/r/workspaces/w/datastores/store/paths/../secret.jpg"
        ),
        jsonl_line("AmlDatastore://store/data/../../secret.jpg"),
    ]
    jsonl = tmp_path / "cloud" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(lines) + "\n")
    found = errors_of(jsonl, datastore_root=root)
    assert [message.split(" [")[0].rsplit(":", 1)[1] for message in found] == ["3", "4"]
    assert all("datastore root" in message for message in found)


def test_coco_file_name_leaving_the_dataset_is_an_error(tmp_path: Path) -> None:
    picture(tmp_path / "secret.jpg")
    picture(tmp_path / "coco" / "ok.jpg")
    document = {
        "images": [
            {"id": 1, "file_name": "ok.jpg", "width": 16, "height": 12},
            {"id": 2, "file_name": "../secret.jpg", "width": 16, "height": 12},
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "x"}],
    }
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(document))
    found = errors_of(tmp_path / "coco")
    assert len(found) == 1 and "images[1].file_name" in found[0] and "leaves" in found[0]


def test_a_convert_output_keeps_its_images_but_a_copied_or_forged_one_does_not(tmp_path: Path) -> None:
    voc = make_voc_dataset(tmp_path / "data" / "voc", n_images=4)
    out = tmp_path / "work" / "converted"
    convert(voc, out, "jsonl", validation_every=2)
    assert (out / PROVENANCE_FILE).is_file()
    assert len(read_dataset(out).images) == 4, "the images convert left in place stay readable"
    DatasetStore(tmp_path / "store").register(out / "train_annotations.jsonl", "kept")

    copied = tmp_path / "work" / "copied"
    shutil.copytree(out, copied)  # same relative paths, new files: the record no longer vouches for them
    found = errors_of(copied)
    assert len(found) == 4 and all("leaves" in message for message in found)

    forged = tmp_path / "work" / "forged"
    forged.mkdir()
    (forged / "a.jsonl").write_text(jsonl_line("../../data/voc/images/img-000.jpg") + "\n")
    (forged / PROVENANCE_FILE).write_text(
        json.dumps({"files": {"a.jsonl": {"image_root": "/", "file": [1, 2, 3]}}})
    )
    assert len(errors_of(forged / "a.jsonl")) == 1


def test_store_copies_are_no_more_readable_than_the_originals(tmp_path: Path) -> None:
    voc = make_voc_dataset(tmp_path / "voc", n_images=2)
    private = voc / "images" / "img-000.jpg"
    private.chmod(0o600)
    old = os.umask(0o022)
    try:
        version = DatasetStore(tmp_path / "store").register(voc, "private")
    finally:
        os.umask(old)
    stored = Path(version.path) / "images"
    assert (stored / "img-000.jpg").stat().st_mode & 0o777 == 0o600
    assert (stored / "img-001.jpg").stat().st_mode & 0o777 == 0o644


def test_a_filename_over_255_bytes_is_a_clean_error_in_validate_convert_and_stats(tmp_path: Path) -> None:
    voc = make_voc_dataset(tmp_path / "voc", n_images=2)
    xml = voc / "annotations" / "img-000.xml"
    xml.write_text(xml.read_text().replace("img-000.jpg", "x" * 300 + ".jpg"))
    for command in (["validate"], ["convert", "--to", "jsonl", "--out", str(tmp_path / "out")], ["stats"]):
        done = subprocess.run(
            [CLI, "data", command[0], str(voc), *command[1:]], capture_output=True, text=True
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == (0 if command == ["stats"] else 1), done.stdout + done.stderr
    found = errors_of(voc)
    assert len(found) == 1 and "img-000.xml" in found[0] and "too long" in found[0]


def test_a_nul_character_in_a_path_is_an_error_of_its_line(tmp_path: Path) -> None:
    picture(tmp_path / "ok.jpg")
    (tmp_path / "a.jsonl").write_text(jsonl_line("ok.jpg") + "\n" + jsonl_line("ok\u0000.jpg") + "\n")
    found = errors_of(tmp_path / "a.jsonl")
    assert len(found) == 1 and "a.jsonl:2 [image_url]" in found[0] and "NUL" in found[0]

"""Dataset versions: content-addressed get-or-create, atomic publish, concurrent registers, fsspec stores."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
from conftest import make_voc_dataset
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.convert import convert
from visionautoml.data.formats import read_dataset
from visionautoml.data.versions import (
    DatasetStore,
    canonical_annotations,
    dataset_digest,
    parse_ref,
)
from visionautoml.errors import DataError


def files_with_mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*")}


def test_register_is_get_or_create_and_stores_jsonl_images_and_record(tiny_voc: Path, tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "store"))
    first = store.register(tiny_voc, "shapes")
    assert (first.ref, first.image_count, first.classes, first.reused) == (
        "shapes:1",
        10,
        ["blue_square", "red_square"],
        False,
    )
    assert first.box_count == 15
    folder = Path(first.path)
    assert folder == tmp_path / "store" / "shapes" / "1"
    assert sorted(p.name for p in folder.iterdir()) == ["annotations.jsonl", "images", "version.json"]
    assert (folder / "images" / "img-003.jpg").read_bytes() == (
        tiny_voc / "images" / "img-003.jpg"
    ).read_bytes()
    line = json.loads((folder / "annotations.jsonl").read_text().splitlines()[0])
    assert line["image_url"] == "images/img-000.jpg"
    record = json.loads((folder / "version.json").read_text())
    assert record["digest"] == first.digest and record["source"] == str(tiny_voc)
    before = files_with_mtimes(tmp_path / "store")

    again = store.register(tiny_voc, "shapes")
    assert again == first and again.reused
    assert files_with_mtimes(tmp_path / "store") == before  # nothing copied, nothing left behind


def test_same_content_from_another_path_or_as_jsonl_is_the_same_version(
    tiny_voc: Path, tmp_path: Path
) -> None:
    store = DatasetStore(str(tmp_path / "store"))
    first = store.register(tiny_voc, "shapes")
    moved = shutil.copytree(tiny_voc, tmp_path / "elsewhere" / "copy")
    assert store.register(moved, "shapes") == first
    # The JSONL converted from the VOC folder (normalised float coordinates) has the same content.
    convert(tiny_voc, tmp_path / "jsonl", "jsonl")
    assert store.register(tmp_path / "jsonl" / "train_annotations.jsonl", "shapes") == first
    # And the stored version re-registered from the store itself is a fixed point.
    assert store.register(first.annotations, "shapes") == first
    assert [v.ref for v in store.list()] == ["shapes:1"]


def test_changed_boxes_or_image_bytes_make_new_versions(tmp_path: Path) -> None:
    data = make_voc_dataset(tmp_path / "voc", n_images=4)
    store = DatasetStore(str(tmp_path / "store"))
    assert store.register(data, "shapes").version == 1
    xml = data / "annotations" / "img-001.xml"
    text = xml.read_text()
    xml.write_text(
        text.replace("blue_square", "red_square") if "blue_square" in text else text.replace("red_", "blue_")
    )
    assert store.register(data, "shapes").version == 2
    image = data / "images" / "img-002.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    third = store.register(data, "shapes")
    assert third.version == 3
    assert store.register(data, "other").ref == "other:1"
    assert [v.ref for v in store.list()] == ["other:1", "shapes:1", "shapes:2", "shapes:3"]
    assert store.get("shapes") == third
    assert store.get("shapes", 1).digest != third.digest
    # Every version is complete and readable on its own.
    assert len(read_dataset(store.get("shapes", 2).annotations).images) == 4


def test_missing_names_versions_and_bad_refs_are_clear_errors(tiny_voc: Path, tmp_path: Path) -> None:
    store = DatasetStore(str(tmp_path / "store"))
    assert store.list() == []
    with pytest.raises(
        DataError, match=r"no dataset 'shapes'.*registered: none.*data register PATH --name shapes"
    ):
        store.get("shapes")
    store.register(tiny_voc, "shapes")
    with pytest.raises(DataError, match=r"has no version 7 .* it has 1"):
        store.get("shapes", 7)
    with pytest.raises(DataError, match="not allowed"):
        store.register(tiny_voc, "../escape")
    with pytest.raises(DataError, match="cannot open it"):
        DatasetStore("nosuchprotocol://bucket/datasets")
    with pytest.raises(DataError, match="nothing to register"):
        store.register_dataset(Dataset([], []), "empty")
    assert parse_ref("shapes") == ("shapes", None) and parse_ref("shapes:12") == ("shapes", 12)
    with pytest.raises(DataError, match="positive integer"):
        parse_ref("shapes:latest")


def test_digest_ignores_box_order_and_float_noise_but_not_content(tmp_path: Path) -> None:
    a = Box(10, 20, 30, 40, "cat")
    b = Box(1, 2, 3, 4, "dog", iscrowd=True)
    noisy = Box(10.0000000001, 19.9999999999, 30, 40, "cat")

    def dataset(*boxes: Box) -> Dataset:
        return Dataset([ImageRecord("x.jpg", tmp_path / "x.jpg", 64, 48, list(boxes))], ["cat", "dog"])

    hashes = {"x.jpg": "0" * 64}
    assert canonical_annotations(dataset(a, b)) == canonical_annotations(dataset(b, noisy))
    assert dataset_digest(dataset(a, b), hashes) == dataset_digest(dataset(b, noisy), hashes)
    assert dataset_digest(dataset(a, b), hashes) != dataset_digest(dataset(a), hashes)
    assert dataset_digest(dataset(a, b), hashes) != dataset_digest(dataset(a, b), {"x.jpg": "1" * 64})
    crowd_changed = Box(1, 2, 3, 4, "dog", iscrowd=False)
    assert dataset_digest(dataset(a, b), hashes) != dataset_digest(dataset(a, crowd_changed), hashes)


def _register_in_child(store: str, path: str, queue: multiprocessing.Queue) -> None:
    queue.put(DatasetStore(store).register(path, "shared").ref)


def test_concurrent_registers_neither_corrupt_nor_duplicate(tmp_path: Path) -> None:
    one = make_voc_dataset(tmp_path / "one", n_images=6, seed=1)
    two = make_voc_dataset(tmp_path / "two", n_images=6, seed=2)
    store = str(tmp_path / "store")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(target=_register_in_child, args=(store, str(path), queue))
        for path in (one, two, one, two)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    refs = sorted(queue.get(timeout=5) for _ in children)
    assert refs == ["shared:1", "shared:1", "shared:2", "shared:2"]
    versions = DatasetStore(store).list()
    assert len({v.digest for v in versions}) == 2
    assert sorted(p.name for p in (tmp_path / "store" / "shared").iterdir()) == [".lock", "1", "2"]


def test_fsspec_memory_store(tiny_voc: Path) -> None:
    url = f"memory://stores/{uuid.uuid4().hex}"
    store = DatasetStore(url)
    first = store.register(tiny_voc, "shapes")
    assert first.path == f"{url}/shapes/1" and first.ref == "shapes:1"
    assert store.register(tiny_voc, "shapes").reused
    fs, root = fsspec.core.url_to_fs(url)
    assert (
        fs.cat_file(f"{root}/shapes/1/images/img-000.jpg")
        == (tiny_voc / "images" / "img-000.jpg").read_bytes()
    )
    assert fs.cat_file(f"{root}/shapes/1/annotations.jsonl").startswith(b'{"image_url": "images/img-000.jpg"')
    assert not fs.exists(f"{root}/shapes/.lock")
    assert [v.ref for v in DatasetStore(url).list()] == ["shapes:1"]


def test_cli_register_twice_list_and_show(tiny_voc: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    runner = CliRunner()
    first = runner.invoke(app, ["data", "register", str(tiny_voc), "--name", "shapes", "--store", store])
    second = runner.invoke(app, ["data", "register", str(tiny_voc), "--name", "shapes", "--store", store])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert first.stdout.strip() == second.stdout.strip() == "shapes:1"
    assert "nothing copied" in second.stderr
    listing = runner.invoke(app, ["data", "list", "--store", store])
    assert "│ shapes  │ 1       │ 10     │ 15    │" in listing.stdout
    shown = runner.invoke(app, ["data", "show", "shapes:1", "--store", store])
    assert DatasetStore(store).get("shapes").digest[:20] in shown.stdout.replace("\n", "")
    missing = runner.invoke(app, ["data", "show", "nope", "--store", store])
    assert isinstance(missing.exception, DataError)


def test_raccoon_jsonl_registered_twice_is_one_version(raccoon_dir: Path, tmp_path: Path) -> None:
    convert(raccoon_dir, tmp_path / "jsonl", "jsonl")
    jsonl = tmp_path / "jsonl" / "train_annotations.jsonl"
    store = DatasetStore(str(tmp_path / "store"))
    first = store.register(jsonl, "raccoon")
    assert (first.ref, first.image_count, first.classes) == ("raccoon:1", 200, ["raccoon"])
    before = files_with_mtimes(tmp_path / "store")
    assert store.register(jsonl, "raccoon").ref == "raccoon:1"
    assert store.register(raccoon_dir, "raccoon").ref == "raccoon:1"  # the VOC it came from
    assert files_with_mtimes(tmp_path / "store") == before

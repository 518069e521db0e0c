"""Readers and writers of VOC, COCO, YOLO and AutoML JSONL, each only to and from the canonical model."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import make_voc_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats import FORMATS, detect_format, read_dataset, write_dataset
from visionautoml.data.formats._paths import DataRoot
from visionautoml.data.formats._vocxml import FieldReader, Fields, _tree_fields
from visionautoml.data.formats.jsonl import _line
from visionautoml.data.formats.voc import _checked_record, _Context, _record
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

SIZES = {"a.jpg": (64, 48), "b.png": (50, 70), "c.jpg": (33, 21)}


def make_images(folder: Path, sizes: dict[str, tuple[int, int]] = SIZES) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, size in sizes.items():
        paths[name] = folder / name
        Image.new("RGB", size, (90, 120, 150)).save(paths[name], "PNG" if name.endswith(".png") else "JPEG")
    return paths


def sample_dataset(folder: Path) -> Dataset:
    """Fractional and edge-touching boxes, a crowd box, an image without boxes, awkward labels."""
    paths = make_images(folder)
    images = [
        ImageRecord(
            "a.jpg",
            paths["a.jpg"],
            64,
            48,
            [Box(0, 0, 64, 48, "cat & dog"), Box(1.25, 2.5, 10.125, 20.75, "ünïcode <x>", iscrowd=True)],
        ),
        ImageRecord("b.png", paths["b.png"], 50, 70, [Box(3, 4, 5, 6, "cat & dog")]),
        ImageRecord("c.jpg", paths["c.jpg"], 33, 21, []),
    ]
    return Dataset(images, ["cat & dog", "ünïcode <x>"])


def assert_same(expected: Dataset, actual: Dataset, *, crowd: bool = True) -> None:
    by_name = {image.name: image for image in actual.images}
    assert sorted(by_name) == sorted(image.name for image in expected.images)
    for image in expected.images:
        got = by_name[image.name]
        assert (got.width, got.height) == (image.width, image.height)
        assert len(got.boxes) == len(image.boxes), image.name
        for want, have in zip(image.boxes, got.boxes, strict=True):
            assert have.label == want.label
            if crowd:
                assert have.iscrowd == want.iscrowd
            for a, b in zip(
                (want.xmin, want.ymin, want.xmax, want.ymax),
                (have.xmin, have.ymin, have.xmax, have.ymax),
                strict=True,
            ):
                assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6 * max(image.width, image.height))


# --- VOC -------------------------------------------------------------------------------------


def test_voc_reads_edge_coordinates_unchanged_and_difficult_as_crowd(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=4, difficult_every=2)
    dataset = read_dataset(root)
    assert len(dataset.images) == 4 and dataset.classes == ["blue_square", "red_square"]
    first = next(image for image in dataset.images if image.name == "img-000.jpg")
    xml = (root / "annotations" / "img-000.xml").read_text()
    xmin = float(xml.split("<xmin>")[1].split("<")[0])
    assert first.boxes[0].xmin == xmin, "VOC values are edge coordinates, taken without a -1 shift"
    assert (
        first.boxes[0].iscrowd
        and not next(i for i in dataset.images if i.name == "img-001.jpg").boxes[0].iscrowd
    )


def test_voc_layouts_real_voc_and_flat(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=2)
    real = tmp_path / "real"
    shutil.copytree(root / "annotations", real / "Annotations")
    shutil.copytree(root / "images", real / "JPEGImages")
    flat = tmp_path / "flat"
    shutil.copytree(root / "annotations", flat)
    shutil.copytree(root / "images", flat, dirs_exist_ok=True)
    for layout in (real, flat):
        assert detect_format(layout) == "voc"
        assert_same(read_dataset(root), read_dataset(layout))


def test_voc_zero_size_is_filled_from_the_image_with_a_warning(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=1)
    xml = root / "annotations" / "img-000.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "<width>0</width>").replace(">48<", ">0<"))
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems)
    assert (dataset.images[0].width, dataset.images[0].height) == (64, 48)
    assert not problems.errors and "0x0" in problems.warnings[0].message


def test_voc_problems_name_file_and_field_and_reading_goes_on(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=5)
    annotations = root / "annotations"
    (annotations / "img-000.xml").write_text("<annotation><filename>img-000.jpg</filename>")
    text = (annotations / "img-001.xml").read_text()
    (annotations / "img-001.xml").write_text(text.replace("<xmin>", "<xmin>x", 1))
    (annotations / "img-002.xml").write_text(text.replace("img-001.jpg", "missing.jpg"))
    (root / "images" / "orphan.jpg").write_bytes((root / "images" / "img-003.jpg").read_bytes())
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems)
    found = {(Path(p.file).name, p.severity, p.field) for p in problems.problems}
    assert ("img-000.xml", "error", None) in found
    assert ("img-001.xml", "error", "object[1]/bndbox/xmin") in found
    assert ("img-002.xml", "error", "filename") in found
    assert ("orphan.jpg", "warning", None) in found
    assert {image.name for image in dataset.images} == {"img-001.jpg", "img-003.jpg", "img-004.jpg"}
    with pytest.raises(DataError, match=r"img-000\.xml") as raised:
        read_dataset(root)
    assert "img-002.xml" in str(raised.value), "the error lists every problem, not only the first"


def test_duplicate_annotation_of_one_image_is_an_error(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=2)
    shutil.copy(root / "annotations" / "img-000.xml", root / "annotations" / "copy.xml")
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems)
    assert len(dataset.images) == 2
    assert len(problems.errors) == 1 and "annotated twice" in problems.errors[0].message
    assert Path(problems.errors[0].file).name in ("img-000.xml", "copy.xml")


VOC_PIECES = st.sampled_from(
    [
        "",
        " ",
        "\n\t",
        "<!-- note -->",
        "<pose>Unspecified</pose>",
        "<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>",
        "<attributes><attribute><name>occluded</name><value>no</value></attribute></attributes>",
        "<truncated/>",
    ]
)


@st.composite
def voc_documents(draw: st.DrawFn) -> tuple[str, str]:
    """Two annotations with one skeleton and different text, in the shapes real tools write."""

    def value(values: st.SearchStrategy[str]) -> tuple[str, str]:
        return draw(values), draw(values)

    numbers = st.sampled_from(["1", "2.5", " 7 ", "", "x", "1e3", "-3", "nan"])
    names = st.sampled_from(["cat", "dog", " a b ", "ü", ""])
    pieces = [draw(VOC_PIECES) for _ in range(6)]
    declaration = draw(
        st.sampled_from(["", '<?xml version="1.0"?>\n', "<?xml version='1.0' encoding='UTF-8'?>"])
    )
    attributes = draw(st.sampled_from(["", ' verified="yes"', " a='1' b=\"2\""]))
    objects = []
    for _ in range(draw(st.integers(0, 3))):
        tags = {key: value(numbers) for key in ("xmin", "ymin", "xmax", "ymax")}
        name = value(names)
        difficult = draw(
            st.sampled_from(["<difficult>0</difficult>", "<difficult/>", "", "<difficult>1</difficult>"])
        )
        objects.append((tags, name, difficult))

    def document(which: int) -> str:
        body = "".join(
            f"<object>{pieces[0]}<name>{name[which]}</name>{pieces[1]}{difficult}<bndbox>"
            + "".join(f"<{key}>{text[which]}</{key}>" for key, text in tags.items())
            + f"</bndbox>{pieces[2]}</object>"
            for tags, name, difficult in objects
        )
        size = draw(st.sampled_from(["<size><width>64</width><height>48</height></size>", "<size/>", ""]))
        return (
            f"{declaration}<annotation{attributes}>{pieces[3]}<filename>img{which}.jpg</filename>"
            f"{pieces[4]}{size}{body}{pieces[5]}</annotation>\n"
        )

    return document(0), document(1)


@settings(max_examples=150, deadline=None)
@given(voc_documents(), st.sampled_from(["\n", "\r\n"]))
def test_voc_fast_path_reads_exactly_what_elementtree_reads(documents: tuple[str, str], newline: str) -> None:
    reader = FieldReader()
    for document in documents:
        data = document.replace("\n", newline).encode()
        assert reader.read(data) == _tree_fields(data)


def test_voc_fast_path_is_taken_and_malformed_twins_are_still_caught() -> None:
    good = (
        b"<annotation><filename>a.jpg</filename><size><width>4</width><height>3</height></size></annotation>"
    )
    reader = FieldReader()
    assert reader.read(good) == _tree_fields(good)
    assert reader._learned == 1
    twin = good.replace(b"a.jpg", b"b.jpg")
    assert reader.read(twin).filename == "b.jpg"
    assert reader._learned == 1, "the twin was read by the learned plan"
    windows = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n' + good.replace(b"><", b">\r\n<")
    for name in (b"c.jpg", b"d.jpg"):
        document = windows.replace(b"a.jpg", name)
        assert reader.read(document) == _tree_fields(document)
    assert reader._learned == 2, "a declaration and CRLF line ends are part of the skeleton"
    for broken in (
        good.replace(b"a.jpg", b"a & b"),
        good.replace(b"a.jpg", b"a\x01b"),
        good.replace(b"a.jpg", b"a]]>b"),
        good + b"trailing text",
        b"text before" + good,
        good.replace(b"a.jpg", b"\xff\xfe"),
    ):
        assert isinstance(reader.read(broken), str), broken


TEXTS = st.sampled_from(["0", "1", " 2 ", "2.5", "10", "64", "48", "", "x", "-1", "nan", "inf", "1e1", None])


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["annotation", "other"]),
    st.sampled_from(["a.jpg", " a.jpg ", "sub/b.jpg", "../a.jpg", "missing.jpg", "", None]),
    TEXTS,
    TEXTS,
    st.lists(
        st.tuples(
            st.sampled_from(["cat", " cat ", "", None]), st.sampled_from(["0", "1", " 1", "2", None])
        ).flatmap(lambda head: st.tuples(*(st.just(part) for part in head), TEXTS, TEXTS, TEXTS, TEXTS)),
        max_size=3,
    ),
)
def test_voc_record_fast_path_agrees_with_the_checked_path(
    root: str, filename: str | None, width: str | None, height: str | None, objects: list[tuple]
) -> None:
    fields = Fields(root, filename, width, height, objects)
    images = Path("/data/images")
    names = {name: images / name for name in ("a.jpg", "sub/b.jpg")}
    context = _Context(images, names, {}, DataRoot("/data"))
    fast, checked = ProblemLog(), ProblemLog()
    record = _record(fields, "/data/annotations/a.xml", "a.xml", context, fast)
    assert record == _checked_record(fields, "/data/annotations/a.xml", "a.xml", context, checked)
    assert fast.problems == checked.problems


# --- JSONL -----------------------------------------------------------------------------------


def test_jsonl_reads_what_users_of_the_cloud_service_have(tmp_path: Path) -> None:
    images = make_images(tmp_path / "store" / "raccoon" / "images")
    lines = [
        {
            "image_url": "AmlDatastore://workspaceblobstore/raccoon/images/a.jpg",
            "image_details": {"format": "jpg", "width": "64px", "height": "48px"},
            "label": [
                {"label": "r", "topX": 0.25, "topY": 0.5, "bottomX": 0.75, "bottomY": 1.0, "isCrowd": 1}
            ],
        },
        {
            "image_url": "azureml://subscriptions/s/resourcegroups/g/workspaces/w/datastores/d/paths/raccoon/images/b.png",
            "label": [{"label": "r", "topX": 0.1, "topY": 0.1, "bottomX": 0.2, "bottomY": 0.2}],
        },
        {"image_url": images["c.jpg"].as_uri(), "label": []},
    ]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = read_dataset(jsonl, datastore_root=tmp_path / "store")
    by_name = {image.name: image for image in dataset.images}
    assert sorted(by_name) == ["a.jpg", "b.png", "c.jpg"]
    assert by_name["a.jpg"].boxes == [Box(16, 24, 48, 48, "r", True)]
    assert (by_name["b.png"].width, by_name["b.png"].height) == (50, 70), "size read from the image"
    assert by_name["b.png"].boxes[0].xmax == pytest.approx(10)

    relative = tmp_path / "store" / "rel.jsonl"
    relative.write_text(json.dumps({"image_url": "raccoon/images/a.jpg", "label": []}) + "\n")
    absolute = tmp_path / "abs.jsonl"
    absolute.write_text(json.dumps({"image_url": str(images["a.jpg"]), "label": []}) + "\n")
    for path in (relative, absolute):
        assert read_dataset(path).images[0].path == images["a.jpg"]


def test_jsonl_problems_name_the_line_and_field(tmp_path: Path) -> None:
    make_images(tmp_path)
    good = {"image_url": "a.jpg", "label": [{"label": "r", "topX": 0, "topY": 0, "bottomX": 1, "bottomY": 1}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"image_url": "AmlDatastore://store/x.jpg", "label": []}),
        json.dumps({"image_url": "https://example.org/x.jpg", "label": []}),
        json.dumps({**good, "image_url": "b.png", "image_details": {"width": "wide", "height": 2}}),
        json.dumps(
            {
                "image_url": "c.jpg",
                "label": [{"label": "r", "topX": 1.5, "topY": 0, "bottomX": 2.5, "bottomY": 1}],
            }
        ),
        json.dumps({"image_url": "nothing.jpg", "label": []}),
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    problems = ProblemLog()
    read_dataset(jsonl, problems=problems)
    found = {(p.line, p.field) for p in problems.errors}
    assert found == {
        (2, None),
        (3, "image_url"),
        (4, "image_url"),
        (5, "image_details.width"),
        (6, "label[0]"),  # wholly outside the image: no rule repairs it
        (7, "image_url"),
    }
    assert "--datastore-root" in next(p.message for p in problems.errors if p.line == 3)


@settings(max_examples=50, deadline=None)
@given(
    st.text(min_size=1, max_size=12),
    st.lists(
        st.tuples(st.floats(0, 1000), st.floats(0, 1000), st.text(max_size=8), st.booleans()), max_size=4
    ),
    st.integers(1, 5000),
    st.integers(1, 5000),
)
def test_jsonl_lines_are_byte_identical_to_json_dumps(
    url: str, boxes: list[tuple[float, float, str, bool]], width: int, height: int
) -> None:
    records = [Box(x, y, x + 1, y + 2, label, crowd) for x, y, label, crowd in boxes]
    expected = {
        "image_url": url,
        "image_details": {"format": "jpg", "width": width, "height": height},
        "label": [
            {
                "label": box.label,
                "topX": box.xmin / width,
                "topY": box.ymin / height,
                "bottomX": box.xmax / width,
                "bottomY": box.ymax / height,
                "isCrowd": int(box.iscrowd),
            }
            for box in records
        ],
    }
    assert _line(url, "jpg", width, height, records) == json.dumps(expected) + "\n"


# --- COCO and YOLO ---------------------------------------------------------------------------


def test_coco_categories_define_classes_and_area_is_filled(tmp_path: Path) -> None:
    dataset = sample_dataset(tmp_path / "images")
    write_dataset(dataset, tmp_path / "coco", "coco", copy_images=True)
    document = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert [c["name"] for c in document["categories"]] == dataset.classes
    crowd = next(a for a in document["annotations"] if a["iscrowd"])
    assert crowd["bbox"] == [1.25, 2.5, 8.875, 18.25] and crowd["area"] == 8.875 * 18.25
    document["categories"] = list(reversed(document["categories"]))
    document["annotations"].append({"id": 99, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]})
    document["annotations"].append({"id": 98, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]})
    (tmp_path / "coco" / "annotations.json").write_text(json.dumps(document))
    problems = ProblemLog()
    reread = read_dataset(tmp_path / "coco", problems=problems)
    assert reread.classes == dataset.classes, "ordered by category id, not by position in the file"
    assert {p.field for p in problems.errors} == {"annotations[3].category_id", "annotations[4].bbox"}


def test_yolo_names_from_data_yaml_map_or_classes_txt(tmp_path: Path) -> None:
    root = tmp_path / "yolo"
    make_images(root / "images", {"a.jpg": (100, 50), "b.jpg": (10, 10)})
    (root / "labels").mkdir()
    (root / "labels" / "a.txt").write_text(
        "1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.1 0.1\n7 0.5 0.5 0.1 0.1\n0 0.5\n"
    )
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems)
    assert dataset.classes == ["cat", "dog"]
    a = next(image for image in dataset.images if image.name == "a.jpg")
    assert (a.boxes[0].label, a.boxes[1].label) == ("dog", "cat")
    assert [a.boxes[0].xmin, a.boxes[0].ymin, a.boxes[0].xmax, a.boxes[0].ymax] == pytest.approx(
        [40, 15, 60, 35]
    )
    assert next(image for image in dataset.images if image.name == "b.jpg").boxes == []
    assert {(p.line, p.field) for p in problems.errors} == {(4, "class"), (5, None)}
    (root / "data.yaml").unlink()
    (root / "classes.txt").write_text("cat\ndog\n")
    assert read_dataset(root, problems=ProblemLog()).classes == ["cat", "dog"]


# --- all formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", FORMATS)
@pytest.mark.parametrize("target", FORMATS)
def test_every_format_to_every_format_and_back_keeps_every_box(
    tmp_path: Path, source: str, target: str
) -> None:
    dataset = sample_dataset(tmp_path / "images")
    write_dataset(dataset, tmp_path / "a", source)
    first = read_dataset(tmp_path / "a")
    write_dataset(first, tmp_path / "b", target)
    second = read_dataset(tmp_path / "b", target)
    write_dataset(second, tmp_path / "c", source)
    back = read_dataset(tmp_path / "c", source)
    assert back.classes == dataset.classes
    assert_same(dataset, back, crowd="yolo" not in (source, target))


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    labels = draw(
        st.lists(
            st.text("abcxyz &<é", min_size=1, max_size=5).map(str.strip).filter(bool),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    images = []
    for index in range(draw(st.integers(1, 3))):
        width, height = draw(st.integers(2, 600)), draw(st.integers(2, 600))
        boxes = []
        for _ in range(draw(st.integers(0, 3))):
            x0, y0 = draw(st.floats(0, width - 1)), draw(st.floats(0, height - 1))
            x1, y1 = draw(st.floats(x0 + 0.5, width)), draw(st.floats(y0 + 0.5, height))
            boxes.append(Box(x0, y0, x1, y1, draw(st.sampled_from(labels)), draw(st.booleans())))
        images.append(ImageRecord(f"img{index}.png", Path(), width, height, boxes))
    used = sorted({box.label for image in images for box in image.boxes})
    return Dataset(images, used)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datasets(), st.lists(st.sampled_from(FORMATS), min_size=1, max_size=3))
def test_round_trips_through_any_chain_of_formats(tmp_path: Path, dataset: Dataset, chain: list[str]) -> None:
    work = Path(tmp_path_for(tmp_path))
    for image in dataset.images:
        image.path = work / "src" / image.name
        image.path.parent.mkdir(parents=True, exist_ok=True)
        # YOLO reads sizes from the image header: a real PNG header of the right size is needed.
        Image.new("1", (image.width, image.height)).save(image.path)
    current = dataset
    for step, fmt in enumerate([*chain, chain[0]]):
        write_dataset(current, work / f"out{step}", fmt)
        current = read_dataset(work / f"out{step}", fmt)
    assert_same(dataset, current, crowd="yolo" not in chain)
    shutil.rmtree(work)


_COUNTER = iter(range(10**9))


def tmp_path_for(tmp_path: Path) -> Path:
    return tmp_path / f"example{next(_COUNTER)}"


# --- robustness ------------------------------------------------------------------------------


def _layout_for(fmt: str, root: Path, content: bytes) -> Path:
    """A dataset of ``fmt`` whose one annotation file holds ``content``."""
    make_images(root / "images", {"a.jpg": (8, 8)})
    if fmt == "voc":
        (root / "annotations").mkdir()
        (root / "annotations" / "a.xml").write_bytes(content)
        return root
    if fmt == "coco":
        (root / "annotations.json").write_bytes(content)
        return root
    if fmt == "yolo":
        (root / "labels").mkdir()
        (root / "labels" / "a.txt").write_bytes(content)
        (root / "data.yaml").write_bytes(content)
        return root
    (root / "a.jsonl").write_bytes(content)
    return root / "a.jsonl"


_VALID: dict[str, bytes] = {}


def _valid_annotation(fmt: str, tmp_path: Path) -> bytes:
    if fmt in _VALID:
        return _VALID[fmt]
    dataset = Dataset(
        [
            ImageRecord(
                "a.jpg", make_images(tmp_path, {"a.jpg": (8, 8)})["a.jpg"], 8, 8, [Box(1, 1, 5, 6, "x")]
            )
        ],
        ["x"],
    )
    out = tmp_path / f"valid-{fmt}"
    write_dataset(dataset, out, fmt, copy_images=True)
    file = {"voc": "annotations/a.xml", "coco": "annotations.json", "yolo": "labels/a.txt"}.get(
        fmt, "train_annotations.jsonl"
    )
    _VALID[fmt] = (out / file).read_bytes()
    return _VALID[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=300), cut=st.floats(0, 1))
def test_random_and_truncated_bytes_raise_only_data_error(
    tmp_path: Path, fmt: str, content: bytes, cut: float
) -> None:
    valid = _valid_annotation(fmt, tmp_path_for(tmp_path))
    for data in (content, valid[: int(len(valid) * cut)], valid[: int(len(valid) * cut)] + content):
        path = _layout_for(fmt, tmp_path_for(tmp_path), data)
        with contextlib.suppress(DataError):
            read_dataset(path, fmt)
        problems = ProblemLog()
        read_dataset(path, fmt, problems=problems)


def test_detect_format_and_unknown_formats(tmp_path: Path) -> None:
    dataset = sample_dataset(tmp_path / "images")
    for fmt in FORMATS:
        write_dataset(dataset, tmp_path / fmt, fmt)
        assert detect_format(tmp_path / fmt) == fmt
    assert detect_format(tmp_path / "coco" / "annotations.json") == "coco"
    assert detect_format(tmp_path / "jsonl" / "train_annotations.jsonl") == "jsonl"
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path / "images")
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown format"):
        read_dataset(tmp_path / "voc", "pascal")


def test_class_list_fixes_order_and_rejects_other_labels(tmp_path: Path) -> None:
    root = make_voc_dataset(tmp_path / "voc", n_images=3)
    assert read_dataset(root, classes=["red_square", "blue_square"]).classes == ["red_square", "blue_square"]
    problems = ProblemLog()
    dataset = read_dataset(root, problems=problems, classes=["red_square"])
    assert problems.errors and all("blue_square" in p.message and p.field == "label" for p in problems.errors)
    assert {box.label for image in dataset.images for box in image.boxes} == {"red_square"}


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    dataset = sample_dataset(tmp_path / "images")
    write_dataset(dataset, tmp_path / "out", "voc")
    before = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*"))
    dataset.images[1].path.unlink()
    with pytest.raises(DataError, match="cannot write"):
        write_dataset(dataset, tmp_path / "out", "voc")
    assert sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left over"


def _voc_with(objects: list[str]) -> bytes:
    return (
        "<annotation>\n\t<filename>a.jpg</filename>\n\t<size><width>64</width><height>48</height></size>\n"
        + "".join(objects)
        + "</annotation>\n"
    ).encode()


def _object(index: int, extra: str = "") -> str:
    return (
        f"\t<object><name>c{index % 3}</name>{extra}<difficult>{index % 2}</difficult><bndbox>"
        f"<xmin>{index}</xmin><ymin>1</ymin><xmax>{index + 5}</xmax><ymax>9</ymax></bndbox></object>\n"
    )


def test_voc_fast_path_reads_any_number_of_objects_with_one_plan() -> None:
    """One plan per skeleton, not per object count: a dense file is read in one linear pass."""
    reader = FieldReader()
    for count in (1, 2, 7, 300, 8000, 0):
        document = _voc_with([_object(index) for index in range(count)])
        assert reader.read(document) == _tree_fields(document), count
    assert reader._learned == 1
    mixed = _voc_with([_object(0), _object(1, "<truncated>1</truncated>"), _object(2), _object(3, "<pose/>")])
    assert reader.read(mixed) == _tree_fields(mixed)
    assert reader.read(mixed.replace(b"c1", b"c2")) == _tree_fields(mixed.replace(b"c1", b"c2"))
    assert reader._learned == 2, "objects of several shapes in one file share one plan"
    split = _voc_with([_object(0), "\t<segmented>0</segmented>\n", _object(1)])
    assert reader.read(split) == _tree_fields(split), "objects that are not one run go through ElementTree"

"""Fuzzing the boundaries: mutated annotations and images raise the project's own errors, nothing else.

Each reader gets a valid file of its format mutated at the byte level (flips, cuts,
splices) and at the value level (hostile paths, odd numbers, wrong JSON types); the
decoder gets mutated JPEG, PNG, GIF and BMP files. Bounded to a few seconds a target, so
the whole file stays well under a minute in CI.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionautoml.data.formats import read_dataset
from visionautoml.data.images import check_image, decode_image_bytes, verify_image_file
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import VisionAutoMLError

FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

HOSTILE_TEXT = st.sampled_from(
    [
        "/etc/passwd",
        "../../../../../../etc/shadow",
        "a.jpg",
        "x" * 300 + ".jpg",
        "",
        " ",
        "\x00",
        "nan",
        "-1",
        "1e400",
        "0",
        "64",
        "a/../../b.jpg",
        "file:///etc/hostname",
        "azureml://x/datastores/s/paths/../../etc/passwd",
        "AmlDatastore://s/../../etc/passwd",
        "&amp;",
        "<x/>",
        "\u202e",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | HOSTILE_TEXT,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(HOSTILE_TEXT, children, max_size=3),
    max_leaves=8,
)


def picture(folder: Path, name: str = "a.jpg") -> None:
    Image.new("RGB", (64, 48), (90, 120, 40)).save(folder / name)


def voc(folder: Path, text: bytes) -> Path:
    (folder / "annotations").mkdir()
    (folder / "images").mkdir()
    picture(folder / "images")
    (folder / "annotations" / "a.xml").write_bytes(text)
    return folder


def coco(folder: Path, text: bytes) -> Path:
    picture(folder)
    (folder / "annotations.json").write_bytes(text)
    return folder


def jsonl(folder: Path, text: bytes) -> Path:
    picture(folder)
    (folder / "a.jsonl").write_bytes(text)
    return folder / "a.jsonl"


def yolo(folder: Path, text: bytes) -> Path:
    (folder / "images").mkdir()
    (folder / "labels").mkdir()
    picture(folder / "images")
    (folder / "labels" / "a.txt").write_bytes(text)
    (folder / "data.yaml").write_text("names: [cat, dog]\n")
    return folder


VALID: dict[str, tuple[Callable[[Path, bytes], Path], bytes]] = {
    "voc": (
        voc,
        b'<?xml version="1.0"?>\n<annotation><folder>images</folder><filename>a.jpg</filename>'
        b"<path>/x/a.jpg</path><size><width>64</width><height>48</height><depth>3</depth></size>"
        b"<object><name>cat</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
        b"<xmax>30</xmax><ymax>40</ymax></bndbox></object></annotation>\n",
    ),
    "coco": (
        coco,
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}],
                "annotations": [
                    {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 20, 30], "iscrowd": 0}
                ],
                "categories": [{"id": 1, "name": "cat"}],
            }
        ).encode(),
    ),
    "jsonl": (
        jsonl,
        (
            json.dumps(
                {
                    "image_url": "a.jpg",
                    "image_details": {"format": "jpg", "width": 64, "height": 48},
                    "label": [
                        {
                            "label": "cat",
                            "topX": 0.1,
                            "topY": 0.1,
                            "bottomX": 0.5,
                            "bottomY": 0.6,
                            "isCrowd": 0,
                        }
                    ],
                }
            )
            + "\n"
        ).encode(),
    ),
    "yolo": (yolo, b"0 0.5 0.5 0.25 0.25\n1 0.2 0.3 0.1 0.1\n"),
}


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid file with a few byte edits: flips, cuts, insertions of hostile text, splices."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "duplicate"]))
        if kind == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[position : position + draw(st.integers(1, 20))]
        elif kind == "insert":
            data[position:position] = draw(HOSTILE_TEXT).encode("utf-8", "surrogatepass")
        elif kind == "truncate":
            del data[position:]
        else:
            data[position:position] = data[max(0, position - 30) : position]
    return bytes(data)


@st.composite
def json_edits(draw: st.DrawFn, valid: bytes) -> bytes:
    """The valid JSON document (or JSONL line) with one value anywhere replaced by any JSON value."""
    documents = [json.loads(line) for line in valid.decode().splitlines()]

    def replace(value: object) -> object:
        if isinstance(value, dict) and value and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(value)))
            return {**value, key: replace(value[key])}
        if isinstance(value, list) and value and draw(st.booleans()):
            index = draw(st.integers(0, len(value) - 1))
            return [*value[:index], replace(value[index]), *value[index + 1 :]]
        return draw(JSON_VALUES)

    return "\n".join(json.dumps(replace(document)) for document in documents).encode()


def read_only_our_errors(fmt: str, content: bytes) -> None:
    make, _ = VALID[fmt]
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{fmt}-") as folder:
        path = make(Path(folder), content)
        read_dataset(path, fmt, problems=ProblemLog())
        with contextlib.suppress(VisionAutoMLError):
            read_dataset(path, fmt)
        with contextlib.suppress(VisionAutoMLError):
            read_dataset(path, fmt, problems=ProblemLog(), drop_invalid=True, datastore_root=Path(folder))


@FUZZ
@given(st.data())
def test_voc_reader(data: st.DataObject) -> None:
    read_only_our_errors("voc", data.draw(mutated(VALID["voc"][1])))


@FUZZ
@given(st.data())
def test_yolo_reader(data: st.DataObject) -> None:
    read_only_our_errors("yolo", data.draw(mutated(VALID["yolo"][1])))


@FUZZ
@given(st.data(), st.booleans())
def test_coco_reader(data: st.DataObject, structural: bool) -> None:
    valid = VALID["coco"][1]
    read_only_our_errors("coco", data.draw(json_edits(valid) if structural else mutated(valid)))


@FUZZ
@given(st.data(), st.booleans())
def test_jsonl_reader(data: st.DataObject, structural: bool) -> None:
    valid = VALID["jsonl"][1]
    read_only_our_errors("jsonl", data.draw(json_edits(valid) if structural else mutated(valid)))


def _encoded(fmt: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.effect_noise((24, 16), 50).convert(mode)
    image.save(buffer, fmt, **({"quality": 80} if fmt == "JPEG" else {}))
    return buffer.getvalue()


IMAGES = [
    _encoded("JPEG", "RGB"),
    _encoded("PNG", "RGBA"),
    _encoded("PNG", "P"),
    _encoded("GIF", "P"),
    _encoded("BMP", "RGB"),
]


@FUZZ
@given(st.data(), st.sampled_from(range(len(IMAGES))))
def test_image_decoder(data: st.DataObject, which: int) -> None:
    content = data.draw(mutated(IMAGES[which]) | st.binary(max_size=200))
    with contextlib.suppress(VisionAutoMLError):
        image = decode_image_bytes(content, name="fuzz")
        assert image.ndim == 3 and image.shape[0] == 3
    with tempfile.TemporaryDirectory(prefix="fuzz-image-") as folder:
        path = Path(folder) / "fuzz.jpg"
        path.write_bytes(content)
        for check in (verify_image_file, check_image):
            with contextlib.suppress(VisionAutoMLError):
                check(path)

"""Pascal VOC: ``images/`` plus ``annotations/`` with one XML file per image.

Coordinates are edge coordinates taken unchanged (see ``annotations.py``); ``difficult``
maps to ``iscrowd``. The real VOC layout (``Annotations/`` + ``JPEGImages/``) and a flat
folder of images beside their XML files are read too. Reading is the hot path of
converting large datasets (see ``_vocxml.py`` for the XML side): the loop keeps to
strings and sets and never opens an image unless the XML has no size.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.sax.saxutils import escape

from visionautoml.data.annotations import Box, Dataset, ImageRecord, classes_in_order_of_appearance
from visionautoml.data.formats._common import (
    Rendered,
    checked_box,
    collector_paused,
    crowd_flag,
    files_by_name,
    image_size,
    is_image_name,
    list_files,
    number,
    unique_stems,
)
from visionautoml.data.formats._vocxml import FieldReader, Fields
from visionautoml.data.images import probe_image
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

ANNOTATION_FOLDERS = ("annotations", "Annotations")
IMAGE_FOLDERS = ("images", "JPEGImages")
_COORDINATES = ("xmin", "ymin", "xmax", "ymax")
_FLAGS = frozenset({None, "0", "1"})


def layout(root: Path) -> tuple[Path, Path] | None:
    """(annotation folder, image folder), or None when ``root`` does not look like VOC."""
    annotations = next((root / name for name in ANNOTATION_FOLDERS if (root / name).is_dir()), None)
    if annotations is None:
        if any(name.lower().endswith(".xml") for name in os.listdir(root)):
            return root, root
        return None
    images = next((root / name for name in IMAGE_FOLDERS if (root / name).is_dir()), root)
    return annotations, images


def read(path: Path, problems: ProblemLog, *, datastore_root: Path | None = None) -> Dataset:
    found = layout(path) if path.is_dir() else None
    if found is None:
        raise DataError(f"{path}: not a Pascal VOC folder; expected annotations/*.xml beside images/")
    annotation_dir, image_dir = found
    xml_names = [name for name in list_files(annotation_dir) if name.lower().endswith(".xml")]
    images = files_by_name(image_dir)
    reader = FieldReader()
    records: list[ImageRecord] = []
    with collector_paused(), _opened_folder(annotation_dir) as folder:
        for name in xml_names:
            xml_path = f"{annotation_dir}/{name}"
            try:
                data = _read_bytes(name, folder) if folder is not None else _read_bytes(xml_path)
            except OSError as error:
                problems.error(xml_path, f"cannot read the file: {error.strerror or error}")
                continue
            fields = reader.read(data)
            if isinstance(fields, str):
                problems.error(xml_path, f"malformed XML: {fields}; fix or re-export the annotation")
                continue
            record = _record(fields, xml_path, name, image_dir, images, problems)
            if record is not None:
                records.append(record)
    annotated = {name[:-4] for name in xml_names}
    for name in sorted(name for name in images if name.rpartition(".")[0] not in annotated):
        if is_image_name(name):
            problems.warning(image_dir / name, "image has no annotation file; it is left out")
    return Dataset(records, classes_in_order_of_appearance(records))


@contextmanager
def _opened_folder(folder: Path) -> Iterator[int | None]:
    """A descriptor of ``folder``: opening its files relative to it spares the kernel a path walk each."""
    if os.open not in os.supports_dir_fd:
        yield None
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def _read_bytes(path: str, folder: int | None = None) -> bytes:
    """``os.read`` rather than ``open``: half the cost per small file, which adds up over 10,000s.

    The first read asks for 16 KiB, more than a VOC file holds: a larger buffer costs
    more to allocate and shrink than the rare second read.
    """
    descriptor = os.open(path, os.O_RDONLY, dir_fd=folder)
    try:
        data = os.read(descriptor, 16384)
        if len(data) < 16384:
            return data
        chunks = [data]
        while chunks[-1]:
            chunks.append(os.read(descriptor, 1 << 20))
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def _record(
    fields: Fields, xml_path: str, name: str, image_dir: Path, images: dict[str, Path], problems: ProblemLog
) -> ImageRecord | None:
    """The record of a plain, valid annotation, checked inline (the hot path of large conversions).

    Anything unusual -- a problem to report, a nested path, a size to read from the image --
    goes through :func:`_checked_record`, which gives the same result or says what is wrong.
    """
    root, filename, width_text, height_text, objects = fields
    image_path = images.get(filename) if filename and "/" not in name else None
    if root == "annotation" and image_path is not None:
        try:
            width, height = int(width_text), int(height_text)
        except (TypeError, ValueError):
            width = height = 0
        boxes: list[Box] = []
        if width > 0 and height > 0 and "/" not in filename and filename == filename.strip():
            for label, difficult, x0, y0, x1, y1 in objects:
                try:
                    xmin, ymin, xmax, ymax = float(x0), float(y0), float(x1), float(y1)
                except (TypeError, ValueError):
                    break
                label = label.strip() if label else ""
                if not (
                    0 <= xmin < xmax <= width and 0 <= ymin < ymax <= height and label and difficult in _FLAGS
                ):
                    break
                boxes.append(Box(xmin, ymin, xmax, ymax, label, difficult == "1"))
            else:
                return ImageRecord(filename, image_path, width, height, boxes, xml_path)
    return _checked_record(fields, xml_path, name, image_dir, images, problems)


def _checked_record(
    fields: Fields, xml_path: str, name: str, image_dir: Path, images: dict[str, Path], problems: ProblemLog
) -> ImageRecord | None:
    if fields.root != "annotation":
        problems.error(xml_path, f"root element is <{fields.root}>, not <annotation>: not a VOC annotation")
        return None
    filename = (fields.filename or "").strip()
    if not filename:
        problems.error(xml_path, "missing <filename>; add the image's file name", field="filename")
        return None
    image_name = filename
    if "/" in name or "/" in filename or filename.startswith("."):
        image_name = posixpath.normpath(posixpath.join(posixpath.dirname(name), filename))
    image_path = images.get(image_name) or image_dir / image_name
    if image_name not in images and not image_path.is_file():
        problems.error(xml_path, f"image not found: {image_path}", field="filename")
        return None
    try:
        width, height = int(fields.width), int(fields.height)
    except (TypeError, ValueError):
        width, height = image_size(fields.width), image_size(fields.height)
    if width is None or height is None or width < 0 or height < 0:
        bad = "width" if width is None or width < 0 else "height"
        problems.error(
            xml_path, "the image size must be a whole number of pixels; fix <size>", field=f"size/{bad}"
        )
        return None
    if width == 0 or height == 0:
        try:
            info = probe_image(image_path)
        except DataError as error:
            problems.error(xml_path, f"<size> is {width}x{height} and the image cannot be read: {error}")
            return None
        problems.warning(
            xml_path,
            f"<size> is {width}x{height}; using the image's size {info.width}x{info.height}",
            field="size",
        )
        width, height = info.width, info.height
    boxes: list[Box] = []
    for index, (label, difficult, *coordinates) in enumerate(fields.objects, start=1):
        box = _box(xml_path, index, (label or "").strip(), difficult, coordinates, width, height, problems)
        if box is not None:
            boxes.append(box)
    return ImageRecord(image_name, image_path, width, height, boxes, xml_path)


def _box(
    xml_path: str,
    index: int,
    label: str,
    difficult: str | None,
    coordinates: list[str | None],
    width: int,
    height: int,
    problems: ProblemLog,
) -> Box | None:
    where = f"object[{index}]"
    values: list[float] = []
    for key, text in zip(_COORDINATES, coordinates, strict=True):
        value = number(text)
        if value is None:
            what = "missing" if text is None else f"not a number: {text.strip()!r}"
            problems.error(xml_path, f"bounding box coordinate {what}", field=f"{where}/bndbox/{key}")
            return None
        values.append(value)
    crowd = crowd_flag(difficult.strip() if difficult is not None else None)
    if crowd is None:
        problems.error(xml_path, f"<difficult> must be 0 or 1, not {difficult!r}", field=f"{where}/difficult")
        return None
    xmin, ymin, xmax, ymax = values
    return checked_box(problems, xml_path, where, (xmin, ymin, xmax, ymax), label, crowd, width, height)


def render(dataset: Dataset, out_dir: Path, *, copy_images: bool = True) -> Rendered:
    """``annotations/`` with one XML per image named after it, and ``images/``.

    The layout needs the images beside the annotations, so they are always copied.
    """
    images = sorted(dataset.images, key=lambda image: image.name)
    unique_stems((image.name for image in images), "VOC")
    files = {f"annotations/{os.path.splitext(image.name)[0]}.xml": _xml(image).encode() for image in images}
    return Rendered(files, {f"images/{image.name}": image.path for image in images})


def _xml(image: ImageRecord) -> str:
    objects = "".join(
        f"\t<object>\n\t\t<name>{escape(box.label)}</name>\n\t\t<pose>Unspecified</pose>\n"
        f"\t\t<truncated>0</truncated>\n\t\t<difficult>{int(box.iscrowd)}</difficult>\n\t\t<bndbox>\n"
        f"\t\t\t<xmin>{_number(box.xmin)}</xmin>\n\t\t\t<ymin>{_number(box.ymin)}</ymin>\n"
        f"\t\t\t<xmax>{_number(box.xmax)}</xmax>\n\t\t\t<ymax>{_number(box.ymax)}</ymax>\n"
        "\t\t</bndbox>\n\t</object>\n"
        for box in image.boxes
    )
    return (
        f"<annotation>\n\t<folder>images</folder>\n\t<filename>{escape(posixpath.basename(image.name))}"
        f"</filename>\n\t<size>\n\t\t<width>{image.width}</width>\n\t\t<height>{image.height}</height>\n"
        f"\t\t<depth>3</depth>\n\t</size>\n\t<segmented>0</segmented>\n{objects}</annotation>\n"
    )


def _number(value: float) -> str:
    """Whole pixels as integers, as VOC tools write them; anything else exactly (repr)."""
    return str(int(value)) if value == int(value) else repr(value)

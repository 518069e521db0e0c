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
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape

from visionautoml.data.annotations import Box, Dataset, ImageRecord, classes_in_order_of_appearance
from visionautoml.data.formats._common import (
    Rendered,
    checked_box,
    collector_paused,
    crowd_flag,
    image_size,
    is_image_name,
    number,
    unique_stems,
)
from visionautoml.data.formats._paths import DataRoot, PathRefused, files_by_name, walk_files
from visionautoml.data.formats._vocxml import FieldReader, Fields
from visionautoml.data.images import probe_image
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

ANNOTATION_FOLDERS = ("annotations", "Annotations")
IMAGE_FOLDERS = ("images", "JPEGImages")
_COORDINATES = ("xmin", "ymin", "xmax", "ymax")
_FLAGS = frozenset({None, "0", "1"})
_DRIVE = re.compile(r"[A-Za-z]:[\\/]")


def layout(root: Path) -> tuple[Path, Path] | None:
    """(annotation folder, image folder), or None when ``root`` does not look like VOC."""
    annotations = next((root / name for name in ANNOTATION_FOLDERS if (root / name).is_dir()), None)
    if annotations is None:
        if any(name.lower().endswith(".xml") for name in os.listdir(root)):
            return root, root
        return None
    images = next((root / name for name in IMAGE_FOLDERS if (root / name).is_dir()), root)
    return annotations, images


def read(
    path: Path, problems: ProblemLog, *, datastore_root: Path | None = None, image_root: Path | None = None
) -> Dataset:
    """``<filename>`` must name an image inside the dataset folder (or ``image_root``); ``<path>``,
    an absolute path on the annotator's machine, is never read."""
    found = layout(path) if path.is_dir() else None
    if found is None:
        raise DataError(f"{path}: not a Pascal VOC folder; expected annotations/*.xml beside images/")
    annotation_dir, image_dir = found
    dataset_root = DataRoot(path)
    root = DataRoot(image_root) if image_root is not None else dataset_root
    for folder, allowed in ((annotation_dir, dataset_root), (image_dir, root)):
        if not allowed.contains_real(os.path.realpath(folder)):
            raise DataError(
                f"{folder}: a symbolic link to {os.path.realpath(folder)}, outside {allowed}; "
                "copy the real folder into the dataset"
            )
    names, outside = walk_files(annotation_dir, dataset_root)
    for name, target in sorted(outside.items()):
        if name.lower().endswith(".xml"):
            xml_path = annotation_dir / name
            problems.error(
                xml_path, f"a symbolic link to {target}, outside {path}; it is not read", record=xml_path
            )
    xml_names = sorted(name for name in names if name.lower().endswith(".xml"))
    images, linked_out = files_by_name(image_dir, root)
    context = _Context(image_dir, images, linked_out, root)
    reader = FieldReader()
    records: list[ImageRecord] = []
    with collector_paused(), _opened_folder(annotation_dir) as folder:
        for name in xml_names:
            xml_path = f"{annotation_dir}/{name}"
            try:
                data = _read_bytes(name, folder) if folder is not None else _read_bytes(xml_path)
            except OSError as error:
                problems.error(xml_path, f"cannot read the file: {error.strerror or error}", record=xml_path)
                continue
            fields = reader.read(data)
            if isinstance(fields, str):
                problems.error(
                    xml_path, f"malformed XML: {fields}; fix or re-export the annotation", record=xml_path
                )
                continue
            record = _record(fields, xml_path, name, context, problems)
            if record is not None:
                records.append(record)
    annotated = {name[:-4] for name in xml_names}
    for name in sorted(name for name in images if name.rpartition(".")[0] not in annotated):
        if is_image_name(name):
            problems.warning(image_dir / name, "image has no annotation file; it is left out")
    return Dataset(records, classes_in_order_of_appearance(records))


class _Context(NamedTuple):
    """What every record of one VOC folder is resolved against."""

    image_dir: Path
    images: dict[str, Path]
    linked_out: dict[str, str]
    root: DataRoot


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
    fields: Fields, xml_path: str, name: str, context: _Context, problems: ProblemLog
) -> ImageRecord | None:
    """The record of a plain, valid annotation, checked inline (the hot path of large conversions).

    Anything unusual -- a problem to report, a nested path, a size to read from the image --
    goes through :func:`_checked_record`, which gives the same result or says what is wrong.
    """
    root, filename, width_text, height_text, objects = fields
    image_path = context.images.get(filename) if filename and "/" not in name else None
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
    return _checked_record(fields, xml_path, name, context, problems)


def _image(filename: str, xml_name: str, context: _Context) -> tuple[str, Path]:
    """The image's name (relative to the image folder) and path; PathRefused when it leads out."""
    if filename.startswith("/") or _DRIVE.match(filename):
        raise PathRefused(
            f"<filename> {filename!r} is an absolute path; give the image's name relative to "
            f"{context.image_dir}"
        )
    image_name = filename
    if "/" in xml_name or "/" in filename or filename.startswith("."):
        image_name = posixpath.normpath(posixpath.join(posixpath.dirname(xml_name), filename))
    if image_name == ".." or image_name.startswith("../"):
        raise PathRefused(f"<filename> {filename!r} leaves the image folder {context.image_dir}")
    if image_name in context.linked_out:
        raise PathRefused(
            f"image {image_name} is a symbolic link to {context.linked_out[image_name]}, outside "
            f"{context.root}; copy the real file into the dataset"
        )
    path = context.images.get(image_name)
    if path is None:
        path = context.root.file(image_name, context.image_dir)
    return image_name, path


def _checked_record(
    fields: Fields, xml_path: str, name: str, context: _Context, problems: ProblemLog
) -> ImageRecord | None:
    if fields.root != "annotation":
        problems.error(
            xml_path,
            f"root element is <{fields.root}>, not <annotation>: not a VOC annotation",
            record=xml_path,
        )
        return None
    filename = (fields.filename or "").strip()
    if not filename:
        problems.error(
            xml_path, "missing <filename>; add the image's file name", field="filename", record=xml_path
        )
        return None
    try:
        image_name, image_path = _image(filename, name, context)
    except PathRefused as refused:
        problems.error(xml_path, str(refused), field="filename", record=xml_path)
        return None
    try:
        width, height = int(fields.width), int(fields.height)
    except (TypeError, ValueError):
        width, height = image_size(fields.width), image_size(fields.height)
    if width is None or height is None or width < 0 or height < 0:
        bad = "width" if width is None or width < 0 else "height"
        problems.error(
            xml_path,
            "the image size must be a whole number of pixels; fix <size>",
            field=f"size/{bad}",
            record=image_path,
        )
        return None
    if width == 0 or height == 0:
        try:
            info = probe_image(image_path)
        except DataError as error:
            problems.error(
                xml_path,
                f"<size> is {width}x{height} and the image cannot be read: {error}",
                record=image_path,
            )
            return None
        problems.warning(
            xml_path,
            f"<size> is {width}x{height}; using the image's size {info.width}x{info.height}",
            field="size",
        )
        width, height = info.width, info.height
    boxes: list[Box] = []
    for index, (label, difficult, *coordinates) in enumerate(fields.objects, start=1):
        box = _box(
            xml_path,
            index,
            (label or "").strip(),
            difficult,
            coordinates,
            (width, height),
            image_path,
            problems,
        )
        if box is not None:
            boxes.append(box)
    return ImageRecord(image_name, image_path, width, height, boxes, xml_path)


def _box(
    xml_path: str,
    index: int,
    label: str,
    difficult: str | None,
    coordinates: list[str | None],
    size: tuple[int, int],
    image_path: Path,
    problems: ProblemLog,
) -> Box | None:
    where = f"object[{index}]"
    values: list[float] = []
    for key, text in zip(_COORDINATES, coordinates, strict=True):
        value = number(text)
        if value is None:
            what = "missing" if text is None else f"not a number: {text.strip()!r}"
            problems.error(
                xml_path, f"bounding box coordinate {what}", field=f"{where}/bndbox/{key}", record=image_path
            )
            return None
        values.append(value)
    crowd = crowd_flag(difficult.strip() if difficult is not None else None)
    if crowd is None:
        problems.error(
            xml_path,
            f"<difficult> must be 0 or 1, not {difficult!r}",
            field=f"{where}/difficult",
            record=image_path,
        )
        return None
    xmin, ymin, xmax, ymax = values
    width, height = size
    return checked_box(
        problems, xml_path, where, (xmin, ymin, xmax, ymax), label, crowd, width, height, record=image_path
    )


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

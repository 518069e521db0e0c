"""The cloud AutoML service's JSONL for object detection, one image per line.

``{"image_url": ..., "image_details": {"format": "jpg", "width": 499, "height": 666},
"label": [{"label": "can", "topX": 0.26, "topY": 0.41, "bottomX": 0.74, "bottomY": 0.70,
"isCrowd": 0}]}`` with coordinates normalised to [0, 1]. Reading accepts what users of
that service have (``"400px"`` sizes, no ``image_details``, datastore URLs mapped to a
local folder) so they can bring their files unchanged.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from visionautoml.data.annotations import Box, Dataset, ImageRecord, classes_in_order_of_appearance
from visionautoml.data.formats._common import (
    RelativePaths,
    Rendered,
    checked_box,
    crowd_flag,
    image_size,
    names_under_common_folder,
    number,
)
from visionautoml.data.formats._paths import DataRoot, PathRefused, external_root, trusted_image_root
from visionautoml.data.images import format_name_for_suffix, probe_image
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

TRAIN_FILE = "train_annotations.jsonl"
VALIDATION_FILE = "validation_annotations.jsonl"
_COORDINATES = ("topX", "topY", "bottomX", "bottomY")
_AZUREML_PATH = re.compile(r"/datastores/([^/]+)/paths/(.+)$", re.IGNORECASE)


class _UrlError(Exception):
    """An ``image_url`` that cannot name a local file."""


def files_in(path: Path) -> list[Path]:
    """All JSONL files of a folder are one dataset: `data convert` writes training and validation together."""
    return [path] if path.is_file() else sorted(path.glob("*.jsonl"))


def read(
    path: Path, problems: ProblemLog, *, datastore_root: Path | None = None, image_root: Path | None = None
) -> Dataset:
    """Image paths must stay inside the JSONL's folder (the folder given, for a folder of JSONL files),
    inside ``image_root`` when given, or inside the image folder ``data convert`` recorded when it
    wrote the file; datastore URLs inside ``datastore_root``."""
    files = files_in(path)
    if not files:
        raise DataError(f"{path}: no .jsonl file found; pass the JSONL file or the folder holding it")
    records: list[ImageRecord] = []
    default_root = DataRoot(
        image_root if image_root is not None else (path if path.is_dir() else path.parent)
    )
    roots = _Roots(
        default_root, DataRoot(datastore_root, "the datastore root") if datastore_root is not None else None
    )
    for file in files:
        trusted = trusted_image_root(file) if image_root is None else None
        roots = roots._replace(files=DataRoot(trusted) if trusted is not None else default_root)
        try:
            with open(file, "rb") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        records.append(_read_line(line, file, line_number, roots, problems))
                    except _LineError as failure:
                        problems.error(
                            file,
                            failure.message,
                            line=line_number,
                            field=failure.field,
                            record=f"{file}:{line_number}",
                        )
        except OSError as error:
            problems.error(file, f"cannot read the file: {error.strerror or error}")
    names = names_under_common_folder([str(record.path) for record in records])
    for record, name in zip(records, names, strict=True):
        record.name = name
    return Dataset(records, classes_in_order_of_appearance(records))


class _Roots(NamedTuple):
    files: DataRoot
    datastore: DataRoot | None


class _LineError(Exception):
    """A problem that makes a whole line unusable."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def _read_line(line: bytes, file: Path, line_number: int, roots: _Roots, problems: ProblemLog) -> ImageRecord:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError) as failure:
        raise _LineError(f"not valid JSON ({failure}); each line must be one JSON object") from None
    if not isinstance(entry, dict):
        raise _LineError("each line must be a JSON object with image_url and label")
    url = entry.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise _LineError("missing or empty; give the image's path or URL", "image_url")
    try:
        image_path = resolve_image_url(url.strip(), file.parent, roots.datastore, roots.files)
    except (_UrlError, PathRefused) as failure:
        raise _LineError(str(failure), "image_url") from None
    size = _declared_size(entry.get("image_details"))
    if size is None:
        try:
            info = probe_image(image_path)
        except DataError as failure:
            raise _LineError(str(failure), "image_url") from None
        size = (info.width, info.height)
    width, height = size
    labels = entry.get("label")
    if not isinstance(labels, list):
        raise _LineError(
            "must be a list of boxes (object detection): [{label, topX, topY, bottomX, bottomY}]", "label"
        )
    boxes: list[Box] = []
    for index, item in enumerate(labels):
        box = _box(item, f"label[{index}]", (width, height), image_path, file, line_number, problems)
        if box is not None:
            boxes.append(box)
    return ImageRecord("", image_path, width, height, boxes, f"{file}:{line_number}")


def _declared_size(details: object) -> tuple[int, int] | None:
    """(width, height) from image_details; None when it gives none, so the image is asked."""
    if details is None:
        return None
    if not isinstance(details, dict):
        raise _LineError("must be an object {format, width, height}", "image_details")
    if details.get("width") is None and details.get("height") is None:
        return None
    size = []
    for key in ("width", "height"):
        value = image_size(details.get(key))
        if not value:
            raise _LineError(
                f'must be a positive whole number of pixels (e.g. 640 or "640px"), not {details.get(key)!r}',
                f"image_details.{key}",
            )
        size.append(value)
    return size[0], size[1]


def _box(
    item: object, field: str, size: tuple[int, int], image: Path, file: Path, line: int, problems: ProblemLog
) -> Box | None:
    width, height = size
    if not isinstance(item, dict):
        problems.error(file, "each box must be an object", line=line, field=field, record=image)
        return None
    label = item.get("label")
    if not isinstance(label, str):
        problems.error(file, "missing or not a string", line=line, field=f"{field}.label", record=image)
        return None
    values = []
    for key in _COORDINATES:
        raw = item.get(key)
        value = None if isinstance(raw, str) else number(raw)  # the service writes numbers, never strings
        if value is None:
            problems.error(
                file,
                f"must be a number in [0, 1], not {item.get(key)!r}",
                line=line,
                field=f"{field}.{key}",
                record=image,
            )
            return None
        values.append(value)
    crowd = crowd_flag(item.get("isCrowd"))
    if crowd is None:
        problems.error(file, "must be 0 or 1", line=line, field=f"{field}.isCrowd", record=image)
        return None
    top_x, top_y, bottom_x, bottom_y = values
    return checked_box(
        problems,
        file,
        field,
        (top_x * width, top_y * height, bottom_x * width, bottom_y * height),
        label,
        crowd,
        width,
        height,
        line=line,
        record=image,
    )


def resolve_image_url(url: str, base: Path, datastore: DataRoot | None, root: DataRoot) -> Path:
    """The local file an ``image_url`` names: a path (relative to the JSONL's folder), ``file://``,
    or a cloud datastore URL (``AmlDatastore://STORE/PATH``, ``azureml://.../paths/PATH``) under
    the datastore root. Raises PathRefused for a path that leaves its root or names no file."""
    lowered = url.lower()
    if lowered.startswith(("amldatastore://", "azureml://")):
        if lowered.startswith("amldatastore://"):
            store, _, relative = url[len("amldatastore://") :].partition("/")
        else:
            match = _AZUREML_PATH.search(urlsplit(url).path)
            if match is None:
                raise _UrlError(f"cannot find '/datastores/NAME/paths/PATH' in the azureml URL {url!r}")
            store, relative = match.group(1), match.group(2)
        if datastore is None:
            raise _UrlError(
                f"{url!r} is a cloud datastore URL; download the datastore and pass --datastore-root DIR "
                "(PATH is then read from DIR/PATH)"
            )
        relative = unquote(relative).lstrip("/")
        try:
            return datastore.file(relative)
        except PathRefused as refused:
            if "not found" not in str(refused):
                raise
            try:
                return datastore.file(f"{store}/{relative}")
            except PathRefused:
                raise refused from None
    if lowered.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _UrlError(f"file URL on another host ({parts.netloc}) cannot be read; copy the image here")
        return root.file(url2pathname(parts.path))
    if "://" in url:
        raise _UrlError(
            f"remote URL {url!r} is not downloaded; fetch the images (`visionautoml data fetch`) and "
            "refer to them by path"
        )
    return root.file(url, base)


def render(
    dataset: Dataset, out_dir: Path, *, file_name: str = TRAIN_FILE, copy_images: bool = False
) -> Rendered:
    """One JSONL file; ``image_url`` is relative to ``out_dir`` (or ``images/NAME`` with copies).

    Lines are formatted directly rather than through ``json.dumps`` per dict, which is
    the bulk of the time when converting large datasets; the tests hold both byte-equal.
    """
    images = sorted(dataset.images, key=attrgetter("name"))
    relative = RelativePaths(out_dir)
    lines = []
    for image in images:
        url = f"images/{image.name}" if copy_images else relative(image.path)
        lines.append(_line(url, format_name_for_suffix(image.name), image.width, image.height, image.boxes))
    if copy_images:
        copies = {f"images/{image.name}": image.path for image in images}
        return Rendered({file_name: "".join(lines).encode()}, copies)
    external = tuple((file_name, root) for root in external_root((image.path for image in images), out_dir))
    return Rendered({file_name: "".join(lines).encode()}, {}, external)


def _line(url: str, fmt: str, width: int, height: int, boxes: list[Box]) -> str:
    """One line, byte for byte as ``json.dumps`` would write it."""
    labels = [
        f'{{"label": {_json_string(box.label)}, "topX": {box.xmin / width!r}, "topY": {box.ymin / height!r}, '
        f'"bottomX": {box.xmax / width!r}, "bottomY": {box.ymax / height!r}, "isCrowd": {int(box.iscrowd)}}}'
        for box in boxes
    ]
    return (
        f'{{"image_url": {encode_basestring_ascii(url)}, "image_details": {{"format": {_json_string(fmt)}, '
        f'"width": {width}, "height": {height}}}, "label": [{", ".join(labels)}]}}\n'
    )


@lru_cache(maxsize=4096)
def _json_string(text: str) -> str:
    """Labels and formats repeat on every line: encode each once."""
    return encode_basestring_ascii(text)

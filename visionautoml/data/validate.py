"""``data validate``: every problem of a dataset, found before a training run trips over one.

Reading the annotations finds what the files say wrong (malformed XML/JSON, bad boxes,
unknown labels, missing images, duplicates). Validation then decodes every image,
because only the pixels tell whether a file is truncated, what its real size is, how
EXIF rotates it, and whether two names hold the same picture. The real, displayed size
(EXIF applied, as training decodes it) wins over what the annotation says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats import detect_format, read_dataset, without_skipped
from visionautoml.data.formats._common import checked_box, location
from visionautoml.data.images import CheckedImage, check_image, format_name_for_suffix
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

# Formats whose boxes are fractions of the image: a wrong declared size does not move them.
_NORMALISED_FORMATS = frozenset({"jsonl", "yolo"})


@dataclass
class ValidationReport:
    path: str
    format: str
    dataset: Dataset
    problems: ProblemLog

    def failed(self, strict: bool = False) -> bool:
        """Errors fail; with ``strict``, warnings too."""
        return bool(self.problems.errors or (strict and self.problems.warnings))

    def to_json(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "format": self.format,
                "images": len(self.dataset.images),
                "boxes": self.dataset.box_count,
                "classes": self.dataset.classes,
                "errors": len(self.problems.errors),
                "warnings": len(self.problems.warnings),
                "summary": self.problems.summary(),
                "problems": [asdict(problem) for problem in self.problems.problems],
            },
            indent=2,
        )


def validate_dataset(
    path: str | Path,
    format: str = "auto",
    *,
    classes: list[str] | None = None,
    datastore_root: Path | None = None,
    image_root: Path | None = None,
    drop_invalid: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationReport:
    """Read the dataset and check every image; the report's dataset holds only usable images.

    With ``drop_invalid`` the images with errors are left out with a warning each (what
    ``convert``/``register``/training with ``drop_invalid`` would skip), so the report
    fails only on errors of the dataset as a whole.
    """
    fmt = detect_format(path) if format == "auto" else format
    problems = ProblemLog()
    dataset = read_dataset(
        path,
        fmt,
        problems=problems,
        classes=classes,
        datastore_root=datastore_root,
        image_root=image_root,
        drop_invalid=drop_invalid,
    )
    images = sorted(dataset.images, key=lambda image: image.name)
    seen: dict[str, ImageRecord] = {}
    usable: list[ImageRecord] = []
    for done, image in enumerate(images, start=1):
        if _check(image, fmt, seen, problems):
            usable.append(image)
        if progress is not None:
            progress(done, len(images))
    checked = Dataset(usable, dataset.classes)
    if drop_invalid:
        checked = without_skipped(checked, problems)
    return ValidationReport(str(path), fmt, checked, problems)


def _check(image: ImageRecord, fmt: str, seen: dict[str, ImageRecord], problems: ProblemLog) -> bool:
    try:
        checked = check_image(image.path)
    except DataError as error:
        problems.error(image.path, str(error).removeprefix(f"{image.path}: "), record=image.path)
        return False
    info = checked.info
    expected = format_name_for_suffix(image.name)
    if info.format != expected:
        problems.warning(
            image.path, f"the file is {info.format.upper()} but named .{expected}; it is read by its content"
        )
    if info.exif_orientation != 1:
        problems.warning(
            image.path,
            f"EXIF orientation {info.exif_orientation} rotates or flips this image; boxes are taken on the "
            "displayed (rotated) image, as training decodes it: check they were drawn on that view",
        )
    if checked.sha256 in seen:
        problems.warning(
            image.path,
            f"same picture as {seen[checked.sha256].path}; "
            "a duplicate can leak between training and validation",
        )
    else:
        seen[checked.sha256] = image
    if (info.width, info.height) != (image.width, image.height):
        _real_size_wins(image, checked, fmt, problems)
    return True


def _real_size_wins(image: ImageRecord, checked: CheckedImage, fmt: str, problems: ProblemLog) -> None:
    info = checked.info
    file, line = location(image.source)
    said, real = f"{image.width}x{image.height}", f"{info.width}x{info.height}"
    if fmt in _NORMALISED_FORMATS:
        problems.warning(
            file,
            f"the annotation says the image is {said} but it is {real}; the real size is used and the "
            "normalised boxes scale with it",
            line=line,
            field="image_details",
        )
        sx, sy = info.width / image.width, info.height / image.height
        image.boxes = [
            replace(box, xmin=box.xmin * sx, ymin=box.ymin * sy, xmax=box.xmax * sx, ymax=box.ymax * sy)
            for box in image.boxes
        ]
    else:
        hint = ""
        if info.exif_orientation in (5, 6, 7, 8) and (info.height, info.width) == (image.width, image.height):
            hint = " (the stored pixels are unrotated; EXIF rotates them for display)"
        problems.error(
            file,
            f"the annotation says the image {image.path.name} is {said} but it displays as {real}{hint}; "
            "boxes were probably drawn on another version of the image: fix the size or re-annotate",
            line=line,
            field="size",
            record=image.path,
        )
    image.width, image.height = info.width, info.height
    kept: list[Box] = []
    for index, box in enumerate(image.boxes):
        coordinates = (box.xmin, box.ymin, box.xmax, box.ymax)
        field = f"box[{index}]"
        rechecked = checked_box(
            problems,
            file,
            field,
            coordinates,
            box.label,
            box.iscrowd,
            image.width,
            image.height,
            line=line,
            record=image.path,
        )
        if rechecked is not None:
            kept.append(rechecked)
    image.boxes = kept

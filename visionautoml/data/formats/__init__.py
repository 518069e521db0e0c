"""Every annotation format as a reader to and a writer from the canonical model.

There is no format-to-format code: converting is reading into :class:`Dataset` and
writing from it, so N formats need N readers and N writers, and a fix in one reader
helps every conversion. The registries are plain dicts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.formats import coco, jsonl, voc, yolo
from visionautoml.data.formats._common import Rendered, commit, location
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError

Reader = Callable[..., Dataset]
Writer = Callable[..., Rendered]

READERS: dict[str, Reader] = {"voc": voc.read, "coco": coco.read, "yolo": yolo.read, "jsonl": jsonl.read}
WRITERS: dict[str, Writer] = {
    "voc": voc.render,
    "coco": coco.render,
    "yolo": yolo.render,
    "jsonl": jsonl.render,
}
FORMATS = tuple(READERS)

__all__ = [
    "FORMATS",
    "READERS",
    "WRITERS",
    "detect_format",
    "read_dataset",
    "render_dataset",
    "without_skipped",
    "write_dataset",
]


def detect_format(path: str | Path) -> str:
    """The format of a file or folder, from its layout; the user can always say it with ``--format``."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "jsonl"
        if suffix == ".json":
            return "coco"
        raise DataError(f"{path}: cannot tell the format from a '{suffix}' file; pass --format")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    if yolo.looks_like_yolo(path):
        return "yolo"
    if any((path / name).is_dir() for name in voc.ANNOTATION_FOLDERS):
        return "voc"
    if jsonl.files_in(path):
        return "jsonl"
    if coco.annotation_file(path) is not None:
        return "coco"
    if voc.layout(path) is not None:
        return "voc"
    raise DataError(
        f"{path}: cannot tell the format. Expected one of: VOC (annotations/*.xml + images/), COCO "
        "(annotations.json), YOLO (images/ + labels/ + data.yaml or classes.txt), JSONL (*.jsonl); "
        f"or pass --format {'|'.join(FORMATS)}"
    )


def read_dataset(
    path: str | Path,
    format: str = "auto",
    *,
    problems: ProblemLog | None = None,
    classes: list[str] | None = None,
    datastore_root: Path | None = None,
    image_root: Path | None = None,
    drop_invalid: bool = False,
) -> Dataset:
    """Read any format into the canonical model.

    With a ``problems`` log, every problem is recorded there and the dataset holds what
    could be read (unusable images and boxes are left out); without one, any error raises
    a :class:`DataError` listing all of them. ``classes`` fixes the class list (and its
    order); a label outside it is an error.

    Paths in the annotations must stay inside the dataset (see ``_paths.py``);
    ``image_root`` names another folder that holds the images, for annotation files that
    point out of their own folder and are trusted. Zero-area boxes are dropped and boxes
    leaving their image clipped, with a warning each. With ``drop_invalid`` an image with
    an error that no rule repairs (an unusable box, a missing image, a malformed file) is
    left out with a warning instead of failing the dataset; errors of the dataset as a
    whole still fail it. The source is never modified.
    """
    root = Path(os.path.abspath(path))
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in READERS:
        raise DataError(f"unknown format {format!r}; choose one of auto, {', '.join(FORMATS)}")
    if not root.exists():
        raise DataError(f"{path}: no such file or folder")
    log = problems if problems is not None else ProblemLog()
    if image_root is not None:
        image_root = Path(os.path.abspath(image_root))
    dataset = READERS[fmt](root, log, datastore_root=datastore_root, image_root=image_root)
    if classes is not None:
        dataset = _with_class_list(dataset, classes, log)
    _check_class_names(dataset, root, log)
    dataset = _without_duplicates(dataset, log)
    if drop_invalid:
        dataset = without_skipped(dataset, log)
    if problems is None:
        log.raise_if_errors(f"reading {path}")
    return dataset


def without_skipped(dataset: Dataset, problems: ProblemLog) -> Dataset:
    """``dataset`` without the images its errors concern; those errors become warnings (drop_invalid)."""
    skipped = problems.skip_records()
    if not skipped:
        return dataset
    kept = [image for image in dataset.images if str(image.path) not in skipped]
    return Dataset(kept, dataset.classes)


def render_dataset(dataset: Dataset, out_dir: str | Path, format: str, **options: object) -> Rendered:
    """A writer's files in memory, for callers that commit several outputs together (``convert``)."""
    if format not in WRITERS:
        raise DataError(f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}")
    return WRITERS[format](dataset, Path(os.path.abspath(out_dir)), **options)


def write_dataset(dataset: Dataset, out_dir: str | Path, format: str, **options: object) -> list[Path]:
    """Write ``dataset`` under ``out_dir`` atomically; returns the top-level paths written.

    Options: ``copy_images`` (COCO, JSONL; VOC and YOLO always copy), ``file_name`` (JSONL).
    """
    out_dir = Path(os.path.abspath(out_dir))
    return commit(out_dir, render_dataset(dataset, out_dir, format, **options))


def _with_class_list(dataset: Dataset, classes: list[str], problems: ProblemLog) -> Dataset:
    known = set(classes)
    images: list[ImageRecord] = []
    for image in dataset.images:
        kept: list[Box] = []
        for box in image.boxes:
            if box.label in known:
                kept.append(box)
            else:
                file, line = location(image.source)
                problems.error(
                    file,
                    f"unknown label {box.label!r}: not in the class list ({', '.join(classes)}); "
                    "fix the label or add the class",
                    line=line,
                    field="label",
                    record=image.path,
                )
        image.boxes = kept
        images.append(image)
    return Dataset(images, list(classes))


def _check_class_names(dataset: Dataset, root: Path, problems: ProblemLog) -> None:
    seen: set[str] = set()
    for name in dataset.classes:
        if name in seen:
            problems.error(
                root, f"class {name!r} appears twice in the class list; class names must be unique"
            )
        seen.add(name)


def _without_duplicates(dataset: Dataset, problems: ProblemLog) -> Dataset:
    first: dict[str, ImageRecord] = {}
    for image in dataset.images:
        if image.name in first:
            file, line = location(image.source)
            problems.error(
                file,
                f"image {image.path} is annotated twice (also in {first[image.name].source}); keep one",
                line=line,
                record=image.path,
            )
        else:
            first[image.name] = image
    if len(first) == len(dataset.images):
        return dataset
    return Dataset(list(first.values()), dataset.classes)

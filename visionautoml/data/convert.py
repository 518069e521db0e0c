"""``data convert``: read any format, optionally split, write any format, all or nothing.

Conversion refuses a dataset with errors (the user fixes them, runs ``data validate`` for
the full report, or passes ``drop_invalid`` to leave those images out) and passes warnings
back for the CLI to show: boxes repaired (clipped, zero-area ones dropped) and images
skipped are counted in :attr:`ConvertResult.summary`. It reads the annotation files and
checks that every image it accepts is a complete image file (:func:`verify_image_file`:
start and end of a JPEG, a full decode of anything else), so a truncated download or a
text file named ``.jpg`` fails here rather than in a training run; decoding every pixel is
validation's job, and skipping it keeps large conversions fast. The source is never changed.

JSONL output is ``train_annotations.jsonl`` plus, with a split, ``validation_annotations.jsonl``
side by side, as the cloud service expects; converting without a split removes a
validation file an earlier split left, so training cannot pick up stale data. Other formats
with a split get ``train/`` and ``validation/`` folders, each a complete dataset.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import FORMATS, read_dataset, render_dataset, without_skipped
from visionautoml.data.formats._common import Rendered, collector_paused, commit
from visionautoml.data.formats._paths import PROVENANCE_FILE
from visionautoml.data.formats.coco import ANNOTATION_FILE
from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
from visionautoml.data.images import verify_image_file
from visionautoml.data.problems import Problem, ProblemLog
from visionautoml.data.split import split_every_nth, split_fraction
from visionautoml.errors import DataError

LOCK_FILE = ".visionautoml-convert.lock"
# What a convert can write at the top of its output folder: the only names whose staging
# leftovers (".NAME.tmp-*", ".NAME.old-*" from a killed run) it removes.
_OUTPUT_NAMES = frozenset(
    {
        TRAIN_FILE,
        VALIDATION_FILE,
        ANNOTATION_FILE,
        PROVENANCE_FILE,
        "annotations",
        "images",
        "labels",
        "data.yaml",
        "train",
        "validation",
    }
)
_LEFTOVER = re.compile(r"\.(.+)\.(?:tmp|old)-[^/]+")


@dataclass
class ConvertResult:
    outputs: list[Path]
    train_images: int
    validation_images: int
    classes: list[str]
    warnings: list[Problem] = field(default_factory=list)
    summary: dict[str, int] = field(default_factory=dict)
    """``ProblemLog.summary()``: warnings, clipped and dropped boxes, skipped images."""


def convert(
    source: str | Path,
    out_dir: str | Path,
    to: str,
    *,
    format: str = "auto",
    validation_every: int | None = None,
    validation_fraction: float | None = None,
    seed: int = 42,
    copy_images: bool = False,
    classes: list[str] | None = None,
    datastore_root: Path | None = None,
    image_root: Path | None = None,
    drop_invalid: bool = False,
) -> ConvertResult:
    """Convert ``source`` to format ``to`` under ``out_dir``; same input and options, same bytes."""
    if to not in FORMATS:
        raise DataError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if validation_every is not None and validation_fraction is not None:
        raise DataError("give either --validation-every or --validation-fraction, not both")
    problems = ProblemLog()
    with collector_paused():
        dataset = read_dataset(
            source,
            format,
            problems=problems,
            classes=classes,
            datastore_root=datastore_root,
            image_root=image_root,
            drop_invalid=drop_invalid,
        )
        _record(_unusable_images(dataset), problems)
        if drop_invalid:
            dataset = without_skipped(dataset, problems)
        problems.raise_if_errors(f"cannot convert {source}")
        if not dataset.images:
            raise DataError(f"{source}: no annotated images found; nothing to convert")
        out = Path(os.path.abspath(out_dir))
        outputs, train, validation = _rendered(
            dataset, out, to, validation_every, validation_fraction, seed, copy_images
        )
    with _output_folder(out):
        written = commit(out, *outputs)
        if to == "jsonl" and validation is None:
            (out / VALIDATION_FILE).unlink(missing_ok=True)
    return ConvertResult(
        written,
        len(train.images),
        len(validation.images) if validation is not None else 0,
        list(dataset.classes),
        problems.warnings,
        problems.summary(),
    )


def _unusable_images(dataset: Dataset) -> list[tuple[Path, str]]:
    """(path, reason) of every image that is not a complete image file."""
    found = []
    for image in dataset.images:
        try:
            verify_image_file(image.path)
        except DataError as error:
            found.append((image.path, str(error).removeprefix(f"{image.path}: ")))
    return found


def _record(unusable: list[tuple[Path, str]], problems: ProblemLog) -> None:
    for path, reason in unusable:
        problems.error(path, reason, record=path)


def _rendered(
    dataset: Dataset,
    out: Path,
    to: str,
    every: int | None,
    fraction: float | None,
    seed: int,
    copy_images: bool,
) -> tuple[list[Rendered], Dataset, Dataset | None]:
    """The outputs in memory, and the two sides of the split (validation None without one)."""
    train, validation = _split(dataset, every, fraction, seed)
    if to == "jsonl":
        outputs = [render_dataset(train, out, "jsonl", file_name=TRAIN_FILE, copy_images=copy_images)]
        if validation is not None:
            outputs.append(
                render_dataset(validation, out, "jsonl", file_name=VALIDATION_FILE, copy_images=copy_images)
            )
    elif validation is None:
        outputs = [render_dataset(train, out, to, copy_images=copy_images)]
    else:
        outputs = [
            _render_under(train, out, "train", to, copy_images),
            _render_under(validation, out, "validation", to, copy_images),
        ]
    return outputs, train, validation


@contextmanager
def _output_folder(out: Path) -> Iterator[None]:
    """Hold the output folder's lock, first removing what a killed convert left half-staged.

    The staging folders of a run that was killed (``.train.tmp-*``) would otherwise stay
    forever; under the lock no other convert can be using them.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOCK_FILE).touch()
    except OSError as error:
        raise DataError(f"cannot write to {out}: {error}; check the folder and its permissions") from None
    with open(out / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        for entry in os.scandir(out):
            match = _LEFTOVER.fullmatch(entry.name)
            if match and match.group(1) in _OUTPUT_NAMES:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
        yield


def _split(
    dataset: Dataset, every: int | None, fraction: float | None, seed: int
) -> tuple[Dataset, Dataset | None]:
    if every is not None:
        return split_every_nth(dataset, every)
    if fraction is not None:
        return split_fraction(dataset, fraction, seed)
    return dataset, None


def _render_under(dataset: Dataset, out: Path, folder: str, to: str, copy_images: bool) -> Rendered:
    return render_dataset(dataset, out / folder, to, copy_images=copy_images).under(folder)

"""``data convert``: read any format, optionally split, write any format, all or nothing.

Conversion refuses a dataset with errors (the user fixes them or runs ``data validate``
for the full report) and passes warnings back for the CLI to show. It reads only the
annotation files (and an image header where an annotation lacks the size), never the
pixels: checking images is validation's job, and skipping it keeps large conversions fast.

JSONL output is ``train_annotations.jsonl`` plus, with a split, ``validation_annotations.jsonl``
side by side, as the cloud service expects. Other formats with a split get ``train/``
and ``validation/`` folders, each a complete dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import FORMATS, read_dataset, render_dataset
from visionautoml.data.formats._common import Rendered, collector_paused, commit
from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
from visionautoml.data.problems import Problem, ProblemLog
from visionautoml.data.split import split_every_nth, split_fraction
from visionautoml.errors import DataError


@dataclass
class ConvertResult:
    outputs: list[Path]
    train_images: int
    validation_images: int
    classes: list[str]
    warnings: list[Problem] = field(default_factory=list)


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
) -> ConvertResult:
    """Convert ``source`` to format ``to`` under ``out_dir``; same input and options, same bytes."""
    if to not in FORMATS:
        raise DataError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if validation_every is not None and validation_fraction is not None:
        raise DataError("give either --validation-every or --validation-fraction, not both")
    problems = ProblemLog()
    with collector_paused():
        dataset = read_dataset(
            source, format, problems=problems, classes=classes, datastore_root=datastore_root
        )
        problems.raise_if_errors(f"cannot convert {source}")
        if not dataset.images:
            raise DataError(f"{source}: no annotated images found; nothing to convert")
        train, validation = _split(dataset, validation_every, validation_fraction, seed)
        out = Path(os.path.abspath(out_dir))
        if to == "jsonl":
            outputs = [render_dataset(train, out, "jsonl", file_name=TRAIN_FILE, copy_images=copy_images)]
            if validation is not None:
                outputs.append(
                    render_dataset(
                        validation, out, "jsonl", file_name=VALIDATION_FILE, copy_images=copy_images
                    )
                )
        elif validation is None:
            outputs = [render_dataset(train, out, to, copy_images=copy_images)]
        else:
            outputs = [
                _render_under(train, out, "train", to, copy_images),
                _render_under(validation, out, "validation", to, copy_images),
            ]
    written = commit(out, *outputs)
    return ConvertResult(
        written,
        len(train.images),
        len(validation.images) if validation is not None else 0,
        list(dataset.classes),
        problems.warnings,
    )


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

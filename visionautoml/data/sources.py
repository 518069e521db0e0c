"""The one way training data is found: from what a config names to a training and a validation dataset.

A single trial, a sweep and the pipeline all call :func:`resolve_training_data`, so the
same ``training_data`` means the same images everywhere. It accepts:

- a dataset folder or file in any format (VOC, COCO, YOLO, AutoML JSONL);
- a ``data convert`` output folder: ``train_annotations.jsonl`` is the training data and its
  ``validation_annotations.jsonl`` the validation data;
- an ``MLTable`` file or a folder holding one (the cloud service's data asset): its
  ``paths`` (``file``, ``folder`` or ``pattern``, relative to the MLTable) are read and merged;
- a registered dataset ``NAME`` or ``NAME:VERSION`` of the workspace's dataset store, or
  the folder or JSONL of a stored version (found by its ``version.json``).

Without validation data, ``validation_data_size`` of the training images are split off,
deterministically by name and seed; such parts are not the stored version, so they carry
their content digest instead of its reference.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visionautoml.data.annotations import Dataset
from visionautoml.data.formats import read_dataset
from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
from visionautoml.data.images import verify_image_file
from visionautoml.data.problems import ProblemLog
from visionautoml.data.split import split_fraction
from visionautoml.data.versions import VERSION_FILE, DatasetStore, dataset_digest, image_sha256, parse_ref
from visionautoml.errors import DataError

log = logging.getLogger(__name__)

MLTABLE_FILE = "MLTable"
SOURCE_FORMS = (
    "a dataset folder or file (VOC, COCO, YOLO, JSONL), a `data convert` output folder, an MLTable "
    "file or folder, or NAME[:VERSION] of `visionautoml data list`"
)


@dataclass(frozen=True)
class Source:
    """Where a dataset was read from; ``ref`` and ``digest`` when it is a dataset-store version."""

    paths: tuple[Path, ...]
    ref: str | None = None
    digest: str | None = None

    @property
    def path(self) -> Path:
        return self.paths[0]

    def describe(self) -> str:
        return ", ".join(str(path) for path in self.paths)


@dataclass
class TrainingData:
    """A trial's two datasets and where each came from (a store version or a content digest)."""

    training: Dataset
    validation: Dataset
    training_source: Source
    validation_source: Source
    training_digest: str
    validation_digest: str
    split_from: str | None = None
    """Set when validation was split off the training data: ``PATH (validation_data_size F)``."""
    split_of: str | None = None
    """The ``NAME:VERSION`` both parts were split from, when that was a stored version."""
    problems: dict[str, ProblemLog] = field(default_factory=dict)
    """Per role, what reading repaired or skipped (a dataset version records it)."""

    def reference(self, role: str) -> str:
        """``NAME:VERSION`` of a stored version, else ``sha256:<first 16 of the digest>``."""
        source, digest = self._role(role)
        return source.ref or f"sha256:{digest[:16]}"

    def digest(self, role: str) -> str:
        return self._role(role)[1]

    def location(self, role: str) -> str:
        source, _ = self._role(role)
        if role == "validation" and self.split_from:
            return self.split_from
        return source.describe()

    def _role(self, role: str) -> tuple[Source, str]:
        if role == "training":
            return self.training_source, self.training_digest
        return self.validation_source, self.validation_digest


def content_digest(dataset: Dataset) -> str:
    """The dataset store's digest of this content: equal for equal images and boxes, whatever the format."""
    hashes = {image.name: image_sha256(image.path) for image in dataset.images}
    return dataset_digest(dataset, hashes)


def resolve_training_data(
    training_data: str | None,
    validation_data: str | None,
    *,
    validation_data_size: float,
    seed: int,
    store_root: str,
    datastore_root: Path | None = None,
    drop_invalid: bool = False,
) -> TrainingData:
    """The training and validation datasets a config names (see the module docstring for the forms)."""
    if not training_data:
        raise DataError(
            f"no training data: set training_data in the config or pass --training-data ({SOURCE_FORMS})"
        )
    training_source = locate(training_data, store_root, role="training")
    validation_given = validation_data
    converted_validation = _converted_file(training_source, VALIDATION_FILE)
    if validation_given is None and converted_validation is not None:
        validation_given = str(converted_validation)
    training_source = _converted_part(training_source, TRAIN_FILE)

    logs = {"training": ProblemLog(), "validation": ProblemLog()}
    training = _read(
        training_source, logs["training"], datastore_root=datastore_root, drop_invalid=drop_invalid
    )
    if not training.images:
        raise DataError(f"{training_source.describe()}: no annotated images; training needs at least one")
    split_from = split_of = None
    if validation_given is None:
        whole = training_source
        training, validation = split_fraction(training, validation_data_size, seed)
        if not training.images:
            raise DataError(
                f"{whole.describe()}: {len(validation.images)} image(s) and validation_data_size "
                f"{validation_data_size} leave no training images; add images or give validation_data"
            )
        # Each part is a part of what was given, so neither is that version nor has its digest.
        split_of = whole.ref
        training_source = validation_source = Source(whole.paths, ref=None, digest=None)
        split_from = f"{whole.describe()} (validation_data_size {validation_data_size})"
    else:
        validation_source = _converted_part(
            locate(validation_given, store_root, role="validation"), VALIDATION_FILE
        )
        validation = _read(
            validation_source,
            logs["validation"],
            classes=list(training.classes),
            datastore_root=datastore_root,
            drop_invalid=drop_invalid,
        )
    if not validation.images:
        raise DataError(
            f"no validation images (from {validation_given or training_source.describe()}); give "
            "validation_data or a larger validation_data_size"
        )
    return TrainingData(
        training,
        validation,
        training_source,
        validation_source,
        training_source.digest or content_digest(training),
        validation_source.digest or content_digest(validation),
        split_from,
        split_of,
        logs,
    )


def locate(source: str, store_root: str, *, role: str = "training") -> Source:
    """What ``source`` names: files on disk (MLTable paths expanded), or a registered version."""
    path = Path(source).expanduser()
    if path.exists():
        mltable = path / MLTABLE_FILE if path.is_dir() else path
        if mltable.name == MLTABLE_FILE and mltable.is_file():
            return Source(mltable_paths(mltable))
        return _stored_version(path) or Source((path,))
    try:
        name, version = parse_ref(source)
        registered = DatasetStore(store_root).get(name, version) if Path(store_root).is_dir() else None
    except DataError:
        registered = None
    if registered is not None:
        return Source((Path(registered.annotations),), registered.ref, registered.digest)
    raise DataError(
        f"{role}_data: '{source}' is no file or folder, nor a dataset registered in {store_root}. "
        f"Give {SOURCE_FORMS}"
    )


def mltable_paths(mltable: Path) -> tuple[Path, ...]:
    """The local files an MLTable's ``paths`` name (``file``, ``folder`` or ``pattern``, relative to it)."""
    try:
        spec = yaml.safe_load(mltable.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"{mltable}: not a readable MLTable ({error})") from None
    entries = spec.get("paths") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"{mltable}: an MLTable needs a `paths:` list (e.g. `- file: ./train_annotations.jsonl`)"
        )
    found: list[Path] = []
    for index, entry in enumerate(entries):
        kind, value = _path_entry(entry, mltable, index)
        if "://" in value:
            raise DataError(
                f"{mltable}: paths[{index}] is the remote location {value}; download the data and point the "
                "MLTable at the local copy (remote MLTable paths are read by the cloud service only)"
            )
        target = (mltable.parent / value).resolve()
        if kind == "pattern":
            found.extend(Path(item) for item in sorted(glob.glob(str(target), recursive=True)))
        elif target.exists():
            found.append(target)
        else:
            raise DataError(
                f"{mltable}: paths[{index}].{kind} {value} does not exist (relative to {mltable.parent})"
            )
    if not found:
        raise DataError(f"{mltable}: its paths match no file")
    return tuple(found)


def _path_entry(entry: Any, mltable: Path, index: int) -> tuple[str, str]:
    if isinstance(entry, dict) and len(entry) == 1:
        ((kind, value),) = entry.items()
        if kind in ("file", "folder", "pattern") and isinstance(value, str):
            return kind, value
    raise DataError(
        f"{mltable}: paths[{index}] must be one of `file: PATH`, `folder: PATH` or `pattern: GLOB`"
    )


def _complete_images(dataset: Dataset, problems: ProblemLog, drop_invalid: bool) -> Dataset:
    """The dataset without images that are no complete image file: an error each, or skipped.

    Training would find them only when it decodes them, after its run was created; checked
    here, a truncated download fails the command before any run, naming the file.
    """
    for image in dataset.images:
        try:
            verify_image_file(image.path)
        except DataError as error:
            problems.error(image.path, str(error).removeprefix(f"{image.path}: "), record=image.path)
    if not drop_invalid:
        return dataset
    skipped = problems.skip_records()
    return Dataset(
        [image for image in dataset.images if str(image.path) not in skipped], list(dataset.classes)
    )


def _stored_version(path: Path) -> Source | None:
    """A folder or JSONL of a dataset-store version, recognised by the ``version.json`` beside it."""
    version_file = (path if path.is_dir() else path.parent) / VERSION_FILE
    try:
        info = json.loads(version_file.read_text(encoding="utf-8"))
        return Source((path,), f"{info['name']}:{info['version']}", str(info["digest"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _converted_file(source: Source, name: str) -> Path | None:
    folder = source.path
    return folder / name if len(source.paths) == 1 and folder.is_dir() and (folder / name).is_file() else None


def _converted_part(source: Source, name: str) -> Source:
    """A ``data convert`` output folder stands for its ``name`` file (train or validation)."""
    part = _converted_file(source, name)
    return Source((part,), source.ref, source.digest) if part is not None else source


def _read(
    source: Source,
    problems: ProblemLog,
    *,
    classes: list[str] | None = None,
    datastore_root: Path | None = None,
    drop_invalid: bool = False,
) -> Dataset:
    """Read every path of ``source`` into one dataset (an MLTable may name several files).

    Repairable problems (a zero-area box, a box partly outside) are repaired with a warning each;
    an image with an error stops the command unless ``drop_invalid`` skips it with a warning.
    """
    parts = []
    for path in source.paths:
        dataset = read_dataset(
            path, classes=classes, datastore_root=datastore_root, drop_invalid=drop_invalid, problems=problems
        )
        parts.append(_complete_images(dataset, problems, drop_invalid))
        problems.raise_if_errors(f"reading {path}")
    for problem in problems.warnings:
        log.warning("%s", problem)
    if len(parts) == 1:
        return parts[0]
    images, seen = [], set()
    for part in parts:
        for image in part.images:
            if image.name in seen:
                raise DataError(f"{source.describe()}: image {image.name} is annotated in two of these files")
            seen.add(image.name)
            images.append(image)
    merged_classes = classes or sorted({name for part in parts for name in part.classes})
    return Dataset(images, merged_classes)

"""The pipeline's data steps: fetch the labelled data, validate it, convert it with the split, register it.

Each returns what the next step needs and a one-line detail for the step's log line.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from visionautoml.automl.sweep import dataset_names
from visionautoml.config import JobConfig, Pipeline
from visionautoml.errors import ConfigError
from visionautoml.redact import mask


def fetch(source: str | None, job: JobConfig) -> tuple[Path, str]:
    from visionautoml.data.fetch import fetch
    from visionautoml.tracking.workspace import workspace_dir

    if not source:
        raise ConfigError("no data to fetch: set pipeline.data in the config or pass --data URL_OR_PATH")
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve(), f"{local.resolve()} (a folder: read in place)"
    target = workspace_dir(job) / "pipeline" / "data" / hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = fetch(source, target, job.pipeline.sha256)
    return dataset_root(folder), f"{mask(source)} -> {folder}"


def dataset_root(folder: Path) -> Path:
    """Step into an archive's single top folder (``odFridgeObjects/`` in the fridge zip)."""
    while True:
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def validate(folder: Path, pipeline: Pipeline, datastore_root: Path | None) -> tuple[Any, str]:
    from visionautoml.data.formats import read_dataset
    from visionautoml.data.problems import ProblemLog

    problems = ProblemLog()
    dataset = read_dataset(folder, pipeline.format, problems=problems, datastore_root=datastore_root)
    problems.raise_if_errors(f"validating {folder}")
    if len(dataset.images) < pipeline.validation_every:
        raise ConfigError(
            f"{folder}: {len(dataset.images)} image(s) is too few for pipeline.validation_every="
            f"{pipeline.validation_every}; add images or lower it"
        )
    warnings = f", {len(problems.warnings)} warning(s)" if problems.warnings else ""
    classes = ", ".join(dataset.classes)
    return dataset, f"{len(dataset.images)} images, {dataset.box_count} boxes, classes: {classes}{warnings}"


def convert(
    folder: Path, classes: list[str], job: JobConfig, datastore_root: Path | None
) -> tuple[Path, str]:
    from visionautoml.data.convert import convert
    from visionautoml.tracking.workspace import workspace_dir

    key = hashlib.sha256(
        f"{folder}|{job.pipeline.format}|{job.pipeline.validation_every}".encode()
    ).hexdigest()
    out = workspace_dir(job) / "pipeline" / "converted" / key[:16]
    converted = convert(
        folder,
        out,
        "jsonl",
        format=job.pipeline.format,
        validation_every=job.pipeline.validation_every,
        classes=classes,
        datastore_root=datastore_root,
    )
    return out, f"{converted.train_images} train / {converted.validation_images} validation images in {out}"


def register_data(converted: Path, job: JobConfig) -> tuple[Any, Any]:
    from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
    from visionautoml.data.versions import DatasetStore, default_store_root
    from visionautoml.tracking.workspace import workspace_dir

    store = DatasetStore(default_store_root(workspace_dir(job)))
    train_name, validation_name = dataset_names(job)
    training = store.register(converted / TRAIN_FILE, train_name, format="jsonl")
    validation = store.register(converted / VALIDATION_FILE, validation_name, format="jsonl")
    return training, validation


def version_dict(version: Any) -> dict[str, Any]:
    return {**asdict(version), "ref": version.ref}

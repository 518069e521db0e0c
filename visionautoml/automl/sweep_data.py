"""The data every trial of a sweep reads: registered once as dataset versions, reachable from every node.

The sweep resolves its data as a single trial would, and registers the training and
validation parts as versions of the workspace's dataset store; trials get the versions'
paths, never the data. On a Ray cluster with a tracking server, the versions are also logged
to the sweep's parent run (:mod:`visionautoml.tracking.datasets`), so that a trial on a node
that shares no disk with the driver fetches them by digest, and a ``--resume`` from another
machine finds them too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from visionautoml.automl.automatic import DataProfile
from visionautoml.automl.trial_runner import DatasetSpecs, dataset_cache
from visionautoml.config import JobConfig
from visionautoml.data.formats import read_dataset
from visionautoml.data.versions import VERSION_FILE, DatasetStore, default_store_root
from visionautoml.errors import DataError
from visionautoml.tracking import datasets
from visionautoml.tracking.schema import Tag

ROLES = ("training", "validation")


@dataclass(frozen=True)
class Version:
    """One role's dataset version as the driver reads it."""

    ref: str
    digest: str
    annotations: str
    """Its ``annotations.jsonl`` on the driver's disk."""
    image_count: int


@dataclass
class PreparedData:
    """What every trial shares: the job with the versions' paths, the versions, whether the run has them."""

    job: JobConfig
    training: Version
    validation: Version
    profile: DataProfile
    """What the automatic mode reads: the training objects' sizes and counts."""
    published: bool = False

    @property
    def image_count(self) -> int:
        return self.training.image_count + self.validation.image_count

    def version(self, role: str) -> Version:
        return self.training if role == "training" else self.validation

    def state(self) -> dict[str, str]:
        """What the sweep's state file keeps to find the versions again on ``--resume``."""
        found = {}
        for role in ROLES:
            found[role] = self.version(role).ref
            found[f"{role}_digest"] = self.version(role).digest
        return found

    def tags(self) -> dict[str, str]:
        """The dataset versions as the parent run and the registered model carry them."""
        found = {}
        for role in ROLES:
            found[Tag.dataset(role)] = self.version(role).ref
            found[Tag.dataset(role, "digest")] = self.version(role).digest
        return found

    def specs(self) -> DatasetSpecs:
        """What a trial needs to find the versions on its own node."""
        return {
            role: {"digest": self.version(role).digest, **({"published": "1"} if self.published else {})}
            for role in ROLES
        }


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "sweep"


def dataset_names(job: JobConfig) -> tuple[str, str]:
    """The names a sweep registers its data under (the pipeline registers under the same ones)."""
    name = slug(job.experiment_name)
    return f"{name}-train", f"{name}-validation"


def prepare_data(
    job: JobConfig, state: dict[str, Any], console: Console, *, tracking_uri: str
) -> PreparedData:
    """Resolve the data once, as a single trial would, and register both parts as dataset versions.

    Every trial then reads the same two versions, and the validation set is a versioned,
    content-addressed thing the model's tags can point at, which ``promote_if_better`` needs
    to compare like with like. Registering is get-or-create, so data that already is a
    version (the pipeline's, a ``NAME:VERSION``) maps to itself. A resumed sweep uses the
    versions it started with: from this workspace's store, or else from its parent run.
    """
    from visionautoml.data.sources import resolve_training_data

    store = DatasetStore(default_store_root(job.workspace))
    if state.get("training") and state.get("validation"):
        training, validation = (_resumed_version(job, store, state, role, tracking_uri) for role in ROLES)
    else:
        with console.status("reading the training data"):
            data = resolve_training_data(
                job.training_data,
                job.validation_data,
                validation_data_size=job.validation_data_size,
                seed=job.training_parameters.seed,
                store_root=store.url,
                datastore_root=Path(job.datastore_root) if job.datastore_root else None,
                drop_invalid=job.invalid_data == "drop",
            )
        registered = [
            store.register_dataset(
                getattr(data, role), name, source=data.location(role), problems=data.problems[role]
            )
            for role, name in zip(ROLES, dataset_names(job), strict=True)
        ]
        training, validation = (
            Version(each.ref, each.digest, each.annotations, each.image_count) for each in registered
        )
        console.print(
            f"Data: {training.ref} ({training.image_count} images) for training, "
            f"{validation.ref} ({validation.image_count} images) for validation"
        )
    trial_job = job.model_copy(
        update={"training_data": training.annotations, "validation_data": validation.annotations}
    )
    return PreparedData(trial_job, training, validation, DataProfile.of(read_dataset(training.annotations)))


def publish(prepared: PreparedData, parent_run_id: str, *, tracking_uri: str) -> PreparedData:
    """Log the versions to the parent run when trials may run where the driver's disk is not.

    That is a sweep on a Ray cluster with a tracking server; a laptop sweep, or one whose
    store is a file (which the nodes could only share on a common disk), copies nothing.
    """
    if not datasets.copies_through_server(prepared.job):
        return prepared
    for role in ROLES:
        folder = Path(prepared.version(role).annotations).parent
        datasets.publish_version(parent_run_id, role, folder, tracking_uri=tracking_uri)
    return replace(prepared, published=True)


def _resumed_version(
    job: JobConfig, store: DatasetStore, state: dict[str, Any], role: str, tracking_uri: str
) -> Version:
    name, _, number = str(state[role]).partition(":")
    try:
        version = store.get(name, int(number))
        return Version(version.ref, version.digest, version.annotations, version.image_count)
    except (DataError, ValueError):
        digest, parent = state.get(f"{role}_digest"), state.get("parent_run_id")
        if not digest or not parent:
            raise
    annotations = datasets.local_version(
        "",
        digest,
        run_id=parent,
        role=role,
        cache=dataset_cache(job),
        tracking_uri=tracking_uri,
    )
    info = json.loads((Path(annotations).parent / VERSION_FILE).read_text(encoding="utf-8"))
    return Version(state[role], digest, annotations, int(info["image_count"]))

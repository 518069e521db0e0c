"""Dataset versions a trial on any node can read: logged to the sweep's run, fetched there by digest.

A sweep registers its data in the dataset store of the machine that starts it. A Ray node that
shares no disk with that machine cannot read that store, but every node reaches the tracking
server: so the sweep logs each version's folder (``annotations.jsonl``, ``images/``, and
``version.json`` last, as the mark that the copy is whole) as artifacts of its parent run, and
a trial that does not find the version on its own disk downloads it once into a node-local
cache named by the version's digest. A download is checked against that digest before it is
used and published by one ``rename``, so concurrent trials on a node never read half a copy.
With ``mlflow server --serve-artifacts`` the bytes pass through the server: a worker needs the
tracking URI and a login, never the bucket's keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from visionautoml.config import JobConfig
from visionautoml.data.formats import read_dataset
from visionautoml.data.sources import content_digest
from visionautoml.data.versions import ANNOTATIONS_FILE, IMAGES_DIR, VERSION_FILE
from visionautoml.errors import DataError
from visionautoml.tracking.store import Store
from visionautoml.tracking.workspace import resolve_tracking_uri, sqlite_path

log = logging.getLogger(__name__)

DATASET_ARTIFACTS = "dataset_versions"
"""Where in a sweep's parent run its dataset versions are, one folder per role."""


def artifact_path(role: str) -> str:
    return f"{DATASET_ARTIFACTS}/{role}"


def served_to_every_node(tracking_uri: str) -> bool:
    """Whether the store is a server (or database) other machines reach, not a file on this one.

    Only then is it worth copying data and checkpoints into it: a SQLite or file store works
    across nodes only on a disk they share, where the files themselves are reachable already.
    """
    if sqlite_path(tracking_uri) is not None or tracking_uri.startswith("file:"):
        return False
    return "://" in tracking_uri or tracking_uri.startswith("databricks")


def copies_through_server(job: JobConfig) -> bool:
    """Whether a sweep's data versions and trial checkpoints travel through the tracking server.

    A sweep on a Ray cluster whose trials may run where the driver's disk is not, with a store
    every node reaches (:func:`served_to_every_node`); everything else reads its own disk.
    """
    return job.compute.target == "ray" and served_to_every_node(resolve_tracking_uri(job))


def publish_version(run_id: str, role: str, folder: Path, *, tracking_uri: str) -> str:
    """Log the version in ``folder`` under the run's ``dataset_versions/<role>/`` unless it is there.

    ``version.json`` goes last: a reader takes a folder without it for an interrupted upload.
    """
    store = Store(tracking_uri)
    path = artifact_path(role)
    if f"{path}/{VERSION_FILE}" in store.artifact_paths(run_id, path):
        return path
    store.log_folder(run_id, folder / IMAGES_DIR, f"{path}/{IMAGES_DIR}")
    store.log_files(
        run_id,
        {name: (folder / name).read_bytes() for name in (ANNOTATIONS_FILE, VERSION_FILE)},
        path,
    )
    return path


def local_version(
    annotations: str, digest: str, *, run_id: str, role: str, cache: Path, tracking_uri: str
) -> str:
    """A path to the version's ``annotations.jsonl`` on this node: ``annotations`` if it is that version.

    Otherwise the copy in ``cache/<digest>/``, downloaded from the run first if this node has
    none yet.
    """
    if annotations and _digest_of(Path(annotations).parent) == digest:
        return annotations
    target = cache / digest
    if _digest_of(target) != digest:
        _download(run_id, role, digest, target, tracking_uri)
    return str(target / ANNOTATIONS_FILE)


def _digest_of(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / VERSION_FILE).read_text(encoding="utf-8"))["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _download(run_id: str, role: str, digest: str, target: Path, tracking_uri: str) -> None:
    """Fetch the run's copy into a scratch folder beside ``target``, check it, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name[:12]}-", dir=target.parent))
    try:
        fetched = Store(tracking_uri).download_folder(run_id, artifact_path(role), scratch)
        if fetched is None or _digest_of(fetched) is None:
            raise DataError(
                f"the {role} data is not on this node, and run {run_id} holds no copy of it "
                f"({artifact_path(role)}/{VERSION_FILE}); run the sweep again without --resume, or give "
                "every node the workspace's disk"
            )
        found = content_digest(read_dataset(fetched / ANNOTATIONS_FILE, "jsonl"))
        if _digest_of(fetched) != digest or found != digest:
            raise DataError(
                f"the {role} data downloaded from run {run_id} has digest {found[:16]}, not the sweep's "
                f"{digest[:16]}; its artifacts were changed. Start the sweep again without --resume"
            )
        try:
            os.rename(fetched, target)
        except OSError:
            if _digest_of(target) != digest:  # not a concurrent trial's identical copy: a real failure
                raise
        log.info("fetched the %s data (%s) from run %s into %s", role, digest[:16], run_id, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "DATASET_ARTIFACTS",
    "copies_through_server",
    "local_version",
    "publish_version",
    "served_to_every_node",
]

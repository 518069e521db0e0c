"""A trial's checkpoints kept on the tracking server, so that a retry on another node resumes from them.

The trainer writes ``best.pt`` and ``last.pt`` (the trial adds ``run.json``) into a folder on
its node's own disk. When that node dies, Ray Tune retries the trial elsewhere, where no such
folder exists; so while a sweep trial trains on a cluster, a thread copies each new checkpoint
to the run's artifacts, ``checkpoints/<n>/``, and a retry downloads the newest before it starts.

A copy is a consistent set: the files are hard-linked into a snapshot (the trainer replaces
files atomically, so a link keeps the bytes it saw), taken only when ``best.pt`` is not newer
than ``last.pt`` (within an epoch the best weights are saved first, so a newer best belongs to
an epoch ``last.pt`` does not hold yet). Each copy ends with ``manifest.json``, every file's
sha256; a retry takes the newest copy whose files all match, so an upload cut off by the
node's death is never resumed from, and the copy before it is deleted only once the next one
is whole. Copying never fails the training, and the copies go when the trial ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

from visionautoml.errors import first_line
from visionautoml.files import sha256_file
from visionautoml.tracking.schema import Tag
from visionautoml.tracking.store import Store

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACTS = "checkpoints"
MANIFEST = "manifest.json"
WATCHED = "last.pt"
"""The file whose every new version is a checkpoint to copy."""
COMPANIONS = ("best.pt", "run.json")
POLL_SECONDS = 1.0
_STOP_WAIT_SECONDS = 300.0


class CheckpointMirror(threading.Thread):
    """Copies every new checkpoint in ``folder`` to the run's artifacts until stopped."""

    def __init__(self, folder: Path, run_id: str, tracking_uri: str) -> None:
        super().__init__(name=f"checkpoint mirror {run_id}", daemon=True)
        self.folder, self.run_id, self.tracking_uri = folder, run_id, tracking_uri
        self.stopping = threading.Event()
        self.copies = max(_copy_numbers(Store(tracking_uri), run_id), default=0)
        self.copied: tuple[int, int] | None = None
        """(inode, mtime_ns) of the last ``last.pt`` copied."""

    def run(self) -> None:
        while not self.stopping.wait(POLL_SECONDS):
            try:
                self.sync()
            except FileNotFoundError:
                continue  # the trainer is replacing a file, or the trial removed the folder
            except Exception as error:  # a server hiccup: the next checkpoint tries again
                log.warning("could not copy the checkpoint of run %s: %s", self.run_id, first_line(error))

    def sync(self) -> bool:
        """Copy the folder's checkpoint if it is new and consistent; True when one was copied."""
        seen = (self.folder / WATCHED).stat()
        if (seen.st_ino, seen.st_mtime_ns) == self.copied:
            return False
        snapshot = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-copy-", dir=self.folder.parent))
        try:
            for name in (WATCHED, *COMPANIONS):
                _link(self.folder / name, snapshot / name)
            taken = (snapshot / WATCHED).stat()
            best = snapshot / "best.pt"
            if best.is_file() and best.stat().st_mtime_ns > taken.st_mtime_ns:
                return False  # the best of an epoch whose last.pt is still to come
            files = {path.name: sha256_file(path) for path in sorted(snapshot.iterdir())}
            number = self.copies + 1
            store = Store(self.tracking_uri)
            store.log_folder(self.run_id, snapshot, f"{CHECKPOINT_ARTIFACTS}/{number}")
            store.log_files(
                self.run_id,
                {MANIFEST: json.dumps({"files": files}, indent=2)},
                f"{CHECKPOINT_ARTIFACTS}/{number}",
            )
            self.copies, self.copied = number, (taken.st_ino, taken.st_mtime_ns)
            for older in _copy_numbers(store, self.run_id):
                if older < number:
                    _delete(self.tracking_uri, self.run_id, f"{CHECKPOINT_ARTIFACTS}/{older}")
            return True
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(_STOP_WAIT_SECONDS)


_mirrors: dict[str, CheckpointMirror] = {}
_lock = threading.Lock()


def mirror_checkpoints(folder: Path, run_id: str, *, tracking_uri: str) -> CheckpointMirror:
    """Start copying ``folder``'s checkpoints to run ``run_id`` (once per run and process)."""
    with _lock:
        mirror = _mirrors.get(run_id)
        if mirror is None or not mirror.is_alive():
            mirror = _mirrors[run_id] = CheckpointMirror(folder, run_id, tracking_uri)
            mirror.start()
        return mirror


def discard_checkpoints(run_id: str, *, tracking_uri: str) -> None:
    """Stop copying and delete the run's copies: the trial ended, nothing will resume from them."""
    with _lock:
        mirror = _mirrors.pop(run_id, None)
    if mirror is not None:
        mirror.stop()
    try:
        if _copy_numbers(Store(tracking_uri), run_id):
            _delete(tracking_uri, run_id, CHECKPOINT_ARTIFACTS)
    except Exception as error:  # leftover copies cost space, not correctness
        log.warning("could not delete the checkpoint copies of run %s: %s", run_id, first_line(error))


def fetch_checkpoints(parent_run_id: str, run_name: str, folder: Path, *, tracking_uri: str) -> str | None:
    """Download the newest whole checkpoint copy of an earlier attempt of this trial into ``folder``.

    An earlier attempt is a run of the same name under the same parent (Tune keeps a trial's
    id, and so its run name, across retries). Returns that run's id, or None when no attempt
    left a whole copy.
    """
    store = Store(tracking_uri)
    parent = store.find_run(parent_run_id)
    if parent is None:
        return None
    attempts = store.search(
        [parent.experiment_id],
        f"tags.`{Tag.MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' and attributes.run_name = '{run_name}'",
    )
    for attempt in attempts:  # newest first
        for number in sorted(_copy_numbers(store, attempt.run_id), reverse=True):
            if _download(store, attempt.run_id, f"{CHECKPOINT_ARTIFACTS}/{number}", folder):
                return attempt.run_id
    return None


def _copy_numbers(store: Store, run_id: str) -> list[int]:
    names = (path.rpartition("/")[2] for path in store.artifact_paths(run_id, CHECKPOINT_ARTIFACTS))
    return [int(name) for name in names if name.isdigit()]


def _link(source: Path, target: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links: a copy, checked by its hash all the same
            shutil.copy2(source, target)


def _download(store: Store, run_id: str, path: str, folder: Path) -> bool:
    manifest = store.read_text(run_id, f"{path}/{MANIFEST}")
    if manifest is None:
        return False  # cut off before its end
    files: dict[str, str] = json.loads(manifest)["files"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{folder.name}-fetch-", dir=folder.parent) as scratch:
        fetched = store.download_folder(run_id, path, Path(scratch))
        if fetched is None:
            return False
        for name, digest in files.items():
            if not (fetched / name).is_file() or sha256_file(fetched / name) != digest:
                log.warning("run %s: the checkpoint copy %s is not whole; not resuming from it", run_id, path)
                return False
        folder.mkdir(parents=True, exist_ok=True)
        for name in files:
            os.replace(fetched / name, folder / name)
    return True


def _delete(tracking_uri: str, run_id: str, path: str) -> None:
    """Delete an artifact folder of the run (through the server, with ``--serve-artifacts``)."""
    from mlflow import MlflowClient
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    artifact_uri = MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
    get_artifact_repository(artifact_uri, tracking_uri=tracking_uri).delete_artifacts(path)


__all__ = ["CHECKPOINT_ARTIFACTS", "discard_checkpoints", "fetch_checkpoints", "mirror_checkpoints"]

"""Immutable, content-addressed dataset versions: the registered-dataset step of the original flow.

A version is a folder ``<store>/<NAME>/<VERSION>/`` holding the AutoML JSONL
(``annotations.jsonl``, image URLs relative: ``images/...``), a copy of every image and
``version.json`` (digest, counts, classes, created, source, and the repairs reading made:
boxes clipped or dropped, images skipped under ``drop_invalid``). Every image is checked to
be a complete image file before anything is copied, and a copy is never readable by more
users than the original and the umask allow. Registering is get-or-create:
the digest covers the images' bytes and the canonical annotations, not where they came
from, so registering the same content again (from another folder, or as VOC instead of the
JSONL converted from it) returns the existing version and copies nothing.

The store is any fsspec location. On a local (or shared POSIX) file system a version is
staged in a hidden folder and published by one ``rename`` under a per-name ``flock``, so
concurrent registers never expose a half-copied version nor create two versions of the
same content. On object stores a version becomes visible when its ``version.json``, written
last, appears; a per-name lock object created exclusively keeps registers apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from rich.progress import Progress

from visionautoml.config import DEFAULT_WORKSPACE
from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.data.formats import read_dataset, without_skipped, write_dataset
from visionautoml.data.images import verify_image_file
from visionautoml.data.problems import ProblemLog
from visionautoml.errors import DataError
from visionautoml.files import sha256_file
from visionautoml.progress import progress_bar

VERSION_FILE = "version.json"
ANNOTATIONS_FILE = "annotations.jsonl"
IMAGES_DIR = "images"
DIGEST_SCHEME = "visionautoml-dataset/1"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REMOTE_LOCK_WAIT_S = 600.0
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class DatasetVersion:
    """One registered version. ``path`` is a local folder, or an fsspec URL for remote stores."""

    name: str
    version: int
    path: str
    digest: str
    classes: list[str]
    image_count: int
    box_count: int
    created: str = ""
    source: str = ""
    repairs: dict[str, int] = field(default_factory=dict)
    """Counts of what reading repaired: ``clipped_boxes``, ``dropped_boxes``, ``skipped_images``."""
    reused: bool = field(default=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def annotations(self) -> str:
        """The version's AutoML JSONL, readable by ``read_dataset``."""
        return f"{self.path}/{ANNOTATIONS_FILE}"


def default_store_root(workspace: str | Path = DEFAULT_WORKSPACE) -> str:
    return str(Path(workspace).expanduser() / "datasets")


def parse_ref(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION`` -> (name, version or None for the latest)."""
    name, _, version = text.partition(":")
    _check_name(name)
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise DataError(f"'{text}': the version after ':' must be a positive integer, e.g. {name}:1.")
    return name, int(version)


def image_sha256(path: Path) -> str:
    try:
        return sha256_file(path, _CHUNK)
    except OSError as error:
        raise DataError(f"{path}: cannot read the image: {error.strerror or error}") from None


def canonical_annotations(dataset: Dataset) -> str:
    """The annotations as deterministic JSONL: what a digest may depend on, and nothing else.

    Images sorted by name, boxes sorted, coordinates in pixels rounded to 1/1000 so that a
    VOC file and the normalised JSONL converted from it (float round trip) agree.
    """

    def coordinate(value: float) -> str:
        return f"{round(value, 3) + 0.0:.3f}"

    lines = [json.dumps({"classes": list(dataset.classes)}, separators=(",", ":"))]
    for image in sorted(dataset.images, key=lambda record: record.name):
        boxes = sorted(
            (
                box.label,
                *(coordinate(value) for value in (box.xmin, box.ymin, box.xmax, box.ymax)),
                int(box.iscrowd),
            )
            for box in image.boxes
        )
        record = {"image": image.name, "width": image.width, "height": image.height, "boxes": boxes}
        lines.append(json.dumps(record, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines) + "\n"


def dataset_digest(dataset: Dataset, image_hashes: dict[str, str]) -> str:
    """sha256 over the sorted (image name, image bytes sha256) pairs and the canonical annotations."""
    digest = hashlib.sha256(f"{DIGEST_SCHEME}\n".encode())
    for name in sorted(image_hashes):
        digest.update(f"{name}\0{image_hashes[name]}\n".encode())
    digest.update(canonical_annotations(dataset).encode())
    return digest.hexdigest()


class DatasetStore:
    """Named, numbered dataset versions under one root (a local folder or any fsspec URL)."""

    def __init__(self, root: str | Path) -> None:
        self.url = str(root)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as error:
            raise DataError(
                f"dataset store {self.url}: cannot open it ({error}); for a remote store install its "
                "fsspec backend (e.g. `pip install s3fs` for s3://)."
            ) from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def register(
        self,
        path: str | Path,
        name: str,
        *,
        format: str = "auto",
        datastore_root: Path | None = None,
        image_root: Path | None = None,
        drop_invalid: bool = False,
    ) -> DatasetVersion:
        """Get-or-create the version of ``name`` holding the dataset at ``path`` (folder or JSONL).

        ``datastore_root`` is where ``AmlDatastore://`` image URLs of a cloud JSONL live locally;
        ``image_root`` a folder outside the annotation file's that its image paths may name.
        With ``drop_invalid`` images with errors are left out (and counted) instead of failing.
        """
        _check_name(name)
        source = str(Path(path).expanduser().resolve())
        problems = ProblemLog()
        dataset = read_dataset(
            path,
            format,
            problems=problems,
            datastore_root=datastore_root,
            image_root=image_root,
            drop_invalid=drop_invalid,
        )
        return self.register_dataset(
            dataset, name, source=source, problems=problems, drop_invalid=drop_invalid
        )

    def register_dataset(
        self,
        dataset: Dataset,
        name: str,
        *,
        source: str = "",
        problems: ProblemLog | None = None,
        drop_invalid: bool = False,
    ) -> DatasetVersion:
        """Get-or-create the version of ``name`` holding ``dataset`` (already read, e.g. just converted).

        ``problems`` is the log the dataset was read with: its errors refuse the dataset and
        its repairs are recorded with the version. Every image is verified first.
        """
        _check_name(name)
        log = problems if problems is not None else ProblemLog()
        for image in dataset.images:
            try:
                verify_image_file(image.path)
            except DataError as error:
                log.error(image.path, str(error).removeprefix(f"{image.path}: "), record=image.path)
        if drop_invalid:
            dataset = without_skipped(dataset, log)
        log.raise_if_errors(f"cannot register {source or name}")
        if not dataset.images:
            raise DataError(f"{source or name}: no annotated images; nothing to register.")
        dataset = dataset.sorted()
        _check_image_names(dataset, source)
        hashes = _hash_images(dataset.images)
        digest = dataset_digest(dataset, hashes)
        existing = self._find(name, digest)
        if existing is not None:
            return existing

        summary = log.summary()
        repairs = {key: summary[key] for key in ("clipped_boxes", "dropped_boxes", "skipped_images")}
        try:
            return self._create(dataset, name, digest, hashes, source, repairs)
        except OSError as error:
            raise DataError(
                f"cannot write dataset '{name}' to the store {self.url}: {error.strerror or error}; "
                "check free space and permissions (nothing was published)."
            ) from None

    def _create(
        self,
        dataset: Dataset,
        name: str,
        digest: str,
        hashes: dict[str, str],
        source: str,
        repairs: dict[str, int],
    ) -> DatasetVersion:
        """Stage a copy, then publish it under the lock; a concurrent twin returns the winner's version."""
        if self.local:
            staging_parent = Path(self.root) / name
            staging_parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=staging_parent))
        else:
            staging = Path(tempfile.mkdtemp(prefix="visionautoml-version-"))
        staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the published version private
        try:
            _stage(dataset, hashes, staging)
            with self._lock(name):
                existing = self._find(name, digest)
                if existing is not None:
                    return existing
                version = self._next_version(name)
                info = {
                    "name": name,
                    "version": version,
                    "digest": digest,
                    "classes": list(dataset.classes),
                    "image_count": len(dataset.images),
                    "box_count": dataset.box_count,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "source": source,
                    "repairs": repairs,
                }
                (staging / VERSION_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
                self._publish(staging, name, version)
            return self._load(name, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def get(self, name: str, version: int | None = None) -> DatasetVersion:
        """The given version of ``name``, or its latest."""
        _check_name(name)
        versions = self._versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise DataError(
                f"no dataset '{name}' in the store {self.url} (registered: {known}); "
                f"register it with `visionautoml data register PATH --name {name}`."
            )
        chosen = max(versions) if version is None else version
        if chosen not in versions:
            raise DataError(
                f"dataset '{name}' has no version {chosen} in {self.url}; it has "
                f"{', '.join(str(v) for v in sorted(versions))}."
            )
        return self._load(name, chosen)

    def list(self, name: str | None = None) -> list[DatasetVersion]:
        """Every version (of ``name``, or of every dataset), by name then version."""
        names = [name] if name is not None else self.names()
        return [self._load(each, version) for each in names for version in sorted(self._versions(each))]

    def names(self) -> list[str]:
        if not self.fs.isdir(self.root):
            return []
        entries = self.fs.ls(self.root, detail=False)
        return sorted(
            base
            for entry in entries
            if _NAME.fullmatch(base := PurePosixPath(entry).name) and self._versions(base)
        )

    def _versions(self, name: str) -> list[int]:
        """Published versions: a numbered folder counts once its ``version.json`` exists."""
        found = self.fs.glob(f"{self.root}/{name}/*/{VERSION_FILE}")
        numbers = (PurePosixPath(path).parent.name for path in found)
        return [int(number) for number in numbers if number.isdigit()]

    def _next_version(self, name: str) -> int:
        """One past every numbered folder, published or not: an interrupted upload keeps its number."""
        folder = f"{self.root}/{name}"
        entries = self.fs.ls(folder, detail=False) if self.fs.isdir(folder) else []
        numbers = [int(base) for entry in entries if (base := PurePosixPath(entry).name).isdigit()]
        return max(numbers, default=0) + 1

    def _load(self, name: str, version: int) -> DatasetVersion:
        folder = f"{self.root}/{name}/{version}"
        try:
            info: dict[str, Any] = json.loads(self.fs.cat_file(f"{folder}/{VERSION_FILE}"))
            return DatasetVersion(
                name=name,
                version=version,
                path=folder if self.local else f"{self.url.rstrip('/')}/{name}/{version}",
                digest=info["digest"],
                classes=list(info["classes"]),
                image_count=int(info["image_count"]),
                box_count=int(info["box_count"]),
                created=str(info.get("created", "")),
                source=str(info.get("source", "")),
                repairs={str(key): int(value) for key, value in dict(info.get("repairs") or {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DataError(
                f"{folder}/{VERSION_FILE}: unreadable version record ({error}); the store was edited by "
                "hand. Restore the file or delete the version folder."
            ) from None

    def _find(self, name: str, digest: str) -> DatasetVersion | None:
        for version in sorted(self._versions(name)):
            record = self._load(name, version)
            if record.digest == digest:
                return DatasetVersion(**{**asdict(record), "reused": True})
        return None

    def _publish(self, staging: Path, name: str, version: int) -> None:
        target = f"{self.root}/{name}/{version}"
        if self.local:
            # rename() of a folder is atomic and fails on a non-empty target: never half a version.
            os.rename(staging, target)
            return
        files = sorted(path for path in staging.rglob("*") if path.is_file() and path.name != VERSION_FILE)
        for path in files:
            self.fs.put_file(str(path), f"{target}/{path.relative_to(staging).as_posix()}")
        self.fs.put_file(str(staging / VERSION_FILE), f"{target}/{VERSION_FILE}")

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        lock_path = f"{self.root}/{name}/.lock"
        if self.local:
            Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        deadline = time.monotonic() + _REMOTE_LOCK_WAIT_S
        while True:
            try:
                with self.fs.open(lock_path, "xb") as handle:
                    handle.write(f"{os.getpid()} {datetime.now(UTC).isoformat()}".encode())
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise DataError(
                        f"{self.fs.unstrip_protocol(lock_path)}: another register of '{name}' has held this "
                        "lock for 10 minutes; if none is running, delete the lock file and retry."
                    ) from None
                time.sleep(0.5)
        try:
            yield
        finally:
            self.fs.rm_file(lock_path)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise DataError(
            f"dataset name '{name}' is not allowed; use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit), e.g. raccoon-train."
        )


def _check_image_names(dataset: Dataset, source: str) -> None:
    seen: set[str] = set()
    for image in dataset.images:
        parts = PurePosixPath(image.name).parts
        if not parts or image.name.startswith("/") or ".." in parts:
            raise DataError(f"{image.source or source}: image name '{image.name}' must be a relative path.")
        if image.name in seen:
            raise DataError(
                f"{image.source or source}: image '{image.name}' appears twice; merge its annotations into "
                "one record so the version has one entry per image."
            )
        seen.add(image.name)


def _progress() -> Progress:
    return progress_bar(eta=True)


def _hash_images(images: list[ImageRecord]) -> dict[str, str]:
    hashes = {}
    with _progress() as progress:
        for image in progress.track(images, description="hash images"):
            hashes[image.name] = image_sha256(image.path)
    return hashes


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stage(dataset: Dataset, hashes: dict[str, str], staging: Path) -> None:
    """Copy the images and write the JSONL, checking each copy against the hash the digest used.

    A copy gets the original's permissions less the umask: registering must not make a
    file other users could not read readable to them.
    """
    umask = _umask()
    with _progress() as progress:
        for image in progress.track(dataset.images, description="copy images"):
            target = staging / IMAGES_DIR / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with image.path.open("rb") as source:
                mode = os.fstat(source.fileno()).st_mode & 0o666 & ~umask
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                with os.fdopen(descriptor, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            if digest.hexdigest() != hashes[image.name]:
                raise DataError(
                    f"{image.path}: the image changed while it was being registered; register again."
                )
    stored = Dataset(
        [
            ImageRecord(image.name, staging / IMAGES_DIR / image.name, image.width, image.height, image.boxes)
            for image in dataset.images
        ],
        list(dataset.classes),
    )
    # The images already sit in staging/images, so the writer's relative URLs are images/NAME.
    write_dataset(stored, staging, "jsonl", file_name=ANNOTATIONS_FILE)

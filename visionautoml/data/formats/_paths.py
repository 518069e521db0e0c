"""Where the paths in a dataset may lead: inside its root, and a writer's output inside its folder.

A path written in an annotation (``../../etc/shadow``, ``/root/.bashrc``, a datastore URL
with ``..``) or a symbolic link in a dataset must not make a command read, copy or upload
a file from outside the dataset, and an image name from data must not make a writer write
outside ``--out``. Listing keeps to ``os.scandir``'s directory entries, which say whether
a name is a link without another system call: the usual dataset without links pays nothing.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from visionautoml.errors import DataError
from visionautoml.files import atomic_path


class PathRefused(Exception):
    """A path from data that names no usable file: outside the root, missing, or unusable."""


class DataRoot:
    """The folder every path that comes from a dataset's files must stay inside.

    A path written in an annotation (``../../etc/shadow``, ``/root/.bashrc``, a datastore
    URL with ``..``) or a symbolic link in the dataset must not make a command read, copy
    or upload a file from outside the dataset. Checked lexically first, then on the real
    path (symbolic links resolved), with each folder's real path computed once.
    """

    def __init__(self, folder: str | Path, what: str = "the dataset folder") -> None:
        self.what = what
        self.folder = os.path.abspath(folder)
        self.real = os.path.realpath(self.folder)
        self._real_folders: dict[str, str] = {}

    def __str__(self) -> str:
        return self.folder

    def contains_real(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip(os.sep) + os.sep)

    def _lexically_inside(self, path: str) -> bool:
        return any(
            path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in (self.folder, self.real)
        )

    def file(self, reference: str, base: str | Path | None = None) -> Path:
        """The regular file ``reference`` names (relative to ``base``, default the root), or PathRefused."""
        if "\0" in reference:
            raise PathRefused(f"{reference!r} holds a NUL character, which no file name can")
        path = os.path.normpath(os.path.join(base if base is not None else self.folder, reference))
        if not self._lexically_inside(path):
            how = "is an absolute path outside" if os.path.isabs(reference) else "leaves"
            raise PathRefused(
                f"{reference!r} {how} {self.what} {self.folder}; images must be inside {self.what} "
                "(give the image root explicitly if you trust this file)"
            )
        folder = os.path.dirname(path)
        real_folder = self._real_folders.get(folder)
        try:
            if real_folder is None:
                real_folder = self._real_folders[folder] = os.path.realpath(folder)
            if not self.contains_real(real_folder):
                raise PathRefused(
                    f"{reference!r}: its folder is a symbolic link to {real_folder}, outside {self}"
                )
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(path)
                if not self.contains_real(target):
                    raise PathRefused(f"{reference!r} is a symbolic link to {target}, outside {self}")
                mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise PathRefused(f"image not found: {path}") from None
        except OSError as error:
            raise PathRefused(f"cannot use the path {reference!r}: {error.strerror or error}") from None
        if not stat.S_ISREG(mode):
            raise PathRefused(f"image not found: {path} is not a regular file")
        return Path(path)


def _scan(folder: str | Path, root: DataRoot | None) -> tuple[list[str], list[str], dict[str, str]]:
    """(files, folders, links leaving ``root`` with their targets) of one folder; hidden entries skipped.

    ``os.scandir`` knows from the directory entry whether a name is a link, so the usual
    link-free dataset costs no extra system call; a link is resolved and must stay inside.
    """
    files: list[str] = []
    folders: list[str] = []
    outside: dict[str, str] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return files, folders, outside
    for entry in entries:
        name = entry.name
        if name[0] == ".":
            continue
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if root is not None and not root.contains_real(target):
                    outside[name] = target
                elif os.path.isdir(target):
                    folders.append(name)
                elif os.path.isfile(target):
                    files.append(name)
            elif entry.is_dir(follow_symlinks=False):
                folders.append(name)
            else:
                files.append(name)
        except OSError:
            continue
    return files, folders, outside


def list_files(root: Path, data_root: DataRoot | None = None) -> list[str]:
    """Every file under ``root`` as a relative POSIX path, sorted; hidden entries and links out are skipped.

    ``os.scandir`` rather than ``Path.rglob``: listing is on the hot path of converting
    tens of thousands of files.
    """
    return sorted(walk_files(root, data_root)[0])


def walk_files(root: Path, data_root: DataRoot | None = None) -> tuple[list[str], dict[str, str]]:
    """(relative names of every file under ``root``, links that leave ``data_root`` with their targets)."""
    found: list[str] = []
    outside: dict[str, str] = {}
    seen = {os.path.realpath(root)}
    pending = [("", str(root))]
    while pending:
        prefix, directory = pending.pop()
        files, folders, links = _scan(directory, data_root)
        found.extend(prefix + name for name in files)
        outside.update((prefix + name, target) for name, target in links.items())
        for name in folders:
            path = os.path.join(directory, name)
            real = os.path.realpath(path)
            if real not in seen:  # a link back up the tree must not loop forever
                seen.add(real)
                pending.append((f"{prefix}{name}/", path))
    return found, outside


def files_by_name(root: Path, data_root: DataRoot | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """(every file under ``root`` by relative POSIX name with its path, links leaving ``data_root``).

    Paths come from ``Path.iterdir``, which builds them without re-parsing: on a large
    dataset that is a good part of a reader's time.
    """
    found: dict[str, Path] = {}
    outside: dict[str, str] = {}
    seen = {os.path.realpath(root)}
    pending = [("", root)]
    while pending:
        prefix, folder = pending.pop()
        files, folders, links = _scan(folder, data_root)
        outside.update((prefix + name, target) for name, target in links.items())
        if not files and not folders:
            continue
        wanted = set(files)
        subfolders = set(folders)
        try:
            children = list(folder.iterdir())
        except OSError:
            continue
        for child in children:
            name = child.name
            if name in wanted:
                found[prefix + name] = child
            elif name in subfolders:
                real = os.path.realpath(child)
                if real not in seen:
                    seen.add(real)
                    pending.append((f"{prefix}{name}/", child))
    return found, outside


PROVENANCE_FILE = ".visionautoml-images.json"


def external_root(paths: Iterable[Path], out_dir: Path) -> tuple[str, ...]:
    """The folder holding every image, when it is not inside ``out_dir`` (else nothing to record)."""
    folders = {os.path.dirname(path) for path in paths}
    if not folders:
        return ()
    root = os.path.commonpath(sorted(folders))
    inside = root == str(out_dir) or root.startswith(str(out_dir).rstrip(os.sep) + os.sep)
    return () if inside else (root,)


def safe_relative(relative: str, out_dir: Path) -> str:
    """A writer's path, refused when it would land outside ``out_dir`` (an image name from data)."""
    parts = PurePosixPath(relative).parts
    if not parts or relative.startswith("/") or "\\" in relative or any(p in ("..", ".", "") for p in parts):
        raise DataError(
            f"refusing to write {relative!r}: it would land outside {out_dir}; the dataset names an image "
            "with '..' or an absolute path, fix its annotation"
        )
    return relative


def record_provenance(out_dir: Path, written: list[str], external: dict[str, str]) -> None:
    """Say, beside each annotation file just written, which image folder outside it the file may name.

    Readers keep paths inside the dataset's folder; a ``data convert`` output without copied
    images names the source's images by relative paths that leave it. The record binds that
    permission to the exact file written here (inode, size and modification time in ns),
    so the same record shipped inside someone else's dataset grants nothing.
    """
    by_folder: dict[str, dict[str, object]] = {}
    for relative in (key for key in written if key.endswith((".jsonl", ".json"))):
        folder, _, name = relative.rpartition("/")
        entries = by_folder.setdefault(folder, {})
        if relative in external:
            path = out_dir / relative
            info = path.stat()
            image_root = os.path.relpath(external[relative], path.parent)
            entries[name] = {"image_root": image_root, "file": [info.st_ino, info.st_size, info.st_mtime_ns]}
    for folder, entries in by_folder.items():
        record = out_dir / folder / PROVENANCE_FILE if folder else out_dir / PROVENANCE_FILE
        if not entries:
            record.unlink(missing_ok=True)
            continue
        with atomic_path(record) as temporary:
            temporary.write_text(
                json.dumps({"written_by": "visionautoml", "files": entries}, indent=1) + "\n"
            )


def trusted_image_root(annotation_file: Path) -> Path | None:
    """The image folder recorded for ``annotation_file`` when this tool wrote it, if the file is unchanged."""
    try:
        record = json.loads((annotation_file.parent / PROVENANCE_FILE).read_bytes())
        entry = record["files"][annotation_file.name]
        info = annotation_file.stat()
        if list(entry["file"]) != [info.st_ino, info.st_size, info.st_mtime_ns]:
            return None
        return Path(os.path.normpath(annotation_file.parent / str(entry["image_root"])))
    except (OSError, ValueError, KeyError, TypeError):
        return None

"""Unpacking an untrusted archive: every entry checked before a byte of it is written.

``data fetch`` brings archives from the network. An entry that would land outside the
target (``../x``, absolute paths), a link or device file, an archive that unpacks to far
more than it weighs (a decompression bomb), or one that is cut short (a truncated zip,
which is not a zip at all to ``zipfile`` and would otherwise be kept as a plain file) is
refused with a message saying what to do.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from rich.progress import (
    Progress,
)

from visionautoml.errors import FetchError
from visionautoml.progress import progress_bar

# Below this unpacked size a high compression ratio is harmless (a small text file of zeros).
RATIO_FLOOR = 16 * 2**20
CHUNK = 1 << 20
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def byte_progress() -> Progress:
    return progress_bar(transfer=True)


def describe(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def unpack(archive: Path, name: str, staging: Path, shown: str, max_size: int, max_ratio: float) -> str:
    """Unpack ``archive`` into the empty folder ``staging``; return what kind of source it was."""
    try:
        with archive.open("rb") as stream:
            head = stream.read(8)
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging, shown, max_size, max_ratio)
            return "zip"
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or name.lower().endswith(".zip"):
            raise FetchError(
                f"{shown}: a zip archive that is truncated or damaged (its table of contents is missing); "
                "download it again."
            )
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, staging, shown, max_size, max_ratio)
            return "tar"
        if name.lower().endswith(_TAR_SUFFIXES):
            raise FetchError(f"{shown}: a tar archive that is truncated or damaged; download it again.")
        _check_compressed_stream(archive, head, shown)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, NotImplementedError, RuntimeError) as error:
        raise FetchError(
            f"{shown}: the archive is truncated or damaged, or uses a feature not supported ({error}); "
            "re-create or re-download it."
        ) from None
    except OSError as error:
        raise FetchError(f"{shown}: cannot unpack: {describe(error)}") from None
    shutil.copyfile(archive, staging / name)
    return "file"


def _check_compressed_stream(archive: Path, head: bytes, shown: str) -> None:
    """A compressed single file (``x.json.gz``) is kept as it is, but only when it decompresses to the end."""
    opener = next((open_ for magic, open_ in _COMPRESSED.items() if head.startswith(magic)), None)
    if opener is None:
        return
    try:
        with opener(archive, "rb") as stream:
            while stream.read(CHUNK):
                pass
    except (EOFError, OSError, lzma.LZMAError) as error:
        raise FetchError(
            f"{shown}: the compressed file is truncated or damaged ({describe(error)}); download it again."
        ) from None


def _entry_path(name: str, shown: str) -> PurePosixPath | None:
    """The entry's path relative to the target, or a FetchError if it would land outside it."""
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or re.match(r"[A-Za-z]:", normalised):
        raise FetchError(
            f"{shown}: entry '{name}' has an absolute path; refusing to unpack an archive that writes "
            "outside the target folder. Re-create the archive with relative paths."
        )
    parts = [part for part in normalised.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise FetchError(
            f"{shown}: entry '{name}' escapes the target folder (contains '..'); refusing to unpack it. "
            "Re-create the archive with paths inside one folder."
        )
    return PurePosixPath(*parts) if parts else None


def _refuse_special(shown: str, name: str, what: str) -> FetchError:
    return FetchError(
        f"{shown}: entry '{name}' is {what}; refusing to unpack links and special files. "
        "Re-create the archive with regular files only."
    )


class _Budget:
    """Counts unpacked bytes as they are written, so a lying header cannot exceed the limits."""

    def __init__(self, shown: str, archive_size: int, max_size: int, max_ratio: float) -> None:
        self.shown, self.archive_size, self.max_size, self.max_ratio = (
            shown,
            archive_size,
            max_size,
            max_ratio,
        )
        self.total = 0

    def charge(self, count: int, declared: bool = False) -> None:
        self.total += count
        what = "declares" if declared else "unpacks to"
        if self.total > self.max_size:
            raise FetchError(
                f"{self.shown}: archive {what} more than {self.max_size:,} bytes (the --max-size limit); "
                "refusing it as a possible decompression bomb. Raise --max-size if you trust it."
            )
        ratio = self.total / max(self.archive_size, 1)
        if self.total > RATIO_FLOOR and ratio > self.max_ratio:
            raise FetchError(
                f"{self.shown}: archive {what} {self.total:,} bytes from {self.archive_size:,} "
                f"(ratio over {self.max_ratio:g}, the --max-ratio limit); refusing it as a possible "
                "decompression bomb. Raise --max-ratio if you trust it."
            )


def _copy_stream(
    source: IO[bytes], target: Path, limit: int | None, budget: _Budget, advance: Callable[[int], None]
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if limit is not None and written > limit:
                raise FetchError(f"{budget.shown}: entry '{target.name}' is larger than its header says.")
            budget.charge(len(chunk))
            out.write(chunk)
            advance(len(chunk))


def _extract_zip(archive: Path, staging: Path, shown: str, max_size: int, max_ratio: float) -> None:
    with zipfile.ZipFile(archive) as bundle:
        entries = bundle.infolist()
        declared = _Budget(shown, archive.stat().st_size, max_size, max_ratio)
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        for info in entries:
            relative = _entry_path(info.filename, shown)
            file_type = stat.S_IFMT(info.external_attr >> 16)
            if file_type == stat.S_IFLNK:
                raise _refuse_special(shown, info.filename, "a symbolic link")
            if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse_special(shown, info.filename, "a device, pipe or socket")
            if info.flag_bits & 0x1:
                raise FetchError(
                    f"{shown}: entry '{info.filename}' is encrypted; unpack the archive yourself."
                )
            declared.charge(info.file_size, declared=True)
            if relative is not None:
                plan.append((info, relative))
        budget = _Budget(shown, archive.stat().st_size, max_size, max_ratio)
        with byte_progress() as progress:
            task = progress.add_task(f"unpack {archive.name}", total=declared.total)
            for info, relative in plan:
                if info.is_dir():
                    (staging / relative).mkdir(parents=True, exist_ok=True)
                    continue
                with bundle.open(info) as stream:
                    _copy_stream(
                        stream,
                        staging / relative,
                        info.file_size,
                        budget,
                        lambda n: progress.advance(task, n),
                    )


def _extract_tar(archive: Path, staging: Path, shown: str, max_size: int, max_ratio: float) -> None:
    """Stream the members in one pass: listing a compressed tar first would decompress a bomb twice."""
    budget = _Budget(shown, archive.stat().st_size, max_size, max_ratio)
    with tarfile.open(archive, "r:*") as bundle, byte_progress() as progress:
        task = progress.add_task(f"unpack {archive.name}", total=None)
        for member in bundle:
            relative = _entry_path(member.name, shown)
            if member.issym():
                raise _refuse_special(shown, member.name, "a symbolic link")
            if member.islnk():
                raise _refuse_special(shown, member.name, "a hard link")
            if member.isdir():
                if relative is not None:
                    (staging / relative).mkdir(parents=True, exist_ok=True)
                continue
            if not member.isfile():
                raise _refuse_special(shown, member.name, "a device, pipe or socket")
            if relative is None:
                continue
            stream = bundle.extractfile(member)
            if stream is None:
                raise _refuse_special(shown, member.name, "not a regular file")
            with stream:
                _copy_stream(
                    stream, staging / relative, member.size, budget, lambda n: progress.advance(task, n)
                )

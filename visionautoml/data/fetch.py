"""Bring a labelled dataset (URL, ``file://`` URL, local archive or folder) into a folder, safely.

The original flow downloaded a zip and called ``extractall``: one hostile or broken archive
could write outside the target (``../x``, absolute paths, links), fill the disk (a
decompression bomb) or leave a half-extracted folder behind. Here every archive entry is
checked before a byte of it is written, everything is unpacked into a temporary folder beside
the target that replaces it only when complete, and a marker file records what was fetched
so that fetching the same verified content again does nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import ssl
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from visionautoml.errors import FetchError
from visionautoml.files import atomic_path, sha256_file

MARKER = ".visionautoml-fetch.json"
DEFAULT_MAX_SIZE = 10 * 2**30
DEFAULT_MAX_RATIO = 200.0
# Below this unpacked size a high compression ratio is harmless (a small text file of zeros).
RATIO_FLOOR = 16 * 2**20
TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 30.0
CHUNK = 1 << 20

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2}
_SIZE_UNITS |= {"mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4}
_SIZE_UNITS |= {"tib": 1024**4}


class _Transient(Exception):
    """A failure worth retrying (server busy, connection dropped); never escapes this module."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def fetch(
    source: str,
    out_dir: str | Path,
    sha256: str | None = None,
    *,
    max_size: int = DEFAULT_MAX_SIZE,
    max_ratio: float = DEFAULT_MAX_RATIO,
    retries: int = 4,
    backoff_s: float = 0.5,
    timeout_s: float = 60.0,
    force: bool = False,
) -> Path:
    """Put the content of ``source`` into ``out_dir`` and return ``out_dir``.

    ``source`` is an http(s) or ``file://`` URL, a local zip / tar(.gz/.bz2/.xz) archive
    (unpacked), another local file (copied) or a folder (copied). ``sha256`` is checked
    before anything is unpacked. ``out_dir`` must be absent, empty or an earlier fetch's
    output, which is replaced whole; when it already holds the same verified content (same
    sha256) nothing is done unless ``force``.
    """
    out_dir = Path(out_dir)
    expected = _normalise_sha256(sha256)
    previous = read_marker(out_dir)
    _check_out_dir(out_dir, previous)
    if not force and expected and previous and previous.get("sha256") == expected:
        return out_dir

    kind, location = _classify(source)
    shown = redact(source)
    if kind == "folder":
        if expected:
            raise FetchError(
                f"{shown}: --sha256 applies to a downloaded file or an archive, not to a folder; "
                "drop --sha256 or fetch the archive instead."
            )
        _copy_folder_into(Path(location), out_dir, shown)
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{out_dir.name}.download-", dir=out_dir.parent)
    os.close(handle)
    download = Path(temporary)
    try:
        if kind == "url":
            digest = _download(location, download, shown, retries, backoff_s, timeout_s)
            archive, name = download, _url_file_name(location)
        else:
            archive, name = Path(location), Path(location).name
            digest = _sha256_of(archive, shown)
        if expected and digest != expected:
            raise FetchError(
                f"{shown}: sha256 is {digest}, expected {expected}. The file is corrupt or has changed; "
                "check the --sha256 value or the source, then fetch again."
            )
        if not force and previous and previous.get("sha256") == digest:
            return out_dir
        marker = {
            "source": shown,
            "sha256": digest,
            "fetched": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with atomic_path(out_dir, directory=True) as staging:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the data from other users
            marker["kind"] = _unpack(archive, name, staging, shown, max_size, max_ratio)
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    finally:
        download.unlink(missing_ok=True)
    return out_dir


def read_marker(out_dir: str | Path) -> dict[str, Any] | None:
    """What an earlier fetch put into ``out_dir`` (source, sha256, time), or None."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def redact(source: str) -> str:
    """The source without credentials or query string (SAS tokens live there), safe to print."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme not in ("http", "https"):
        return source
    query = "…" if parts.query else ""
    return urllib.parse.urlunsplit((parts.scheme, _host_and_port(parts), parts.path, query, ""))


def parse_size(text: str) -> int:
    """``10GiB``, ``500MB`` or a plain byte count, for the ``--max-size`` option."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and _SIZE_UNITS.get(match.group(2).lower())
    if not match or unit is None:
        raise FetchError(f"size '{text}' not understood; write e.g. 10GiB, 500MB or a number of bytes.")
    return int(float(match.group(1)) * unit)


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FetchError(f"--sha256 '{sha256}' is not a sha256 hex digest (64 characters 0-9a-f).")
    return value


def _check_out_dir(out_dir: Path, previous: dict[str, Any] | None) -> None:
    """Refuse to replace a folder this module did not create: ``--out .`` must not wipe a project."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FetchError(f"{out_dir}: exists and is not a folder; choose another --out.")
    if out_dir.is_dir() and previous is None and any(out_dir.iterdir()):
        raise FetchError(
            f"{out_dir}: folder exists, is not empty and was not written by `data fetch`; "
            "choose a new --out folder (it is created) or empty this one."
        )


def _classify(source: str) -> tuple[str, str]:
    """('url' | 'file' | 'folder', location)."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme in ("http", "https"):
        if not parts.hostname:
            raise FetchError(f"{redact(source)}: URL has no host name.")
        return "url", source
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(
                f"{source}: only local file:// URLs are supported (file:///path/to/archive.zip)."
            )
        source = urllib.request.url2pathname(parts.path)
    elif len(parts.scheme) > 1:
        raise FetchError(
            f"{source}: unsupported scheme '{parts.scheme}://'; use http(s)://, file:// or a local path."
        )
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.is_file():
        return "file", str(path)
    raise FetchError(f"{source}: no such file or folder; check the path.")


def _url_file_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return name if name and name not in (".", "..") else "download"


def _progress() -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def _request_for(url: str) -> urllib.request.Request:
    """Credentials in the URL become a Basic auth header, so they never travel in a log line.

    The header is "unredirected": a redirect to another host must not receive it.
    """
    parts = urllib.parse.urlsplit(url)
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=_host_and_port(parts))),
        headers={"User-Agent": "visionautoml-fetch"},
    )
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _host_and_port(parts: urllib.parse.SplitResult) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _download(url: str, target: Path, shown: str, retries: int, backoff_s: float, timeout_s: float) -> str:
    """Download with bounded exponential backoff on transient failures; return the sha256."""
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            return _download_once(url, target, shown, timeout_s)
        except _Transient as error:
            if attempt + 1 == attempts:
                raise FetchError(
                    f"{shown}: {error} (gave up after {attempts} attempts); check that the server is up "
                    "and the URL is right, then fetch again."
                ) from None
            delay = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            if error.retry_after is not None:
                delay = max(delay, min(error.retry_after, MAX_BACKOFF_S))
            time.sleep(delay)
    raise AssertionError("unreachable")


def _download_once(url: str, target: Path, shown: str, timeout_s: float) -> str:
    digest = hashlib.sha256()
    received = 0
    try:
        with urllib.request.urlopen(_request_for(url), timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with target.open("wb") as out, _progress() as progress:
                task = progress.add_task(f"fetch {_url_file_name(url)}", total=expected)
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    progress.update(task, advance=len(chunk))
    except urllib.error.HTTPError as error:
        if error.code in TRANSIENT_HTTP_STATUS:
            retry_after = error.headers.get("Retry-After", "") if error.headers else ""
            raise _Transient(
                f"HTTP {error.code} {error.reason}", float(retry_after) if retry_after.isdigit() else None
            ) from None
        raise FetchError(
            f"{shown}: HTTP {error.code} {error.reason}; check the URL and your access to it."
        ) from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, (TimeoutError, ConnectionError, OSError)) and not _is_tls_error(reason):
            raise _Transient(f"connection failed: {_describe(reason)}") from None
        raise FetchError(f"{shown}: cannot connect: {_describe(reason)}") from None
    except (TimeoutError, ConnectionError, HTTPException) as error:
        raise _Transient(f"connection failed: {_describe(error)}") from None
    if expected is not None and received != expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")
    return digest.hexdigest()


def _is_tls_error(error: object) -> bool:
    return isinstance(error, ssl.SSLError)


def _describe(error: object) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _sha256_of(path: Path, shown: str) -> str:
    try:
        return sha256_file(path, CHUNK)
    except OSError as error:
        raise FetchError(f"{shown}: cannot read: {_describe(error)}") from None


def _unpack(archive: Path, name: str, staging: Path, shown: str, max_size: int, max_ratio: float) -> str:
    """Unpack ``archive`` into the empty folder ``staging``; return what kind of source it was."""
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging, shown, max_size, max_ratio)
            return "zip"
        if tarfile.is_tarfile(archive):
            _extract_tar(archive, staging, shown, max_size, max_ratio)
            return "tar"
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, NotImplementedError, RuntimeError) as error:
        raise FetchError(
            f"{shown}: damaged or unsupported archive: {error}; re-create or re-download it."
        ) from None
    except OSError as error:
        raise FetchError(f"{shown}: cannot unpack: {_describe(error)}") from None
    shutil.copyfile(archive, staging / name)
    return "file"


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
        with _progress() as progress:
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
    with tarfile.open(archive, "r:*") as bundle, _progress() as progress:
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


def _copy_folder_into(folder: Path, out_dir: Path, shown: str) -> None:
    """Copy a local folder, refusing links and special files like an archive would be refused."""
    folder_resolved, out_resolved = folder.resolve(), out_dir.resolve()
    if out_resolved == folder_resolved or folder_resolved in out_resolved.parents:
        raise FetchError(f"{shown}: --out {out_dir} is inside the source folder; choose a folder outside it.")
    marker = {"source": str(folder_resolved), "sha256": None, "kind": "folder"}
    marker["fetched"] = datetime.now(UTC).isoformat(timespec="seconds")
    with atomic_path(out_dir, directory=True) as staging:
        staging.chmod(0o755)
        for source, relative in _walk_regular_files(folder, shown):
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, target)
            except OSError as error:
                raise FetchError(f"{source}: cannot copy: {_describe(error)}") from None
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _walk_regular_files(folder: Path, shown: str) -> Iterator[tuple[Path, PurePosixPath]]:
    pending = [(folder, PurePosixPath())]
    while pending:
        directory, relative = pending.pop()
        with os.scandir(directory) as entries:
            for entry in sorted(entries, key=lambda item: item.name):
                if entry.name == MARKER and not relative.parts:
                    continue
                name = relative / entry.name
                if entry.is_symlink():
                    raise FetchError(
                        f"{shown}: '{name}' is a symbolic link; refusing to copy links. "
                        "Replace it with the real file."
                    )
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), name))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path), name
                else:
                    raise FetchError(f"{shown}: '{name}' is a device, pipe or socket; refusing to copy it.")

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
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

from visionautoml.data.archives import byte_progress, describe, unpack
from visionautoml.errors import FetchError
from visionautoml.files import atomic_path, sha256_file
from visionautoml.redact import public_url

MARKER = ".visionautoml-fetch.json"
DEFAULT_MAX_SIZE = 10 * 2**30
DEFAULT_MAX_RATIO = 200.0
TRANSIENT_HTTP_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 30.0
DEFAULT_TIMEOUT_S = 30.0
CHUNK = 1 << 20
_BYTE_SIZE = TypeAdapter(ByteSize)


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
    timeout: float = DEFAULT_TIMEOUT_S,
    force: bool = False,
) -> Path:
    """Put the content of ``source`` into ``out_dir`` and return ``out_dir``.

    ``source`` is an http(s) or ``file://`` URL, a local zip / tar(.gz/.bz2/.xz) archive
    (unpacked), another local file (copied) or a folder (copied). ``sha256`` is checked
    before anything is unpacked. ``out_dir`` must be absent, empty or an earlier fetch's
    output, which is replaced whole; when it already holds the same verified content (same
    sha256) nothing is done unless ``force``.

    ``timeout`` is how many seconds to wait for the server, to connect, to answer and for
    each next piece of data. A server that does not answer at all within it fails the fetch
    at once (waiting out every retry would hold a CI job for minutes); one that stalls in
    the middle of a download is retried like a dropped connection. An archive that does not
    unpack completely (a truncated zip) is an error, never kept as a plain file.
    """
    if not timeout > 0:
        raise FetchError(f"timeout must be a positive number of seconds, not {timeout!r}")
    out_dir = Path(out_dir)
    expected = _normalise_sha256(sha256)
    previous = read_marker(out_dir)
    _check_out_dir(out_dir, previous)
    if not force and expected and previous and previous.get("sha256") == expected:
        return out_dir

    kind, location = _classify(source)
    shown = public_url(source)
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
            digest = _download(location, download, shown, retries, backoff_s, timeout)
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
            marker["kind"] = unpack(archive, name, staging, shown, max_size, max_ratio)
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


def parse_size(text: str) -> int:
    """``10GiB``, ``500MB`` or a plain byte count, for the ``--max-size`` option (pydantic's ByteSize)."""
    try:
        return int(_BYTE_SIZE.validate_python(text.strip()))
    except ValidationError:
        raise FetchError(
            f"size '{text}' not understood; write e.g. 10GiB, 500MB or a number of bytes."
        ) from None


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
            raise FetchError(f"{public_url(source)}: URL has no host name.")
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


def _download(url: str, target: Path, shown: str, retries: int, backoff_s: float, timeout: float) -> str:
    """Download with bounded exponential backoff on transient failures; return the sha256."""
    attempts = retries + 1
    for attempt in range(attempts):
        try:
            return _download_once(url, target, shown, timeout)
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


def _download_once(url: str, target: Path, shown: str, timeout: float) -> str:
    digest = hashlib.sha256()
    received = 0
    answered = False
    try:
        with urllib.request.urlopen(_request_for(url), timeout=timeout) as response:
            answered = True
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with target.open("wb") as out, byte_progress() as progress:
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
        if isinstance(reason, TimeoutError):
            raise _no_answer(shown, timeout) from None
        if isinstance(reason, (ConnectionError, OSError)) and not _is_tls_error(reason):
            raise _Transient(f"connection failed: {describe(reason)}") from None
        raise FetchError(f"{shown}: cannot connect: {describe(reason)}") from None
    except TimeoutError:
        if not answered:
            raise _no_answer(shown, timeout) from None
        raise _Transient(f"the server sent nothing for {timeout:g} s") from None
    except (ConnectionError, HTTPException) as error:
        raise _Transient(f"connection failed: {describe(error)}") from None
    if expected is not None and received != expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")
    return digest.hexdigest()


def _no_answer(shown: str, timeout: float) -> FetchError:
    return FetchError(
        f"{shown}: no answer from the server within {timeout:g} s; check the URL and that the server is "
        "up, or allow longer with --timeout SECONDS."
    )


def _is_tls_error(error: object) -> bool:
    return isinstance(error, ssl.SSLError)


def _sha256_of(path: Path, shown: str) -> str:
    try:
        return sha256_file(path, CHUNK)
    except OSError as error:
        raise FetchError(f"{shown}: cannot read: {describe(error)}") from None


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
                raise FetchError(f"{source}: cannot copy: {describe(error)}") from None
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

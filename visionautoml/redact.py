"""Keeping secrets out of everything this process writes: one registry of values, one set of rules.

A credential reaches the process as a resolved ``${secret:...}`` reference, as a CI secret
variable mapped straight into a well-known environment variable, or inside a URL
(``https://user:password@host``, a SAS token in a query string). Once known, a value is
masked in the console, in log records (every handler, files included), in exception text and
in the files we write, because a token that reaches a CI log is public for as long as the log
is kept. Every layer redacts through here, so a new leak path needs one fix, not three.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from visionautoml.files import atomic_write_text

MASK = "***"
# Credentials that reach us through the environment without a ${secret:...} reference (a CI job
# maps its secret variables straight to them); they are masked all the same.
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "VAULT_TOKEN",
    "BAO_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_CLIENT_SECRET",
    "GITHUB_TOKEN",
    "RAY_AUTH_TOKEN",
)
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")

_secret_values: set[str] = set()


# --- URLs -------------------------------------------------------------------------------------


def strip_userinfo(uri: str) -> str:
    """The URI as shown to people: any ``user:password@`` part removed."""
    return _URL_USERINFO.sub(r"\1", uri)


def public_url(url: str) -> str:
    """An http(s) URL without user info or query string (SAS tokens live there), safe to print."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return strip_userinfo(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "…" if parts.query else "", ""))


def scrub(text: str) -> str:
    """Text a library produced (an error echoing a request), without URL user info or known credentials."""
    text = _URL_USERINFO.sub(rf"\1{MASK}@", text)
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, MASK)
    return mask(text)


# --- the registry of secret values -------------------------------------------------------------


def register_secret(value: str) -> None:
    """Mask ``value`` (and its URL- and JSON-escaped forms) in everything written from now on.

    Under GitHub Actions or Azure Pipelines the runner is told too, so its own log masks the
    value even in output of processes that are not ours.
    """
    if not value or value in _secret_values:
        return
    variants = {value, quote(value, safe=""), value.encode("unicode_escape").decode("ascii")}
    _secret_values.update(variant for variant in variants if variant)
    lines = [line for line in value.splitlines() if line.strip()]
    real_stdout = sys.__stdout__
    if real_stdout is None:
        return
    if os.environ.get("GITHUB_ACTIONS") == "true":
        real_stdout.writelines(f"::add-mask::{line}\n" for line in lines)
    if os.environ.get("TF_BUILD", "").lower() == "true":
        real_stdout.writelines(f"##vso[task.setsecret]{line}\n" for line in lines)
    real_stdout.flush()


def register_environment_credentials() -> None:
    """Mask the credentials that CI maps straight into well-known environment variables."""
    for name in CREDENTIAL_VARIABLES:
        register_secret(os.environ.get(name, ""))


def mask(text: str) -> str:
    """``text`` with every registered secret replaced by ``***`` (longest first, so no prefix leaks)."""
    if not _secret_values or not text:
        return text
    for value in sorted(_secret_values, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def mask_values(raw: Any) -> Any:
    """A copy of a mapping with every string masked (a secret embedded in a URL included)."""
    if isinstance(raw, dict):
        return {key: mask_values(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [mask_values(value) for value in raw]
    return mask(raw) if isinstance(raw, str) else raw


def contains_secret(text: str) -> bool:
    return any(value in text for value in _secret_values)


def write_masked_text(path: str | Path, text: str) -> Path:
    """Write a file we produce (a summary, a report) atomically, with secrets masked."""
    return atomic_write_text(path, mask(text))


# --- masking what the process prints ----------------------------------------------------------


def _mask_rendered(text: str) -> str:
    """Mask console output, where colour codes may sit inside a secret (rich highlights digits)."""
    masked = mask(text)
    if "\x1b" in masked:
        plain = _ANSI_ESCAPE.sub("", masked)
        if contains_secret(plain):
            return mask(plain)
    return masked


class MaskingStream(io.TextIOBase):
    """A text stream that masks what passes through, for ``sys.stdout``/``sys.stderr``.

    It has no ``buffer``: writers that look for the binary buffer (click) then fall back to
    the text interface instead of going around the mask.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_mask_rendered(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self._stream, name)


def _masking_record_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """Mask each log record as it is created, so every handler (files included) sees it masked."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not _secret_values:
            return record
        try:
            message = record.getMessage()
        except Exception:
            return record
        record.msg, record.args = mask(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = mask("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return record

    factory.masks_secrets = True  # type: ignore[attr-defined]
    return factory


def _mask_exception(error: BaseException) -> None:
    """Mask the text of an exception and of its causes, which are printed after the block has ended."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        with suppress(Exception):
            current.args = tuple(mask(arg) if isinstance(arg, str) else arg for arg in current.args)
        current = current.__cause__ or current.__context__


@contextmanager
def masked_output() -> Iterator[None]:
    """Mask registered secrets in ``sys.stdout``, ``sys.stderr`` and every log record inside the block.

    Rich consoles created without an explicit file look ``sys.stdout`` up at each write, so
    progress bars and tables go through the mask too. An exception leaving the block has its
    text masked, as it is printed after the streams are restored. Re-entrant.
    """
    previous_factory = logging.getLogRecordFactory()
    if getattr(previous_factory, "masks_secrets", False):
        yield
        return
    previous_stdout, previous_stderr = sys.stdout, sys.stderr
    logging.setLogRecordFactory(_masking_record_factory(previous_factory))
    sys.stdout, sys.stderr = MaskingStream(previous_stdout), MaskingStream(previous_stderr)
    try:
        yield
    except BaseException as error:
        _mask_exception(error)
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, MaskingStream):
                stream.flush()
        sys.stdout, sys.stderr = previous_stdout, previous_stderr
        logging.setLogRecordFactory(previous_factory)

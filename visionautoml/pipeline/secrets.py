"""Secrets in configs: ``${secret:NAME}`` references, the providers that resolve them, and masking.

A CI job receives credentials as secret variables (the environment), as mounted files or
from a vault; the config only names them, so it can be committed. Once a value is resolved
it is masked in everything this process writes (log records, the console, exception text,
files we write), because a token that reaches a CI log is public for as long as the log is
kept. Secrets are never taken from the command line: every user of the machine can read a
process's arguments.

Reference forms:

- ``${secret:NAME}``: the environment variable NAME, else the file NAME in
  ``$VISIONAUTOML_SECRETS_DIR`` (default ``/run/secrets``, where Docker and Kubernetes mount them);
- ``${secret:vault://MOUNT/PATH#KEY}``: KEY of the KV v2 secret PATH under MOUNT in HashiCorp
  Vault or OpenBao, at ``VAULT_ADDR`` (or ``BAO_ADDR``) with ``VAULT_TOKEN`` (or ``BAO_TOKEN``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from visionautoml.config import JobConfig, load_config, parse_config
from visionautoml.errors import ConfigError
from visionautoml.files import atomic_write_text

REFERENCE = re.compile(r"\$\{secret:([^}]*)\}")
MASK = "***"
SECRETS_DIR_VARIABLE = "VISIONAUTOML_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"
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
)
# Fields that must hold a reference, never a literal: a literal password would sit in the repository.
REFERENCE_ONLY_FIELDS = ("tracking.password", "tracking.token")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


# --- masking ----------------------------------------------------------------------------------

_secret_values: set[str] = set()


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
    """A copy of a config mapping with every string masked (a secret embedded in a URL included)."""
    if isinstance(raw, dict):
        return {key: mask_values(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [mask_values(value) for value in raw]
    return mask(raw) if isinstance(raw, str) else raw


def contains_secret(text: str) -> bool:
    return any(value in text for value in _secret_values)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _mask_rendered(text: str) -> str:
    """Mask console output, where colour codes may sit inside a secret (rich highlights digits)."""
    masked = mask(text)
    if "\x1b" in masked:
        plain = _ANSI_ESCAPE.sub("", masked)
        if contains_secret(plain):
            return mask(plain)
    return masked


def write_masked_text(path: str | Path, text: str) -> Path:
    """Write a file we produce (a summary, a report) atomically, with secrets masked."""
    return atomic_write_text(path, mask(text))


class _MaskingStream(io.TextIOBase):
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
    sys.stdout, sys.stderr = _MaskingStream(previous_stdout), _MaskingStream(previous_stderr)
    try:
        yield
    except BaseException as error:
        _mask_exception(error)
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _MaskingStream):
                stream.flush()
        sys.stdout, sys.stderr = previous_stdout, previous_stderr
        logging.setLogRecordFactory(previous_factory)


# --- providers --------------------------------------------------------------------------------


def _secrets_dir() -> Path:
    return Path(os.environ.get(SECRETS_DIR_VARIABLE) or DEFAULT_SECRETS_DIR)


def _from_environment(name: str) -> str | None:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"'{name}' is not a valid secret name (letters, digits, _ . -)")
    value = os.environ.get(name)
    if value == "":
        raise ConfigError(
            f"environment variable {name} is set but empty (an unset CI secret maps to an empty string)"
        )
    return value


def _from_file(name: str) -> str | None:
    """A mounted secret file; one trailing newline (``echo VALUE > file``) is not part of the value."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"'{name}' is not a valid secret name (letters, digits, _ . -)")
    path = _secrets_dir() / name
    try:
        value = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"secret file {path} cannot be read: {error.strerror or error}") from None
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"secret file {path} is empty")
    return value


def _vault_setting(*names: str) -> str | None:
    return next((os.environ[name] for name in names if os.environ.get(name)), None)


def _from_vault(reference: str) -> str | None:
    """KEY of the KV v2 secret MOUNT/PATH, read with the token from the environment."""
    location, _, key = reference.removeprefix("vault://").partition("#")
    mount, _, path = location.partition("/")
    if not (mount and path and key):
        raise ConfigError(
            f"'{reference}' is not of the form vault://MOUNT/PATH#KEY (e.g. vault://secret/ci#token)"
        )
    address = _vault_setting("VAULT_ADDR", "BAO_ADDR")
    token = _vault_setting("VAULT_TOKEN", "BAO_TOKEN")
    if not address or not token:
        raise ConfigError(
            "vault:// secrets need the server address and a token in the environment: "
            "set VAULT_ADDR and VAULT_TOKEN (or BAO_ADDR and BAO_TOKEN)"
        )
    try:
        import hvac
        import hvac.exceptions
        import requests
    except ImportError:
        raise ConfigError(
            "vault:// secrets need the hvac package: pip install 'visionautoml[vault]'"
        ) from None
    client = hvac.Client(
        url=address,
        token=token,
        namespace=_vault_setting("VAULT_NAMESPACE", "BAO_NAMESPACE"),
        verify=_vault_setting("VAULT_CACERT", "BAO_CACERT") or True,
        timeout=10,
    )
    where = f"vault {address}, secret {mount}/{path}"
    try:
        response = client.secrets.kv.v2.read_secret_version(
            path=path, mount_point=mount, raise_on_deleted_version=True
        )
    except hvac.exceptions.Forbidden:
        raise ConfigError(
            f"{where}: permission denied (403): the token in VAULT_TOKEN/BAO_TOKEN is invalid, "
            "expired or lacks a policy that reads this path"
        ) from None
    except hvac.exceptions.InvalidPath:
        return None
    except hvac.exceptions.VaultError as error:
        raise ConfigError(f"{where}: the server refused the read: {mask(str(error))}") from None
    except requests.RequestException as error:
        raise ConfigError(
            f"{where}: cannot reach the server ({type(error).__name__}): check VAULT_ADDR"
        ) from None
    data = response["data"]["data"] or {}
    if key not in data:
        known = ", ".join(sorted(data)) or "none"
        raise ConfigError(f"{where} has no key '{key}' (its keys: {known})")
    return str(data[key])


# Provider name -> (reference without its scheme -> value, or None when this provider lacks it).
PROVIDERS: dict[str, Callable[[str], str | None]] = {
    "env": _from_environment,
    "file": _from_file,
    "vault": _from_vault,
}


def providers_for(reference: str) -> list[str]:
    """Which providers a reference consults, in order."""
    return ["vault"] if reference.startswith("vault://") else ["env", "file"]


def _not_found(reference: str) -> str:
    if reference.startswith("vault://"):
        return "no such secret in the vault (check MOUNT/PATH)"
    return f"not in the environment and no file {reference} in {_secrets_dir()} (set {SECRETS_DIR_VARIABLE})"


# --- resolution -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretStatus:
    """Whether one reference resolves; never its value."""

    reference: str
    fields: tuple[str, ...]
    provider: str | None
    problem: str | None

    @property
    def resolved(self) -> bool:
        return self.problem is None


def _walk(raw: Any, location: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield from _walk(value, f"{location}.{key}" if location else str(key))
    elif isinstance(raw, list):
        for index, value in enumerate(raw):
            yield from _walk(value, f"{location}[{index}]")
    elif isinstance(raw, str):
        yield location, raw


def find_references(raw: Any) -> dict[str, list[str]]:
    """Each ``${secret:...}`` reference in a config mapping -> the fields that use it."""
    found: dict[str, list[str]] = {}
    for location, text in _walk(raw):
        for match in REFERENCE.finditer(text):
            found.setdefault(match.group(1).strip(), []).append(location)
    return found


def _resolve_one(reference: str) -> tuple[str | None, str | None, str | None]:
    """(value, provider, problem) for one reference."""
    for provider in providers_for(reference):
        try:
            value = PROVIDERS[provider](reference)
        except ConfigError as error:
            return None, provider, str(error)
        if value is not None:
            return value, provider, None
    return None, None, _not_found(reference)


def _resolve_references(raw: Any) -> tuple[list[SecretStatus], dict[str, str]]:
    statuses, values = [], {}
    for reference, fields in find_references(raw).items():
        value, provider, problem = _resolve_one(reference)
        if value is not None:
            register_secret(value)
            values[reference] = value
        statuses.append(SecretStatus(reference, tuple(fields), provider, problem))
    return statuses, values


def resolve_secret_values(references: list[str]) -> dict[str, str]:
    """Reference -> value for those of ``references`` that resolve (registered for masking)."""
    values = {}
    for reference in references:
        value, _, _ = _resolve_one(reference)
        if value is not None:
            register_secret(value)
            values[reference] = value
    return values


def check_secrets(raw: Any) -> list[SecretStatus]:
    """Try every reference in ``raw``; the values are registered for masking, never returned."""
    return _resolve_references(raw)[0]


def _check_reference_only_fields(raw: Any, source: str) -> None:
    for location, text in _walk(raw):
        if location in REFERENCE_ONLY_FIELDS and not REFERENCE.fullmatch(text.strip()):
            raise ConfigError(
                f"{source}: {location} holds a literal value; a credential must not be written in the "
                f"config. Write {location.split('.')[-1]}: ${{secret:NAME}} and provide NAME as a CI "
                "secret variable, a secret file or a vault:// reference"
            )


def resolve_secrets(
    raw: Any, *, source: str = "config", allowed_fields: tuple[str, ...] | None = None
) -> Any:
    """A copy of the config mapping ``raw`` with every reference replaced by its value.

    Every reference is tried before failing, so one error lists all that are missing.
    ``allowed_fields`` (dotted prefixes) limits where secrets may be used: fields that end up in
    MLflow params or tags must never carry one.
    """
    _check_reference_only_fields(raw, source)
    misplaced = [
        f"  ${{secret:{reference}}}: {field} may not hold a secret (it is recorded in MLflow); "
        f"secrets are allowed in {', '.join(allowed_fields)}"
        for reference, fields in find_references(raw).items()
        for field in fields
        if allowed_fields is not None and not field.startswith(allowed_fields)
    ]
    statuses, values = _resolve_references(raw) if not misplaced else ([], {})
    problems = misplaced + [
        f"  ${{secret:{status.reference}}} (used by {', '.join(status.fields)}): {mask(status.problem)}"
        for status in statuses
        if status.problem is not None
    ]
    if problems:
        hint = "`visionautoml secrets check CONFIG` shows every reference and where it was looked up."
        raise ConfigError("\n".join([f"{source}: secrets that cannot be used:", *problems, hint]))
    return _substitute(raw, values)


def _substitute(raw: Any, values: dict[str, str]) -> Any:
    if isinstance(raw, dict):
        return {key: _substitute(value, values) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_substitute(value, values) for value in raw]
    if isinstance(raw, str):
        return REFERENCE.sub(lambda match: values[match.group(1).strip()], raw)
    return raw


def load_config_with_secrets(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    allowed_fields: tuple[str, ...] | None = None,
) -> JobConfig:
    """Validate the config first (a typo fails before any vault round trip), then resolve its secrets."""
    job = load_config(path, overrides)
    raw = job.model_dump(mode="json", exclude_unset=True)
    return parse_config(
        resolve_secrets(raw, source=str(path), allowed_fields=allowed_fields), source=str(path)
    )


def check_config_secrets(path: str | Path) -> list[SecretStatus]:
    """Try the references of a config file, after validating it."""
    return check_secrets(load_config(path).model_dump(mode="json", exclude_unset=True))


# --- command-line arguments -------------------------------------------------------------------

_CREDENTIAL_OPTION = re.compile(
    r"--?(password|passwd|pass|token|secret|api[-_]?key|access[-_]?key|client[-_]?secret|credentials?)(=.*)?",
    re.IGNORECASE,
)
_CREDENTIAL_ASSIGNMENT = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(PASSWORD|PASSWD|TOKEN|SECRET|API_?KEY|ACCESS_?KEY)[A-Za-z0-9_]*=.+",
    re.IGNORECASE,
)
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
_TOKEN_SHAPE = re.compile(
    r"\b(ghp_|gho_|ghs_|ghu_|github_pat_|glpat-|hvs\.|hvb\.|xox[abp]-|AKIA[0-9A-Z]{16})"
)


def _looks_like_credential(argument: str) -> str | None:
    option = _CREDENTIAL_OPTION.fullmatch(argument)
    if option:
        return f"the option {argument.split('=')[0]} does not exist on purpose"
    if "${secret:" in argument:
        return "a ${secret:...} reference belongs in the config file"
    if _CREDENTIAL_ASSIGNMENT.fullmatch(argument):
        return f"{argument.split('=')[0]}=... looks like a credential"
    if _URL_WITH_PASSWORD.search(argument):
        return "a URL with a password in it"
    if _TOKEN_SHAPE.search(argument):
        return "it has the shape of an access token"
    for name in CREDENTIAL_VARIABLES:
        value = os.environ.get(name, "")
        if len(value) >= 4 and value in argument:
            return f"it contains the value of {name}"
    return None


def refuse_secret_arguments(arguments: list[str]) -> None:
    """Refuse a credential on the command line, where the process list shows it to every user.

    The message names the argument's position and why, never its text.
    """
    for position, argument in enumerate(arguments, start=1):
        reason = _looks_like_credential(argument)
        if reason:
            raise ConfigError(
                f"argument {position} looks like a secret ({reason}). Secrets are never passed on the "
                "command line, where any user of the machine can read them in the process list: put the "
                "value in an environment variable (a CI secret variable, e.g. MLFLOW_TRACKING_PASSWORD) "
                f"or a file in ${SECRETS_DIR_VARIABLE}, and write ${{secret:NAME}} in the config"
            )

"""Secrets in configs: ``${secret:NAME}`` references and the providers that resolve them.

A CI job receives credentials as secret variables (the environment), as mounted files or
from a vault; the config only names them, so it can be committed. Every command that reads a
config loads it through :func:`load_config_with_secrets`, so ``train``, ``pipeline run``,
``evaluate`` and ``secrets check`` resolve references the same way, refuse a literal
credential and refuse a reference in a field that would be recorded in MLflow. A resolved
value is registered with :mod:`visionautoml.redact`, which masks it in everything the process
writes.

Reference forms:

- ``${secret:NAME}``: the environment variable NAME, else the file NAME in
  ``$VISIONAUTOML_SECRETS_DIR`` (default ``/run/secrets``, where Docker and Kubernetes mount them);
- ``${secret:vault://MOUNT/PATH#KEY}``: KEY of the KV v2 secret PATH under MOUNT in HashiCorp
  Vault or OpenBao, at ``VAULT_ADDR`` (or ``BAO_ADDR``) with ``VAULT_TOKEN`` (or ``BAO_TOKEN``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visionautoml.config import JobConfig, load_config, parse_config
from visionautoml.errors import ConfigError
from visionautoml.redact import mask, register_secret

REFERENCE = re.compile(r"\$\{secret:([^}]*)\}")
SECRETS_DIR_VARIABLE = "VISIONAUTOML_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"
# Fields that must hold a reference, never a literal: a literal password would sit in the repository.
REFERENCE_ONLY_FIELDS = ("tracking.password", "tracking.token")
# Where a ${secret:...} may be used: fields that go to the environment, or that only the pipeline's
# fetch step reads; every other field ends up in MLflow params, tags or artifacts.
SECRET_FIELDS = ("tracking.username", "tracking.password", "tracking.token", "pipeline.data")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


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
    raw: Any, *, source: str = "config", allowed_fields: tuple[str, ...] | None = SECRET_FIELDS
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
    settings: Sequence[str] = (),
    *,
    allowed_fields: tuple[str, ...] | None = SECRET_FIELDS,
) -> JobConfig:
    """Validate the config first (a typo fails before any vault round trip), then resolve its secrets.

    This is how every command reads a config: a literal credential is refused, a reference
    outside :data:`SECRET_FIELDS` is refused, and every reference resolves or the command
    stops naming each that does not.
    """
    job = load_config(path, overrides, settings)
    raw = job.model_dump(mode="json", exclude_unset=True)
    return parse_config(
        resolve_secrets(raw, source=str(path), allowed_fields=allowed_fields), source=str(path)
    )


def check_config_secrets(path: str | Path) -> list[SecretStatus]:
    """Try the references of a config file, after validating it."""
    return check_secrets(load_config(path).model_dump(mode="json", exclude_unset=True))

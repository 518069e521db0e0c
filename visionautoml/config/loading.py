"""Reading a config: YAML, ``--set`` overrides, the cloud service's job file, errors that say what to fix.

Every command reads a config through :func:`load_config` (directly, or through
:func:`visionautoml.secrets.load_config_with_secrets`). A cloud AutoML job file
(``az ml job create``'s YAML) is translated first (:mod:`visionautoml.config.cloud`), so a
migrating user's file runs as it is; a typo is answered with the closest field name.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from visionautoml.config.cloud import translate_cloud_job
from visionautoml.config.models import JobConfig
from visionautoml.errors import ConfigError


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration:"]
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field{_did_you_mean(item['loc'])}"
        lines.append(f"  {location}: {message}")
    lines.append("Fix the field(s) above; `visionautoml train --help` lists the options.")
    return "\n".join(lines)


def _did_you_mean(location: tuple[Any, ...]) -> str:
    """The closest field name of the section an unknown key sits in, as a hint."""
    model: type[BaseModel] | None = JobConfig
    for part in location[:-1]:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(location[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(model.model_fields)})"


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, settings: Sequence[str] = ()
) -> JobConfig:
    """Read and validate a YAML job config.

    ``overrides`` are top-level keys set on top (None values are skipped); ``settings`` are
    ``KEY.PATH=VALUE`` strings (``--set``), the value read as YAML, applied last.
    """
    return parse_config(read_raw_config(path, overrides, settings), source=str(path))


def read_raw_config(
    path: str | Path, overrides: dict[str, Any] | None = None, settings: Sequence[str] = ()
) -> dict[str, Any]:
    """The config file's mapping with the overrides applied, not yet validated."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values")
    raw = translate_cloud_job(raw, source=str(path))
    raw.update({key: value for key, value in (overrides or {}).items() if value is not None})
    for setting in settings:
        apply_setting(raw, setting)
    return raw


def apply_setting(raw: dict[str, Any], setting: str) -> None:
    """Set ``KEY.PATH=VALUE`` in ``raw`` in place; the value is a YAML scalar, list or mapping."""
    key, sep, text = setting.partition("=")
    names = [name.strip() for name in key.split(".")]
    if not sep or not all(names):
        raise ConfigError(
            f"--set {setting}: write KEY.PATH=VALUE, e.g. --set training_parameters.learning_rate=0.01"
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {setting}: the value is not valid YAML ({error})") from None
    target = raw
    for name in names[:-1]:
        child = target.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {setting}: '{name}' is a value, not a section")
        target = child
    target[names[-1]] = value


def parse_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error, source)) from None

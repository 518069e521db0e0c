"""What every command shares: the consoles, choices as Enums, durations, and the refusal of secrets.

Choices are Enums so typer checks them and ``--help`` lists them; durations take a unit
(``90s``, ``50m``, ``2h``; a plain number is seconds) so every ``--timeout`` reads the same.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from visionautoml.config import DEFAULT_WORKSPACE
from visionautoml.errors import ConfigError
from visionautoml.redact import CREDENTIAL_VARIABLES
from visionautoml.secrets import SECRETS_DIR_VARIABLE

console = Console()
err_console = Console(stderr=True)


class InputFormat(StrEnum):
    auto = "auto"
    voc = "voc"
    coco = "coco"
    yolo = "yolo"
    jsonl = "jsonl"


class DataFormat(StrEnum):
    jsonl = "jsonl"
    coco = "coco"
    voc = "voc"
    yolo = "yolo"


class Backend(StrEnum):
    auto = "auto"
    onnx = "onnx"
    pytorch = "pytorch"


class MetricType(StrEnum):
    voc = "voc"
    coco = "coco"
    coco_voc = "coco_voc"


FORMAT_HELP = "Input format: auto (from the layout), voc, coco, yolo or jsonl."
DATASTORE_HELP = (
    "Local copy of the cloud datastore that AmlDatastore:// and azureml:// image URLs point into."
)
STORE_HELP = "Dataset store: a folder or any fsspec URL (s3://bucket/datasets ...)."
WORKSPACE_HELP = f"The workspace folder (default {DEFAULT_WORKSPACE}): runs, datasets, checkpoints."
SET_HELP = (
    "Override a config field, e.g. --set training_parameters.number_of_epochs=2 (repeatable; the value is "
    "read as YAML and checked like the file)."
)
DEFAULT_STORE = str(Path(DEFAULT_WORKSPACE) / "datasets")
TILE_GRID_HELP = (
    "Tile grid over the model's own (the cloud service's tile_grid_size): 3x2, 2x2 ...; none turns the "
    "model's tiling off."
)
TILE_OVERLAP_HELP = "Overlap of neighbouring tiles, a fraction of a tile (tile_overlap_ratio, 0-1)."
TILE_NMS_HELP = (
    "IoU above which boxes of the whole image and its tiles merge (tile_predictions_nms_threshold)."
)


def tiling_overrides(grid: str | None, overlap: float | None, nms_threshold: float | None) -> dict[str, Any]:
    """The tiling settings given on the command line, checked now so a bad one fails before any loading."""
    from visionautoml.models.tiling import resolve_tiling

    given = {
        "tile_grid_size": grid,
        "tile_overlap_ratio": overlap,
        "tile_predictions_nms_threshold": nms_threshold,
    }
    given = {name: value for name, value in given.items() if value is not None}
    resolve_tiling(None, **given)
    return given


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str, option: str = "--timeout") -> float:
    """Seconds in ``90``, ``90s``, ``5m``, ``1h30m`` or ``2.5h``."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise typer.BadParameter(f"'{text}' is no duration; write e.g. 90s, 50m or 2h", param_hint=option)
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def class_list(classes: str | None) -> list[str] | None:
    if classes is None:
        return None
    names = [name.strip() for name in classes.split(",") if name.strip()]
    if not names:
        raise typer.BadParameter(
            "give at least one class name, e.g. --classes cat,dog", param_hint="--classes"
        )
    return names


def repairs_line(summary: dict[str, int]) -> str | None:
    """``repaired: 2 boxes clipped, 1 box dropped; skipped 1 image``, or None when nothing was repaired."""
    parts = [
        f"{summary.get(key, 0)} {what}"
        for key, what in (
            ("clipped_boxes", "box(es) clipped"),
            ("dropped_boxes", "zero-area box(es) dropped"),
        )
        if summary.get(key)
    ]
    skipped = f"skipped {summary['skipped_images']} image(s)" if summary.get("skipped_images") else ""
    if not parts and not skipped:
        return None
    return "repaired: " + "; ".join(filter(None, [", ".join(parts), skipped]))


def problem_table(problems: list[Any], root: Path, title: str, limit: int | None = None) -> Any:
    """Files inside the dataset are shown relative to it (the title names it), so rows stay short.

    The message column takes the room: at 80 columns a row still reads as a sentence.
    """
    from rich.markup import escape
    from rich.table import Column, Table

    base = f"{root.absolute()}/" if root.is_dir() else f"{root.absolute().parent}/"
    table = Table(
        Column("severity", no_wrap=True),
        Column("where", overflow="fold", ratio=2),
        Column("problem", overflow="fold", ratio=3),
        title=f"{root}: {title}",
        title_justify="left",
        expand=True,
    )
    for problem in problems[:limit]:
        colour = "red" if problem.severity == "error" else "yellow"
        where = problem.file.removeprefix(base)
        where = where if problem.line is None else f"{where}:{problem.line}"
        if problem.field:
            where = f"{where} {problem.field}"
        table.add_row(f"[{colour}]{problem.severity}[/]", escape(where), escape(problem.message))
    if limit is not None and len(problems) > limit:
        table.caption = f"... and {len(problems) - limit} more"
    return table


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

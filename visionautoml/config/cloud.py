"""The cloud service's AutoML image job file, read as it is: translated to this project's config.

A migrating user has ``az ml job create`` YAML files (``$schema``, ``type: automl``,
``task: image_object_detection``, ``training_data: {type: mltable, path: ...}``,
``compute: azureml:gpu-cluster`` ...) and SDK v1 habits (``img_size``, ``lr_scheduler``,
``box_score_thresh`` ...). This module turns such a file into the config :class:`JobConfig`
validates, so nothing needs rewriting:

- fields with a meaning here are mapped (an MLTable input becomes its path, the SDK v1 names
  become today's, ``log_verbosity`` sets the log level, search-space string expressions such as
  ``uniform(0.001, 0.01)`` become distributions);
- fields that only mean something to the cloud service (``$schema``, ``compute: azureml:...``,
  ``description`` ...) are accepted with one warning each saying so (:data:`CLOUD_ONLY`);
- values this project cannot honour (another task, another primary metric) are refused.

Every translation is logged as a warning naming the field, so a user sees what was understood.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from pathlib import Path
from typing import Any

from visionautoml.errors import ConfigError

log = logging.getLogger("visionautoml.config")

CLOUD_ONLY: dict[str, str] = {
    "$schema": "the cloud service's schema URL; this file is validated here instead",
    "type": "the cloud job type; `automl` is what this command runs",
    "name": "the cloud job's name; runs here are named by MLflow",
    "display_name": "the cloud job's display name; runs here are named by MLflow",
    "description": "the cloud job's description",
    "tags": "cloud job tags; MLflow runs here get their own tags",
    "outputs": "cloud job outputs; the model goes to the MLflow registry (register: model_name)",
    "identity": "the cloud job's identity; credentials come from tracking.* and the environment",
    "resources": "cloud compute resources; trials here get compute.cpus_per_trial / gpus_per_trial",
    "queue_settings": "the cloud job queue",
    "services": "cloud job services",
}
"""Top-level keys of a cloud job accepted with a warning: they have no meaning on this machine."""

SDK_V1_NAMES: dict[str, str] = {
    "img_size": "image_size",
    "lr_scheduler": "learning_rate_scheduler",
    "box_score_thresh": "box_score_threshold",
    "nms_iou_thresh": "nms_iou_threshold",
    "box_detections_per_img": "box_detections_per_image",
    "tile_predictions_nms_thresh": "tile_predictions_nms_threshold",
    "grad_accumulation_step": "gradient_accumulation_step",
    "amsgrad": "ams_gradient",
    "warmup_cosine_lr_warmup_epochs": "warmup_cosine_lr_warmup_epochs",
}
"""The cloud SDK v1's training parameter names and today's."""

_LOG_LEVELS = {
    "not_set": logging.NOTSET,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
}
_LOG_LEVELS |= {"error": logging.ERROR, "critical": logging.CRITICAL}
_EXPRESSION = re.compile(r"\s*([a-z_]+)\s*\((.*)\)\s*", re.DOTALL)


def is_cloud_job(raw: dict[str, Any]) -> bool:
    return "type" in raw or "$schema" in raw or isinstance(raw.get("training_data"), dict)


def translate_cloud_job(raw: dict[str, Any], *, source: str) -> dict[str, Any]:
    """``raw`` as this project's config; a plain visionautoml config only gets its SDK v1 names mapped."""
    raw = dict(raw)
    if is_cloud_job(raw):
        raw = _translate_job(raw, source)
    parameters = raw.get("training_parameters")
    if isinstance(parameters, dict):
        raw["training_parameters"] = _renamed(parameters, source, "training_parameters")
        if "split_ratio" in raw["training_parameters"]:
            value = raw["training_parameters"].pop("split_ratio")
            _note(
                source,
                "training_parameters.split_ratio",
                f"is the SDK v1 name of validation_data_size ({value})",
            )
            raw.setdefault("validation_data_size", value)
    if isinstance(raw.get("search_space"), list):
        raw["search_space"] = [
            _subspace(subspace, source, index) if isinstance(subspace, dict) else subspace
            for index, subspace in enumerate(raw["search_space"])
        ]
    return raw


def _translate_job(raw: dict[str, Any], source: str) -> dict[str, Any]:
    if raw.get("type") not in (None, "automl"):
        raise ConfigError(
            f"{source}: type '{raw['type']}' is not an AutoML job; only `type: automl` runs here"
        )
    task = raw.get("task", "image_object_detection")
    if task != "image_object_detection":
        raise ConfigError(
            f"{source}: task '{task}' is not supported; visionautoml trains object detectors "
            "(task: image_object_detection)"
        )
    for key, why in CLOUD_ONLY.items():
        if key in raw:
            raw.pop(key)
            _note(source, key, f"accepted and ignored: {why}")
    metric = raw.pop("primary_metric", "mean_average_precision")
    if metric != "mean_average_precision":
        raise ConfigError(
            f"{source}: primary_metric '{metric}' is not supported; detectors here are ranked by "
            "mean_average_precision (its kind is training_parameters.validation_metric_type)"
        )
    column = raw.pop("target_column_name", "label")
    if column != "label":
        raise ConfigError(
            f"{source}: target_column_name '{column}': AutoML JSONL for detection has `label` only"
        )
    verbosity = raw.pop("log_verbosity", None)
    if verbosity is not None:
        level = _LOG_LEVELS.get(str(verbosity).lower())
        if level is None:
            raise ConfigError(f"{source}: log_verbosity '{verbosity}' is none of {', '.join(_LOG_LEVELS)}")
        logging.getLogger("visionautoml").setLevel(level)
    for role in ("training_data", "validation_data"):
        if isinstance(raw.get(role), dict):
            raw[role] = _data_input(raw[role], source, role)
            beside = Path(source).parent / raw[role]
            if not Path(raw[role]).is_absolute() and beside.exists():  # relative to the file, as in the cloud
                raw[role] = str(beside)
    compute = raw.get("compute")
    if isinstance(compute, str):
        raw.pop("compute")
        _note(
            source,
            "compute",
            f"'{compute}' is a cloud compute target; trials run on this machine (set compute: "
            "{target: ray, address: HOST:PORT} for a Ray cluster)",
        )
    return raw


def _data_input(value: dict[str, Any], source: str, role: str) -> str:
    kind, path = value.get("type", "mltable"), value.get("path")
    if not isinstance(path, str):
        raise ConfigError(
            f"{source}: {role} needs a path (an MLTable folder, a JSONL file or a dataset folder)"
        )
    if kind not in ("mltable", "uri_file", "uri_folder"):
        raise ConfigError(
            f"{source}: {role}.type '{kind}' is not supported; use mltable, uri_file or uri_folder"
        )
    if path.startswith(("azureml:", "azureml://")):
        raise ConfigError(
            f"{source}: {role}.path {path} is a cloud data asset; download it and give the local MLTable "
            "folder (or a JSONL / VOC folder), with --datastore-root for the images' azureml:// URLs"
        )
    extra = sorted(set(value) - {"type", "path", "mode"})
    if extra:
        raise ConfigError(f"{source}: {role} has fields this project does not know: {', '.join(extra)}")
    return path


def _renamed(parameters: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    renamed = {}
    for key, value in parameters.items():
        new = SDK_V1_NAMES.get(key, key)
        if new != key:
            _note(source, f"{where}.{key}", f"is the SDK v1 name of {new}")
        renamed[new] = value
    return renamed


def _subspace(subspace: dict[str, Any], source: str, index: int) -> dict[str, Any]:
    where = f"search_space[{index}]"
    return {
        name: _distribution(value, source, f"{where}.{name}") if isinstance(value, str) else value
        for name, value in _renamed(subspace, source, where).items()
    }


def _distribution(text: str, source: str, where: str) -> dict[str, Any]:
    """``choice(a, b)``, ``uniform(lo, hi)``, ``loguniform(lo, hi)`` ... as a distribution mapping.

    The cloud SDK's ``loguniform`` and ``qloguniform`` take the logarithms of the bounds
    (the value is ``exp(uniform(lo, hi))``); here the bounds are the values themselves, so
    they are exponentiated.
    """
    match = _EXPRESSION.fullmatch(text)
    if match is None:
        return {"type": "choice", "values": [text]}
    kind, body = match.groups()
    try:
        arguments = ast.literal_eval(f"[{body}]")
    except (ValueError, SyntaxError):
        raise ConfigError(f"{source}: {where}: cannot read the arguments of '{text}'") from None
    if kind == "choice":
        values = arguments[0] if len(arguments) == 1 and isinstance(arguments[0], list | tuple) else arguments
        return {"type": "choice", "values": list(values)}
    shapes = {
        "uniform": ("min_value", "max_value"),
        "quniform": ("min_value", "max_value", "q"),
        "loguniform": ("min_value", "max_value"),
        "qloguniform": ("min_value", "max_value", "q"),
        "normal": ("mu", "sigma"),
        "lognormal": ("mu", "sigma"),
        "randint": ("upper",),
    }
    if kind not in shapes or len(arguments) != len(shapes[kind]):
        raise ConfigError(
            f"{source}: {where}: '{text}' is no distribution this project knows ({', '.join(shapes)})"
        )
    distribution = {"type": kind, **dict(zip(shapes[kind], arguments, strict=True))}
    if kind in ("loguniform", "qloguniform"):
        distribution["min_value"] = math.exp(distribution["min_value"])
        distribution["max_value"] = math.exp(distribution["max_value"])
        _note(
            source,
            where,
            f"{text}: the cloud SDK's bounds are logarithms, so the values lie in "
            f"[{distribution['min_value']:.3g}, {distribution['max_value']:.3g}]",
        )
    return distribution


def _note(source: str, field: str, text: str) -> None:
    log.warning("%s: %s %s", source, field, text)

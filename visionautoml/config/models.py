"""The one validated configuration object: every section and field, with the cloud service's names.

Names and defaults follow the cloud AutoML-for-images service wherever it has them
(``model_name``, ``learning_rate``, ``number_of_epochs``, ``limits.max_trials`` ...),
so a user of that service finds every knob where they would look for it. A bad
value fails before any work starts, naming the field.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import warnings
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @classmethod
    def of(cls, settings: BaseModel) -> Any:
        """This model's fields taken from a model that has them all (``Thresholds.of(params)``)."""
        return cls.model_validate({name: getattr(settings, name) for name in cls.model_fields})


NOT_IN_ZOO: dict[str, str] = {
    name: (
        f"'{name}' (Ultralytics YOLO) is AGPL-3.0 licensed, which a permissive project cannot ship; "
        "use model_name: yolox (the same model_size) or ssdlite320_mobilenet_v3_large"
    )
    for name in ("yolov5", "yolov8", "yolov9", "yolov10", "yolo11")
}
"""Models a cloud config may name that cannot be in the zoo: refused at load time, saying what to use."""

DEFAULT_WORKSPACE = ".visionautoml"
"""Where runs, datasets, checkpoints and sweeps live unless a config or option says otherwise."""


class Thresholds(_Strict):
    """Which detections a trained model reports: the one definition training, export and serving share.

    A detection is kept when its score is at least ``box_score_threshold`` (:meth:`keep`),
    after class-wise NMS at ``nms_iou_threshold``, best ``box_detections_per_image`` first.
    The saved model carries these, so a served model answers as it did in validation.
    """

    box_score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.3
    nms_iou_threshold: Annotated[float, Field(ge=0, le=1)] = 0.5
    box_detections_per_image: Annotated[int, Field(ge=1)] = 100

    def keep(self, scores: Any) -> Any:
        """The mask of ``scores`` (a tensor or an array) a model reports: ``score >= box_score_threshold``."""
        return scores >= self.box_score_threshold


class Tiling(_Strict):
    """Tiles for small objects, as the cloud service has them: training sees each image's tiles as well
    as the image, and inference runs the whole image plus every tile, merging the boxes with NMS.

    ``tile_grid_size`` is ``COLUMNSxROWS`` (``3x2``) or None for no tiling. The saved model carries
    these, and ``evaluate``, ``predict`` and ``serve`` may override them.
    """

    tile_grid_size: str | None = None
    tile_overlap_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.25
    tile_predictions_nms_threshold: Annotated[float, Field(gt=0, le=1)] = 0.25

    @field_validator("tile_grid_size", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> str | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
            return None
        text = str(value).strip().lower().replace(" ", "").strip("()").replace(",", "x")
        match = re.fullmatch(r"([1-9][0-9]?)x([1-9][0-9]?)", text)
        if match is None:
            raise ValueError(f"'{value}' is no tile grid; write COLUMNSxROWS such as 3x2, or none")
        return text

    @property
    def grid(self) -> tuple[int, int] | None:
        """(columns, rows), or None without tiling."""
        if self.tile_grid_size is None:
            return None
        columns, rows = self.tile_grid_size.split("x")
        return int(columns), int(rows)


class TrainingParameters(Thresholds, Tiling):
    """Hyperparameters of one trial (a single training run), the inference thresholds and tiling included."""

    model_name: str = "fasterrcnn_resnet50_fpn"
    model_size: Literal["small", "medium", "large", "extra_large"] | None = Field(
        None, description="with model_name: yolox, which YOLOX (the cloud service's name; default medium)"
    )
    pretrained: str = Field(
        "coco",
        description="coco | imagenet | none | PATH to a local state dict (loaded with weights_only=True)",
    )
    checkpoint_run_id: str | None = None
    checkpoint_path: str | None = None

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 0.005
    momentum: Annotated[float, Field(ge=0, le=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 1e-4
    nesterov: bool = True
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.999
    ams_gradient: bool = False

    learning_rate_scheduler: Literal["warmup_cosine", "step"] = "warmup_cosine"
    warmup_cosine_lr_cycles: Annotated[float, Field(ge=0, le=1)] = 0.45
    warmup_cosine_lr_warmup_epochs: Annotated[int, Field(ge=0)] = 2
    step_lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.5
    step_lr_step_size: Annotated[int, Field(ge=1)] = 5

    number_of_epochs: Annotated[int, Field(ge=1)] = 15
    training_batch_size: Annotated[int, Field(ge=1)] = 2
    validation_batch_size: Annotated[int, Field(ge=1)] = 1
    gradient_accumulation_step: Annotated[int, Field(ge=1)] = 1

    early_stopping: bool = True
    early_stopping_patience: Annotated[int, Field(ge=1)] = 5
    early_stopping_delay: Annotated[int, Field(ge=0)] = 5
    evaluation_frequency: Annotated[int, Field(ge=1)] = 1
    checkpoint_frequency: Annotated[int, Field(ge=1)] | None = None
    layers_to_freeze: Annotated[int, Field(ge=0)] | None = None

    min_size: Annotated[int, Field(ge=32)] | None = None
    max_size: Annotated[int, Field(ge=32)] | None = None
    image_size: Annotated[int, Field(ge=32)] | None = None
    apply_automl_train_augmentations: bool = True
    apply_mosaic_for_yolo: bool | None = Field(
        None, description="mosaic of four images per sample (default: on for YOLOX, off for the others)"
    )
    mixup_probability: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="share of mosaic samples blended with a second mosaic (YOLOX's mixup)"
    )
    no_augmentation_epochs: Annotated[int, Field(ge=0)] | None = Field(
        None, description="last epochs trained without mosaic and mixup (default: a tenth of the epochs)"
    )
    multi_scale: bool = Field(
        False, description="a random input size per batch (0.67x to 1.33x, multiples of 32): YOLOX, R-CNNs"
    )
    weights_ema: bool | None = Field(
        None, description="evaluate and save a moving average of the weights (default: on for YOLOX)"
    )
    number_of_workers: Annotated[int, Field(ge=0)] | None = None

    validation_metric_type: Literal["voc", "coco", "coco_voc"] = "voc"
    validation_iou_threshold: Annotated[float, Field(gt=0, le=1)] = 0.5

    seed: int = 42
    max_minutes: Annotated[float, Field(gt=0)] | None = Field(
        None,
        description=(
            "Wall-time budget of the training: where number_of_epochs does not fit, the run is re-planned "
            "after every epoch to end in time (learning-rate schedule, augmentation tail and weight average "
            "over the epochs that fit), and stopped at the limit in any case (the last evaluation still "
            "runs)."
        ),
    )

    @field_validator("model_name")
    @classmethod
    def _available(cls, value: str) -> str:
        if value in NOT_IN_ZOO:
            raise ValueError(NOT_IN_ZOO[value])
        return value


Distribution = Literal[
    "choice", "uniform", "loguniform", "normal", "lognormal", "quniform", "qloguniform", "randint"
]


class ParameterDistribution(_Strict):
    """One searched hyperparameter, in the cloud service's YAML shape."""

    type: Distribution
    values: list[Any] | None = None
    min_value: float | None = None
    max_value: float | None = None
    mu: float | None = None
    sigma: float | None = None
    q: float | None = None
    lower: int | None = None
    upper: int | None = None

    @model_validator(mode="after")
    def _check_arguments(self) -> ParameterDistribution:
        needed = {
            "choice": ("values",),
            "uniform": ("min_value", "max_value"),
            "loguniform": ("min_value", "max_value"),
            "quniform": ("min_value", "max_value", "q"),
            "qloguniform": ("min_value", "max_value", "q"),
            "normal": ("mu", "sigma"),
            "lognormal": ("mu", "sigma"),
            "randint": ("upper",),
        }[self.type]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise ValueError(f"distribution '{self.type}' needs {', '.join(missing)}")
        if self.type == "choice" and not self.values:
            raise ValueError("distribution 'choice' needs a non-empty list of values")
        kind = self.type
        ranged = kind in ("uniform", "loguniform", "quniform", "qloguniform")
        if ranged and not self.min_value < self.max_value:
            raise ValueError("min_value must be below max_value")
        if kind in ("loguniform", "qloguniform") and self.min_value <= 0:
            raise ValueError(f"{kind} needs min_value > 0 (it samples the logarithm)")
        if kind in ("quniform", "qloguniform") and self.q <= 0:
            raise ValueError("q must be positive")
        if kind in ("normal", "lognormal") and self.sigma <= 0:
            raise ValueError("sigma must be positive")
        if kind == "randint" and self.upper <= (self.lower or 0):
            raise ValueError("upper must be above lower (randint draws from [lower, upper))")
        return self

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole distribution when checking it: choices and range ends."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type in ("uniform", "loguniform", "quniform", "qloguniform"):
            return [self.min_value, self.max_value]
        if self.type == "randint":
            return [self.lower or 0, self.upper - 1]
        return [math.exp(self.mu) if self.type == "lognormal" else self.mu]


def search_space_problems(
    subspaces: list[dict[str, ParameterDistribution]], fixed: TrainingParameters
) -> list[str]:
    """What is wrong with a search space, checked once when the config loads, before any work.

    Each name must be a training parameter (a typo is answered with the closest one) and each
    choice and range end must be a value that parameter takes with the fixed ones around it,
    so ``optimizer: {values: [sgd, adan]}`` fails now, not in trial 7 an hour from now. Model
    names are the zoo's to check (:func:`visionautoml.models.zoo.check_model_names`).
    """
    problems: list[str] = []
    known = list(TrainingParameters.model_fields)
    base = fixed.model_dump()
    for index, subspace in enumerate(subspaces):
        if not subspace:
            problems.append(f"search_space[{index}]: empty sub-space; give at least one parameter")
        for name, distribution in subspace.items():
            where = f"search_space[{index}].{name}"
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else " (see the training_parameters names)"
                problems.append(f"{where}: not a training parameter{hint}")
                continue
            if name == "model_name":
                problems += [
                    f"{where}: {NOT_IN_ZOO[value]}"
                    for value in distribution.values or []
                    if value in NOT_IN_ZOO
                ]
                continue
            for value in distribution.probe_values():
                try:
                    TrainingParameters.model_validate({**base, name: value})
                except ValidationError as error:
                    problems.append(f"{where}: value {value!r} is invalid: {error.errors()[0]['msg']}")
                    break
    return problems


class Limits(_Strict):
    max_trials: Annotated[int, Field(ge=1)] = 1
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 1
    timeout_minutes: Annotated[float, Field(gt=0)] | None = None
    trial_timeout_minutes: Annotated[float, Field(gt=0)] | None = None


class EarlyTermination(_Strict):
    type: Literal["bandit", "median_stopping", "truncation_selection", "asha"]
    evaluation_interval: Annotated[int, Field(ge=1)] = 1
    delay_evaluation: Annotated[int, Field(ge=0)] = 0
    slack_factor: Annotated[float, Field(gt=0)] | None = None
    slack_amount: Annotated[float, Field(gt=0)] | None = None
    truncation_percentage: Annotated[int, Field(ge=1, le=99)] | None = None

    @model_validator(mode="after")
    def _check_policy(self) -> EarlyTermination:
        if self.type == "bandit" and (self.slack_factor is None) == (self.slack_amount is None):
            raise ValueError("bandit needs exactly one of slack_factor or slack_amount")
        if self.type == "truncation_selection" and self.truncation_percentage is None:
            raise ValueError("truncation_selection needs truncation_percentage")
        return self


class Sweep(_Strict):
    sampling_algorithm: Literal["grid", "random", "bayesian"] = "random"
    early_termination: EarlyTermination | None = None


class Compute(_Strict):
    target: Literal["local", "ray"] = "local"
    address: str | None = None
    # Ray's job API, for `pipeline run --detach` on the cluster; default http://HEAD:8265
    dashboard_address: str | None = None
    min_nodes: Annotated[int, Field(ge=1)] = 1
    min_gpus: Annotated[int, Field(ge=0)] = 0
    wait_timeout_minutes: Annotated[float, Field(gt=0)] = 20
    cpus_per_trial: Annotated[float, Field(gt=0)] | None = None
    gpus_per_trial: Annotated[float, Field(ge=0)] = 0
    max_failures: Annotated[int, Field(ge=0)] = Field(
        2, description="times a trial whose process or node died is retried from its last checkpoint"
    )
    storage_path: str | None = Field(
        None,
        description="where Ray Tune keeps the sweep's state (s3://BUCKET/PATH for clusters without a "
        "shared disk; the endpoint from the AWS variables); default: the workspace",
    )

    @model_validator(mode="after")
    def _check_address(self) -> Compute:
        if self.target == "ray" and not self.address:
            raise ValueError("compute.target 'ray' needs an address (HOST:PORT or ray://HOST:10001)")
        return self


class Register(_Strict):
    model_name: str | None = None
    promote_if_better: str | None = None


class Tracking(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite inside the workspace")
    username: str | None = None
    password: str | None = None
    token: str | None = None


# --- pipeline section (owner: pipeline) -----------------------------------------------------------


class Pipeline(_Strict):
    """What `visionautoml pipeline run` fetches, checks and splits before training; ignored by `train`.

    The datasets are registered as ``<experiment_name>-train`` and ``-validation``, the names a
    sweep gives them, so one content never gets two names.
    """

    data: str | None = Field(
        None, description="URL, zip/tar archive or folder of labelled images; `--data` overrides it"
    )
    sha256: str | None = Field(None, description="expected sha256 of a downloaded or local archive")
    format: Literal["auto", "voc", "coco", "yolo", "jsonl"] = "auto"
    validation_every: Annotated[int, Field(ge=2)] = Field(
        5, description="every Nth image (in name order) goes to the validation set"
    )
    export: bool = Field(True, description="export the registered model to ONNX (checked against PyTorch)")


# --- end of pipeline section -------------------------------------------------------------------------


# pydantic models are ABCs, whose `register` classmethod the `register:` section shadows on
# instances only; the YAML key is the one users know, so the harmless warning is silenced.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class JobConfig(_Strict):
    """A whole job: data, one trial or a sweep, where to track and what to register."""

    experiment_name: str = "visionautoml"
    task: Literal["image_object_detection"] = "image_object_detection"
    workspace: str = DEFAULT_WORKSPACE
    training_data: str | None = None
    validation_data: str | None = None
    validation_data_size: Annotated[float, Field(gt=0, lt=1)] = 0.2
    invalid_data: Literal["error", "drop"] = Field(
        "error",
        description="an image with an error that cannot be repaired: refuse the data (error) or skip it",
    )
    datastore_root: str | None = Field(
        None, description="local copy of the cloud datastore that azureml:// image URLs point into"
    )
    tracking: Tracking = Tracking()
    training_parameters: TrainingParameters = TrainingParameters()
    limits: Limits = Limits()
    sweep: Sweep = Sweep()
    search_space: list[dict[str, ParameterDistribution]] = []
    compute: Compute = Compute()
    register: Register = Register()
    pipeline: Pipeline = Pipeline()

    @model_validator(mode="after")
    def _check_search_space(self) -> JobConfig:
        problems = search_space_problems(self.search_space, self.training_parameters)
        if problems:
            raise ValueError("invalid search space:\n    " + "\n    ".join(problems))
        return self

    @property
    def is_sweep(self) -> bool:
        """Several trials, or a cluster to run on: both go through Ray Tune; else one trial here."""
        return bool(self.search_space) or self.limits.max_trials > 1 or self.compute.target == "ray"

    def fingerprint(self) -> str:
        """A short hash of the config, stored as a tag so a model points at its config.

        Credentials are left out: even a hash of a password is a clue to it.
        """
        credentials = {"tracking": {"username", "password", "token"}}
        canonical = json.dumps(self.model_dump(mode="json", exclude=credentials), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

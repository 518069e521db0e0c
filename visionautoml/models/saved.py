"""The saved-model format: a folder with a state dict and a JSON spec, never a pickled object.

::

    model/
      weights.pt   state dict (tensors only, read with torch.load(weights_only=True))
      model.json   ModelSpec: zoo name, labels, input size, inference thresholds (and tiling)
      labels.json  the class names in label order (label i+1 = labels[i]), for other tools

The spec names a zoo entry, so loading rebuilds the exact architecture from code of this
version and only tensors come from the file: a model folder from an untrusted source
cannot run code. Training, MLflow logging, ONNX export and serving all use this format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from visionautoml.config import Thresholds, Tiling, TrainingParameters
from visionautoml.errors import DataError
from visionautoml.files import atomic_path
from visionautoml.models.weights import read_state_dict
from visionautoml.models.zoo import ZOO, InputSize, build_model, get_entry

FORMAT_VERSION = 2
"""2: the thresholds are one ``thresholds`` object; version 1 files (flat fields) are read too."""
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "model.json"
LABELS_FILE = "labels.json"


class ModelSpec(BaseModel):
    """Everything besides the tensors needed to rebuild and run a trained detector."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    format_version: int = FORMAT_VERSION
    model_name: str
    labels: Annotated[list[str], Field(min_length=1)]
    num_classes: int
    min_size: int | None = None
    max_size: int | None = None
    image_size: int | None = None
    thresholds: Thresholds = Thresholds()
    tiling: Tiling = Tiling()

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.num_classes != len(self.labels) + 1:
            raise ValueError(f"num_classes must be len(labels) + 1 (background), got {self.num_classes}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.image_size is None and (self.min_size is None or self.max_size is None):
            raise ValueError("give image_size, or both min_size and max_size")
        return self

    @classmethod
    def from_params(cls, params: TrainingParameters, labels: list[str]) -> ModelSpec:
        """The spec of a model trained with ``params`` on ``labels``, sizes resolved from the zoo."""
        size = get_entry(params.model_name).input_size(params)
        return cls(
            model_name=params.model_name,
            labels=list(labels),
            num_classes=len(labels) + 1,
            min_size=size.min_size,
            max_size=size.max_size,
            image_size=size.image_size,
            thresholds=Thresholds.of(params),
            tiling=Tiling.of(params),
        )

    @property
    def input_size(self) -> InputSize:
        return InputSize(self.min_size, self.max_size, self.image_size)

    def training_parameters(self) -> TrainingParameters:
        """Parameters that rebuild this architecture with random weights (the tensors come from the file)."""
        return TrainingParameters(
            model_name=self.model_name,
            pretrained="none",
            min_size=self.min_size,
            max_size=self.max_size,
            image_size=self.image_size,
            **self.thresholds.model_dump(),
            **self.tiling.model_dump(),
        )


def save_model(module: nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """Write the model folder atomically: it appears complete or not at all, replacing an old one."""
    directory = Path(directory)
    state = {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}
    with atomic_path(directory, directory=True) as temporary:
        torch.save(state, temporary / WEIGHTS_FILE)
        (temporary / SPEC_FILE).write_text(spec.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (temporary / LABELS_FILE).write_text(json.dumps(spec.labels, indent=2) + "\n", encoding="utf-8")
    return directory


def read_spec(directory: str | Path) -> ModelSpec:
    """The spec of a model folder, with an error that says what is wrong with it."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not directory.is_dir():
        raise DataError(
            f"{directory}: not a model folder (expected {WEIGHTS_FILE}, {SPEC_FILE}, {LABELS_FILE})"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {directory} is not a saved model folder") from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable or not JSON ({error})") from None
    if (
        isinstance(raw, dict)
        and isinstance(raw.get("format_version"), int)
        and raw["format_version"] > FORMAT_VERSION
    ):
        raise DataError(
            f"{path}: format_version {raw['format_version']} was written by a newer visionautoml "
            f"(this one reads up to {FORMAT_VERSION}); upgrade visionautoml"
        )
    try:
        return ModelSpec.model_validate(upgrade_thresholds(raw))
    except ValidationError as error:
        problems = "; ".join(_describe(item) for item in error.errors())
        raise DataError(f"{path}: invalid model spec: {problems}") from None


def upgrade_thresholds(raw: Any) -> Any:
    """A format-1 file's flat threshold fields as the ``thresholds`` object later formats hold."""
    if not isinstance(raw, dict) or raw.get("format_version", 1) != 1:
        return raw
    names = [name for name in Thresholds.model_fields if name in raw]
    upgraded = {key: value for key, value in raw.items() if key not in names}
    upgraded["thresholds"] = {name: raw[name] for name in names}
    upgraded["format_version"] = FORMAT_VERSION
    return upgraded


def _describe(item: dict) -> str:
    message = item["msg"].removeprefix("Value error, ")
    return f"{'.'.join(str(part) for part in item['loc'])}: {message}" if item["loc"] else message


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from its spec and load its tensors; the module is in eval mode on ``device``."""
    directory = Path(directory)
    spec = read_spec(directory)
    labels_path = directory / LABELS_FILE
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"{labels_path}: missing or not JSON ({error})") from None
    if labels != spec.labels:
        raise DataError(
            f"{labels_path}: labels differ from those in {SPEC_FILE}; the folder was edited by hand"
        )
    if not (directory / WEIGHTS_FILE).is_file():
        raise DataError(f"{directory / WEIGHTS_FILE}: missing; the model folder is incomplete")
    if spec.model_name not in ZOO:
        raise DataError(
            f"{directory / SPEC_FILE}: model_name '{spec.model_name}' is not in this version's model zoo "
            f"({', '.join(ZOO)}); load it with the visionautoml version that trained it"
        )
    module = build_model(spec.model_name, spec.num_classes, spec.training_parameters())
    state = read_state_dict(directory / WEIGHTS_FILE)
    own = module.state_dict()
    # Batch norm is frozen (no step counter) when a model was fine-tuned from pretrained weights and
    # trainable otherwise; in eval mode both compute the same, so the counter is not required.
    missing = [name for name in own if name not in state and not name.endswith("num_batches_tracked")]
    extra = [name for name in state if name not in own]
    reshaped = [name for name in state if name in own and state[name].shape != own[name].shape]
    if missing or extra or reshaped:
        details = "; ".join(
            f"{what}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
            for what, names in (("missing", missing), ("unexpected", extra), ("wrong shape", reshaped))
            if names
        )
        raise DataError(
            f"{directory / WEIGHTS_FILE}: does not match {spec.model_name} with {spec.num_classes} classes "
            f"from {SPEC_FILE} ({details}); save the model again with save_model"
        )
    module.load_state_dict(state, strict=False)
    return module.to(device).eval(), spec

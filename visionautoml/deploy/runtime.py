"""Loading a model for inference: its ONNX export when there is one, else the PyTorch model.

An export folder holds ``model.onnx``, ``labels.json``, ``settings.json`` (the thresholds
and the graph's input and output names) and ``parity.json`` (the check it passed).
:class:`OnnxPredictor` has the interface of :class:`~visionautoml.models.predictor.Predictor`,
so batch prediction and the scoring service do not care which one they run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from visionautoml.config import Thresholds
from visionautoml.errors import DataError, first_line
from visionautoml.models.predictor import Detections, Predictor
from visionautoml.models.saved import ModelSpec, upgrade_thresholds
from visionautoml.tracking.models import EXPORT_SUBDIR

ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.json"
SETTINGS_FILE = "settings.json"
PARITY_FILE = "parity.json"

Backend = Literal["auto", "onnx", "pytorch"]


class ExportSettings(BaseModel):
    """``settings.json``: the ModelSpec fields inference needs, plus what the graph looks like."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    format_version: int = 2
    model_name: str
    labels: Annotated[list[str], Field(min_length=1)]
    thresholds: Thresholds
    graph_score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.0
    input_name: str = "image"
    outputs: list[str] = ["boxes", "scores", "labels"]
    opset: int = 17

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ExportSettings:
        return cls(model_name=spec.model_name, labels=list(spec.labels), thresholds=spec.thresholds)

    def with_graph(self, *, outputs: list[str], opset: int, graph_score_threshold: float) -> ExportSettings:
        return self.model_copy(
            update={"outputs": outputs, "opset": opset, "graph_score_threshold": graph_score_threshold}
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> ExportSettings:
        path = directory / SETTINGS_FILE
        try:
            return cls.model_validate(upgrade_thresholds(json.loads(path.read_text(encoding="utf-8"))))
        except FileNotFoundError:
            raise DataError(
                f"{path}: missing; {directory} is not an ONNX export (run `visionautoml export`)"
            ) from None
        except (OSError, ValueError) as error:
            raise DataError(
                f"{path}: unreadable or invalid ({first_line(error)}); export the model again"
            ) from None


def is_export(directory: Path) -> bool:
    return (directory / ONNX_FILE).is_file() and (directory / SETTINGS_FILE).is_file()


def default_threads() -> int:
    """Cores this process may use (the affinity mask, not the machine's count, inside containers)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def make_session(path: Path, *, intra_op_threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; one session serves concurrent ``run`` calls safely."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or default_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Idle ONNX Runtime threads otherwise spin for a while after each run, taking cores from the
    # request threads and from everything else on the machine.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise DataError(f"{path}: ONNX Runtime cannot load it ({error}); export the model again") from None


class OnnxPredictor:
    """:class:`~visionautoml.models.predictor.Predictor`'s interface on an ONNX export.

    ``spec`` is the export's settings, which carry the same ``model_name``, ``labels`` and
    ``thresholds`` as a ModelSpec.
    """

    def __init__(self, directory: str | Path, *, intra_op_threads: int | None = None) -> None:
        self.directory = Path(directory)
        self.spec = ExportSettings.read(self.directory)
        self.session = make_session(self.directory / ONNX_FILE, intra_op_threads=intra_op_threads)

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        return [self._predict_one(image) for image in images]

    def _predict_one(self, image: torch.Tensor) -> Detections:
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"expected a uint8 tensor of shape (3, H, W), got {image.dtype} {tuple(image.shape)}"
            )
        pixels = image.numpy().astype(np.float32) / np.float32(255.0)
        raw = self.session.run(None, {self.spec.input_name: pixels})
        output = dict(zip(self.spec.outputs, raw, strict=True))
        scores = output["scores"].astype(np.float32)
        ids = output["labels"].astype(np.int64)
        keep = self.spec.thresholds.keep(scores) & (ids >= 1) & (ids <= len(self.spec.labels))
        order = np.argsort(-scores[keep], kind="stable")
        return Detections(
            boxes=torch.from_numpy(output["boxes"].astype(np.float32)[keep][order]),
            scores=torch.from_numpy(scores[keep][order]),
            labels=[self.spec.labels[int(i) - 1] for i in ids[keep][order]],
        )


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where a model to run lives on this machine, found once and handed to every server worker."""

    source: str
    backend: Literal["onnx", "pytorch"]
    directory: Path
    registered_name: str | None = None
    registered_version: str | None = None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "directory": str(self.directory)})

    @classmethod
    def from_json(cls, text: str) -> ModelLocation:
        raw = json.loads(text)
        return cls(**{**raw, "directory": Path(raw["directory"])})


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A predictor and what a client may ask about it (``/metadata``)."""

    predictor: Predictor | OnnxPredictor
    location: ModelLocation

    @property
    def spec(self) -> ModelSpec | ExportSettings:
        return self.predictor.spec

    @property
    def backend(self) -> str:
        return self.location.backend

    def metadata(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "model_name": spec.model_name,
            "registered_model": self.location.registered_name,
            "version": self.location.registered_version,
            "source": self.location.source,
            "backend": self.location.backend,
            "labels": list(spec.labels),
            "thresholds": spec.thresholds.model_dump(),
        }


def locate_model(
    model: str, *, onnx: str | Path | None = None, backend: Backend = "auto", tracking_uri: str | None = None
) -> ModelLocation:
    """Find ``model`` locally (downloading it from MLflow if needed) and pick the backend.

    ``model`` is a registry or run URI, a saved-model folder or an export folder. ONNX
    Runtime is chosen when an export is found: ``onnx``, ``model`` itself, or the saved
    model's ``onnx/`` subfolder (where ``visionautoml export --attach`` puts it). URIs are looked
    up in ``tracking_uri``, else the store the process is connected to.
    """
    from visionautoml.redact import strip_userinfo
    from visionautoml.tracking.models import resolve_model
    from visionautoml.tracking.registry import registry_reference
    from visionautoml.tracking.workspace import current_tracking_uri, use_tracking_uri

    quiet_downloads()
    source = strip_userinfo(model)
    with use_tracking_uri(tracking_uri or current_tracking_uri()):
        registered = registry_reference(model) or (None, None)
    is_uri = "://" in model or model.startswith(("runs:", "models:"))
    export_dir = Path(onnx).expanduser() if onnx is not None else None
    if export_dir is not None and not is_export(export_dir):
        raise DataError(f"{export_dir}: not an ONNX export (needs {ONNX_FILE} and {SETTINGS_FILE})")
    if export_dir is None and not is_uri and is_export(Path(model).expanduser()):
        if backend == "pytorch":
            raise DataError(f"{model}: an ONNX export, which has no PyTorch weights; give the saved model")
        export_dir = Path(model).expanduser()
    saved_dir = None
    if export_dir is None or backend == "pytorch":
        saved_dir = resolve_model(model, tracking_uri=tracking_uri)
        if export_dir is None and is_export(saved_dir / EXPORT_SUBDIR):
            export_dir = saved_dir / EXPORT_SUBDIR
    if backend == "onnx" and export_dir is None:
        raise DataError(
            f"{source}: no ONNX export found (looked in the model's {EXPORT_SUBDIR}/ folder); run "
            f"`visionautoml export {model} --out DIR` and pass --onnx DIR, or use the PyTorch backend"
        )
    if export_dir is not None and backend != "pytorch":
        return ModelLocation(source, "onnx", export_dir.resolve(), *registered)
    assert saved_dir is not None
    return ModelLocation(source, "pytorch", saved_dir.resolve(), *registered)


def load_located(location: ModelLocation, *, threads: int | None = None) -> LoadedModel:
    """Load the predictor ``location`` names; ``threads`` bounds the cores one inference uses."""
    threads = threads or default_threads()
    if location.backend == "onnx":
        return LoadedModel(OnnxPredictor(location.directory, intra_op_threads=threads), location)
    torch.set_num_threads(threads)
    return LoadedModel(Predictor.from_directory(location.directory), location)


def load_for_inference(
    model: str, *, onnx: str | Path | None = None, backend: Backend = "auto", threads: int | None = None
) -> LoadedModel:
    """:func:`locate_model` then :func:`load_located`: the predictor for ``model``, ONNX when exported."""
    return load_located(locate_model(model, onnx=onnx, backend=backend), threads=threads)


def quiet_downloads() -> None:
    """MLflow draws a progress bar per download, which floods a server's log; the user can still opt in."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

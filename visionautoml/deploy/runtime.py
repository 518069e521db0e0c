"""Loading a model for inference: its ONNX export when there is one, else the PyTorch model.

An export folder holds ``model.onnx`` (the one-image graph), ``labels.json``, ``settings.json``
(the thresholds, the graph's input and output names, its precision) and ``parity.json`` (the
checks it passed); for the SSD family also the three graphs of the batched path
(:mod:`visionautoml.deploy.graphs`). :class:`OnnxPredictor` has the interface of
:class:`~visionautoml.models.predictor.Predictor`, so batch prediction and the scoring service
do not care which one they run, nor whether ONNX Runtime or OpenVINO runs the graph.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from visionautoml.config import Thresholds, Tiling
from visionautoml.deploy.graphs import CORE_FILE, CORE_OUTPUTS, POSTPROCESS_FILE, PREPROCESS_FILE
from visionautoml.deploy.sessions import Runtime, default_threads, make_session
from visionautoml.errors import DataError, first_line
from visionautoml.models.predictor import Detections, Predictor
from visionautoml.models.saved import ModelSpec, upgrade_thresholds
from visionautoml.models.tiling import TiledPredictor, resolve_tiling, with_tiling
from visionautoml.tracking.models import EXPORT_SUBDIR

__all__ = ["default_threads", "make_session"]

ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.json"
SETTINGS_FILE = "settings.json"
PARITY_FILE = "parity.json"
MAX_CORE_BATCH = 16
"""Images per call of the batched core: the batch axis is free, this only bounds the memory."""

Backend = Literal["auto", "onnx", "openvino", "pytorch"]
_EXPORT_BACKENDS = ("onnx", "openvino")
_RUNTIMES: dict[str, Runtime] = {"onnx": "onnxruntime", "openvino": "openvino"}


class BatchedPath(BaseModel):
    """The graphs of the batched path and the fixed size the pre-processing resizes to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocess: str = PREPROCESS_FILE
    core: str = CORE_FILE
    postprocess: str = POSTPROCESS_FILE
    image_size: tuple[int, int]


class AccuracyGate(BaseModel):
    """What let an int8 export through: its mAP@0.5 beside the fp32 graph's on the same validation images."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = "map_voc at IoU 0.5"
    images: int
    source: str
    fp32: float
    int8: float
    int8_batched: float | None = None
    tolerance: float
    calibration_images: int
    calibration_method: str

    @property
    def drop(self) -> float:
        """The worst int8 path's loss against fp32 (negative: int8 scored higher)."""
        return self.fp32 - min(value for value in (self.int8, self.int8_batched) if value is not None)

    @property
    def passed(self) -> bool:
        return self.drop <= self.tolerance

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        batched = f", batched {self.int8_batched:.4f}" if self.int8_batched is not None else ""
        return (
            f"int8 accuracy gate {verdict}: mAP@0.5 {self.int8:.4f}{batched} against fp32 {self.fp32:.4f} "
            f"on {self.images} {self.source} image(s), drop {self.drop:+.4f} (tolerance {self.tolerance:g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(), "drop": self.drop, "passed": self.passed}


class ExportSettings(BaseModel):
    """``settings.json``: the ModelSpec fields inference needs, plus what the graph looks like."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    format_version: int = 3
    model_name: str
    labels: Annotated[list[str], Field(min_length=1)]
    thresholds: Thresholds
    graph_score_threshold: Annotated[float, Field(ge=0, le=1)] = 0.0
    input_name: str = "image"
    outputs: list[str] = ["boxes", "scores", "labels"]
    opset: int = 17
    precision: Literal["fp32", "int8"] = "fp32"
    batched: BatchedPath | None = None
    accuracy_gate: AccuracyGate | None = None
    tiling: Tiling = Tiling()
    """The model's tiling: the graph scores one image, the runtime runs it on whole image + tiles."""

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> ExportSettings:
        return cls(
            model_name=spec.model_name,
            labels=list(spec.labels),
            thresholds=spec.thresholds,
            tiling=spec.tiling,
        )

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


class OnnxPredictor:
    """:class:`~visionautoml.models.predictor.Predictor`'s interface on an ONNX export.

    ``spec`` is the export's settings, which carry the same ``model_name``, ``labels`` and
    ``thresholds`` as a ModelSpec. One image runs through the one-image graph; several run
    through the batched path when the export has one (the core sees them as one batch).
    ``runtime`` picks ONNX Runtime or OpenVINO for the same files.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        intra_op_threads: int | None = None,
        runtime: Runtime = "onnxruntime",
        max_batch: int = MAX_CORE_BATCH,
        settings: ExportSettings | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.spec = settings or ExportSettings.read(self.directory)
        self.runtime = runtime
        self.max_batch = max_batch
        threads = intra_op_threads
        self.session = make_session(self.directory / ONNX_FILE, intra_op_threads=threads, runtime=runtime)
        self._batched: tuple[Any, Any, Any] | None = None
        if self.spec.batched is not None:
            paths = [self.directory / name for name in self._batched_files()]
            missing = [path.name for path in paths if not path.is_file()]
            if missing:
                raise DataError(
                    f"{self.directory}: settings.json names the batched graphs but {', '.join(missing)} "
                    "is missing; export the model again"
                )
            pre, core, post = (make_session(p, intra_op_threads=threads, runtime=runtime) for p in paths)
            self._batched = (pre, core, post)

    @property
    def batched(self) -> bool:
        return self._batched is not None

    def batched_sessions(self) -> tuple[Any, Any, Any]:
        """The (pre-processing, core, post-processing) sessions of the batched path."""
        if self._batched is None:
            raise ValueError(f"{self.directory}: this export has no batched path")
        return self._batched

    def _batched_files(self) -> list[str]:
        assert self.spec.batched is not None
        return [self.spec.batched.preprocess, self.spec.batched.core, self.spec.batched.postprocess]

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        return [self._detections(raw) for raw in self.raw(images)]

    def raw(self, images: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        """Every detection the graph keeps (down to its own low threshold), per image."""
        pixels = [_pixels(image) for image in images]
        if self._batched is not None and len(pixels) > 1:
            return self.raw_batched(pixels)
        return [self.raw_one(image) for image in pixels]

    def raw_one(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """The one-image graph on float CHW pixels in [0, 1]."""
        raw = self.session.run(None, {self.spec.input_name: pixels})
        return dict(zip(self.spec.outputs, raw, strict=True))

    def raw_batched(self, pixels: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """The batched path on float CHW pixels: resize each, one core call per chunk, decode each."""
        pre, core, post = self.batched_sessions()
        results = []
        for start in range(0, len(pixels), self.max_batch):
            chunk = pixels[start : start + self.max_batch]
            resized = np.stack([pre.run(None, {"image": image})[0] for image in chunk])
            heads = core.run(None, {"images": resized})
            for index, image in enumerate(chunk):
                feeds = {name: head[index] for name, head in zip(CORE_OUTPUTS, heads, strict=True)}
                feeds["original_size"] = np.array(image.shape[1:], dtype=np.int64)
                results.append(dict(zip(self.spec.outputs, post.run(None, feeds), strict=True)))
        return results

    def _detections(self, output: dict[str, np.ndarray]) -> Detections:
        scores = output["scores"].astype(np.float32)
        ids = output["labels"].astype(np.int64)
        keep = self.spec.thresholds.keep(scores) & (ids >= 1) & (ids <= len(self.spec.labels))
        order = np.argsort(-scores[keep], kind="stable")
        return Detections(
            boxes=torch.from_numpy(output["boxes"].astype(np.float32)[keep][order]),
            scores=torch.from_numpy(scores[keep][order]),
            labels=[self.spec.labels[int(i) - 1] for i in ids[keep][order]],
        )


def _pixels(image: torch.Tensor) -> np.ndarray:
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        shape = tuple(image.shape)
        raise ValueError(f"expected a uint8 tensor of shape (3, H, W), got {image.dtype} {shape}")
    return image.numpy().astype(np.float32) / np.float32(255.0)


@dataclass(frozen=True, slots=True)
class ModelLocation:
    """Where a model to run lives on this machine, found once and handed to every server worker."""

    source: str
    backend: Literal["onnx", "openvino", "pytorch"]
    directory: Path
    registered_name: str | None = None
    registered_version: str | None = None
    tiling: dict[str, Any] = field(default_factory=dict)
    """Tiling settings given over the model's own (``tile_grid_size: "none"`` switches it off)."""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "directory": str(self.directory)})

    @classmethod
    def from_json(cls, text: str) -> ModelLocation:
        raw = json.loads(text)
        return cls(**{**raw, "directory": Path(raw["directory"])})


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A predictor and what a client may ask about it (``/metadata``)."""

    predictor: Predictor | OnnxPredictor | TiledPredictor
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
            "precision": getattr(spec, "precision", "fp32"),
            "labels": list(spec.labels),
            "thresholds": spec.thresholds.model_dump(),
            "tiling": self.tiling.model_dump(),
        }

    @property
    def tiling(self) -> Tiling:
        """What the predictor runs: the model's tiling, or the one given over it."""
        return self.predictor.tiling if isinstance(self.predictor, TiledPredictor) else Tiling()


def locate_model(
    model: str, *, onnx: str | Path | None = None, backend: Backend = "auto", tracking_uri: str | None = None
) -> ModelLocation:
    """Find ``model`` locally (downloading it from MLflow if needed) and pick the backend.

    ``model`` is a registry or run URI, a saved-model folder or an export folder. ONNX
    Runtime is chosen when an export is found: ``onnx``, ``model`` itself, or the saved
    model's ``onnx/`` subfolder (where ``visionautoml export --attach`` puts it); ``openvino``
    runs the same export with OpenVINO. URIs are looked up in ``tracking_uri``, else the store
    the process is connected to.
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
    if backend in _EXPORT_BACKENDS and export_dir is None:
        raise DataError(
            f"{source}: no ONNX export found (looked in the model's {EXPORT_SUBDIR}/ folder); run "
            f"`visionautoml export {model} --out DIR` and pass --onnx DIR, or use the PyTorch backend"
        )
    if export_dir is not None and backend != "pytorch":
        chosen = "openvino" if backend == "openvino" else "onnx"
        return ModelLocation(source, chosen, export_dir.resolve(), *registered)
    assert saved_dir is not None
    return ModelLocation(source, "pytorch", saved_dir.resolve(), *registered)


def load_located(location: ModelLocation, *, threads: int | None = None, batch_size: int = 4) -> LoadedModel:
    """Load the predictor ``location`` names; ``threads`` bounds the cores one inference uses.

    ``batch_size`` is how many images PyTorch runs together; an export's batched path takes
    whatever a call gives it (up to :data:`MAX_CORE_BATCH` per core run).
    """
    threads = threads or default_threads()
    predictor: Predictor | OnnxPredictor
    if location.backend in _EXPORT_BACKENDS:
        predictor = OnnxPredictor(
            location.directory, intra_op_threads=threads, runtime=_RUNTIMES[location.backend]
        )
    else:
        torch.set_num_threads(threads)
        predictor = Predictor.from_directory(location.directory, batch_size=batch_size)
    # The model's own tiling runs around either backend, unless the location's settings replace it.
    tiling = resolve_tiling(predictor.spec.tiling, **location.tiling)
    return LoadedModel(with_tiling(predictor, tiling), location)


def load_for_inference(
    model: str,
    *,
    onnx: str | Path | None = None,
    backend: Backend = "auto",
    threads: int | None = None,
    batch_size: int = 4,
    tiling: dict[str, Any] | None = None,
) -> LoadedModel:
    """:func:`locate_model` then :func:`load_located`: the predictor for ``model``, ONNX when exported.

    ``tiling``: settings given over the model's own (see :attr:`ModelLocation.tiling`).
    """
    location = locate_model(model, onnx=onnx, backend=backend)
    if tiling:
        location = replace(location, tiling=tiling)
    return load_located(location, threads=threads, batch_size=batch_size)


def quiet_downloads() -> None:
    """MLflow draws a progress bar per download, which floods a server's log; the user can still opt in."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

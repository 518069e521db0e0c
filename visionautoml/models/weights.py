"""Pretrained and checkpoint weights: find them, load them safely, fit them to the dataset's classes.

``pretrained`` is ``coco``, ``imagenet``, ``none`` or a PATH. torchvision's weight files
are looked up in the torch hub cache first (``torch.hub.get_dir()/checkpoints/<file>``),
so an offline machine with the file in place never touches the network; a missing file
is downloaded with a timeout, and if that is impossible the error says which file to
put where. Every file is read with ``torch.load(weights_only=True)``: a weights file is
data, never code.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torchvision.models._api import WeightsEnum

from visionautoml.errors import ConfigError, FetchError, TrainingError, first_line

if TYPE_CHECKING:
    from visionautoml.models.zoo import ZooEntry

log = logging.getLogger(__name__)

OFFLINE_ENV = "VISIONAUTOML_OFFLINE"
"""Set to 1 to forbid downloads: missing weight files then fail at once instead of trying the network."""

DOWNLOAD_TIMEOUT_S = 10
"""Seconds to wait for a connection or a chunk: an unreachable server fails fast instead of hanging."""
_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")
_WEIGHTS_FILE = "weights.pt"


@dataclass(frozen=True, slots=True)
class PretrainedSource:
    """Where a model's starting weights come from; :meth:`state_dict` reads them on demand."""

    kind: str
    path: Path | None = None

    def describe(self) -> str:
        return f"pretrained {self.kind}" if self.path is None else f"pretrained {self.kind} ({self.path})"

    def state_dict(self) -> dict[str, torch.Tensor]:
        assert self.path is not None
        return read_state_dict(self.path)


@dataclass(slots=True)
class LoadReport:
    """What loading a state dict into a module did, so it can be logged and checked."""

    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.reshaped:
            parts.append(
                f"re-initialised {len(self.reshaped)} whose shape differs: {', '.join(self.reshaped)}"
            )
        if self.missing:
            parts.append(f"{len(self.missing)} not in the file kept their initialisation")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file are not in the model")
        return "; ".join(parts)

    def raise_if_unrelated(self, what: str, model_name: str) -> None:
        """Refuse weights that fit less than half the model: they belong to another architecture."""
        total = len(self.loaded) + len(self.reshaped) + len(self.missing)
        if 2 * len(self.loaded) < total:
            raise TrainingError(
                f"{what}: only {len(self.loaded)} of the model's {total} tensors match; the file is not "
                f"a checkpoint of {model_name}. Use weights saved from the same model_name."
            )


def cached_weights_file(url: str) -> Path:
    """Where torch's hub cache keeps the file at ``url`` (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def torchvision_weights_file(weights: WeightsEnum) -> Path:
    return cached_weights_file(weights.url)


def ensure_weights_file(url: str, what: str, *, sha256: str | None = None) -> Path:
    """The cached file of ``url``, downloaded first when allowed and checked; FetchError when impossible.

    ``sha256`` is the file's digest or a prefix of it (torchvision puts one in its file names);
    a download that does not match it is deleted, never loaded. A file already in the cache is
    used as it is, so a machine without network works with files placed by hand.
    """
    target = cached_weights_file(url)
    if target.is_file():
        return target
    offline = os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")
    reason = f"{OFFLINE_ENV} is set"
    if not offline:
        try:
            _download(url, target, sha256)
            return target
        except (OSError, RuntimeError) as error:  # URLError, timeouts, refused connections, a bad hash
            detail = getattr(error, "reason", None) or first_line(error)
            reason = f"the download failed ({detail}; set {OFFLINE_ENV}=1 where there is no network)"
    raise FetchError(
        f"{what} needs the file {target.name}, which is not in the torch cache, and {reason}. "
        f"Download {url} on a machine with internet access and place it at {target} "
        "(or set TORCH_HOME to a folder holding hub/checkpoints/), or set "
        "training_parameters.pretrained to `none` to train from scratch or to a local state dict PATH."
    )


def ensure_torchvision_weights(weights: WeightsEnum, what: str) -> Path:
    """A torchvision weights file, checked against the hash prefix in its name."""
    expected = _HASH_PREFIX.search(os.path.basename(weights.url))
    return ensure_weights_file(weights.url, what, sha256=expected.group(1) if expected else None)


def _download(url: str, target: Path, sha256: str | None) -> None:
    """torch.hub's download (progress bar, temporary file, hash check), with a timeout on every read."""
    log.info("downloading %s to %s", url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=sha256, progress=sys.stderr.isatty())
    finally:
        socket.setdefaulttimeout(previous)


def pretrained_source(entry: ZooEntry, pretrained: str) -> PretrainedSource:
    """Resolve ``pretrained`` for ``entry`` to a checked source, failing before any model is built."""
    what = f"training_parameters.pretrained '{pretrained}' for {entry.name}"
    if pretrained == "none":
        return PretrainedSource("none")
    if pretrained == "imagenet":
        if entry.imagenet_weights is None:
            raise ConfigError(
                f"{what}: there are no ImageNet backbone weights for {entry.name}; use `coco`, `none` or a "
                "local state dict PATH"
            )
        return PretrainedSource("imagenet", ensure_torchvision_weights(entry.imagenet_weights, what))
    if pretrained == "coco":
        if entry.coco_file is not None:
            return PretrainedSource("coco", entry.coco_file(what))
        if entry.coco_weights is None:
            raise ConfigError(
                f"{what}: torchvision has no COCO weights for {entry.name}. Use `imagenet` (ImageNet "
                "backbone), `none`, a local state dict PATH, or a model with COCO weights "
                "(`visionautoml models zoo` lists them)."
            )
        return PretrainedSource("coco", ensure_torchvision_weights(entry.coco_weights, what))
    path = Path(pretrained).expanduser()
    if not path.exists():
        raise ConfigError(
            f"training_parameters.pretrained: '{pretrained}' is neither coco, imagenet, none nor an existing "
            "file; give the path of a state dict (.pt/.pth) or of a saved model folder"
        )
    return PretrainedSource("path", path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: a plain state dict, a training checkpoint or a saved model folder."""
    path = Path(path)
    if path.is_dir():
        path = path / _WEIGHTS_FILE
    try:
        data: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrainingError(f"{path}: weights file not found") from None
    except Exception as error:
        raise TrainingError(
            f"{path}: not a loadable state dict ({type(error).__name__}: {first_line(error)}). "
            "Only plain tensors are accepted (torch.load weights_only=True); save with "
            "torch.save(model.state_dict(), path)."
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(value, torch.Tensor) for value in data.values()):
        raise TrainingError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return data


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor whose name and shape match; the rest keep the module's initialisation.

    This is how weights trained on other classes fit a new dataset: only the class-dependent
    head layers differ in shape, and those start fresh.
    """
    own = module.state_dict()
    report = LoadReport()
    usable = {}
    for name, tensor in state_dict.items():
        if name not in own:
            report.unexpected.append(name)
        elif own[name].shape != tensor.shape:
            report.reshaped.append(name)
        else:
            usable[name] = tensor
            report.loaded.append(name)
    report.missing = [
        name for name in own if name not in state_dict and not name.endswith("num_batches_tracked")
    ]
    module.load_state_dict(usable, strict=False)
    return report


def load_weights(module: nn.Module, path: str | Path) -> LoadReport:
    """Start ``module`` from a checkpoint (incremental training); class-dependent heads adapt.

    ``path`` is a state dict file or a saved model folder (e.g. the folder
    :func:`visionautoml.tracking.models.resolve_model` returns for ``checkpoint_run_id``).
    """
    report = load_matching(module, read_state_dict(path))
    report.raise_if_unrelated(f"checkpoint {path}", type(module).__name__)
    log.info("checkpoint %s: %s", path, report.summary())
    return report

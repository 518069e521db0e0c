"""YOLOX (Megvii's anchor-free YOLO with the SimOTA assigner) behind the zoo's torchvision-style interface.

The network and its loss are the ``pixeltable-yolox`` package's (an Apache-2.0 fork of
Megvii's code, whose module names match the official checkpoints key for key); this module
only wraps them so that trainer, evaluation, export and serving see what every torchvision
detector offers: a list of float CHW RGB images in [0, 1] of any size, losses in training,
``boxes``/``scores``/``labels`` (1..C) in each image's own pixels in evaluation.

Inside, every image is letterboxed the way Megvii trained the COCO weights: scaled so its
longer side fits ``image_size``, placed top-left on a square of grey 114, BGR, 0-255, no
mean or std. (The fork's own ``YoloxProcessor`` feeds RGB to those weights; we follow the
training code instead.) The resize is a ``grid_sample`` over a fixed square grid computed
from the image's shape tensor, so one ONNX graph accepts any image size and keeps the
letterbox, decoding, class-aware NMS and the scaling back in the graph.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.onnx import operators
from torchvision.ops import batched_nms, box_convert
from yolox.config import YoloxConfig
from yolox.models import YoloxModule

from visionautoml.errors import ConfigError
from visionautoml.models import weights

log = logging.getLogger(__name__)
# The package's SimOTA assigner still enters the deprecated ``torch.cuda.amp.autocast(enabled=False)``.
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.autocast", category=FutureWarning)

COCO_RELEASE = "https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0"
PAD_VALUE = 114.0
"""The grey Megvii pads letterboxed images with (0-255 scale), in training and evaluation alike."""
BACKBONE_STAGES = ("stem", "dark2", "dark3", "dark4", "dark5")
"""CSPDarknet's stages from the input: what ``layers_to_freeze`` counts."""
TOPK_CANDIDATES = 1000
"""Best-scoring anchors kept before NMS, as torchvision's one-stage detectors bound NMS's cost."""


@dataclass(frozen=True, slots=True)
class YoloxVariant:
    """Depth and width multipliers of Megvii's ``exps/default`` file, its input size, its COCO file's hash.

    Megvii publishes no hash. ``sha256`` and ``size_bytes`` are the Git LFS pointer of a
    re-upload of each release file on Hugging Face (``kadirnar/<name>-v0.1.1``; ``yolox_m``'s
    matches a second, independent upload), not checked against GitHub from here. Should they
    differ from the release, a download fails loudly and says what to do; it never loads.
    """

    depth: float
    width: float
    image_size: int
    depthwise: bool = False
    sha256: str | None = None
    size_bytes: int | None = None


YOLOX_VARIANTS: dict[str, YoloxVariant] = {
    "yolox_nano": YoloxVariant(
        0.33, 0.25, 416, True, "cd28f55fbbc1829f99d9ac9b38a16d259a22889739c8728ea877610201feff7b", 7694953
    ),
    "yolox_tiny": YoloxVariant(
        0.33, 0.375, 416, False, "9de513de589ac98bb92d3bca53b5af7b9acfa9b0bacb831f7999d0f7afaee8f0", 40755013
    ),
    "yolox_s": YoloxVariant(
        0.33, 0.50, 640, False, "f55ded7181e1b0c13285c56e7790b8f0e8f8db590fe4edb37f0b7f345c913a30", 72089125
    ),
    "yolox_m": YoloxVariant(
        0.67, 0.75, 640, False, "60076992b32da82951c90cfa7bd6ab70eba9eda243e08b940a396f60ac2d19b6", 203114461
    ),
    "yolox_l": YoloxVariant(
        1.0, 1.0, 640, False, "1e6b7fa6240375370b2a8a8eab9066b3cdd43fd1d0bfa8d2027fd3a51def2917", 434357141
    ),
    "yolox_x": YoloxVariant(
        1.33, 1.25, 640, False, "5652330b6ae860043f091b8f550a60c10e1129f416edfdb65c259be6caf355cf", 793463373
    ),
}

COCO_URLS: dict[str, str] = {name: f"{COCO_RELEASE}/{name}.pth" for name in YOLOX_VARIANTS}
"""Megvii's official COCO checkpoints: ``{"model": state dict, ...}`` of plain tensors and containers."""

MODEL_SIZES: dict[str, str] = {
    "small": "yolox_s",
    "medium": "yolox_m",
    "large": "yolox_l",
    "extra_large": "yolox_x",
}
"""The cloud service's ``model_size`` for ``model_name: yolox`` (its default is ``medium``)."""


def variant_for(model_name: str, model_size: str | None = None) -> str:
    """The variant ``model_name`` (and, for the generic ``yolox``, ``model_size``) names."""
    if model_name in YOLOX_VARIANTS:
        return model_name
    if model_name != "yolox":
        raise ConfigError(
            f"training_parameters.model_name: '{model_name}' is not a YOLOX model; "
            f"use yolox or one of {', '.join(YOLOX_VARIANTS)}"
        )
    size = model_size or "medium"
    if size not in MODEL_SIZES:
        raise ConfigError(
            f"training_parameters.model_size: '{size}' is not a YOLOX size; use one of "
            f"{', '.join(MODEL_SIZES)} (or a model_name such as yolox_nano)"
        )
    return MODEL_SIZES[size]


def letterbox(image: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """``(3, size, size)`` BGR 0-255 input as Megvii trained it, and the scale from image to input pixels.

    Sampling ``image - 114`` with zero padding and adding 114 back pads with grey: one
    bilinear ``grid_sample`` does resize and pad, with sizes taken from the shape tensor so a
    traced graph stays correct for every image size.
    """
    height_width = operators.shape_as_tensor(image)[1:].to(device=image.device, dtype=image.dtype)
    longest = height_width.max()
    # Output pixel centres in [-1, 1] coordinates of the square that the longer side spans.
    steps = (torch.arange(size, device=image.device, dtype=image.dtype) + 0.5) * (2.0 / size)
    x = steps * (longest / height_width[1]) - 1.0
    y = steps * (longest / height_width[0]) - 1.0
    grid = torch.stack((x[None, :].expand(size, size), y[:, None].expand(size, size)), dim=-1)
    pixels = image.flip(0) * 255.0 - PAD_VALUE
    sampled = F.grid_sample(
        pixels[None], grid[None], mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return sampled[0] + PAD_VALUE, size / longest


class YoloxDetector(YoloxModule):
    """The package's YOLOX module as a zoo detector; the same ``backbone``/``head``, so official keys load.

    ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` are read at every call,
    as on torchvision's one-stage detectors, so the zoo's threshold helpers work unchanged.
    """

    def __init__(
        self,
        module: YoloxModule,
        *,
        image_size: int,
        score_thresh: float,
        nms_thresh: float,
        detections_per_img: int,
        frozen_stages: tuple[str, ...] = (),
    ) -> None:
        super().__init__(module.backbone, module.head)
        self.image_size = image_size
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.frozen_stages = frozen_stages
        self.train_sizes: tuple[int, ...] = ()
        for name in frozen_stages:
            getattr(self.backbone.backbone, name).requires_grad_(False)

    def train(self, mode: bool = True) -> YoloxDetector:
        """Frozen stages keep their batch-norm statistics too, as torchvision's frozen layers do."""
        super().train(mode)
        for name in self.frozen_stages:
            getattr(self.backbone.backbone, name).eval()
        return self

    def forward(  # type: ignore[override]
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        size = self.image_size
        if self.training and self.train_sizes:  # multi_scale: one random size per batch
            size = self.train_sizes[int(torch.randint(len(self.train_sizes), ()))]
        inputs, scales = zip(*(letterbox(image, size) for image in images), strict=True)
        batch = torch.stack(inputs)
        features = self.backbone(batch)
        if self.training:
            if targets is None:
                raise ValueError("YOLOX needs targets in training mode")
            labels = yolox_targets(targets, scales, batch)
            _, iou, objectness, classes, l1, _ = self.head(features, labels, batch)
            losses = {"loss_box_iou": iou, "loss_objectness": objectness, "loss_classifier": classes}
            if self.head.use_l1:
                losses["loss_box_l1"] = l1
            return losses
        outputs = self.head(features)
        return [
            self._detections(output, scale, image)
            for output, scale, image in zip(outputs, scales, images, strict=True)
        ]

    def _detections(self, output: Tensor, scale: Tensor, image: Tensor) -> dict[str, Tensor]:
        """Megvii's post-processing (score = objectness x best class) in the image's own pixels.

        Boxes are clipped to the image before NMS, as torchvision's detectors do.
        """
        class_scores, classes = output[:, 5:].max(dim=1)
        scores, order = (output[:, 4] * class_scores).topk(min(TOPK_CANDIDATES, output.shape[0]))
        keep = scores > self.score_thresh
        scores, order = scores[keep], order[keep]
        boxes = box_convert(output[order, :4] / scale, "cxcywh", "xyxy")
        height_width = operators.shape_as_tensor(image)[1:].to(device=boxes.device, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), height_width.flip(0).repeat(2))
        classes = classes[order]
        kept = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[kept], "scores": scores[kept], "labels": classes[kept] + 1}


def yolox_targets(targets: list[dict[str, Tensor]], scales: tuple[Tensor, ...], batch: Tensor) -> Tensor:
    """torchvision targets as the YOLOX head wants them: ``(B, max boxes, 5)`` rows of class, cx, cy, w, h.

    Classes count from 0 (torchvision's 1..C minus the background), boxes are in letterboxed
    input pixels, and the head counts an image's boxes as its leading rows that are not all
    zero, so padding rows stay zero.
    """
    count = max([len(target["boxes"]) for target in targets] + [1])
    labels = batch.new_zeros((len(targets), count, 5))
    for index, (target, scale) in enumerate(zip(targets, scales, strict=True)):
        boxes = target["boxes"].to(batch) * scale
        labels[index, : len(boxes), 0] = target["labels"].to(batch) - 1
        labels[index, : len(boxes), 1:] = box_convert(boxes, "xyxy", "cxcywh")
    return labels


def build_yolox(
    variant: str,
    num_classes: int,
    *,
    image_size: int | None = None,
    score_thresh: float = 0.3,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    trainable_layers: int = len(BACKBONE_STAGES),
) -> YoloxDetector:
    """A randomly initialised YOLOX for ``num_classes`` (background included, as in torchvision).

    The package's own builder sets Megvii's initialisation: batch norm with eps 1e-3 and
    momentum 0.03, class and objectness biases for a prior probability of 0.01.
    """
    spec = YOLOX_VARIANTS[variant]
    size = image_size or spec.image_size
    if size % 32:
        raise ConfigError(
            f"training_parameters.image_size: {size} is not a multiple of 32, which {variant}'s "
            f"strides need; use e.g. {max(32, size // 32 * 32)} or {size // 32 * 32 + 32}"
        )
    if not 0 <= trainable_layers <= len(BACKBONE_STAGES):
        raise ConfigError(
            f"training_parameters.layers_to_freeze: {variant} has {len(BACKBONE_STAGES)} backbone layers; "
            f"freeze 0 to {len(BACKBONE_STAGES)}"
        )
    config = YoloxConfig(
        name=variant,
        num_classes=num_classes - 1,
        depth=spec.depth,
        width=spec.width,
        depthwise=spec.depthwise,
    )
    return YoloxDetector(
        config.get_model(),
        image_size=size,
        score_thresh=score_thresh,
        nms_thresh=nms_thresh,
        detections_per_img=detections_per_img,
        frozen_stages=BACKBONE_STAGES[: len(BACKBONE_STAGES) - trainable_layers],
    )


def ensure_coco_weights(variant: str, what: str, *, release: str = COCO_RELEASE) -> Path:
    """The official COCO file of ``variant`` in the torch cache, downloaded (and checked) when missing.

    Cache, timeout, offline mode, the hash check and the "put URL at PATH" error are the
    zoo's own (:func:`visionautoml.models.weights.ensure_weights_file`); the file names carry
    no hash, so a download is checked against :attr:`YoloxVariant.sha256`.
    ``release`` is where the files are: Megvii's GitHub release, or a mirror of it.
    """
    return weights.ensure_weights_file(
        f"{release.rstrip('/')}/{variant}.pth", what, sha256=YOLOX_VARIANTS[variant].sha256
    )


def load_official_checkpoint(model: nn.Module, path: str | Path) -> weights.LoadReport:
    """Load an official (or the fork's) checkpoint, ``{"model": state dict, ...}``, into ``model``.

    The file is read with ``weights_only=True``. Tensors whose shape depends on the class count
    (the three ``head.cls_preds``) keep their fresh initialisation; the report names them.
    """
    report = weights.load_matching(model, weights.read_state_dict(path))
    report.raise_if_unrelated(f"YOLOX weights {path}", type(model).__name__)
    log.info("YOLOX weights %s: %s", path, report.summary())
    return report

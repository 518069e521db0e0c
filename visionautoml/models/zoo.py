"""The model zoo: an explicit registry from the cloud service's model names to detector builders.

Each entry names a builder (:mod:`visionautoml.models.architectures` for torchvision's
detectors, :mod:`visionautoml.models.yolox` for the YOLOX family), its input size, its
freezable backbone layers and the pretrained weights it has, so that a saved model rebuilds
from its name alone and :mod:`visionautoml.models.weights` loads COCO, ImageNet or local
weights from files it checked first. A name a cloud config may use that cannot be here
(Ultralytics' AGPL YOLOs) is answered with the model to use instead.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    VGG16_Weights,
)
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FCOS,
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    FCOS_ResNet50_FPN_Weights,
    RetinaNet,
    RetinaNet_ResNet50_FPN_Weights,
    SSD300_VGG16_Weights,
    SSDLite320_MobileNet_V3_Large_Weights,
)

from visionautoml.config import NOT_IN_ZOO, TrainingParameters
from visionautoml.errors import ConfigError
from visionautoml.models import weights, yolox
from visionautoml.models.architectures import (
    RESNETS,
    SSD300_MIN_IMAGE_SIZE,
    InputSize,
    Setup,
    faster_rcnn_mobilenet,
    faster_rcnn_resnet,
    faster_rcnn_resnet50_v2,
    one_stage_resnet,
    ssd300_vgg16,
    ssdlite320_mobilenet,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ZooEntry:
    """One model: its builder, input size, freezable backbone layers and available weights.

    ``defaults`` are detector keyword arguments: torchvision's own for that builder and
    documented CPU-friendly training settings. None changes the architecture or the weights.
    """

    name: str
    family: str
    builder: Callable[[int, Setup], nn.Module]
    default_size: InputSize
    backbone_layers: int
    default_trainable_layers: int
    imagenet_weights: WeightsEnum | None
    coco_weights: WeightsEnum | None = None
    coco_file: Callable[[str], Path] | None = None
    """For weights torchvision does not publish (YOLOX): the checked local file of the COCO weights."""
    defaults: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    @property
    def has_coco_weights(self) -> bool:
        return self.coco_weights is not None or self.coco_file is not None

    @property
    def sizes(self) -> tuple[str, ...]:
        """The size parameters this family takes (the others do not apply to it)."""
        return ("image_size",) if self.family in ("yolox", "ssd") else ("min_size", "max_size")

    def input_size(self, params: TrainingParameters) -> InputSize:
        """The input size ``params`` ask for, from the size parameters of this family (:attr:`sizes`).

        A sweep over several families may set every family's sizes once; whether a size set
        applies to some model of the job is checked when the job is settled
        (:func:`check_model_names`), so none is silently ignored.
        """
        if self.family == "yolox":
            return InputSize(image_size=params.image_size or self.default_size.image_size, letterbox=True)
        if self.family == "ssd":
            size = params.image_size or self.default_size.image_size
            if self.name == "ssd300_vgg16" and size < SSD300_MIN_IMAGE_SIZE:
                raise ConfigError(
                    f"training_parameters.image_size: {size} is too small for ssd300_vgg16; "
                    f"use at least {SSD300_MIN_IMAGE_SIZE} (default 300) or ssdlite320_mobilenet_v3_large"
                )
            return InputSize(image_size=size)
        return InputSize(
            min_size=params.min_size or self.default_size.min_size,
            max_size=params.max_size or self.default_size.max_size,
        )


def _yolox(variant: str, num_classes: int, setup: Setup) -> nn.Module:
    return yolox.build_yolox(
        variant,
        num_classes,
        image_size=setup.size.image_size,
        trainable_layers=setup.trainable_layers,
        **setup.kwargs,
    )


# --- the registry -------------------------------------------------------------------------------

_RCNN_SIZE = InputSize(min_size=800, max_size=1333)
_MOBILENET = MobileNet_V3_Large_Weights.IMAGENET1K_V1


def _resnet_entry(
    name: str, family: str, builder: Callable[[int, Setup], nn.Module], depth: int, coco: WeightsEnum | None
) -> ZooEntry:
    return ZooEntry(name, family, builder, _RCNN_SIZE, 5, 3, RESNETS[depth][1], coco)


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in [
        _resnet_entry(
            "fasterrcnn_resnet50_fpn",
            "faster_rcnn",
            faster_rcnn_resnet(50),
            50,
            FasterRCNN_ResNet50_FPN_Weights.COCO_V1,
        ),
        _resnet_entry(
            "fasterrcnn_resnet50_fpn_v2",
            "faster_rcnn",
            faster_rcnn_resnet50_v2,
            50,
            FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
        ),
        *(
            _resnet_entry(
                f"fasterrcnn_resnet{depth}_fpn", "faster_rcnn", faster_rcnn_resnet(depth), depth, None
            )
            for depth in (18, 34, 101, 152)
        ),
        ZooEntry(
            "fasterrcnn_mobilenet_v3_large_fpn",
            "faster_rcnn",
            faster_rcnn_mobilenet,
            _RCNN_SIZE,
            6,
            3,
            _MOBILENET,
            FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
            defaults={"rpn_score_thresh": 0.05},
        ),
        ZooEntry(
            "fasterrcnn_mobilenet_v3_large_320_fpn",
            "faster_rcnn",
            faster_rcnn_mobilenet,
            InputSize(min_size=320, max_size=640),
            6,
            3,
            _MOBILENET,
            FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
            # Fewer RPN proposals and sampled regions while training (the team's measurement,
            # issue 3: 3.4x faster training on CPU with the same quality).
            defaults={
                "rpn_score_thresh": 0.05,
                "rpn_pre_nms_top_n_test": 150,
                "rpn_post_nms_top_n_test": 150,
                "rpn_pre_nms_top_n_train": 600,
                "rpn_post_nms_top_n_train": 300,
                "box_batch_size_per_image": 128,
            },
            note="CPU-friendly: trains 3.4x faster",
        ),
        _resnet_entry(
            "retinanet_resnet50_fpn",
            "retinanet",
            one_stage_resnet(RetinaNet, 50),
            50,
            RetinaNet_ResNet50_FPN_Weights.COCO_V1,
        ),
        _resnet_entry("retinanet_resnet18_fpn", "retinanet", one_stage_resnet(RetinaNet, 18), 18, None),
        _resnet_entry(
            "fcos_resnet50_fpn", "fcos", one_stage_resnet(FCOS, 50), 50, FCOS_ResNet50_FPN_Weights.COCO_V1
        ),
        _resnet_entry("fcos_resnet18_fpn", "fcos", one_stage_resnet(FCOS, 18), 18, None),
        ZooEntry(
            "ssd300_vgg16",
            "ssd",
            ssd300_vgg16,
            InputSize(image_size=300),
            5,
            4,
            VGG16_Weights.IMAGENET1K_FEATURES,
            SSD300_VGG16_Weights.COCO_V1,
        ),
        ZooEntry(
            "ssdlite320_mobilenet_v3_large",
            "ssd",
            ssdlite320_mobilenet,
            InputSize(image_size=320),
            6,
            6,
            _MOBILENET,
            SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
            note="smallest, fastest",
        ),
        *(
            ZooEntry(
                name,
                "yolox",
                partial(_yolox, name),
                InputSize(image_size=variant.image_size, letterbox=True),
                len(yolox.BACKBONE_STAGES),
                len(yolox.BACKBONE_STAGES),
                None,
                coco_file=partial(yolox.ensure_coco_weights, name),
                note="real-time single-stage (model_name: yolox + model_size)" if name == "yolox_s" else "",
            )
            for name, variant in yolox.YOLOX_VARIANTS.items()
        ),
    ]
}

# torchvision's keyword names for the three inference thresholds, per detector family.
_THRESHOLD_KWARGS: dict[str, tuple[str, str, str]] = {
    "faster_rcnn": ("box_score_thresh", "box_nms_thresh", "box_detections_per_img"),
    "retinanet": ("score_thresh", "nms_thresh", "detections_per_img"),
    "fcos": ("score_thresh", "nms_thresh", "detections_per_img"),
    "ssd": ("score_thresh", "nms_thresh", "detections_per_img"),
    "yolox": ("score_thresh", "nms_thresh", "detections_per_img"),
}
GENERIC_NAMES = {"yolox": "model_size (small | medium | large | extra_large)"}
"""Cloud model names that stand for a family: the concrete model comes from another parameter."""


def get_entry(model_name: str, field: str = "training_parameters.model_name") -> ZooEntry:
    try:
        return ZOO[model_name]
    except KeyError:
        if model_name in NOT_IN_ZOO:
            raise ConfigError(f"{field}: {NOT_IN_ZOO[model_name]}") from None
        close = difflib.get_close_matches(model_name, list(ZOO), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{field}: unknown model '{model_name}'.{hint} "
            f"Valid names: {', '.join(ZOO)} (`visionautoml models zoo` describes them)"
        ) from None


def concrete_parameters(params: TrainingParameters) -> TrainingParameters:
    """``params`` with ``model_name: yolox`` + ``model_size`` as the zoo model they name (``yolox_m``).

    The trained model records the concrete name, so it rebuilds whatever the defaults become;
    a ``model_size`` that a named model does not use is refused rather than ignored.
    """
    name = params.model_name
    if name in GENERIC_NAMES:
        return params.model_copy(update={"model_name": yolox.variant_for(name, params.model_size)})
    if params.model_size is not None and name not in yolox.YOLOX_VARIANTS:
        raise ConfigError(
            f"training_parameters.model_size: '{params.model_size}' applies to model_name: yolox only, "
            f"not to {name}; remove it or use model_name: yolox"
        )
    if params.model_size is not None and yolox.variant_for("yolox", params.model_size) != name:
        raise ConfigError(
            f"training_parameters.model_size: '{params.model_size}' contradicts model_name {name}; give "
            "model_name: yolox with a model_size, or a concrete model_name alone"
        )
    return params


def check_model_names(job: Any) -> None:
    """Every model a job may train exists here and has the weights it asks for: fails before any run.

    Without this, a missing COCO file (an offline machine) would fail every trial of a sweep after
    its data was read and its runs were created.
    """
    params = job.training_parameters
    # In the automatic mode (a sweep without search_space) the sweep chooses the models and, unless
    # set, their start from the data and the machine: only what the job sets is checked here.
    automatic = job.is_sweep and not job.search_space and "model_name" not in params.model_fields_set
    names = set() if automatic else {concrete_parameters(params).model_name}
    for index, subspace in enumerate(job.search_space):
        distribution = subspace.get("model_name")
        sizes = subspace.get("model_size")
        for value in (distribution.values or []) if distribution is not None else []:
            if str(value) in GENERIC_NAMES:
                for size in (sizes.values or []) if sizes is not None else [params.model_size]:
                    names.add(yolox.variant_for(str(value), size))
            else:
                get_entry(str(value), f"search_space[{index}].model_name")
                names.add(str(value))
    if names:
        _check_sizes(job, names)
    pretrained = set() if automatic and "pretrained" not in params.model_fields_set else {params.pretrained}
    for subspace in job.search_space:
        if "pretrained" in subspace:
            pretrained |= set(subspace["pretrained"].values or [])
    for name in sorted(names):
        for choice in sorted(pretrained):
            weights.pretrained_source(get_entry(name), str(choice))


def _check_sizes(job: Any, names: set[str]) -> None:
    """A size parameter is refused when no model of the job takes it (SSD's image_size on a Faster R-CNN)."""
    taken = {size for name in names for size in get_entry(name).sizes}
    fixed = [
        size for size in ("image_size", "min_size", "max_size") if getattr(job.training_parameters, size)
    ]
    searched = {
        size
        for subspace in job.search_space
        for size in subspace
        if size in ("image_size", "min_size", "max_size")
    }
    for size in sorted(set(fixed) | searched):
        if size not in taken:
            users = "the SSD and YOLOX models" if size == "image_size" else "the R-CNN-style models"
            instead = "min_size and max_size" if size == "image_size" else "image_size"
            raise ConfigError(
                f"training_parameters.{size} applies to {users}, and this job trains none of them "
                f"({', '.join(sorted(names))}); use {instead}"
            )
    for index, subspace in enumerate(job.search_space):
        models = subspace.get("model_name")
        if models is None:
            continue
        local = {str(value) for value in models.values or []} - set(GENERIC_NAMES)
        local_taken = {size for name in local for size in get_entry(name).sizes}
        for size in set(subspace) & {"image_size", "min_size", "max_size"}:
            if local and size not in local_taken:
                models_text = ", ".join(sorted(local))
                raise ConfigError(
                    f"search_space[{index}].{size}: none of this sub-space's models ({models_text}) takes "
                    f"{size}; move it to the sub-space of the models that do"
                )


def trainable_layers(entry: ZooEntry, params: TrainingParameters) -> int:
    """Backbone layers left trainable: the cloud service's ``layers_to_freeze`` counted from the input.

    Unset, a pretrained backbone keeps torchvision's default frozen stem and a randomly
    initialised one trains every layer.
    """
    if params.layers_to_freeze is None:
        return entry.default_trainable_layers if params.pretrained != "none" else entry.backbone_layers
    if params.layers_to_freeze > entry.backbone_layers:
        raise ConfigError(
            f"training_parameters.layers_to_freeze: {params.layers_to_freeze} is more than the "
            f"{entry.backbone_layers} backbone layers of {entry.name}; use 0 to {entry.backbone_layers}"
        )
    return entry.backbone_layers - params.layers_to_freeze


def _setup(entry: ZooEntry, params: TrainingParameters, backbone_weights: dict | None) -> Setup:
    size = entry.input_size(params)
    score, nms, per_image = _THRESHOLD_KWARGS[entry.family]
    kwargs = {
        **entry.defaults,
        score: params.box_score_threshold,
        nms: params.nms_iou_threshold,
        per_image: params.box_detections_per_image,
    }
    if entry.family not in ("ssd", "yolox"):
        kwargs |= {"min_size": size.min_size, "max_size": size.max_size}
    return Setup(
        frozen_batch_norm=params.pretrained != "none",
        trainable_layers=trainable_layers(entry, params),
        backbone_weights=backbone_weights,
        size=size,
        kwargs=kwargs,
    )


def build_model(model_name: str, num_classes: int, params: TrainingParameters) -> nn.Module:
    """A detector for ``num_classes`` (background included) with the weights ``params.pretrained`` names.

    ``coco`` and ``PATH`` weights load into the finished model; tensors whose shapes depend
    on the class count are re-initialised and logged. ``imagenet`` loads the classification
    backbone only.
    """
    if num_classes < 2:
        raise ConfigError(f"a detector needs at least one object class besides background, got {num_classes}")
    entry = get_entry(model_name)
    source = weights.pretrained_source(entry, params.pretrained)
    backbone_weights = source.state_dict() if source.kind == "imagenet" else None
    module = entry.builder(num_classes, _setup(entry, params, backbone_weights))
    if params.multi_scale:
        _train_at_several_sizes(module, entry, params)
    if source.kind in ("coco", "path"):
        report = weights.load_matching(module, source.state_dict())
        report.raise_if_unrelated(source.describe(), model_name)
        log.info("%s weights for %s: %s", source.describe(), model_name, report.summary())
    return module


def _train_at_several_sizes(module: nn.Module, entry: ZooEntry, params: TrainingParameters) -> None:
    """``multi_scale``: each training batch at a random size from 0.67x to 1.33x the input, as YOLO does.

    Evaluation and inference keep the model's own size. torchvision's R-CNN-style transform
    draws a training size from ``min_size`` when it is a tuple and evaluates at its last entry.
    """
    size = entry.input_size(params)
    base = size.image_size or size.min_size
    assert base is not None
    sizes = sorted(
        {max(32, round(base * factor / 32) * 32) for factor in (0.67, 0.83, 1.0, 1.17, 1.33)} - {base}
    )
    if entry.family == "yolox":
        module.train_sizes = (*sizes, base)
    elif entry.family in ("faster_rcnn", "retinanet", "fcos"):
        module.transform.min_size = (*sizes, base)
    else:
        raise ConfigError(
            f"training_parameters.multi_scale: {entry.name} has anchors fixed to its square input "
            f"(image_size {base}); multi_scale applies to YOLOX and the R-CNN-style models. Use image_size "
            "in the search_space to try other sizes"
        )


def parameter_count(model_name: str, num_classes: int = 91) -> int:
    """Parameters of the model as fine-tuned from pretrained weights, as torchvision counts them.

    Built on the meta device: no memory and no initialisation cost, so the zoo table is instant.
    """
    entry = get_entry(model_name)
    params = TrainingParameters(model_name=model_name, pretrained="coco")
    with torch.device("meta"):
        module = entry.builder(num_classes, _setup(entry, params, None))
    return sum(parameter.numel() for parameter in module.parameters())


RAW_SCORE_THRESHOLD = 0.01
"""The score a detector runs at when its caller filters by the model's own threshold afterwards.

NMS is greedy by score, so every detection above the model's threshold comes out exactly
as it would at that threshold; the ONNX graph and the PyTorch predictor both run here.
"""


def score_threshold(detector: nn.Module) -> float | None:
    """The score below which ``detector`` drops detections; None for a module that is not a zoo detector.

    torchvision keeps it on the ROI heads (two-stage) or on the detector itself (one-stage).
    """
    owner = getattr(detector, "roi_heads", detector)
    return float(owner.score_thresh) if hasattr(owner, "score_thresh") else None


def set_score_threshold(detector: nn.Module, threshold: float) -> None:
    getattr(detector, "roi_heads", detector).score_thresh = threshold


@contextmanager
def score_threshold_at_most(detector: nn.Module, threshold: float) -> Iterator[None]:
    """Let ``detector`` return detections down to ``threshold`` for a while (no-op if it already does)."""
    original = score_threshold(detector)
    if original is None or original <= threshold:
        yield
        return
    set_score_threshold(detector, threshold)
    try:
        yield
    finally:
        set_score_threshold(detector, original)

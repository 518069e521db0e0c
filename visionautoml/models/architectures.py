"""The torchvision detectors of the zoo, assembled from torchvision parts, and what every builder gets.

Every model is assembled here from torchvision parts rather than through torchvision's
``*_fpn(weights=...)`` functions, because those decide the architecture (frozen batch
norm, frozen layers) from whether *they* download weights, force 91 classes with COCO
weights and try the network on their own. Building the architecture ourselves gives one
structure per model name whatever the weights, so a saved model rebuilds from its name
alone. ``tests/test_zoo.py`` verifies each architecture against torchvision's own builder,
key by key and shape by shape, so real COCO files load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNet152_Weights,
    mobilenet_v3_large,
    resnet,
)
from torchvision.models import vgg as vgg_module
from torchvision.models._api import WeightsEnum
from torchvision.models.detection import (
    FasterRCNN,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, RPNHead, _default_anchorgen
from torchvision.models.detection.ssd import SSD, SSDHead, _vgg_extractor
from torchvision.models.detection.ssdlite import SSDLiteHead, _normal_init
from torchvision.models.detection.ssdlite import _mobilenet_extractor as _ssdlite_extractor
from torchvision.ops import misc as misc_ops
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from visionautoml.models import weights

log = logging.getLogger(__name__)

# The smallest SSD300 input whose VGG feature pyramid still has six levels (its last two unpadded
# 3x3 convolutions need a 3x3 map): 267 fails, 268 works; tests/test_zoo.py trains at 268.
SSD300_MIN_IMAGE_SIZE = 268


@dataclass(frozen=True, slots=True)
class InputSize:
    """How a model scales its input: shorter side to ``min_size`` capped by ``max_size``, or a square.

    The models resize internally; the training data loader uses the same rule to shrink
    large images once, so decoding, augmentation and the model's own resize see small ones.
    """

    min_size: int | None = None
    max_size: int | None = None
    image_size: int | None = None
    letterbox: bool = False
    """Square input by fitting the longer side and padding (YOLOX) rather than by stretching (SSD)."""

    def scaled(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the model resizes a ``width`` x ``height`` image to (before padding)."""
        if self.image_size is not None and self.letterbox:
            scale = self.image_size / max(width, height)
            return max(1, round(width * scale)), max(1, round(height * scale))
        if self.image_size is not None:
            return self.image_size, self.image_size
        assert self.min_size is not None and self.max_size is not None
        scale = min(self.min_size / min(width, height), self.max_size / max(width, height))
        return max(1, round(width * scale)), max(1, round(height * scale))

    def describe(self) -> str:
        if self.image_size is not None:
            return f"{self.image_size}x{self.image_size}"
        return f"{self.min_size}-{self.max_size}"


@dataclass(frozen=True, slots=True)
class Setup:
    """What a builder needs beyond the class count, decided by :func:`build_model`."""

    frozen_batch_norm: bool
    trainable_layers: int
    backbone_weights: dict[str, torch.Tensor] | None
    size: InputSize
    kwargs: dict[str, Any]


RESNETS: dict[int, tuple[Callable[..., resnet.ResNet], WeightsEnum]] = {
    18: (resnet.resnet18, ResNet18_Weights.IMAGENET1K_V1),
    34: (resnet.resnet34, ResNet34_Weights.IMAGENET1K_V1),
    50: (resnet.resnet50, ResNet50_Weights.IMAGENET1K_V1),
    101: (resnet.resnet101, ResNet101_Weights.IMAGENET1K_V1),
    152: (resnet.resnet152, ResNet152_Weights.IMAGENET1K_V1),
}


def _load_backbone(backbone: nn.Module, setup: Setup) -> nn.Module:
    if setup.backbone_weights is not None:
        report = weights.load_matching(backbone, setup.backbone_weights)
        log.info("ImageNet backbone weights: %s", report.summary())
    return backbone


def _resnet(depth: int, setup: Setup, *, frozen_batch_norm: bool) -> resnet.ResNet:
    norm = misc_ops.FrozenBatchNorm2d if frozen_batch_norm else nn.BatchNorm2d
    return _load_backbone(RESNETS[depth][0](weights=None, norm_layer=norm), setup)


def faster_rcnn_resnet(depth: int) -> Callable[[int, Setup], nn.Module]:
    def build(num_classes: int, setup: Setup) -> nn.Module:
        backbone = _resnet(depth, setup, frozen_batch_norm=setup.frozen_batch_norm)
        return FasterRCNN(
            _resnet_fpn_extractor(backbone, setup.trainable_layers), num_classes, **setup.kwargs
        )

    return build


def faster_rcnn_resnet50_v2(num_classes: int, setup: Setup) -> nn.Module:
    # The v2 recipe trains batch norm everywhere, also with pretrained weights (as torchvision does).
    backbone = _resnet(50, setup, frozen_batch_norm=False)
    backbone = _resnet_fpn_extractor(backbone, setup.trainable_layers, norm_layer=nn.BatchNorm2d)
    anchors = _default_anchorgen()
    return FasterRCNN(
        backbone,
        num_classes,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2),
        box_head=FastRCNNConvFCHead(
            (backbone.out_channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d
        ),
        **setup.kwargs,
    )


def faster_rcnn_mobilenet(num_classes: int, setup: Setup) -> nn.Module:
    norm = misc_ops.FrozenBatchNorm2d if setup.frozen_batch_norm else nn.BatchNorm2d
    backbone = _load_backbone(mobilenet_v3_large(weights=None, norm_layer=norm), setup)
    backbone = _mobilenet_extractor(backbone, True, setup.trainable_layers)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    return FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **setup.kwargs)


def one_stage_resnet(detector: type[nn.Module], depth: int) -> Callable[[int, Setup], nn.Module]:
    """RetinaNet and FCOS share torchvision's P3-P7 ResNet-FPN backbone."""

    def build(num_classes: int, setup: Setup) -> nn.Module:
        backbone = _resnet(depth, setup, frozen_batch_norm=setup.frozen_batch_norm)
        backbone = _resnet_fpn_extractor(
            backbone, setup.trainable_layers, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256)
        )
        return detector(backbone, num_classes, **setup.kwargs)

    return build


def _vgg16_features() -> nn.Module:
    """VGG16 without the 120M-parameter classifier SSD throws away (initialising it takes a second).

    The same modules and initialisation as ``torchvision.models.vgg16`` up to ``features``, so
    ImageNet ``features.*`` weights load unchanged.
    """
    vgg = nn.Module()
    vgg.features = vgg_module.make_layers(vgg_module.cfgs["D"])
    for layer in vgg.features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(layer.bias, 0)
    return vgg


def ssd300_vgg16(num_classes: int, setup: Setup) -> nn.Module:
    backbone = _vgg_extractor(_load_backbone(_vgg16_features(), setup), False, setup.trainable_layers)
    size = setup.size.image_size
    # torchvision's anchor steps place anchor centres for a 300x300 input; at any other size the
    # generator's uniform grid over the actual feature maps is the correct placement.
    anchors = DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
        scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300] if size == 300 else None,
    )
    head = SSDHead([512, 1024, 512, 256, 256, 256], anchors.num_anchors_per_location(), num_classes)
    # VGG16's ImageNet weights expect 0-255 inputs with the mean removed, as in torchvision.
    kwargs = {"image_mean": [0.48235, 0.45882, 0.40784], "image_std": [1.0 / 255.0] * 3, **setup.kwargs}
    return SSD(backbone, anchors, (size, size), num_classes, head=head, **kwargs)


def ssdlite320_mobilenet(num_classes: int, setup: Setup) -> nn.Module:
    # Always the reduced tail of torchvision's COCO model, so COCO weights, ImageNet weights (whose
    # last blocks then do not fit and are re-initialised) and none all give one architecture.
    norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=True)
    _normal_init(backbone)
    backbone = _ssdlite_extractor(_load_backbone(backbone, setup), setup.trainable_layers, norm)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    head = SSDLiteHead([672, 480, 512, 256, 256, 128], anchors.num_anchors_per_location(), num_classes, norm)
    kwargs = {"topk_candidates": 300, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, **setup.kwargs}
    size = setup.size.image_size
    return SSD(backbone, anchors, (size, size), num_classes, head=head, **kwargs)

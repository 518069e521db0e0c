"""The model zoo: every entry builds, trains a step and predicts; architectures match torchvision."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.detection as tv_detection
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.config import TrainingParameters
from visionautoml.errors import ConfigError
from visionautoml.models.zoo import ZOO, build_model, parameter_count

NUM_CLASSES = 3
SMALL = {"ssd300_vgg16": 268}  # the smallest input its VGG feature pyramid accepts


def _params(name: str, **changes) -> TrainingParameters:
    small = {"min_size": 64, "max_size": 64, "image_size": SMALL.get(name, 64)}
    return TrainingParameters(model_name=name, pretrained="none", **(small | changes))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lighten(model: torch.nn.Module) -> torch.nn.Module:
    """Fewer proposals and sampled regions: the two-stage models' step costs a tenth, still end to end."""
    if hasattr(model, "roi_heads"):
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 32
        model.rpn._pre_nms_top_n = model.rpn._post_nms_top_n = {"training": 64, "testing": 32}
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_every_model_builds_trains_a_step_and_predicts(name):
    torch.manual_seed(0)
    model = _lighten(build_model(name, NUM_CLASSES, _params(name, box_score_threshold=0.0)))
    images = [torch.rand(3, 48, 64), torch.rand(3, 40, 56)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 5.0, 50.0, 20.0], [1.0, 1.0, 9.0, 9.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]

    model.train()
    count = 1 if name == "ssd300_vgg16" else 2  # VGG16 at 268 pixels costs as much as all the others
    loss = sum(model(images[:count], targets[:count]).values())
    assert math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)

    model.eval()
    with torch.inference_mode():
        (output,) = model(images[:1])
    boxes = output["boxes"]
    assert boxes.shape[1] == 4 and len(boxes) == len(output["scores"]) > 0
    assert boxes[:, [0, 2]].max() <= 64 and boxes[:, [1, 3]].max() <= 48  # the image's own pixels
    # Sigmoid heads (RetinaNet, FCOS) also score label 0, which the Predictor drops.
    assert set(output["labels"].tolist()) <= {0, 1, 2}


TORCHVISION_BUILDERS = {
    "fasterrcnn_resnet50_fpn": tv_detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": tv_detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": tv_detection.fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": tv_detection.fasterrcnn_mobilenet_v3_large_320_fpn,
    "retinanet_resnet50_fpn": tv_detection.retinanet_resnet50_fpn,
    "fcos_resnet50_fpn": tv_detection.fcos_resnet50_fpn,
    "ssd300_vgg16": tv_detection.ssd300_vgg16,
    "ssdlite320_mobilenet_v3_large": tv_detection.ssdlite320_mobilenet_v3_large,
}


def _resnet_fpn(depth: int, one_stage: bool = False):
    extra = {"returned_layers": [2, 3, 4], "extra_blocks": LastLevelP6P7(256, 256)} if one_stage else {}
    return resnet_fpn_backbone(
        backbone_name=f"resnet{depth}", weights=None, norm_layer=FrozenBatchNorm2d, **extra
    )


REFERENCE_BUILDERS = {
    **{
        name: (lambda builder=builder: builder(weights=None, weights_backbone=None, num_classes=91))
        for name, builder in TORCHVISION_BUILDERS.items()
    },
    **{
        f"fasterrcnn_resnet{depth}_fpn": (lambda depth=depth: tv_detection.FasterRCNN(_resnet_fpn(depth), 91))
        for depth in (18, 34, 101, 152)
    },
    "retinanet_resnet18_fpn": lambda: tv_detection.RetinaNet(_resnet_fpn(18, one_stage=True), 91),
    "fcos_resnet18_fpn": lambda: tv_detection.FCOS(_resnet_fpn(18, one_stage=True), 91),
}


def test_every_architecture_matches_torchvision_tensor_for_tensor():
    """So torchvision's COCO files (and checkpoints of torchvision-built models) load completely."""
    assert set(REFERENCE_BUILDERS) == {name for name, entry in ZOO.items() if entry.family != "yolox"}

    def shapes(module):
        return {
            k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")
        }

    for name, reference in REFERENCE_BUILDERS.items():
        with torch.device("meta"):
            ours = build_model(name, 91, TrainingParameters(model_name=name, pretrained="none"))
            theirs = reference()
        assert shapes(ours) == shapes(theirs), name


@pytest.mark.parametrize("name", [name for name, entry in ZOO.items() if entry.coco_weights])
def test_parameter_counts_equal_torchvision_published_counts(name):
    assert parameter_count(name) == ZOO[name].coco_weights.meta["num_params"]


def test_parameter_count_follows_the_class_count():
    # Faster R-CNN's predictor: 1024 -> classes scores (+1 bias) and 4 box deltas per class.
    difference = parameter_count("fasterrcnn_resnet18_fpn", 91) - parameter_count(
        "fasterrcnn_resnet18_fpn", 2
    )
    assert difference == 89 * (1024 + 1) * 5


def test_sizes_thresholds_and_cpu_defaults_are_honoured():
    params = _params(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        min_size=96,
        max_size=160,
        box_score_threshold=0.25,
        nms_iou_threshold=0.4,
        box_detections_per_image=7,
    )
    with torch.device("meta"):
        rcnn = build_model("fasterrcnn_mobilenet_v3_large_320_fpn", 2, params)
        retina = build_model("retinanet_resnet18_fpn", 2, params)
        ssd = build_model("ssdlite320_mobilenet_v3_large", 2, params.model_copy(update={"image_size": 160}))
        default = build_model("fasterrcnn_resnet18_fpn", 2, TrainingParameters(pretrained="none"))
    assert (rcnn.transform.min_size, rcnn.transform.max_size) == ((96,), 160)
    assert (rcnn.roi_heads.score_thresh, rcnn.roi_heads.nms_thresh, rcnn.roi_heads.detections_per_img) == (
        0.25,
        0.4,
        7,
    )
    assert rcnn.rpn._pre_nms_top_n["training"] == 600 and rcnn.rpn._post_nms_top_n["training"] == 300
    assert rcnn.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert (retina.transform.min_size, retina.score_thresh, retina.detections_per_img) == ((96,), 0.25, 7)
    assert ssd.transform.fixed_size == (160, 160) and ssd.nms_thresh == 0.4
    assert (default.transform.min_size, default.transform.max_size) == ((800,), 1333)


def test_layers_to_freeze_freezes_backbone_layers_from_the_input():
    def trainable(freeze):
        params = TrainingParameters(
            model_name="fasterrcnn_resnet18_fpn", pretrained="none", layers_to_freeze=freeze
        )
        with torch.device("meta"):
            model = build_model("fasterrcnn_resnet18_fpn", 2, params)
        return {name.split(".")[0] for name, p in model.backbone.body.named_parameters() if p.requires_grad}

    assert trainable(None) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    assert trainable(2) == {"layer2", "layer3", "layer4"}
    assert trainable(5) == set()
    with pytest.raises(ConfigError, match="layers_to_freeze: 6 is more than the 5 backbone layers"):
        trainable(6)


def test_bad_names_and_sizes_fail_with_what_to_do():
    with pytest.raises(ConfigError, match=r"unknown model 'yolo_x'. Did you mean 'yolox_x'\?.*ssd300_vgg16"):
        build_model("yolo_x", 2, TrainingParameters(pretrained="none"))
    with pytest.raises(
        ConfigError, match=r"'yolov5' \(Ultralytics YOLO\) is AGPL-3.0.*use model_name: yolox"
    ):
        build_model("yolov5", 2, TrainingParameters(pretrained="none"))
    with pytest.raises(ConfigError, match="image_size: 128 is too small for ssd300_vgg16; use at least 268"):
        build_model("ssd300_vgg16", 2, TrainingParameters(pretrained="none", image_size=128))
    with pytest.raises(ConfigError, match="at least one object class"):
        build_model("fasterrcnn_resnet18_fpn", 1, TrainingParameters(pretrained="none"))


def test_cli_lists_the_zoo_with_parameter_counts():
    result = CliRunner().invoke(app, ["models", "zoo", "--num-classes", "91"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in ZOO:
        assert name in result.output
    assert "41.8M" in result.output and "3.4M" in result.output and "300x300" in result.output

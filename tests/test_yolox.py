"""YOLOX behind the zoo's interface: variants, losses, letterbox frame, ONNX parity, official checkpoints."""

from __future__ import annotations

import hashlib
import http.server
import math
import threading
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from yolox.config import YoloxConfig

from visionautoml.config import Thresholds
from visionautoml.deploy.export import export_saved_model
from visionautoml.deploy.runtime import ExportSettings
from visionautoml.errors import ConfigError, FetchError, TrainingError
from visionautoml.models import weights
from visionautoml.models.yolox import (
    BACKBONE_STAGES,
    COCO_URLS,
    MODEL_SIZES,
    PAD_VALUE,
    YOLOX_VARIANTS,
    build_yolox,
    ensure_coco_weights,
    letterbox,
    load_official_checkpoint,
    variant_for,
    yolox_targets,
)

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    # The package's SimOTA assigner enters the deprecated torch.cuda.amp.autocast (a no-op on CPU).
    pytest.mark.filterwarnings("ignore:`torch.cuda.amp.autocast:FutureWarning"),
]

# Megvii's model zoo table (millions of parameters, 80 COCO classes).
PUBLISHED_PARAMETERS = {
    "yolox_nano": 0.91,
    "yolox_tiny": 5.06,
    "yolox_s": 9.0,
    "yolox_m": 25.3,
    "yolox_l": 54.2,
    "yolox_x": 99.1,
}
CLASS_PREDICTIONS = sorted(
    f"head.cls_preds.{level}.{kind}" for level in range(3) for kind in ("weight", "bias")
)


def _images_and_targets() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two non-square noise images with solid boxes, in torchvision's target format."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=generator), torch.rand(3, 120, 80, generator=generator)]
    images[0][:, 20:70, 10:60] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    images[1][:, 60:110, 30:75] = torch.tensor([0.1, 0.1, 0.9])[:, None, None]
    images[1][:, 5:30, 5:40] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[30.0, 60.0, 75.0, 110.0], [5.0, 5.0, 40.0, 30.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    return images, targets


def _textured(model: torch.nn.Module) -> torch.nn.Module:
    """Weights under which scores and boxes vary from anchor to anchor, unlike a fresh model's near-ties.

    A fresh YOLOX scores every anchor about 1e-4 apart, which makes any comparison of
    top detections a comparison of ties.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
    for conv in [*model.head.cls_preds, *model.head.obj_preds, *model.head.reg_preds]:
        torch.nn.init.zeros_(conv.bias)
        conv.weight.data *= 30
    return model


def test_variants_match_the_package_megvii_sizes_and_the_cloud_model_sizes():
    for name, spec in YOLOX_VARIANTS.items():
        config = YoloxConfig.get_named_config(name)
        assert (spec.depth, spec.width, spec.depthwise) == (config.depth, config.width, config.depthwise)
        assert (spec.image_size, spec.image_size) == tuple(config.test_size)
        assert COCO_URLS[name].endswith(f"/download/0.1.1rc0/{name}.pth")
        with torch.device("meta"):
            model = build_yolox(name, 81)
        count = sum(parameter.numel() for parameter in model.parameters()) / 1e6
        assert count == pytest.approx(PUBLISHED_PARAMETERS[name], rel=0.005), name
    assert {size: variant_for("yolox", size) for size in MODEL_SIZES} == {
        "small": "yolox_s",
        "medium": "yolox_m",
        "large": "yolox_l",
        "extra_large": "yolox_x",
    }
    assert variant_for("yolox") == "yolox_m" and variant_for("yolox_nano", "large") == "yolox_nano"
    with pytest.raises(ConfigError, match=r"model_size: 'huge' is not a YOLOX size; use one of small"):
        variant_for("yolox", "huge")


def test_bad_sizes_and_freezing_fail_with_what_to_do():
    with pytest.raises(ConfigError, match=r"image_size: 100 is not a multiple of 32.* use e.g. 96 or 128"):
        build_yolox("yolox_nano", 3, image_size=100)
    with pytest.raises(ConfigError, match=r"layers_to_freeze: yolox_nano has 5 backbone layers"):
        build_yolox("yolox_nano", 3, trainable_layers=6)


def test_training_losses_are_finite_and_fall_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = build_yolox("yolox_nano", 3, image_size=128).to(memory_format=torch.channels_last).train()
    images, targets = _images_and_targets()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    totals = []
    for _ in range(12):  # 8 were enough on one CPU and 0.7% short on another
        losses = model(images, targets)
        assert set(losses) == {"loss_box_iou", "loss_objectness", "loss_classifier"}
        assert all(loss.ndim == 0 and math.isfinite(loss.item()) for loss in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        totals.append(total.item())
    assert totals[-1] < 0.75 * totals[0], totals
    with torch.no_grad():
        assert [set(output) for output in model.eval()(images)] == [{"boxes", "scores", "labels"}] * 2
    model.train()
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_an_image_without_boxes_trains_on_background_only():
    model = build_yolox("yolox_nano", 2, image_size=64).train()
    empty = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model([torch.rand(3, 40, 64)], [empty])
    assert losses["loss_objectness"].item() > 0 and losses["loss_box_iou"].item() == 0


def test_evaluation_returns_torchvision_detections_within_the_thresholds():
    torch.manual_seed(1)
    model = _textured(build_yolox("yolox_nano", 4, image_size=128, score_thresh=0.0, detections_per_img=7))
    images, _ = _images_and_targets()
    with torch.no_grad():
        outputs = model.eval()(images)
    for output, image in zip(outputs, images, strict=True):
        assert set(output) == {"boxes", "scores", "labels"} and len(output["scores"]) == 7
        assert output["boxes"].dtype == torch.float32 and output["labels"].dtype == torch.int64
        assert ((output["labels"] >= 1) & (output["labels"] <= 3)).all()
        assert (output["scores"][:-1] >= output["scores"][1:]).all()
        height, width = image.shape[1:]
        assert (output["boxes"] >= 0).all() and (output["boxes"][:, 0::2] <= width).all()
        assert (output["boxes"][:, 1::2] <= height).all()
    model.score_thresh = float(outputs[0]["scores"][2])
    with torch.no_grad():
        assert len(model(images[:1])[0]["scores"]) == 2


def test_letterbox_puts_the_image_top_left_in_bgr_0_255_on_grey():
    image = torch.zeros(3, 50, 100)
    image[0, 10:30, 20:40] = 1.0  # a red rectangle: x 20-40, y 10-30
    pixels, scale = letterbox(image, 64)
    assert pixels.shape == (3, 64, 64) and float(scale) == pytest.approx(0.64)
    # Scaled by 0.64, the rectangle covers x 12.8-25.6 and y 6.4-19.2; the image ends at y 32.
    assert pixels[2, 8:18, 14:24].min() == pytest.approx(255.0, abs=1e-3)  # red is the last channel in BGR
    assert pixels[0, 8:18, 14:24].abs().max() < 1e-3
    assert pixels[:, 22:31, 30:60].abs().max() < 1e-3  # black image area
    assert (pixels[:, 33:, :] == PAD_VALUE).all()  # grey padding below the image


def test_boxes_go_to_letterbox_pixels_for_the_loss_and_come_back_in_image_pixels():
    model = build_yolox("yolox_nano", 3, image_size=64, score_thresh=0.5).eval()
    image = torch.rand(3, 50, 100)
    _, scale = letterbox(image, 64)
    target = {"boxes": torch.tensor([[20.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([2])}
    labels = yolox_targets([target], (scale,), torch.zeros(1, 3, 64, 64))
    assert labels.tolist() == [[pytest.approx([1.0, 19.2, 12.8, 12.8, 12.8])]]

    # One anchor of the head's decoded output, (cx, cy, w, h, objectness, class scores), in input pixels.
    output = torch.zeros(10, 7)
    output[3] = torch.tensor([19.2, 12.8, 12.8, 12.8, 0.9, 0.1, 0.8])
    output[5] = torch.tensor([60.0, 30.0, 20.0, 10.0, 0.9, 0.95, 0.0])  # past the right edge: clipped
    detections = model._detections(output, scale, image)
    assert detections["labels"].tolist() == [1, 2]
    assert detections["scores"].tolist() == pytest.approx([0.855, 0.72])
    assert detections["boxes"].tolist() == [
        pytest.approx([78.125, 39.0625, 100.0, 50.0]),
        pytest.approx([20.0, 10.0, 40.0, 30.0]),
    ]


def test_padding_an_image_to_a_square_with_the_letterbox_grey_changes_no_box():
    torch.manual_seed(2)
    model = _textured(build_yolox("yolox_nano", 3, image_size=96, score_thresh=0.0)).eval()
    image = torch.rand(3, 60, 90)
    square = torch.full((3, 90, 90), PAD_VALUE / 255.0)
    square[:, :60, :] = image
    with torch.no_grad():
        original, padded = model([image, square])
    assert torch.equal(original["labels"], padded["labels"])
    torch.testing.assert_close(original["scores"], padded["scores"], atol=1e-5, rtol=0)
    # The square is clipped at its own bottom edge, 30 pixels below the image's.
    boxes = torch.minimum(padded["boxes"], torch.tensor([90.0, 60.0, 90.0, 60.0]))
    torch.testing.assert_close(original["boxes"], boxes, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_onnx_export_of_yolox_nano_matches_pytorch(tmp_path):
    torch.manual_seed(3)
    model = _textured(build_yolox("yolox_nano", 3, image_size=160, score_thresh=0.3)).eval()
    generator = torch.Generator().manual_seed(4)
    images = [
        torch.randint(0, 256, size, dtype=torch.uint8, generator=generator)
        for size in [(3, 120, 160), (3, 150, 100)]
    ]
    settings = ExportSettings(
        model_name="yolox_nano",
        labels=["red", "blue"],
        thresholds=Thresholds(box_score_threshold=0.3, nms_iou_threshold=0.5, box_detections_per_image=100),
    )
    result = export_saved_model(model, settings, tmp_path / "onnx", images, sample_source="synthetic")
    assert result.parity.passed and result.parity.compared >= 10 and result.parity.unmatched == 0
    assert result.parity.max_box_diff_px <= 0.01
    assert result.settings.graph_score_threshold == pytest.approx(0.01) and model.score_thresh == 0.3


def _official_checkpoint(path, num_classes_with_background: int) -> dict[str, torch.Tensor]:
    """A checkpoint in Megvii's layout: the state dict under "model", beside optimizer state and an epoch."""
    torch.manual_seed(5)
    source = build_yolox("yolox_nano", num_classes_with_background)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.01, momentum=0.9)
    sum(
        source(
            [torch.rand(3, 64, 64)],
            [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}],
        ).values()
    ).backward()
    optimizer.step()
    torch.save({"start_epoch": 300, "model": source.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return source.state_dict()


def test_official_checkpoint_loads_with_weights_only_and_refits_the_class_head(tmp_path, caplog):
    path = tmp_path / "yolox_nano.pth"
    saved = _official_checkpoint(path, 81)
    assert torch.load(path, map_location="cpu", weights_only=True)["start_epoch"] == 300

    model = build_yolox("yolox_nano", 4)
    fresh_bias = model.head.cls_preds[0].bias.detach().clone()
    with caplog.at_level("INFO", logger="visionautoml.models.yolox"):
        report = load_official_checkpoint(model, path)
    assert sorted(report.reshaped) == CLASS_PREDICTIONS and not report.missing and not report.unexpected
    assert len(report.loaded) == len(saved) - len(CLASS_PREDICTIONS)
    own = model.state_dict()
    assert all(torch.equal(own[name], saved[name]) for name in report.loaded)
    assert torch.equal(model.head.cls_preds[0].bias, fresh_bias)
    assert fresh_bias.tolist() == pytest.approx([-math.log(99)] * 3)  # Megvii's prior probability 0.01
    assert "re-initialised 6 whose shape differs: head.cls_preds.0.weight" in caplog.text


def test_weight_files_with_pickled_objects_or_of_other_models_are_refused(tmp_path):
    model = build_yolox("yolox_nano", 2)
    torch.save(
        {"model": model.state_dict(), "args": SimpleNamespace(exp="yolox_nano")}, tmp_path / "pickled.pth"
    )
    with pytest.raises(TrainingError, match=r"not a loadable state dict .*weights_only=True"):
        load_official_checkpoint(model, tmp_path / "pickled.pth")
    torch.save({"model": build_yolox("yolox_tiny", 2).state_dict()}, tmp_path / "tiny.pth")
    with pytest.raises(TrainingError, match=r"only \d+ of the model's \d+ tensors match"):
        load_official_checkpoint(model, tmp_path / "tiny.pth")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    return tmp_path / "torch"


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path / "served"``."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_coco_weights_offline_name_the_url_and_the_path_and_a_cached_file_is_used(torch_home):
    target = torch_home / "hub" / "checkpoints" / "yolox_tiny.pth"
    with pytest.raises(FetchError) as raised:
        ensure_coco_weights("yolox_tiny", "training_parameters.pretrained 'coco' for yolox_tiny")
    assert f"Download {COCO_URLS['yolox_tiny']} on a machine with internet access" in str(raised.value)
    assert f"place it at {target}" in str(raised.value)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"placed by hand")
    assert ensure_coco_weights("yolox_tiny", "coco") == target


def test_coco_weights_download_is_checked_against_the_recorded_sha256(torch_home, file_server, monkeypatch):
    monkeypatch.delenv(weights.OFFLINE_ENV)
    root, url = file_server
    payload = b"not the real yolox_nano" * 100
    (root / "yolox_nano.pth").write_bytes(payload)
    with pytest.raises(FetchError, match=r"download failed \(invalid hash value \(expected \"cd28f55f"):
        ensure_coco_weights("yolox_nano", "coco", release=url)
    assert not (torch_home / "hub" / "checkpoints" / "yolox_nano.pth").exists()

    spec = replace(YOLOX_VARIANTS["yolox_nano"], sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(YOLOX_VARIANTS, "yolox_nano", spec)
    path = ensure_coco_weights("yolox_nano", "coco", release=url)
    assert path.read_bytes() == payload and path == torch_home / "hub" / "checkpoints" / "yolox_nano.pth"


def test_frozen_backbone_layers_keep_weights_and_batch_norm_statistics():
    model = build_yolox("yolox_nano", 3, image_size=64, trainable_layers=3).train()
    frozen = set(BACKBONE_STAGES[:2])
    for name in BACKBONE_STAGES:
        stage = getattr(model.backbone.backbone, name)
        assert all(p.requires_grad != (name in frozen) for p in stage.parameters()), name
        assert all(m.training != (name in frozen) for m in stage.modules()), name
    before = model.backbone.backbone.stem.conv.bn.running_mean.clone()
    model(
        [torch.rand(3, 64, 64)],
        [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}],
    )
    assert torch.equal(model.backbone.backbone.stem.conv.bn.running_mean, before)

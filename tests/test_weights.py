"""Pretrained weights from the torch cache, local files and checkpoints; offline and download failures."""

from __future__ import annotations

import hashlib
import http.server
import logging
import threading
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torchvision.models.detection import (
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    fasterrcnn_mobilenet_v3_large_320_fpn,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from visionautoml.config import TrainingParameters
from visionautoml.errors import ConfigError, FetchError, TrainingError
from visionautoml.models import weights
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import build_model

MOBILE = "fasterrcnn_mobilenet_v3_large_320_fpn"
LITE = "ssdlite320_mobilenet_v3_large"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """An empty torch cache, and no downloads unless a test allows them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    return tmp_path / "torch"


def _params(name: str, pretrained: str, **changes) -> TrainingParameters:
    return TrainingParameters(model_name=name, pretrained=pretrained, image_size=64, **changes)


def test_coco_weights_load_from_the_torch_cache_without_network(torch_home, caplog):
    torch.manual_seed(0)
    coco = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=91
    ).state_dict()
    target = weights.torchvision_weights_file(FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1)
    assert target == torch_home / "hub" / "checkpoints" / "fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
    target.parent.mkdir(parents=True)
    torch.save(coco, target)

    with caplog.at_level(logging.INFO, logger="visionautoml"):
        model = build_model(MOBILE, 3, _params(MOBILE, "coco"))

    state = model.state_dict()
    head = {"roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias"}
    head |= {"roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias"}
    for name, tensor in coco.items():
        if name in head:
            assert state[name].shape[0] in (3, 12) and state[name].shape != tensor.shape
        elif not name.endswith("num_batches_tracked"):
            assert torch.equal(state[name], tensor), name
    assert "re-initialised 4 whose shape differs: roi_heads.box_predictor.cls_score.weight" in caplog.text
    # Fine-tuning setup as torchvision's: frozen batch norm, early backbone blocks frozen.
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    body = model.backbone.body
    assert not any(p.requires_grad for p in body["0"].parameters())
    assert all(p.requires_grad for p in body["16"].parameters())


def test_imagenet_weights_fill_the_backbone(torch_home):
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        resnet.bn1.running_mean.uniform_()
    target = weights.torchvision_weights_file(torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    target.parent.mkdir(parents=True)
    torch.save(resnet.state_dict(), target)

    model = build_model("fasterrcnn_resnet18_fpn", 2, TrainingParameters(pretrained="imagenet"))

    body = model.backbone.body.state_dict()
    for name, tensor in resnet.state_dict().items():
        if name in body:
            assert torch.equal(body[name], tensor), name
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)


def test_missing_weights_offline_fail_at_once_saying_what_to_place_where(torch_home):
    with pytest.raises(FetchError) as error:
        build_model(MOBILE, 2, _params(MOBILE, "coco"))
    message = str(error.value)
    assert "VISIONAUTOML_OFFLINE is set" in message
    assert "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth" in message
    assert (
        f"place it at {torch_home}/hub/checkpoints/fasterrcnn_mobilenet_v3_large_320_fpn-907ea3f9.pth"
        in message
    )
    assert "pretrained to `none`" in message


def test_models_without_coco_weights_say_so():
    with pytest.raises(
        ConfigError, match=r"torchvision has no COCO weights for fcos_resnet18_fpn\. Use `imagenet`"
    ):
        build_model("fcos_resnet18_fpn", 2, TrainingParameters(pretrained="coco"))


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


def test_download_fills_the_cache_and_checks_the_hash_in_the_file_name(file_server, monkeypatch, tmp_path):
    monkeypatch.delenv(weights.OFFLINE_ENV)
    root, url = file_server
    payload = b"weights" * 100
    good = f"tiny-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    (root / good).write_bytes(payload)
    (root / "bad-0123abcd.pth").write_bytes(payload)

    path = weights.ensure_torchvision_weights(SimpleNamespace(url=f"{url}/{good}"), "test weights")
    assert path.read_bytes() == payload and path.parent.name == "checkpoints"
    (root / good).unlink()
    assert weights.ensure_torchvision_weights(SimpleNamespace(url=f"{url}/{good}"), "test weights") == path

    with pytest.raises(FetchError, match=r"the download failed \(invalid hash value \(expected \"0123abcd\""):
        weights.ensure_torchvision_weights(SimpleNamespace(url=f"{url}/bad-0123abcd.pth"), "test weights")
    assert not (path.parent / "bad-0123abcd.pth").exists()
    assert [p.name for p in path.parent.iterdir()] == [good]  # no partial files left behind


def test_network_errors_are_reported_as_such(monkeypatch):
    monkeypatch.delenv(weights.OFFLINE_ENV)
    closed = "http://127.0.0.1:9/resnet18-f37072fd.pth"  # the discard port: nothing listens there
    with pytest.raises(FetchError, match=r"the download failed \(.*refused.*\)\. Download http://127"):
        weights.ensure_torchvision_weights(SimpleNamespace(url=closed), "pretrained 'imagenet'")


def test_local_state_dict_adapts_the_class_dependent_heads(tmp_path, caplog):
    torch.manual_seed(2)
    source = build_model(LITE, 6, _params(LITE, "none"))
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pth")

    with caplog.at_level(logging.INFO, logger="visionautoml"):
        model = build_model(LITE, 3, _params(LITE, str(tmp_path / "checkpoint.pth")))

    loaded, original = model.state_dict(), source.state_dict()
    reshaped = [name for name, tensor in loaded.items() if tensor.shape != original[name].shape]
    assert reshaped and all(name.startswith("head.classification_head") for name in reshaped)
    for name, tensor in original.items():
        if name not in reshaped:
            assert torch.equal(loaded[name], tensor), name
    assert f"re-initialised {len(reshaped)} whose shape differs" in caplog.text


def test_checkpoint_of_a_saved_model_folder_resumes_training(tmp_path):
    torch.manual_seed(3)
    trained = build_model(LITE, 3, _params(LITE, "none"))
    params = _params(LITE, "none")
    save_model(trained, ModelSpec.from_params(params, ["a", "b"]), tmp_path / "model")

    fresh = build_model(LITE, 3, params)
    report = weights.load_weights(fresh, tmp_path / "model")

    assert not report.reshaped and not report.missing
    resumed = fresh.state_dict()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(resumed[name], tensor), name


def test_unusable_weight_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'nowhere\.pt' is neither coco, imagenet, none nor an existing file"
    ):
        build_model(LITE, 2, _params(LITE, "nowhere.pt"))

    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(TrainingError, match=r"text\.pt: not a loadable state dict"):
        build_model(LITE, 2, _params(LITE, str(tmp_path / "text.pt")))

    torch.save({"config": SimpleNamespace(lr=1)}, tmp_path / "pickled.pt")  # code, not tensors
    with pytest.raises(TrainingError, match=r"pickled.pt: not a loadable state dict.*weights_only=True"):
        weights.read_state_dict(tmp_path / "pickled.pt")

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(TrainingError, match=r"tensors match; the file is not a checkpoint of ssdlite320"):
        build_model(LITE, 2, _params(LITE, str(tmp_path / "resnet.pt")))

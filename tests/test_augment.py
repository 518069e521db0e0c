"""The real-time training recipe: mosaic and mixup against boxes drawn on the images, the plain tail,
EMA, multi-scale training."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_voc_dataset
from torchvision.transforms import v2

from visionautoml.config import TrainingParameters
from visionautoml.data.formats import read_dataset
from visionautoml.errors import ConfigError
from visionautoml.models.zoo import build_model
from visionautoml.training.augment import MosaicDataset, PhasedLoader, mosaic_enabled, plain_epochs
from visionautoml.training.dataset import DetectionDataset, make_data_loader
from visionautoml.training.ema import ModelEMA, ema_enabled

COLOURS = {1: torch.tensor([220.0, 30, 30]) / 255, 2: torch.tensor([30.0, 30, 220]) / 255}  # red, blue


@pytest.fixture
def voc(tmp_path):
    return read_dataset(make_voc_dataset(tmp_path / "voc", n_images=8, size=(96, 64), seed=4))


def _labels(dataset) -> dict[str, int]:
    return {name: index + 1 for index, name in enumerate(dataset.classes)}


def _assert_boxes_hold_their_colour(image: torch.Tensor, target: dict, classes: list[str]) -> None:
    """Most of every box shows the colour its class was drawn in (so the box moved with its pixels).

    Rectangles of one image may overlap, so a box's own colour fills at least a third of it, not all.
    """
    colour_of = {index + 1: COLOURS[1 if name == "red_square" else 2] for index, name in enumerate(classes)}
    assert len(target["boxes"]) > 0
    for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
        if min(box[2] - box[0], box[3] - box[1]) < 4:
            continue  # a sliver cut at the border: resampling blurs most of its few pixels
        x0, y0, x1, y1 = (round(value) for value in box)
        region = image[:, y0:y1, x0:x1].reshape(3, -1)
        matching = ((region - colour_of[label][:, None]).abs().max(dim=0).values < 0.12).float().mean()
        assert matching > 0.33, (box, label, float(matching))


def test_a_mosaic_places_four_images_and_their_boxes_together(voc):
    base = DetectionDataset(voc, train=True)
    mosaic = MosaicDataset(base, 128)
    mosaic.affine = v2.Identity()  # the placement alone, then with the affine below
    mosaic.photometric = v2.ToDtype(torch.float32, scale=True)
    random.seed(0)
    torch.manual_seed(0)
    image, target = mosaic[0]
    assert image.shape == (3, 128, 128)
    _assert_boxes_hold_their_colour(image, target, voc.classes)


def test_the_affine_moves_boxes_with_the_pixels(voc):
    base = DetectionDataset(voc, train=True)
    mosaic = MosaicDataset(base, 128)
    mosaic.affine = v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.7, 1.3), fill=114)
    mosaic.photometric = v2.ToDtype(torch.float32, scale=True)
    for seed in range(5):
        random.seed(seed)
        torch.manual_seed(seed)
        image, target = mosaic[seed % len(base)]
        _assert_boxes_hold_their_colour(image, target, voc.classes)


def test_mixup_blends_two_mosaics_and_keeps_both_sets_of_boxes(voc):
    base = DetectionDataset(voc, train=True)
    plain = MosaicDataset(base, 128)
    mixed = MosaicDataset(base, 128, mixup=1.0)
    for dataset in (plain, mixed):
        dataset.affine = v2.Identity()
        dataset.photometric = v2.ToDtype(torch.float32, scale=True)
    random.seed(1)
    _, alone = plain[0]
    random.seed(1)
    _, blended = mixed[0]
    assert len(blended["boxes"]) > len(alone["boxes"])
    assert torch.equal(blended["boxes"][: len(alone["boxes"])], alone["boxes"])


def test_mosaic_trains_then_the_last_epochs_are_plain(voc):
    params = TrainingParameters(
        model_name="yolox_nano",
        pretrained="none",
        image_size=64,
        training_batch_size=2,
        number_of_workers=0,
        number_of_epochs=10,
        apply_mosaic_for_yolo=True,
        no_augmentation_epochs=3,
    )
    loader = make_data_loader(voc, params, train=True)
    assert isinstance(loader, PhasedLoader) and loader.plain_from_epoch == 8
    loader.set_epoch(7)
    images, _ = next(iter(loader))
    assert images[0].shape[1:] == (64, 64)  # mosaics are square
    loader.set_epoch(8)
    images, _ = next(iter(loader))
    assert images[0].shape[1:] != (64, 64)  # plain samples keep their aspect
    off = params.model_copy(update={"apply_mosaic_for_yolo": False})
    assert not isinstance(make_data_loader(voc, off, train=True), PhasedLoader)


def test_the_recipe_defaults_follow_the_model_family():
    yolox = TrainingParameters(model_name="yolox_nano", number_of_epochs=30)
    ssd = TrainingParameters(model_name="ssdlite320_mobilenet_v3_large")
    assert mosaic_enabled(yolox, "yolox") and not mosaic_enabled(ssd, "ssd")
    assert ema_enabled(yolox) and not ema_enabled(ssd)
    assert (
        plain_epochs(yolox) == 3 and plain_epochs(yolox.model_copy(update={"no_augmentation_epochs": 0})) == 0
    )


def test_the_average_follows_the_model_with_a_ramp():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEMA(model, decay=0.9, ramp_steps=1.0)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    decay = 0.9 * (1 - torch.exp(torch.tensor(-1.0)))
    assert torch.allclose(ema.module.weight, torch.full((1, 2), float(1 - decay)))
    assert not ema.module.weight.requires_grad


def test_multi_scale_trains_yolox_and_rcnns_at_several_sizes_and_refuses_ssd():
    yolox = build_model(
        "yolox_nano", 3, TrainingParameters(pretrained="none", image_size=320, multi_scale=True)
    )
    assert yolox.train_sizes[-1] == 320 and set(yolox.train_sizes) == {224, 256, 320, 384, 416}
    rcnn = build_model(
        "fasterrcnn_mobilenet_v3_large_320_fpn", 3, TrainingParameters(pretrained="none", multi_scale=True)
    )
    assert rcnn.transform.min_size[-1] == 320 and len(rcnn.transform.min_size) == 5
    yolox.train()
    losses = yolox(
        [torch.rand(3, 80, 120)], [{"boxes": torch.tensor([[10.0, 10, 50, 40]]), "labels": torch.tensor([1])}]
    )
    assert all(torch.isfinite(value) for value in losses.values())
    with pytest.raises(ConfigError, match="multi_scale applies to YOLOX and the R-CNN-style models"):
        build_model(
            "ssdlite320_mobilenet_v3_large", 3, TrainingParameters(pretrained="none", multi_scale=True)
        )

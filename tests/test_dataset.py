"""The input pipeline: decoding, targets, pre-resizing, box-aware augmentation, loaders."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import v2

from visionautoml.config import TrainingParameters
from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.images import decode_image_bytes, decode_image_file
from visionautoml.errors import DataError
from visionautoml.models.zoo import InputSize
from visionautoml.training.dataset import DetectionDataset, collate, make_data_loader

RED = (230, 20, 20)


def _image(path: Path, size=(64, 48), rect=(8, 6, 40, 30), mode="RGB", **save) -> Path:
    image = Image.new("RGB", size, (120, 120, 120))
    ImageDraw.Draw(image).rectangle([rect[0], rect[1], rect[2] - 1, rect[3] - 1], fill=RED)
    image.convert(mode).save(path, **save)
    return path


def _dataset(tmp_path: Path, n: int = 1, boxes: list[Box] | None = None, size=(64, 48)) -> Dataset:
    records = []
    for index in range(n):
        path = _image(tmp_path / f"img-{index}.png", size=size)
        records.append(
            ImageRecord(f"img-{index}.png", path, size[0], size[1], list(boxes or [Box(8, 6, 40, 30, "red")]))
        )
    return Dataset(records, ["blue", "red"])


def _red_extent(image: torch.Tensor) -> tuple[float, float, float, float] | None:
    """Bounding box of the clearly red pixels of a float CHW image."""
    red = (image[0] - torch.maximum(image[1], image[2])) > 0.3
    ys, xs = torch.nonzero(red, as_tuple=True)
    if len(xs) == 0:
        return None
    return xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1


def test_validation_sample_keeps_original_size_every_box_and_target_fields(tmp_path):
    boxes = [Box(8, 6, 40, 30, "red"), Box(0, 0, 10, 10, "blue", iscrowd=True)]
    image, target = DetectionDataset(_dataset(tmp_path, boxes=boxes), train=False)[0]

    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[8, 6, 40, 30], [0, 0, 10, 10]]
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["area"].tolist() == [32 * 24, 100]
    assert target["image_id"].item() == 0


def test_training_sample_is_shrunk_to_the_model_scale_and_drops_crowd(tmp_path):
    boxes = [Box(8, 6, 40, 30, "red"), Box(0, 0, 10, 10, "blue", iscrowd=True), Box(5, 5, 5, 9, "red")]
    samples = DetectionDataset(
        _dataset(tmp_path, boxes=boxes), train=True, input_size=InputSize(min_size=24, max_size=400)
    )
    image, target = samples[0]

    assert image.shape == (3, 24, 32)
    assert target["boxes"].tolist() == [[4, 3, 20, 15]]  # crowd and the zero-width box are gone
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [0]
    assert _red_extent(image) == pytest.approx((4, 3, 20, 15), abs=1)


def test_training_images_smaller_than_the_model_input_are_left_for_the_model_to_enlarge(tmp_path):
    samples = DetectionDataset(
        _dataset(tmp_path), train=True, input_size=InputSize(min_size=96, max_size=400)
    )
    image, target = samples[0]
    assert image.shape == (3, 48, 64) and target["boxes"].tolist() == [[8, 6, 40, 30]]


def test_ssd_training_sample_is_shrunk_to_the_square_input(tmp_path):
    samples = DetectionDataset(_dataset(tmp_path), train=True, input_size=InputSize(image_size=32))
    image, target = samples[0]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].tolist() == [[4, 4, 20, 20]]


def test_augmented_boxes_still_enclose_their_object(tmp_path):
    samples = DetectionDataset(_dataset(tmp_path, size=(128, 96)), train=True, augment=True)
    seen = set()
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = samples[0]
        (box,) = target["boxes"].tolist()  # jitter is mild enough to keep the object in the frame
        assert _red_extent(image) == pytest.approx(box, abs=2.5)
        seen.add(tuple(round(value) for value in box))
    assert len(seen) > 5  # flips and scale jitter really moved the object


def test_boxes_leaving_the_frame_after_augmentation_are_dropped(tmp_path):
    boxes = [Box(8, 6, 40, 30, "red"), Box(54, 38, 64, 48, "blue")]
    samples = DetectionDataset(_dataset(tmp_path, boxes=boxes), train=True, input_size=None)
    samples.transforms = v2.CenterCrop([24, 32])  # keeps x 16..48, y 12..36: the corner box leaves
    _, target = samples[0]
    assert target["boxes"].tolist() == [[0, 0, 24, 18]]
    assert target["labels"].tolist() == [2]
    assert target["area"].tolist() == [24 * 18]


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64x48, shown rotated 90 degrees clockwise: 48x64
    path = _image(tmp_path / "rotated.jpg", rect=(0, 0, 16, 16), exif=exif.tobytes(), quality=95)

    image = decode_image_file(path)

    assert image.shape == (3, 64, 48) and image.dtype == torch.uint8
    assert _red_extent(image.float() / 255) == pytest.approx((32, 0, 48, 16), abs=1)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_grayscale_palette_alpha_and_16_bit_images_become_rgb(tmp_path, mode):
    image = decode_image_file(_image(tmp_path / f"{mode.replace(';', '')}.png", mode=mode))
    assert image.shape == (3, 48, 64) and image.dtype == torch.uint8
    if mode in ("RGBA", "P"):
        assert _red_extent(image.float() / 255) == (8, 6, 40, 30)


def _png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header announces a ``width`` x ``height`` image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    with pytest.raises(DataError, match="decompression bomb"):
        decode_image_bytes(_png_claiming(40_000, 40_000), name="bomb.png")
    small = _image(tmp_path / "small.png").read_bytes()
    with pytest.raises(DataError, match=r"small.png: refused, 64x48 pixels"):
        decode_image_bytes(small, name="small.png", max_pixels=1000)


def test_undecodable_images_name_the_file(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match=r"text.jpg: not an image in any known format"):
        decode_image_file(tmp_path / "text.jpg")
    buffer = io.BytesIO()
    Image.effect_noise((64, 48), 50).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError, match=r"cut.jpg: cannot decode"):
        decode_image_file(tmp_path / "cut.jpg")
    with pytest.raises(DataError, match=r"missing.png: cannot read"):
        decode_image_file(tmp_path / "missing.png")


def test_annotation_size_mismatch_and_unknown_label_are_clear_errors(tmp_path):
    dataset = _dataset(tmp_path)
    dataset.images[0].width = 100
    dataset.images[0].source = "annotations/img-0.xml"
    with pytest.raises(
        DataError, match=r"annotations/img-0.xml: the annotation says 100x48 pixels.*is 64x48"
    ):
        DetectionDataset(dataset, train=False)[0]
    dataset = _dataset(tmp_path, boxes=[Box(1, 1, 9, 9, "green")])
    with pytest.raises(DataError, match="label 'green' is not one of the dataset's classes"):
        DetectionDataset(dataset, train=False)[0]


def test_loader_batches_with_a_worker_is_reproducible_and_serves_from_memory(tmp_path):
    dataset = _dataset(tmp_path, n=5)
    params = TrainingParameters(
        model_name="fasterrcnn_mobilenet_v3_large_320_fpn",
        min_size=32,
        max_size=128,
        training_batch_size=2,
        number_of_workers=1,
        seed=3,
    )
    loaders = [make_data_loader(dataset, params, train=True) for _ in range(2)]
    for record in dataset.images:
        record.path.unlink()  # everything was decoded up front: the files are no longer needed

    orders = []
    for loader in loaders:
        batches = list(loader)
        # 5 images in batches of 2: the last batch of one is dropped (batch norm cannot take it).
        assert [len(images) for images, _ in batches] == [2, 2]
        images, targets = batches[0]
        assert images[0].shape == (3, 32, 43) and targets[0]["labels"].tolist() == [2]
        orders.append([int(t["image_id"]) for _, batch_targets in batches for t in batch_targets])
    assert orders[0] == orders[1] and len(set(orders[0])) == 4 and set(orders[0]) <= {0, 1, 2, 3, 4}


def test_evaluation_loader_is_in_order_at_original_size_and_decodes_lazily_past_the_cache(tmp_path):
    dataset = _dataset(tmp_path, n=3)
    params = TrainingParameters(validation_batch_size=2, number_of_workers=0)
    loader = make_data_loader(dataset, params, train=False, cache_bytes=0)
    images, targets = next(iter(loader))
    assert [image.shape for image in images] == [(3, 48, 64)] * 2
    assert [int(t["image_id"]) for t in targets] == [0, 1]
    dataset.images[2].path.unlink()
    with pytest.raises(DataError, match=r"img-2\.png: cannot read"):
        list(loader)


def test_collate_keeps_lists():
    batch = [
        (torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)}),
        (torch.zeros(3, 6, 7), {"boxes": torch.ones(1, 4)}),
    ]
    images, targets = collate(batch)
    assert [image.shape[1] for image in images] == [4, 6] and len(targets) == 2

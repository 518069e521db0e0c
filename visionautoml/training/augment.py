"""The training recipe of real-time detectors: mosaic, mixup, random affine, colour jitter, a clean tail.

Small datasets are where these pay: a mosaic shows four images (and their objects at new
scales and places) in one sample, mixup blends two, and the affine and colour jitter keep a
model from memorising 160 pictures. As YOLOX does, the last epochs train without them
(``no_augmentation_epochs``), so the model ends on images that look like the real ones.

Every transform is box-aware through torchvision ``transforms.v2`` (``tv_tensors.BoundingBoxes``
move with the pixels); the mosaic's placement, written here, is tested against boxes drawn
on the images.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visionautoml.config import TrainingParameters

PAD_VALUE = 114


def mosaic_enabled(params: TrainingParameters, family: str) -> bool:
    """``apply_mosaic_for_yolo``, whose default (None) means: on for the YOLO family, off otherwise."""
    if params.apply_mosaic_for_yolo is None:
        return family == "yolox"
    return params.apply_mosaic_for_yolo


def plain_epochs(params: TrainingParameters, epochs: int | None = None) -> int:
    """Epochs at the end of a run of ``epochs`` (default ``number_of_epochs``) trained without mosaic and
    mixup: ``no_augmentation_epochs``, else a tenth."""
    epochs = params.number_of_epochs if epochs is None else epochs
    if params.no_augmentation_epochs is not None:
        return min(params.no_augmentation_epochs, epochs)
    return max(1, round(epochs / 10)) if epochs > 2 else 0


class MosaicDataset(TorchDataset):
    """Each sample is a mosaic of four training images (and, with ``mixup``, blended with another).

    ``base`` is a training :class:`~visionautoml.training.dataset.DetectionDataset`; its
    ``raw_sample`` gives the images and boxes, its ``finish`` turns the result into what a
    detector takes. The output is ``size`` x ``size``: four images each scaled to ``size`` on
    their longer side meet at a random point of a ``2 size`` canvas, its centre is cut out, and a
    random affine moves, rotates, shears and scales that.
    """

    def __init__(self, base: Any, size: int, *, mixup: float = 0.0) -> None:
        self.base = base
        self.size = size
        self.mixup = mixup
        self.affine = v2.RandomAffine(
            degrees=10, translate=(0.1, 0.1), scale=(0.5, 1.5), shear=2, fill=PAD_VALUE
        )
        self.photometric = v2.Compose(
            [
                v2.RandomHorizontalFlip(p=0.5),
                v2.ToDtype(torch.float32, scale=True),
                # HSV jitter without the hue shift, which costs more than the rest of the pipeline.
                v2.ColorJitter(brightness=0.4, saturation=0.7),
            ]
        )

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image, target = self.mosaic(index)
        if self.mixup and random.random() < self.mixup:
            other, other_target = self.mosaic(random.randrange(len(self.base)))
            image = tv_tensors.Image((image.float() * 0.5 + other.float() * 0.5).to(torch.uint8))
            target = {
                "boxes": tv_tensors.wrap(
                    torch.cat([target["boxes"], other_target["boxes"]]), like=target["boxes"]
                ),
                "labels": torch.cat([target["labels"], other_target["labels"]]),
            }
        image, target = self.photometric(image, target)
        return self.base.finish(image, target, index)

    def mosaic(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        size = self.size
        canvas = torch.full((3, 2 * size, 2 * size), PAD_VALUE, dtype=torch.uint8)
        centre_x, centre_y = (int(random.uniform(0.5 * size, 1.5 * size)) for _ in range(2))
        indices = [index] + [random.randrange(len(self.base)) for _ in range(3)]
        all_boxes, all_labels = [], []
        for corner, sample in enumerate(indices):
            image, target = self.base.raw_sample(sample)
            height, width = image.shape[1:]
            scale = size / max(height, width)
            height, width = max(1, round(height * scale)), max(1, round(width * scale))
            image = F.resize(image, [height, width], antialias=True)
            boxes = F.resize(target["boxes"], [height, width])
            placed, source = _placement(corner, centre_x, centre_y, width, height, 2 * size)
            (x1, y1, x2, y2), (sx1, sy1, sx2, sy2) = placed, source
            canvas[:, y1:y2, x1:x2] = image[:, sy1:sy2, sx1:sx2]
            shifted = boxes.as_subclass(torch.Tensor) + torch.tensor(
                [x1 - sx1, y1 - sy1] * 2, dtype=torch.float32
            )
            all_boxes.append(shifted)
            all_labels.append(target["labels"])
        boxes = tv_tensors.BoundingBoxes(
            torch.cat(all_boxes).reshape(-1, 4), format="XYXY", canvas_size=(2 * size, 2 * size)
        )
        # The centre first, then the affine: a quarter of the pixels to resample.
        offset = size // 2
        image = F.crop(tv_tensors.Image(canvas), offset, offset, size, size)
        cropped = F.crop(boxes, offset, offset, size, size)
        return self.affine(image, {"boxes": cropped, "labels": torch.cat(all_labels)})


def _placement(
    corner: int, centre_x: int, centre_y: int, width: int, height: int, side: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where image ``corner`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of a mosaic goes.

    Returns the canvas region and the part of the image that fills it (as YOLOX places them):
    each image touches the centre with one corner and is cut where it leaves the canvas.
    """
    if corner == 0:
        x1, y1, x2, y2 = max(centre_x - width, 0), max(centre_y - height, 0), centre_x, centre_y
        source = (width - (x2 - x1), height - (y2 - y1), width, height)
    elif corner == 1:
        x1, y1, x2, y2 = centre_x, max(centre_y - height, 0), min(centre_x + width, side), centre_y
        source = (0, height - (y2 - y1), x2 - x1, height)
    elif corner == 2:
        x1, y1, x2, y2 = max(centre_x - width, 0), centre_y, centre_x, min(side, centre_y + height)
        source = (width - (x2 - x1), 0, width, y2 - y1)
    else:
        x1, y1, x2, y2 = centre_x, centre_y, min(centre_x + width, side), min(side, centre_y + height)
        source = (0, 0, x2 - x1, y2 - y1)
    return (x1, y1, x2, y2), source


class PhasedLoader:
    """Two loaders over the same images: the augmented one, then the plain one for the last epochs.

    The trainer calls :meth:`set_epoch` before each epoch (the convention of PyTorch's
    distributed sampler); the switch happens in this process, so loader workers, which hold
    their own copy of the dataset, never need to be told.
    """

    def __init__(self, augmented: DataLoader, plain: DataLoader, params: TrainingParameters) -> None:
        self.augmented, self.plain = augmented, plain
        self.params = params
        self.set_total_epochs(params.number_of_epochs)
        self.active = augmented

    def set_total_epochs(self, epochs: int) -> None:
        """The run was re-planned to ``epochs`` (to fit ``max_minutes``): the plain tail moves with it."""
        self.plain_from_epoch = epochs - plain_epochs(self.params, epochs) + 1

    def set_epoch(self, epoch: int) -> None:
        self.active = self.plain if epoch >= self.plain_from_epoch else self.augmented

    @property
    def generator(self) -> torch.Generator | None:
        return self.active.generator

    def __len__(self) -> int:
        return len(self.active)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.active)

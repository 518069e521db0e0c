"""The input pipeline: canonical datasets to the image tensors and targets torchvision detectors take.

Training samples larger than the model's input are pre-resized to the scale the model
would shrink them to anyway, so augmenting and the model's own resize work on small images,
and small datasets are decoded once and kept in memory. Validation samples keep their original size: the
model resizes internally and maps boxes back, so detections and ground truth share the
image's own pixel coordinates, exactly as at prediction time.

Augmentation (``apply_automl_train_augmentations``) is box-aware (torchvision
``transforms.v2`` on ``tv_tensors.BoundingBoxes``): horizontal flip, scale jitter within
a fixed frame (so the model's resize does not undo it) and photometric jitter; boxes that
leave the image or become degenerate are dropped. ``benchmarks/bench_input_pipeline.py``
measures the pipeline against a straightforward one and against the model's step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visionautoml.config import TrainingParameters
from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.data.images import decode_image_file
from visionautoml.errors import DataError
from visionautoml.models.zoo import InputSize, get_entry
from visionautoml.training.augment import MosaicDataset, PhasedLoader, mosaic_enabled
from visionautoml.training.tiles import TiledSamples

CACHE_BYTES = 1 << 30
"""Decoded images are kept in memory when they fit in 1 GiB (e.g. 200 images of 1333x800)."""

Target = dict[str, torch.Tensor]


def default_workers() -> int:
    """Loader processes sized to the machine: with a GPU the CPUs only feed it (all but one, at most 8);
    on CPU alone the model needs half of them (at most 4)."""
    cpus = len(os.sched_getaffinity(0))
    return min(8, cpus - 1) if torch.cuda.is_available() else min(4, cpus // 2)


class ScaleJitter(v2.Transform):
    """Scale the content by a random factor and crop or pad back to the same frame, at a random offset.

    The detectors resize every input to their own scale, which would undo a plain random
    resize; changing the content's scale *within* a fixed frame survives it. Equivalent to
    an affine with scale and translation, at a tenth of the cost (a resize and a crop or pad
    instead of a per-pixel resampling grid).
    """

    def __init__(self, scale_range: tuple[float, float] = (0.75, 1.25), fill: int = 114) -> None:
        super().__init__()
        self.scale_range = scale_range
        self.fill = fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = next(F.get_size(x) for x in flat_inputs if isinstance(x, tv_tensors.Image))
        scale = float(torch.empty(1).uniform_(*self.scale_range))
        new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
        top = int(torch.randint(0, abs(new_height - height) + 1, ()))
        left = int(torch.randint(0, abs(new_width - width) + 1, ()))
        return {"size": [new_height, new_width], "frame": (height, width), "top": top, "left": left}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        (height, width), (new_height, new_width) = params["frame"], params["size"]
        top, left = params["top"], params["left"]
        out = self._call_kernel(F.resize, inpt, params["size"], antialias=True)
        if new_height >= height and new_width >= width:
            return self._call_kernel(F.crop, out, top, left, height, width)
        padding = [left, top, width - new_width - left, height - new_height - top]
        fill = self.fill if isinstance(inpt, tv_tensors.Image) else 0
        return self._call_kernel(F.pad, out, padding, fill=fill)


def train_augmentations() -> v2.Transform:
    """The cloud service's default training augmentation: flip, scale jitter, photometric jitter.

    Photometric jitter runs on float pixels (5x faster than on uint8) and leaves hue alone:
    torchvision's hue shift costs more than the rest of the pipeline together.
    """
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([ScaleJitter()], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2)], p=0.5),
        ]
    )


class DetectionDataset(TorchDataset):
    """Samples ``(float CHW image in [0, 1], target)`` for training (``train=True``) or evaluation.

    Targets hold ``boxes`` (float xyxy pixels), ``labels`` (int64, class index + 1),
    ``iscrowd``, ``area`` and ``image_id`` (the index into ``records``). Crowd boxes are
    kept for evaluation (metrics ignore them, COCO style) and dropped for training.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        train: bool,
        input_size: InputSize | None = None,
        augment: bool = False,
    ) -> None:
        self.records: list[ImageRecord] = list(dataset.images)
        self.classes = list(dataset.classes)
        self.train = train
        self.input_size = input_size if train else None
        self.transforms = train_augmentations() if train and augment else None
        # Clip boxes to the frame, then drop those left narrower or shorter than a pixel.
        self.cleanup = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1, min_area=1)])
        self._class_ids = {name: index + 1 for index, name in enumerate(self.classes)}
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.records)

    def decoded_bytes(self) -> int:
        """Memory the decoded (and, for training, pre-resized) images of the whole dataset take."""
        return sum(3 * w * h for w, h in (self._stored_size(record) for record in self.records))

    def preload(self) -> None:
        """Decode every image once, in this process, so loader workers forked later share them."""
        for index in range(len(self.records)):
            self._cache[index] = self._image(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image, target = self.raw_sample(index)
        if self.train and self.transforms is not None:
            image, target = self.transforms(image, target)
        return self.finish(image, target, index)

    def raw_sample(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """The stored uint8 image and its ``boxes`` (BoundingBoxes in its pixels) and ``labels``.

        Augmentations that combine several images (mosaic, mixup) start from these.
        """
        record = self.records[index]
        image = self._cache.get(index)
        if image is None:
            image = self._image(index)
        return self.sample(image, record)

    def sample(self, image: torch.Tensor, record: ImageRecord) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """:meth:`raw_sample` of a stored ``image`` of ``record``: a picture, or with tiling a tile of one."""
        boxes = [box for box in record.boxes if not (self.train and box.iscrowd)]
        coordinates = torch.tensor([[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes], dtype=torch.float32)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                coordinates.reshape(-1, 4), format="XYXY", canvas_size=(record.height, record.width)
            ),
            "labels": torch.tensor([self._label(record, b.label) for b in boxes], dtype=torch.int64),
        }
        if self.train:
            target["boxes"] = F.resize(target["boxes"], list(image.shape[1:]))
        return tv_tensors.Image(image), target

    def finish(self, image: torch.Tensor, target: dict[str, Any], index: int) -> tuple[torch.Tensor, Target]:
        """The sample as a detector takes it: float image in [0, 1], boxes cleaned up, COCO fields."""
        record = self.records[index]
        if self.train:
            image, target = self.cleanup(image, target)
            iscrowd = torch.zeros(len(target["labels"]), dtype=torch.int64)
        else:
            iscrowd = torch.tensor([int(b.iscrowd) for b in record.boxes], dtype=torch.int64)
        boxes_tensor = target["boxes"].as_subclass(torch.Tensor)
        return F.to_dtype(image.as_subclass(torch.Tensor), torch.float32, scale=True), {
            "boxes": boxes_tensor,
            "labels": target["labels"],
            "iscrowd": iscrowd,
            "area": (boxes_tensor[:, 2] - boxes_tensor[:, 0]) * (boxes_tensor[:, 3] - boxes_tensor[:, 1]),
            "image_id": torch.tensor(index, dtype=torch.int64),
        }

    def _stored_size(self, record: ImageRecord) -> tuple[int, int]:
        """The model's input scale when that shrinks the image; enlarging is left to the model.

        Upscaling here would only make decoding, caching and augmentation work on more pixels
        for the same result, since the model resizes its input anyway.
        """
        if self.input_size is None:
            return record.width, record.height
        width, height = self.input_size.scaled(record.width, record.height)
        if width <= record.width and height <= record.height:
            return width, height
        return record.width, record.height

    def _image(self, index: int) -> torch.Tensor:
        """The uint8 image as stored for this dataset: original size, or the model's scale for training."""
        record = self.records[index]
        image = decode_image_file(record.path)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(
                f"{record.source or record.path}: the annotation says {record.width}x{record.height} "
                f"pixels but {record.path} is {image.shape[2]}x{image.shape[1]} (after EXIF orientation); "
                "fix the size in the annotation or run `visionautoml data validate` on the dataset"
            )
        width, height = self._stored_size(record)
        if (width, height) != (record.width, record.height):
            image = F.resize(image, [height, width], antialias=True)
        return image

    def _label(self, record: ImageRecord, label: str) -> int:
        try:
            return self._class_ids[label]
        except KeyError:
            raise DataError(
                f"{record.source or record.path}: label '{label}' is not one of the dataset's classes "
                f"{self.classes}; fix the annotation or the class list"
            ) from None


def collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Detection batches are lists: images differ in size and targets in box count."""
    return [image for image, _ in batch], [target for _, target in batch]


def make_data_loader(
    dataset: Dataset,
    params: TrainingParameters,
    *,
    train: bool,
    cache_bytes: int = CACHE_BYTES,
) -> DataLoader | PhasedLoader:
    """A loader for training (shuffled, pre-resized, augmented if enabled) or for evaluation.

    Images are decoded up front when they fit in ``cache_bytes``; ``params.number_of_workers``
    processes (default :func:`default_workers`) then only augment. With mosaic on, the
    training loader is a :class:`~visionautoml.training.augment.PhasedLoader`: mosaic (and
    mixup) samples first, the plain augmentation for the last ``no_augmentation_epochs``.
    """
    entry = get_entry(params.model_name)
    size = entry.input_size(params)
    samples = DetectionDataset(
        dataset, train=train, input_size=size, augment=params.apply_automl_train_augmentations
    )
    if train and params.grid is not None:
        samples = TiledSamples(samples, params)
    if samples.decoded_bytes() <= cache_bytes:
        samples.preload()
    if train and params.apply_automl_train_augmentations and mosaic_enabled(params, entry.family):
        mosaic = MosaicDataset(
            samples, size.image_size or size.min_size or 640, mixup=params.mixup_probability
        )
        return PhasedLoader(_loader(mosaic, params, train), _loader(samples, params, train), params)
    return _loader(samples, params, train)


def _loader(samples: TorchDataset, params: TrainingParameters, train: bool) -> DataLoader:
    workers = default_workers() if params.number_of_workers is None else params.number_of_workers
    generator = torch.Generator().manual_seed(params.seed)
    batch_size = params.training_batch_size if train else params.validation_batch_size
    return DataLoader(
        samples,
        batch_size=batch_size,
        shuffle=train,
        # A last training batch of one image breaks batch norm ("Expected more than 1 value per
        # channel"); the shuffle leaves a different image out of each epoch instead.
        drop_last=train and len(samples) > 1 and len(samples) % batch_size == 1,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )

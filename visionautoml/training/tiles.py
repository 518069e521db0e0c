"""Training on tiles: each training picture's tiles as extra samples, the picture itself kept.

A model that will see tiles at inference has to learn objects at the scale a tile shows
them. Tiles are cut on the fly from the full-resolution picture (the whole picture is
stored at the model's scale, which would leave a tile a fraction of that), then scaled
like any training image and run through the same augmentation, so every zoo model and the
augmentation recipe (mosaic included) work unchanged.

Boxes are cut at the tile's borders; a box that keeps less than
:data:`MIN_VISIBLE_FRACTION` of its area inside the tile is dropped, since a sliver of an
object teaches the model nothing about the object. As in the cloud service, only tiles
that hold at least one box become samples: an empty tile costs a full training step and
the whole picture already shows its background.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from visionautoml.config import Tiling
from visionautoml.data.annotations import Box, ImageRecord
from visionautoml.data.images import decode_image_file
from visionautoml.errors import DataError
from visionautoml.models.tiling import Tile, image_tiles

if TYPE_CHECKING:
    from visionautoml.training.dataset import DetectionDataset

MIN_VISIBLE_FRACTION = 0.05
"""A box cut by a tile border stays in the tile when at least this share of its area is inside.

The cloud service's own tests keep a box with 6% of its area in a tile, so its rule is at
most this strict; below 5% the part inside is a few pixels of an edge.
"""


def cut_boxes(boxes: list[Box], tile: Tile, min_visible_fraction: float = MIN_VISIBLE_FRACTION) -> list[Box]:
    """``boxes`` as seen in ``tile``: clipped to it, in its pixels, those mostly outside it left out."""
    cut = []
    for box in boxes:
        left, top = max(box.xmin, tile.left), max(box.ymin, tile.top)
        right, bottom = min(box.xmax, tile.right), min(box.ymax, tile.bottom)
        if right <= left or bottom <= top or box.area <= 0:
            continue
        if (right - left) * (bottom - top) < min_visible_fraction * box.area:
            continue
        cut.append(
            Box(
                left - tile.left, top - tile.top, right - tile.left, bottom - tile.top, box.label, box.iscrowd
            )
        )
    return cut


@dataclass(frozen=True, slots=True)
class TileSample:
    """One tile of one training picture: which picture, where, and its boxes in tile pixels."""

    picture: int
    tile: Tile
    record: ImageRecord


def tile_samples(
    records: list[ImageRecord], tiling: Tiling, min_visible_fraction: float = MIN_VISIBLE_FRACTION
) -> list[TileSample]:
    """The tiles of ``records`` that hold at least one (non-crowd) box, picture by picture."""
    samples = []
    for picture, record in enumerate(records):
        for tile in image_tiles(record.width, record.height, tiling):
            boxes = cut_boxes(record.boxes, tile, min_visible_fraction)
            if not any(not box.iscrowd for box in boxes):
                continue
            name = f"{record.name}#tile-{tile.left}-{tile.top}-{tile.width}x{tile.height}"
            tile_record = ImageRecord(name, record.path, tile.width, tile.height, boxes, record.source)
            samples.append(TileSample(picture, tile, tile_record))
    return samples


class TiledSamples(TorchDataset):
    """A training :class:`~visionautoml.training.dataset.DetectionDataset` followed by its pictures' tiles.

    Indices below ``len(base)`` are the pictures as ``base`` gives them; the rest are tiles.
    It offers ``base``'s interface (``raw_sample``, ``finish``, ``preload``,
    ``decoded_bytes``), so mosaic and the loader take it in ``base``'s place. A tile's
    ``image_id`` is its picture's.
    """

    def __init__(
        self, base: DetectionDataset, tiling: Tiling, min_visible_fraction: float = MIN_VISIBLE_FRACTION
    ) -> None:
        self.base = base
        self.tiles = tile_samples(base.records, tiling, min_visible_fraction)
        self._cache: dict[int, torch.Tensor] = {}
        self._decoded: tuple[int, torch.Tensor] | None = None

    @property
    def records(self) -> list[ImageRecord]:
        """The pictures, then one record per tile (its boxes in tile pixels)."""
        return [*self.base.records, *(sample.record for sample in self.tiles)]

    def __len__(self) -> int:
        return len(self.base) + len(self.tiles)

    def decoded_bytes(self) -> int:
        tiles = sum(3 * w * h for w, h in (self.base._stored_size(s.record) for s in self.tiles))
        return self.base.decoded_bytes() + tiles

    def preload(self) -> None:
        """Decode every picture once (the tiles of one picture share the decode) and keep the tiles."""
        self.base.preload()
        for index in range(len(self.tiles)):
            self._cache[index] = self._tile_image(index)
        self._decoded = None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if index < len(self.base):
            return self.base[index]
        image, target = self.raw_sample(index)
        if self.base.transforms is not None:
            image, target = self.base.transforms(image, target)
        return self.finish(image, target, index)

    def raw_sample(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        if index < len(self.base):
            return self.base.raw_sample(index)
        position = index - len(self.base)
        image = self._cache.get(position)
        if image is None:
            image = self._tile_image(position)
        return self.base.sample(image, self.tiles[position].record)

    def finish(
        self, image: torch.Tensor, target: dict[str, Any], index: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        picture = index if index < len(self.base) else self.tiles[index - len(self.base)].picture
        return self.base.finish(image, target, picture)

    def _tile_image(self, position: int) -> torch.Tensor:
        """The tile cut from the full-resolution picture, then scaled as ``base`` stores its images."""
        sample = self.tiles[position]
        tile_record = sample.record
        width, height = self.base._stored_size(tile_record)
        image = sample.tile.crop(self._picture(sample.picture))
        if (width, height) != (tile_record.width, tile_record.height):
            return F.resize(image, [height, width], antialias=True)
        return image.clone()

    def _picture(self, picture: int) -> torch.Tensor:
        """The picture at full resolution; the last one is kept, as its tiles are read one after another."""
        if self._decoded is not None and self._decoded[0] == picture:
            return self._decoded[1]
        record = self.base.records[picture]
        image = decode_image_file(record.path)
        if tuple(image.shape[1:]) != (record.height, record.width):
            raise DataError(
                f"{record.source or record.path}: the annotation says {record.width}x{record.height} "
                f"pixels but {record.path} is {image.shape[2]}x{image.shape[1]}; fix the size in the "
                "annotation or run `visionautoml data validate` on the dataset"
            )
        self._decoded = (picture, image)
        return image

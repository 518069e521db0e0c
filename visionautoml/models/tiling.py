"""Tiles for small objects, as the cloud service cuts them, and the merge of whole-image and tile detections.

A detector works at a few hundred pixels, so a 15-pixel object in a 1,600-pixel photo is
two or three pixels by the time the model sees it. Cutting the picture into a grid of
overlapping tiles and running the model on each tile (and on the whole image, for the
large objects a tile cuts apart) shows it small objects at several times their size. The
boxes of all runs are shifted back to image coordinates and merged by class-aware NMS at
``tile_predictions_nms_threshold``: an object seen whole and in two tiles comes back once.

The grid follows the service: ``COLUMNSxROWS`` tiles of equal size whose neighbours share
``tile_overlap_ratio`` of a tile, the first at the image's top-left corner and the last
ending at its bottom-right one. ``1x1`` is the whole image, i.e. no tiling.

One code path for every backend: :func:`detect_tiled` runs a torchvision-style module (the
validation loop), and :class:`TiledPredictor` wraps anything with the predictor interface
(the PyTorch :class:`~visionautoml.models.predictor.Predictor` or the ONNX Runtime one, whose
exported graph stays one image), both through :func:`merge_detections`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import ValidationError
from torchvision.ops import batched_nms

from visionautoml.config import Tiling
from visionautoml.errors import ConfigError
from visionautoml.models.predictor import Detections


@dataclass(frozen=True, slots=True)
class Tile:
    """A tile's pixel rectangle in its image: columns ``left:right``, rows ``top:bottom``."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    def crop(self, image: torch.Tensor) -> torch.Tensor:
        """The tile of a CHW image, as a view (no copy)."""
        return image[..., self.top : self.bottom, self.left : self.right]


def _spans(extent: int, count: int, overlap: float) -> list[tuple[int, int]]:
    """``count`` equal spans over ``extent`` pixels, neighbours sharing ``overlap`` of a span."""
    if count == 1:
        return [(0, extent)]
    size = extent / (overlap + (1 - overlap) * count)
    step = (1 - overlap) * size
    spans = []
    for index in range(count):
        start = min(round(index * step), extent - 1)
        end = extent if index == count - 1 else min(extent, round(index * step + size))
        spans.append((start, max(end, start + 1)))
    return spans


def tile_grid(width: int, height: int, grid: tuple[int, int], overlap: float) -> list[Tile]:
    """The tiles of a ``width`` x ``height`` image, row by row, for ``grid`` = (columns, rows)."""
    columns, rows = grid
    return [
        Tile(left, top, right, bottom)
        for top, bottom in _spans(height, rows, overlap)
        for left, right in _spans(width, columns, overlap)
    ]


def image_tiles(width: int, height: int, tiling: Tiling) -> list[Tile]:
    """The tiles inference runs besides the whole image: none without tiling or for ``1x1``."""
    if tiling.grid is None:
        return []
    tiles = tile_grid(width, height, tiling.grid, tiling.tile_overlap_ratio)
    return [tile for tile in tiles if (tile.width, tile.height) != (width, height)]


def merge_detections(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    offsets: Sequence[tuple[int, int]],
    iou_threshold: float,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's ``(boxes, scores, labels)`` from those of its runs, best first.

    ``parts[i]`` are run ``i``'s xyxy boxes in its own pixels, shifted by ``offsets[i]`` =
    (left, top) into the image's. Boxes of one class overlapping by more than
    ``iou_threshold`` are duplicates of one object and the best-scored stays; boxes of
    different classes never suppress each other. ``limit`` caps the count, as the model's
    ``box_detections_per_image`` does for one run.
    """
    boxes = torch.cat(
        [
            part[0].reshape(-1, 4).float()
            + torch.tensor([left, top, left, top], dtype=torch.float32, device=part[0].device)
            for part, (left, top) in zip(parts, offsets, strict=True)
        ]
    )
    scores = torch.cat([part[1].reshape(-1).float() for part in parts])
    labels = torch.cat([part[2].reshape(-1) for part in parts])
    keep = batched_nms(boxes, scores, labels, iou_threshold)  # sorted by decreasing score
    if limit is not None:
        keep = keep[:limit]
    return boxes[keep], scores[keep], labels[keep]


def _views(image: torch.Tensor, tiling: Tiling) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """The whole image then its tiles, with each one's offset in the image."""
    tiles = image_tiles(int(image.shape[-1]), int(image.shape[-2]), tiling)
    return [image, *(tile.crop(image) for tile in tiles)], [(0, 0), *((t.left, t.top) for t in tiles)]


def detect_tiled(
    detect: Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]],
    images: Sequence[torch.Tensor],
    tiling: Tiling | None,
    limit: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """A torchvision-style detector's outputs (``boxes``, ``scores``, ``labels``) on whole image + tiles.

    ``detect`` is the module (or any callable taking a list of CHW images). The runs go in
    batches of ``len(images)`` pictures, so tiling costs time but no more memory than the
    batch it replaces. Without tiling (or ``1x1``) this is ``detect(images)`` itself.
    """
    images = list(images)
    if tiling is None or tiling.grid is None:
        return detect(images)
    views, offsets = [], []
    for image in images:
        crops, shifts = _views(image, tiling)
        views.append(crops)
        offsets.append(shifts)
    flat = [crop for crops in views for crop in crops]
    chunk = max(1, len(images))
    outputs: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(flat), chunk):
        outputs.extend(detect(flat[start : start + chunk]))
    merged, position = [], 0
    for shifts in offsets:
        runs = outputs[position : position + len(shifts)]
        position += len(shifts)
        parts = [(run["boxes"], run["scores"], run["labels"]) for run in runs]
        boxes, scores, labels = merge_detections(parts, shifts, tiling.tile_predictions_nms_threshold, limit)
        merged.append({"boxes": boxes, "scores": scores, "labels": labels})
    return merged


class _Predicts(Protocol):
    spec: Any

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]: ...


class TiledPredictor:
    """A predictor (PyTorch or ONNX Runtime) that answers for whole image + tiles, merged.

    Same interface as the predictor it wraps (``spec`` and ``predict`` on uint8 CHW images),
    so batch prediction and the scoring service run it unchanged. The wrapped predictor
    applies the model's ``box_score_threshold`` to every run; the merge then keeps at most
    ``box_detections_per_image`` boxes, as one run of the model would.
    """

    def __init__(self, predictor: _Predicts, tiling: Tiling) -> None:
        self.predictor = predictor
        self.tiling = tiling

    @property
    def spec(self) -> Any:
        return self.predictor.spec

    def predict(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        if self.tiling.grid is None:
            return self.predictor.predict(images)
        labels = list(self.spec.labels)
        ids = {name: index + 1 for index, name in enumerate(labels)}
        limit = self.spec.thresholds.box_detections_per_image

        def detect(views: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return [
                {
                    "boxes": found.boxes,
                    "scores": found.scores,
                    "labels": torch.tensor([ids[name] for name in found.labels], dtype=torch.int64),
                }
                for found in self.predictor.predict(views)
            ]

        merged = detect_tiled(detect, images, self.tiling, limit)
        return [
            Detections(
                boxes=output["boxes"],
                scores=output["scores"],
                labels=[labels[int(i) - 1] for i in output["labels"]],
            )
            for output in merged
        ]


def with_tiling(predictor: _Predicts, tiling: Tiling | None = None) -> _Predicts:
    """``predictor`` answering with ``tiling`` (default: the one its spec records); itself without tiling.

    An override with ``tile_grid_size`` None switches off a model's own tiling, as the
    cloud service lets inference settings do.
    """
    inner = predictor.predictor if isinstance(predictor, TiledPredictor) else predictor
    chosen = tiling if tiling is not None else getattr(inner.spec, "tiling", None)
    if chosen is None or chosen.grid is None:
        return inner
    return TiledPredictor(inner, chosen)


def resolve_tiling(own: Tiling | None, **overrides: Any) -> Tiling:
    """A model's tiling with the settings given on a command line (those not None) replaced.

    ``tile_grid_size="none"`` switches tiling off; the overlap and NMS threshold keep the
    model's values unless given.
    """
    base = (own or Tiling()).model_dump()
    given = {name: value for name, value in overrides.items() if value is not None}
    unknown = sorted(set(given) - set(Tiling.model_fields))
    if unknown:
        raise TypeError(f"not tiling settings: {', '.join(unknown)}")
    try:
        return Tiling.model_validate({**base, **given})
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc'])}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors()
        )
        raise ConfigError(f"tiling settings: {problems}") from None

"""The one canonical annotation model every format reads into and writes from.

Coordinates are absolute, continuous pixel coordinates: ``(0, 0)`` is the top-left
corner of the image and ``(width, height)`` its bottom-right corner, so a box that
covers a whole 640x480 image is ``(0, 0, 640, 480)``. Pascal VOC values are taken
as such edge coordinates unchanged (no 1-based ``-1`` shift), exactly as the cloud
AutoML service's VOC-to-JSONL converter does, so our JSONL equals theirs and every
format round-trips without drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Box:
    """One labelled object. ``iscrowd`` boxes are ignored by COCO-style evaluation."""

    xmin: float
    ymin: float
    xmax: float
    ymax: float
    label: str
    iscrowd: bool = False

    @property
    def width(self) -> float:
        return self.xmax - self.xmin

    @property
    def height(self) -> float:
        return self.ymax - self.ymin

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass(slots=True)
class ImageRecord:
    """One image and its boxes.

    ``name`` is the image's POSIX path relative to the dataset's image root
    (e.g. ``raccoon-1.jpg``); it identifies the image across formats, orders it
    for deterministic splits and names it in outputs. ``path`` is where its bytes
    are. ``source`` says where the annotation came from (``file`` or ``file:line``)
    so that problems found later can point the user at it.
    """

    name: str
    path: Path
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    source: str = ""


@dataclass(slots=True)
class Dataset:
    """Images with their boxes and the ordered class list (index = class id - 1)."""

    images: list[ImageRecord]
    classes: list[str]

    def sorted(self) -> Dataset:
        return Dataset(sorted(self.images, key=lambda image: image.name), list(self.classes))

    @property
    def box_count(self) -> int:
        return sum(len(image.boxes) for image in self.images)


def classes_in_order_of_appearance(images: list[ImageRecord]) -> list[str]:
    """The class list formats without one (VOC, JSONL) imply: sorted, so it is stable."""
    return sorted({box.label for image in images for box in image.boxes})

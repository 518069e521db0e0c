"""Shared fixtures: tiny generated datasets, and the path to the real raccoon data when present."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
RACCOON_DIR = REPO_ROOT.parent / "shared" / "datasets" / "raccoon"

COLOURS = {"red_square": (220, 30, 30), "blue_square": (30, 30, 220)}


def make_voc_dataset(
    root: Path,
    n_images: int = 10,
    size: tuple[int, int] = (64, 48),
    classes: tuple[str, ...] = ("red_square", "blue_square"),
    seed: int = 0,
    difficult_every: int = 0,
) -> Path:
    """Write a VOC folder (images/ + annotations/) of noisy images with coloured boxes.

    Each image holds one or two solid rectangles whose colour gives the class, so a
    detector can learn the task in a few iterations. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    width, height = size
    for index in range(n_images):
        image = Image.new("RGB", size, (rng.randint(90, 160),) * 3)
        draw = ImageDraw.Draw(image)
        objects = []
        for obj_index in range(1 + index % 2):
            label = classes[(index + obj_index) % len(classes)]
            w, h = rng.randint(width // 5, width // 2), rng.randint(height // 5, height // 2)
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            colour = COLOURS.get(label, (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=colour)
            difficult = int(bool(difficult_every) and index % difficult_every == 0 and obj_index == 0)
            objects.append((label, x0, y0, x0 + w, y0 + h, difficult))
        name = f"img-{index:03d}"
        image.save(root / "images" / f"{name}.jpg", quality=95)
        xml_objects = "".join(
            f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for label, x0, y0, x1, y1, difficult in objects
        )
        (root / "annotations" / f"{name}.xml").write_text(
            f"<annotation><folder>images</folder><filename>{name}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{xml_objects}</annotation>",
            encoding="utf-8",
        )
    return root


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    return make_voc_dataset(tmp_path / "tiny_voc")


@pytest.fixture
def raccoon_dir() -> Path:
    if not (RACCOON_DIR / "annotations").is_dir():
        pytest.skip(f"real dataset not found at {RACCOON_DIR} (only present on the project's machines)")
    return RACCOON_DIR

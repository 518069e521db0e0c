"""Train/validation splits that depend only on the images' names (and a seed).

Both splits sort by name first, so the same dataset gives the same split whatever
order a reader returned it in, on any machine.
"""

from __future__ import annotations

import math
import random
from collections import Counter

from visionautoml.data.annotations import Dataset, ImageRecord
from visionautoml.errors import DataError


def split_every_nth(dataset: Dataset, n: int) -> tuple[Dataset, Dataset]:
    """Every ``n``-th image (index % n == 0, by sorted name) to validation, as the original flow did."""
    if n < 2:
        raise DataError(f"--validation-every must be at least 2 (got {n}): 1 would leave nothing to train on")
    images = dataset.sorted().images
    train = [image for index, image in enumerate(images) if index % n]
    validation = [image for index, image in enumerate(images) if not index % n]
    _check_both_sides(
        len(train), len(validation), f"every {n}th image to validation (--validation-every {n})"
    )
    return Dataset(train, list(dataset.classes)), Dataset(validation, list(dataset.classes))


def _check_both_sides(train: int, validation: int, how: str) -> None:
    """A split with an empty side would train on nothing or measure nothing, silently: refuse it."""
    if train and validation:
        return
    total = train + validation
    side = "training" if not train else "validation"
    raise DataError(
        f"{total} image(s) with {how} leave no {side} images; add images, or skip the split and give "
        "validation data separately (training then holds out validation_data_size itself)"
    )


def split_fraction(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """About ``fraction`` of the images to validation, stratified by class where possible.

    Each image is grouped by its rarest class (the class with the fewest images), so a
    rare class gets its share of validation images instead of all landing on one side.
    Group quotas are rounded by largest remainder so the total is ``round(fraction * N)``,
    and both sides keep at least one image when there are two or more; a single image
    cannot be split (DataError).
    """
    if not 0 < fraction < 1:
        raise DataError(f"--validation-fraction must be between 0 and 1 (got {fraction})")
    images = dataset.sorted().images
    total = len(images)
    wanted = round(fraction * total)
    if total >= 2:
        wanted = min(max(wanted, 1), total - 1)
    groups = _groups_by_rarest_class(images)
    quotas = {key: fraction * len(members) for key, members in groups.items()}
    counts = {key: math.floor(quota) for key, quota in quotas.items()}
    by_remainder = sorted(groups, key=lambda key: (-(quotas[key] - counts[key]), key))
    shortfall = wanted - sum(counts.values())
    for key in by_remainder[:shortfall] if shortfall > 0 else []:
        counts[key] += 1
    rng = random.Random(seed)
    validation_names: set[str] = set()
    for key in sorted(groups):
        members = list(groups[key])
        rng.shuffle(members)
        validation_names.update(image.name for image in members[: counts[key]])
    train = [image for image in images if image.name not in validation_names]
    validation = [image for image in images if image.name in validation_names]
    _check_both_sides(len(train), len(validation), f"a validation fraction of {fraction:g}")
    return Dataset(train, list(dataset.classes)), Dataset(validation, list(dataset.classes))


def _groups_by_rarest_class(images: list[ImageRecord]) -> dict[str, list[ImageRecord]]:
    frequency = Counter(label for image in images for label in {box.label for box in image.boxes})
    groups: dict[str, list[ImageRecord]] = {}
    for image in images:
        labels = {box.label for box in image.boxes}
        key = min(labels, key=lambda label: (frequency[label], label)) if labels else ""
        groups.setdefault(key, []).append(image)
    return groups

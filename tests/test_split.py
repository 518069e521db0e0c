"""Train/validation splits: by position in name order, or by fraction stratified by class."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visionautoml.data.annotations import Box, Dataset, ImageRecord
from visionautoml.data.split import split_every_nth, split_fraction
from visionautoml.errors import DataError


def dataset_of(labels_per_image: dict[str, list[str]]) -> Dataset:
    images = [
        ImageRecord(name, Path(name), 10, 10, [Box(0, 0, 5, 5, label) for label in labels])
        for name, labels in labels_per_image.items()
    ]
    return Dataset(images, sorted({label for labels in labels_per_image.values() for label in labels}))


def names(dataset: Dataset) -> list[str]:
    return [image.name for image in dataset.images]


def test_every_nth_sends_index_0_n_2n_of_the_sorted_names_to_validation() -> None:
    shuffled = [f"raccoon-{i}.jpg" for i in (7, 1, 10, 3, 100, 2, 5, 11, 4, 6, 8, 9)]
    train, validation = split_every_nth(dataset_of({name: ["r"] for name in shuffled}), 5)
    ordered = sorted(shuffled)
    assert ordered[:3] == ["raccoon-1.jpg", "raccoon-10.jpg", "raccoon-100.jpg"], "plain string order"
    assert names(validation) == [ordered[0], ordered[5], ordered[10]]
    assert names(train) == [name for index, name in enumerate(ordered) if index % 5]
    assert train.classes == validation.classes == ["r"]


def test_every_nth_needs_at_least_two() -> None:
    with pytest.raises(DataError, match="at least 2"):
        split_every_nth(dataset_of({"a": []}), 1)


def test_fraction_is_stratified_by_the_rarest_class_and_repeatable() -> None:
    labels = {f"common-{i:02d}": ["cat"] for i in range(40)}
    labels.update({f"rare-{i}": ["cat", "owl"] for i in range(10)})
    dataset = dataset_of(labels)
    train, validation = split_fraction(dataset, 0.2, seed=3)
    assert len(validation.images) == 10 and len(train.images) == 40
    owls = [name for name in names(validation) if name.startswith("rare")]
    assert len(owls) == 2, "the rare class gets its share, grouped by each image's rarest class"
    assert split_fraction(dataset, 0.2, seed=3) == (train, validation)
    assert names(split_fraction(dataset, 0.2, seed=4)[1]) != names(validation)


def test_fraction_keeps_both_sides_non_empty() -> None:
    train, validation = split_fraction(dataset_of({"a": ["x"], "b": ["y"]}), 0.01, seed=0)
    assert len(train.images) == len(validation.images) == 1
    with pytest.raises(DataError, match="between 0 and 1"):
        split_fraction(dataset_of({"a": []}), 1.0, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=4), st.lists(st.sampled_from("xyz"), max_size=3), min_size=2
    ),
    st.floats(0.05, 0.95),
    st.integers(0, 10),
    st.integers(2, 7),
)
def test_splits_partition_the_images(
    labels: dict[str, list[str]], fraction: float, seed: int, n: int
) -> None:
    dataset = dataset_of(labels)
    for train, validation in (split_fraction(dataset, fraction, seed), split_every_nth(dataset, n)):
        assert sorted(names(train) + names(validation)) == sorted(labels)
        assert names(train) == sorted(names(train)) and names(validation) == sorted(names(validation))
    train, validation = split_fraction(dataset, fraction, seed)
    if len(labels) >= 2:
        assert train.images and validation.images
        assert len(validation.images) == min(max(round(fraction * len(labels)), 1), len(labels) - 1)

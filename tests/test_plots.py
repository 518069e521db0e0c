"""Per-trial plots: files that open, a confusion matrix that counts what a person counts by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import make_voc_dataset
from PIL import Image

from visionautoml.config import TrainingParameters
from visionautoml.data.formats import read_dataset
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth
from visionautoml.evaluation.scoring import evaluate_predictions
from visionautoml.reports.plots import (
    confusion_matrix,
    confusion_matrix_csv,
    per_class_ap_table,
    worst_images,
    write_trial_plots,
)

CLASSES = ["a", "b"]


def truth(boxes, labels, crowd=None) -> ImageGroundTruth:
    crowd = [False] * len(labels) if crowd is None else crowd
    return ImageGroundTruth(np.array(boxes, float).reshape(-1, 4), labels, crowd, 100, 100)


def found(boxes, scores, labels) -> ImageDetections:
    return ImageDetections(np.array(boxes, float).reshape(-1, 4), scores, labels)


def hand_case() -> tuple[list[ImageGroundTruth], list[ImageDetections]]:
    gts = [
        truth([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [1, 2, 1]),
        truth([[0, 0, 100, 100], [0, 60, 20, 80]], [1, 2], crowd=[True, False]),
        truth([], []),
    ]
    dets = [
        found(
            [[0, 0, 10, 10], [20, 0, 30, 10], [60, 0, 70, 10], [0, 0, 10, 10], [40, 0, 50, 10]],
            [0.9, 0.8, 0.7, 0.6, 0.3],
            [1, 1, 2, 1, 2],
        ),
        found([[0, 0, 90, 90], [0, 60, 20, 80]], [0.9, 0.95], [1, 2]),
        found([], [], []),
    ]
    return gts, dets


def test_confusion_matrix_counts_equal_hand_computed_matches(tmp_path):
    gts, dets = hand_case()
    # Image 1: a found (a,a); the b box predicted as a (b,a); a b false alarm (bg,b); a duplicate of the
    # found a box (bg,a); the second a box missed (a,bg); the 0.3 detection is under the threshold.
    # Image 2: the a detection on the crowd region counts nowhere; b found (b,b). Image 3: nothing.
    expected = [
        [1, 0, 1],
        [1, 1, 0],
        [1, 1, 0],
    ]
    matrix = confusion_matrix(gts, dets, len(CLASSES), score_threshold=0.5)
    assert matrix.tolist() == expected

    evaluation = evaluate_predictions(gts, dets, CLASSES, TrainingParameters(box_score_threshold=0.5))
    write_trial_plots(tmp_path, evaluation)
    with (tmp_path / "confusion_matrix.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["ground_truth \\ predicted", "a", "b", "background"]
    assert [row[0] for row in rows[1:]] == ["a", "b", "background"]
    assert [[int(cell) for cell in row[1:]] for row in rows[1:]] == expected


def test_confusion_matrix_diagonal_is_the_true_positives_behind_precision_and_recall():
    rng = np.random.default_rng(3)
    gts, dets = [], []
    for _ in range(6):
        corner = rng.uniform(0, 60, (4, 2))
        boxes = np.hstack([corner, corner + rng.uniform(10, 40, (4, 2))])
        labels = rng.integers(1, 3, 4)
        gts.append(truth(boxes, labels))
        noisy = boxes + rng.normal(0, 3, boxes.shape)
        dets.append(found(noisy, rng.random(4), np.where(rng.random(4) < 0.3, 3 - labels, labels)))
    matrix = confusion_matrix(gts, dets, 2, score_threshold=0.4)
    metrics = evaluate_predictions(gts, dets, CLASSES, TrainingParameters(box_score_threshold=0.4)).metrics
    for index, name in enumerate(CLASSES):
        per_class = metrics["per_class_metrics"][name]
        assert matrix[index].sum() == per_class["ground_truth_boxes"]
        assert matrix[:, index].sum() == per_class["detections_above_threshold"]
        assert matrix[index, index] == round(per_class["recall"] * per_class["ground_truth_boxes"])
    assert confusion_matrix_csv(matrix, CLASSES).count("\n") == 4


def test_worst_images_come_first():
    gts = [truth([[0, 0, 10, 10]], [1]), truth([[0, 0, 10, 10], [50, 50, 60, 60]], [1, 1]), truth([], [])]
    dets = [
        found([[0, 0, 10, 10]], [0.9], [1]),  # recall 1
        found([[0, 0, 10, 10], [80, 80, 90, 90]], [0.9, 0.9], [1, 1]),  # recall 0.5, one false positive
        found([[30, 30, 40, 40]] * 2, [0.9, 0.8], [2, 2]),  # no objects: recall 1, two false positives
    ]
    assert worst_images(gts, dets, 0.5) == [(1, 0.5, 1), (2, 1.0, 2), (0, 1.0, 0)]


def test_trial_plots_on_real_images_decode_and_the_table_names_every_class(tmp_path):
    dataset = read_dataset(make_voc_dataset(tmp_path / "voc", n_images=6))
    label_of = {name: index + 1 for index, name in enumerate(dataset.classes)}
    gts, dets = [], []
    for position, record in enumerate(dataset.images):
        boxes = np.array([[box.xmin, box.ymin, box.xmax, box.ymax] for box in record.boxes])
        labels = [label_of[box.label] for box in record.boxes]
        gts.append(
            ImageGroundTruth(boxes, labels, [False] * len(labels), record.width, record.height, record.name)
        )
        kept = boxes[: 1 + position % 2]  # some images lose a box: their recall drops
        dets.append(found(kept + 1.0, np.linspace(0.9, 0.6, len(kept)), labels[: len(kept)]))
    classes = [*dataset.classes, "unused"]
    evaluation = evaluate_predictions(gts, dets, classes, TrainingParameters())

    written = write_trial_plots(tmp_path / "plots", evaluation, dataset, max_images=4)

    names = sorted(path.name for path in written)
    assert names == [
        "confusion_matrix.csv",
        "confusion_matrix.png",
        "per_class_ap.md",
        "precision_recall.png",
        "validation_images.png",
    ]
    for path in written:
        if path.suffix == ".png":
            with Image.open(path) as image:
                image.load()
                assert image.format == "PNG" and image.width > 100 and image.height > 100
    table = (tmp_path / "plots" / "per_class_ap.md").read_text()
    for name in dataset.classes:
        assert f"| {name} | " in table
    assert "| unused | n/a |" in table
    assert table == per_class_ap_table(evaluation)
    assert not list((tmp_path / "plots").glob(".*"))  # no temporary files left behind


def test_a_dataset_that_does_not_match_the_evaluation_is_refused(tmp_path):
    dataset = read_dataset(make_voc_dataset(tmp_path / "voc", n_images=3))
    gts, dets = hand_case()
    evaluation = evaluate_predictions(gts[:2], dets[:2], CLASSES, TrainingParameters())
    with pytest.raises(ValueError, match="the dataset has 3 images but the evaluation 2"):
        write_trial_plots(tmp_path / "plots", evaluation, dataset)
    assert not Path(tmp_path / "plots" / "validation_images.png").exists()


def test_validation_images_show_the_tile_grid_the_model_looked_at(tmp_path):
    from matplotlib.colors import to_hex

    from visionautoml.config import Tiling
    from visionautoml.reports.plots import TILE_COLOUR, validation_images_figure

    dataset = read_dataset(make_voc_dataset(tmp_path / "voc", n_images=2))
    gts = [
        ImageGroundTruth(np.zeros((0, 4)), [], [], record.width, record.height, record.name)
        for record in dataset.images
    ]
    dets = [found(np.zeros((0, 4)), np.zeros(0), []) for _ in dataset.images]

    def tiles_drawn(tiling: Tiling | None) -> list[int]:
        figure = validation_images_figure(gts, dets, ["a"], dataset, 0.5, tiling=tiling)
        return [
            sum(to_hex(patch.get_edgecolor()) == TILE_COLOUR for patch in axes.patches)
            for axes in figure.axes
        ]

    assert tiles_drawn(Tiling(tile_grid_size="3x2")) == [6, 6]
    assert tiles_drawn(None) == tiles_drawn(Tiling()) == [0, 0]

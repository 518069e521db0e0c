"""Validation runs: the loader loop the trainer uses, the files `visionautoml evaluate` writes, re-scored."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_voc_dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from visionautoml import cli
from visionautoml.config import TrainingParameters
from visionautoml.errors import VisionAutoMLError
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth
from visionautoml.evaluation.scoring import (
    EVALUATION_SCORE_FLOOR,
    Evaluation,
    evaluate_predictions,
    write_evaluation,
)
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import build_model
from visionautoml.training.evaluate import evaluate_model, predict_loader

MODEL_NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


class CornerDetector(torch.nn.Module):
    """Finds one box, the top-left quarter of every image, with label 1: predictable output to check."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen_devices: list[torch.device] = []
        self.seen_training: list[bool] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen_training.append(self.training)
        outputs = []
        for image in images:
            self.seen_devices.append(image.device)
            height, width = image.shape[-2:]
            box = torch.tensor([[0.0, 0.0, width / 2, height / 2]]) + self.anchor
            outputs.append({"boxes": box, "scores": torch.tensor([0.75]), "labels": torch.tensor([1])})
        return outputs


def pycocotools_stats(folder: Path) -> np.ndarray:
    """COCO's 12 stats from the two files alone, computed by the reference implementation."""
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(folder / "ground_truth.json"))
        found = truth.loadRes(str(folder / "detections.json"))
        evaluator = COCOeval(truth, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_predict_loader_keeps_loader_order_and_restores_the_training_mode():
    images = [torch.rand(3, 40, 60), torch.rand(3, 30, 20), torch.rand(3, 50, 50)]
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 30.0, 20.0]]), "labels": torch.tensor([1]), "name": "first"},
        {
            "boxes": torch.tensor([[1.0, 2.0, 10.0, 12.0], [5.0, 5.0, 15.0, 25.0]]),
            "labels": torch.tensor([2, 1]),
            "iscrowd": torch.tensor([0, 1]),
            "name": "second",
        },
        {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "image_id": torch.tensor(7),
        },
    ]
    loader = [(images[:2], targets[:2]), (images[2:], targets[2:])]
    module = CornerDetector().train()

    truths, found = predict_loader(module, loader, "cpu")

    assert module.training and module.seen_training == [False, False]
    assert module.seen_devices == [torch.device("cpu")] * 3
    assert [(t.width, t.height, t.name) for t in truths] == [
        (60, 40, "first"),
        (20, 30, "second"),
        (50, 50, ""),
    ]
    assert truths[1].labels.tolist() == [2, 1] and truths[1].iscrowd.tolist() == [False, True]
    assert truths[0].iscrowd.tolist() == [False]
    assert [d.boxes.tolist() for d in found] == [[[0, 0, 30, 20]], [[0, 0, 10, 15]], [[0, 0, 25, 25]]]
    metrics = evaluate_predictions(truths, found, ["a", "b"], TrainingParameters()).metrics
    # Class a: image 1's box is found exactly; image 2's box overlaps its crowd region too little (IoU 0.17)
    # and image 3 has nothing to find: two false positives ranked after the hit (equal scores keep order).
    assert metrics["per_class_metrics"]["a"]["ground_truth_boxes"] == 1
    assert metrics["per_class"]["a"] == pytest.approx(1.0)
    assert metrics["per_class_metrics"]["a"]["precision"] == pytest.approx(1 / 3)


class ThresholdedDetector(CornerDetector):
    """Like torchvision's one-stage detectors: drops detections scoring below ``score_thresh``."""

    def __init__(self, score_thresh: float) -> None:
        super().__init__()
        self.score_thresh = score_thresh
        self.seen_thresholds: list[float] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.seen_thresholds.append(self.score_thresh)
        outputs = super().forward(images)
        for output in outputs:
            output["scores"] = torch.tensor([0.2])
        return [
            {k: v[output["scores"] >= self.score_thresh] for k, v in output.items()} for output in outputs
        ]


def test_map_ranks_detections_below_the_deployment_threshold_but_precision_does_not():
    images = [torch.rand(3, 40, 60)]
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 30.0, 20.0]]), "labels": torch.tensor([1])}]
    module = ThresholdedDetector(score_thresh=0.3)

    truths, found = predict_loader(module, [(images, targets)], "cpu")

    # The box scores 0.2: kept for mAP, whatever the model's own threshold, which is restored after.
    assert module.seen_thresholds == [EVALUATION_SCORE_FLOOR] and module.score_thresh == 0.3
    assert found[0].scores.tolist() == pytest.approx([0.2])
    metrics = evaluate_predictions(truths, found, ["a"], TrainingParameters(box_score_threshold=0.3)).metrics
    assert metrics["mean_average_precision"] == pytest.approx(1.0)
    assert metrics["precision"] == 0.0 and metrics["recall"] == 0.0


def test_written_files_rescored_by_pycocotools_reproduce_every_coco_stat(tmp_path):
    rng = np.random.default_rng(11)
    truths, found = [], []
    for index in range(8):
        corner = rng.uniform(0, 100, (3, 2))
        boxes = np.hstack([corner, corner + rng.uniform(8, 90, (3, 2))])
        labels = rng.integers(1, 3, 3)
        truths.append(
            ImageGroundTruth(boxes, labels, [index == 0, False, False], 200, 190, f"img-{index}.jpg")
        )
        found.append(ImageDetections(boxes + rng.normal(0, 4, boxes.shape), rng.random(3), labels))
    evaluation = evaluate_predictions(
        truths, found, ["a", "b"], TrainingParameters(validation_metric_type="coco")
    )

    written = write_evaluation(tmp_path / "eval", evaluation)

    assert [path.name for path in written] == ["ground_truth.json", "detections.json", "metrics.json"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    stats = pycocotools_stats(tmp_path / "eval")
    names = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large"]
    names += ["mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]
    assert [metrics[name] for name in names] == pytest.approx(stats.tolist(), abs=1e-12)
    assert 0.3 < metrics["map"] < 1.0
    assert metrics["mean_average_precision"] == metrics["map"]
    assert metrics["evaluation"]["metric_type"] == "coco"
    ground_truth = json.loads((tmp_path / "eval" / "ground_truth.json").read_text())
    assert ground_truth["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert ground_truth["images"][3] == {"id": 4, "file_name": "img-3.jpg", "width": 200, "height": 190}


def test_an_unwritable_output_folder_is_a_user_error_and_leaves_nothing(tmp_path):
    evaluation = Evaluation(["a"], [], [], {"map": 0.0}, "voc", 0.5, 0.3)
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(VisionAutoMLError, match="cannot write the evaluation there"):
        write_evaluation(blocker / "eval", evaluation)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A randomly initialised zoo detector saved with save_model, and a tiny VOC dataset for it.

    Random weights and a zero score threshold give many weak boxes, a few of which hit the objects:
    small but non-zero mAP, which is all a check of the bookkeeping needs.
    """
    root = tmp_path_factory.mktemp("evaluate")
    data = make_voc_dataset(root / "voc", n_images=6)
    params = TrainingParameters(
        model_name=MODEL_NAME, pretrained="none", min_size=64, max_size=128, box_score_threshold=0.0
    )
    torch.manual_seed(0)
    module = build_model(MODEL_NAME, 3, params)
    model = save_model(module, ModelSpec.from_params(params, ["red_square", "blue_square"]), root / "model")
    return model, data


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("visionautoml")), *args]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_evaluate_command_writes_files_that_pycocotools_scores_the_same(saved_model, tmp_path):
    model, data = saved_model
    out = tmp_path / "eval"

    result = run_cli("evaluate", str(model), "--data", str(data), "--out", str(out), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "mean_average_precision" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("map", "map_50", "map_75", "mean_average_precision", "precision", "recall", "per_class"):
        assert key in metrics
    assert set(metrics["per_class"]) == {"red_square", "blue_square"}
    assert metrics["map_50"] > 0 and metrics["map"] > 0
    stats = pycocotools_stats(out)
    assert abs(stats[0] - metrics["map"]) < 1e-6
    assert abs(stats[1] - metrics["map_50"]) < 1e-6
    assert metrics["mean_average_precision"] == metrics["map_voc"]  # the cloud service's default: voc
    assert metrics["evaluation"]["score_threshold"] == 0.0  # the model's own threshold
    assert {p.name for p in (out / "plots").iterdir()} >= {"confusion_matrix.csv", "validation_images.png"}


def test_evaluate_command_errors_are_one_line_without_traceback(saved_model, tmp_path, monkeypatch, capsys):
    model, data = saved_model
    monkeypatch.chdir(tmp_path)
    cases = {
        "no such model": [str(tmp_path / "nope"), "--data", str(data), "--out", "eval"],
        "validation_iou_threshold": [
            str(model),
            "--data",
            str(data),
            "--out",
            "eval",
            "--iou-threshold",
            "2",
        ],
        "no such file or folder": [str(model), "--data", str(tmp_path / "none"), "--out", "eval"],
    }
    for message, arguments in cases.items():
        monkeypatch.setattr(sys, "argv", ["visionautoml", "evaluate", *arguments])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 1, message
        assert message in stderr and "Traceback" not in stderr
    # A choice that is not one is a usage error (exit 2) listing the choices, before any work.
    monkeypatch.setattr(
        sys,
        "argv",
        ["visionautoml", "evaluate", str(model), "--data", str(data), "--out", "eval", "--metric-type", "f1"],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "'f1' is not one of" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_explicit_thresholds_override_the_model(saved_model):
    model, data = saved_model
    params = TrainingParameters(validation_metric_type="coco_voc", box_score_threshold=0.9)
    evaluation, dataset = evaluate_model(model, data, params, device="cpu")
    assert evaluation.score_threshold == 0.9 and evaluation.metric_type == "coco_voc"
    assert evaluation.metrics["mean_average_precision"] == evaluation.metrics["map"]
    assert evaluation.classes == ["red_square", "blue_square"] == dataset.classes
    assert [t.name for t in evaluation.ground_truths] == [record.name for record in dataset.images]
    assert sum(len(d.scores) for d in evaluation.detections) > 0
    assert evaluation.metrics["precision"] == 0.0  # nothing a random model finds scores 0.9

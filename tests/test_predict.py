"""Batch prediction and backend choice: ONNX when an export is found, else PyTorch, same answers."""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pytest
from PIL import Image

from visionautoml.deploy.predict import collect_images, predict_images
from visionautoml.deploy.runtime import EXPORT_SUBDIR, OnnxPredictor, load_for_inference, locate_model
from visionautoml.errors import DataError
from visionautoml.models.predictor import Predictor

pytestmark = pytest.mark.slow
CLASSES = {"blue_square", "red_square"}


def check_automl_boxes(boxes: list[dict], threshold: float) -> None:
    assert boxes
    for item in boxes:
        assert set(item) == {"box", "label", "score"}
        assert set(item["box"]) == {"topX", "topY", "bottomX", "bottomY"}
        box = item["box"]
        assert 0 <= box["topX"] <= box["bottomX"] <= 1 and 0 <= box["topY"] <= box["bottomY"] <= 1
        assert item["label"] in CLASSES
        assert threshold <= item["score"] <= 1


def test_predict_cli_scores_a_folder_draws_boxes_and_skips_unreadable_files(
    deploy_model, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    images = sorted((deploy_model.data / "images").glob("*.jpg"))
    for image in images[:2]:
        shutil.copy(image, folder / image.name)
    shutil.copy(images[2], folder / "sub" / images[2].name)
    (folder / "broken.jpg").write_text("not a picture")
    out = tmp_path / "out"

    from visionautoml import cli

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    command = ["visionautoml", "predict", str(deploy_model.saved), str(folder), "--out", str(out)]
    monkeypatch.setattr(
        sys, "argv", [*command, "--draw", "--onnx", str(deploy_model.export), "--batch-size", "2"]
    )
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0
    printed = capsys.readouterr()
    assert "on onnx" in printed.err
    assert "scored 3 images" in printed.out and "skipped 1" in printed.out
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["filename"] for line in lines] == [images[0].name, images[1].name, f"sub/{images[2].name}"]
    for line in lines:
        check_automl_boxes(line["boxes"], threshold=0.05)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [item["filename"] for item in skipped] == ["broken.jpg"]
    assert "broken.jpg" in skipped[0]["error"]
    for name in (images[0].name, f"sub/{images[2].name}"):
        with Image.open(out / "images" / name) as drawn:
            assert drawn.size == (96, 72)


def test_onnx_and_pytorch_backends_write_the_same_predictions(deploy_model, tmp_path):
    images = deploy_model.data / "images"
    onnx = load_for_inference(str(deploy_model.export), threads=1)
    eager = load_for_inference(str(deploy_model.saved), backend="pytorch", threads=1)
    assert isinstance(onnx.predictor, OnnxPredictor) and isinstance(eager.predictor, Predictor)
    summaries = [
        predict_images(loaded, [images], tmp_path / loaded.backend, output_format="csv")
        for loaded in (onnx, eager)
    ]
    tables = []
    for summary in summaries:
        assert summary.scored == 4 and not summary.skipped
        with summary.output.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["filename", "label", "score", "topX", "topY", "bottomX", "bottomY"]
        tables.append(rows)
    assert len(tables[0]) == len(tables[1]) == summaries[0].boxes
    # Matched rather than compared row by row: detections with equal scores may come out in either order.
    fields = ("score", "topX", "topY", "bottomX", "bottomY")
    for row in tables[0]:
        assert any(
            other["filename"] == row["filename"]
            and other["label"] == row["label"]
            and all(abs(float(other[key]) - float(row[key])) <= 2e-4 for key in fields)
            for other in tables[1]
        ), row


def test_backend_choice_follows_the_export_next_to_the_model(deploy_model, tmp_path):
    saved = shutil.copytree(deploy_model.saved, tmp_path / "model")
    assert locate_model(str(saved)).backend == "pytorch"
    with pytest.raises(DataError, match="no ONNX export found"):
        locate_model(str(saved), backend="onnx")

    shutil.copytree(deploy_model.export, saved / EXPORT_SUBDIR)
    assert locate_model(str(saved)).backend == "onnx"
    assert locate_model(str(saved)).directory == (saved / EXPORT_SUBDIR).resolve()
    assert locate_model(str(saved), backend="pytorch").backend == "pytorch"
    assert locate_model(str(deploy_model.export)).backend == "onnx"
    with pytest.raises(DataError, match="not an ONNX export"):
        locate_model(str(saved), onnx=tmp_path)


def test_missing_inputs_are_reported(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        collect_images([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images found"):
        collect_images([tmp_path / "empty"])

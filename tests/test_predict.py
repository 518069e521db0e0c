"""Batch prediction and backend choice: ONNX when an export is found, else PyTorch, same answers."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import subprocess
import sys
import zlib

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
    (folder / "short.png").write_bytes(png_with_too_little_data())
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
    assert "scored 3 images" in printed.out and "skipped 2" in printed.out
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["filename"] for line in lines] == [images[0].name, images[1].name, f"sub/{images[2].name}"]
    for line in lines:
        check_automl_boxes(line["boxes"], threshold=0.05)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [item["filename"] for item in skipped] == ["broken.jpg", "short.png"]
    assert "broken.jpg" in skipped[0]["error"]
    assert "short.png" in skipped[1]["error"] and "cannot decode" in skipped[1]["error"]
    # Written atomically, and nothing left behind: no temporary file beside the outputs.
    assert sorted(path.name for path in out.iterdir()) == ["images", "predictions.jsonl", "skipped.jsonl"]
    for name in (images[0].name, f"sub/{images[2].name}"):
        with Image.open(out / "images" / name) as drawn:
            assert drawn.size == (96, 72)


def png_with_too_little_data() -> bytes:
    """Issue 11's 69 bytes: a valid IHDR for 10x10 RGB, an IDAT of 100 zero bytes compressed, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return data + chunk(b"IEND", b"")


def test_predict_in_its_own_process_skips_the_69_byte_png_and_exits_0(deploy_model, tmp_path):
    """The native PNG decoder used to kill the process (exit 139) and leave a temporary file."""
    folder = tmp_path / "in"
    folder.mkdir()
    images = sorted((deploy_model.data / "images").glob("*.jpg"))[:2]
    for image in images:
        shutil.copy(image, folder / image.name)
    (folder / "short.png").write_bytes(png_with_too_little_data())
    out = tmp_path / "out"
    command = [sys.executable, "-m", "visionautoml.cli", "predict", str(deploy_model.export), str(folder)]
    result = subprocess.run(
        [*command, "--out", str(out), "--batch-size", "3"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "scored 2 images" in result.stdout and "skipped 1" in result.stdout
    assert "skipped short.png" in result.stderr
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["filename"] for line in lines] == [image.name for image in images]
    assert sorted(path.name for path in out.iterdir()) == ["predictions.jsonl", "skipped.jsonl"]


def test_batch_size_does_not_change_the_predictions(deploy_model, tmp_path):
    """--batch-size 4 runs the export's batched path (one core call); --batch-size 1 the one-image graph."""
    images = deploy_model.data / "images"
    onnx = load_for_inference(str(deploy_model.export), threads=1)
    assert onnx.predictor.batched
    outputs = [
        predict_images(onnx, [images], tmp_path / str(size), batch_size=size).output for size in (1, 4)
    ]
    one, batched = ([json.loads(line) for line in path.read_text().splitlines()] for path in outputs)
    assert [line["filename"] for line in one] == [line["filename"] for line in batched]
    for single, together in zip(one, batched, strict=True):
        assert len(single["boxes"]) == len(together["boxes"]) > 0
        for item in single["boxes"]:
            assert any(
                other["label"] == item["label"]
                and abs(other["score"] - item["score"]) <= 2e-4
                and all(abs(other["box"][key] - value) <= 2e-4 for key, value in item["box"].items())
                for other in together["boxes"]
            ), item


def test_openvino_backend_reads_the_same_export_and_finds_the_same_boxes(deploy_model, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    images = deploy_model.data / "images"
    onnx = load_for_inference(str(deploy_model.export), threads=1)
    vino = load_for_inference(str(deploy_model.export), backend="openvino", threads=1)
    assert vino.backend == "openvino" and vino.metadata()["backend"] == "openvino"
    tables = []
    for loaded in (onnx, vino):
        summary = predict_images(loaded, [images], tmp_path / loaded.backend)
        tables.append([json.loads(line) for line in summary.output.read_text().splitlines()])
    for expected, actual in zip(*tables, strict=True):
        # Another runtime rounds differently: the same boxes to within a tenth of a pixel on 96x72 images.
        assert len(expected["boxes"]) > 0
        matched = sum(
            any(
                other["label"] == item["label"]
                and abs(other["score"] - item["score"]) <= 2e-3
                and all(abs(other["box"][key] - value) <= 2e-3 for key, value in item["box"].items())
                for other in actual["boxes"]
            )
            for item in expected["boxes"]
        )
        assert matched >= 0.9 * len(expected["boxes"]), (
            expected["filename"],
            matched,
            len(expected["boxes"]),
        )


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
    # Matched rather than compared row by row: detections with equal scores may come out in either order,
    # and this barely trained model gives 100 boxes of near-equal scores an image, so which of them make
    # the 100-box cut can differ by a rounding (it does on some CPUs): nearly all must match.
    fields = ("score", "topX", "topY", "bottomX", "bottomY")
    matched = [
        any(
            other["filename"] == row["filename"]
            and other["label"] == row["label"]
            and all(abs(float(other[key]) - float(row[key])) <= 2e-4 for key in fields)
            for other in tables[1]
        )
        for row in tables[0]
    ]
    assert sum(matched) >= 0.95 * len(matched), [
        row for row, hit in zip(tables[0], matched, strict=True) if not hit
    ]


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

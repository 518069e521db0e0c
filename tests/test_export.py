"""ONNX export: parity with PyTorch on a trained tiny model, the batched path, int8 behind its accuracy
gate, clear failures, the registry flow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from visionautoml.config import Thresholds
from visionautoml.data.formats import read_dataset
from visionautoml.deploy.export import ExportError, check_parity, export_saved_model, synthetic_images
from visionautoml.deploy.quantize import feature_nodes, validation_set
from visionautoml.deploy.runtime import ONNX_FILE, ExportSettings, OnnxPredictor, make_session
from visionautoml.models.predictor import Predictor
from visionautoml.models.saved import load_model, read_spec

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "visionautoml.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def toy_settings() -> ExportSettings:
    return ExportSettings(
        model_name="toy",
        labels=["thing"],
        thresholds=Thresholds(box_score_threshold=0.5, nms_iou_threshold=0.5, box_detections_per_image=3),
    )


class _NoisyDetector(nn.Module):
    """Exports fine, but its boxes are random numbers, so ONNX Runtime cannot agree with PyTorch."""

    score_thresh = 0.5

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        boxes = torch.rand(3, 4) * images[0].shape[-1]
        return [
            {
                "boxes": boxes,
                "scores": torch.tensor([0.9, 0.8, 0.7]),
                "labels": torch.ones(3, dtype=torch.int64),
            }
        ]


class _EighDetector(_NoisyDetector):
    """Uses an operator ONNX has no counterpart for."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        values = torch.linalg.eigh(images[0][0, :4, :4] @ images[0][0, :4, :4].T).eigenvalues
        return [
            {"boxes": values.reshape(1, 4), "scores": values[:1], "labels": torch.ones(1, dtype=torch.int64)}
        ]


def test_export_folder_has_graph_labels_thresholds_and_a_passed_parity_check(deploy_model):
    export = deploy_model.export
    assert sorted(path.name for path in export.iterdir()) == [
        "core.onnx",
        "labels.json",
        "model.onnx",
        "parity.json",
        "postprocess.onnx",
        "preprocess.onnx",
        "settings.json",
    ]
    spec = read_spec(deploy_model.saved)
    settings = ExportSettings.read(export)
    assert settings.labels == spec.labels == json.loads((export / "labels.json").read_text())
    assert settings.thresholds == spec.thresholds and spec.thresholds.box_score_threshold == 0.05
    # SSD returns boxes, scores, labels (Faster R-CNN: boxes, labels, scores); names follow the dict.
    assert settings.outputs == ["boxes", "scores", "labels"]
    assert settings.graph_score_threshold < settings.thresholds.box_score_threshold
    parity = json.loads((export / "parity.json").read_text())
    assert parity["passed"] is True
    assert parity["compared"] == 30 and parity["unmatched"] == 0
    assert parity["max_box_diff_px"] <= 0.01
    # SSDlite resizes to a fixed size, so it has a batched path, checked against the one-image graph.
    assert settings.batched is not None and settings.batched.image_size == (64, 64)
    assert parity["batched"]["passed"] is True and parity["batched"]["reference"] == "the one-image graph"
    assert parity["batched"]["compared"] == 30 and parity["batched"]["max_box_diff_px"] <= 0.01
    assert settings.precision == "fp32" and "accuracy_gate" not in parity


def test_the_core_graph_has_a_batch_axis_and_the_batched_path_answers_as_one_image_does(deploy_model):
    core = onnx.load(str(deploy_model.export / "core.onnx"))
    assert core.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    predictor = OnnxPredictor(deploy_model.export, intra_op_threads=1)
    assert predictor.batched
    generator = torch.Generator().manual_seed(3)
    images = [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        for shape in [(3, 50, 130), (3, 210, 90), (3, 64, 64)]
    ]
    for count in (2, 3):
        together = predictor.predict(images[:count])
        for image, found in zip(images, together, strict=False):
            [alone] = predictor.predict([image])
            assert found.labels == alone.labels and len(found) > 0
            assert torch.allclose(found.boxes, alone.boxes, atol=0.01)
            assert torch.allclose(found.scores, alone.scores, atol=1e-5)


def _nodes(graph, depth: int = 0):
    """(depth, node) of every node, also those in subgraphs (If and Loop bodies)."""
    for node in graph.node:
        yield depth, node
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                yield from _nodes(subgraph, depth + 1)


def _validation(deploy_model):
    labels = ExportSettings.read(deploy_model.export).labels
    return validation_set(read_dataset(deploy_model.data), labels, source="given")


def test_int8_export_quantizes_the_features_only_and_records_its_accuracy_gate(deploy_model, tmp_path):
    module, spec = load_model(deploy_model.saved)
    validation = _validation(deploy_model)
    out = tmp_path / "int8"
    result = export_saved_model(
        module,
        ExportSettings.from_spec(spec),
        out,
        validation.images,
        sample_source="given",
        quantize="int8",
        validation=validation,
    )
    gate = result.gate
    assert gate is not None and gate.passed and gate.images == 4
    assert gate.int8_batched is not None and abs(gate.fp32 - gate.int8) <= 0.01
    settings = ExportSettings.read(out)
    assert settings.precision == "int8" and settings.accuracy_gate == gate
    recorded = json.loads((out / "parity.json").read_text())
    assert recorded["accuracy_gate"]["passed"] is True and recorded["accuracy_gate"]["fp32"] == gate.fp32
    assert recorded["passed"] is True  # the fp32 graph's parity with PyTorch, checked before quantizing

    for name in ("model.onnx", "core.onnx"):
        graph = onnx.load(str(out / name))
        assert any(node.op_type == "QuantizeLinear" for node in graph.graph.node), name
        if name == "model.onnx":
            # NMS sits in the subgraph of an If (no boxes, no NMS): nothing in there is quantized.
            nested = [node.op_type for _, node in _nodes(graph.graph) if _ > 0]
            assert "NonMaxSuppression" in nested
            assert not {"QuantizeLinear", "DequantizeLinear"} & set(nested)
    # Resize, box decoding and NMS stay fp32: no quantized tensor flows into them.
    graph = onnx.load(str(out / "model.onnx"))
    fp32_graph = onnx.load(str(deploy_model.export / "model.onnx"))
    kept = feature_nodes(fp32_graph)
    produced_by = {output: node for node in graph.graph.node for output in node.output}
    for node in graph.graph.node:
        if node.op_type in ("Resize", "If", "TopK", "Softmax"):
            assert node.name not in kept
            assert all(
                produced_by[name].op_type != "DequantizeLinear" for name in node.input if name in produced_by
            ), node.name

    predictor = OnnxPredictor(out, intra_op_threads=1)
    found = predictor.predict(validation.images[:2])
    assert all(len(item) > 0 for item in found)


def test_int8_export_that_misses_the_gate_writes_nothing_and_says_by_how_much(deploy_model, tmp_path):
    module, spec = load_model(deploy_model.saved)
    validation = _validation(deploy_model)
    out = tmp_path / "int8"
    # No quantized graph scores 1.0 mAP above fp32, so a tolerance of -1 can never be met.
    with pytest.raises(
        ExportError, match=r"loses -?[0-9.]+ mAP@0\.5 .* missing the tolerance of -1 by [0-9.]+"
    ):
        export_saved_model(
            module,
            ExportSettings.from_spec(spec),
            out,
            validation.images,
            sample_source="given",
            quantize="int8",
            validation=validation,
            gate_tolerance=-1.0,
        )
    assert list(tmp_path.iterdir()) == []


def test_onnx_predictor_matches_pytorch_at_other_image_sizes(deploy_model):
    module, spec = load_model(deploy_model.saved)
    generator = torch.Generator().manual_seed(1)
    images = [
        torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        for shape in [(3, 50, 130), (3, 210, 90)]
    ]
    expected = Predictor(module, spec, batch_size=1).predict(images)
    actual = OnnxPredictor(deploy_model.export, intra_op_threads=1).predict(images)
    for want, got in zip(expected, actual, strict=True):
        assert len(want) > 0
        # The graph keeps boxes down to its lower threshold; the runtime applies the model's own.
        assert len(got) == len(want)
        assert bool((got.scores >= spec.thresholds.box_score_threshold).all())
        # Matched rather than compared by rank: boxes with equal scores may come out in either order,
        # and this barely trained model scores many boxes alike, so which of them make the 100-box cut
        # can differ by a rounding (it does on some CPUs): nearly all must match.
        missed = []
        for box, score, label in zip(want.boxes, want.scores, want.labels, strict=True):
            same = [
                float((other - box).abs().max())
                for other, other_score, other_label in zip(got.boxes, got.scores, got.labels, strict=True)
                if other_label == label and abs(float(other_score - score)) <= 1e-5
            ]
            if not (same and min(same) <= 0.01):
                missed.append((box, score, label))
        assert len(missed) <= 0.05 * len(want), missed


def test_parity_check_rejects_a_graph_of_another_model(deploy_model):
    other, _ = load_model(deploy_model.saved)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(1.1)
    session = make_session(deploy_model.export / ONNX_FILE, intra_op_threads=1)
    report = check_parity(
        other, session, ["boxes", "scores", "labels"], synthetic_images()[:1], sample_source="synthetic"
    )
    assert not report.passed
    assert report.unmatched > 0
    assert "FAILED" in report.summary()


def test_failed_parity_writes_nothing_and_says_why(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"does not match PyTorch.*max box difference"):
        export_saved_model(
            _NoisyDetector(), toy_settings(), out, synthetic_images()[:1], sample_source="synthetic"
        )
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_model_that_does_not_export_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"toy does not export to ONNX .*linalg_eigh.*PyTorch"):
        export_saved_model(
            _EighDetector(), toy_settings(), out, synthetic_images()[:1], sample_source="synthetic"
        )
    assert list(tmp_path.iterdir()) == []


def test_export_cli_checks_a_registered_model_records_parity_and_attaches_the_export(
    deploy_registry, tmp_path
):
    tracking_uri, model_uri = deploy_registry
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = tmp_path / "exported"
    result = run_cli("export", model_uri, "--to", "onnx", "--out", str(out), "--attach", env=env)
    assert result.returncode == 0, result.stderr
    assert "parity passed" in result.stdout
    assert "Traceback" not in result.stderr

    parity = json.loads((out / "parity.json").read_text())
    # The run recorded its validation data, so parity ran on those images rather than on noise.
    assert parity["sample_source"] == "validation" and parity["images"] == 4
    version = MlflowClient(tracking_uri).get_model_version_by_alias("deploy-tiny", "candidate")
    assert version.tags["onnx.parity"] == "passed"
    assert float(version.tags["onnx.parity.max_box_diff_px"]) <= 0.01

    # Attached inside the saved model's artifact folder, where `serve` and `predict` look for an export.
    client = MlflowClient(tracking_uri)
    model_id = version.source.removeprefix("models:/")
    attached = [item.path for item in client.list_logged_model_artifacts(model_id, "artifacts/model/onnx")]
    assert sorted(Path(path).name for path in attached) == sorted(path.name for path in out.iterdir())


def test_export_cli_int8_gates_on_the_runs_validation_data_and_tags_the_version(deploy_registry, tmp_path):
    tracking_uri, model_uri = deploy_registry
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    out = tmp_path / "int8"
    result = run_cli("export", model_uri, "--out", str(out), "--quantize", "int8", env=env)
    assert result.returncode == 0, result.stderr
    assert "int8 accuracy gate passed" in result.stdout and "on 4 validation image(s)" in result.stdout
    version = MlflowClient(tracking_uri).get_model_version_by_alias("deploy-tiny", "candidate")
    assert version.tags["onnx.precision"] == "int8" and version.tags["onnx.accuracy_gate"] == "passed"
    assert float(version.tags["onnx.accuracy_gate.drop"]) <= 0.01
    assert version.tags["onnx.batch_axis"] == "dynamic"

    folder = tmp_path / "not-a-dataset"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes((out / "labels.json").read_bytes())
    refused = run_cli(
        "export",
        model_uri,
        "--out",
        str(tmp_path / "x"),
        "--quantize",
        "int8",
        "--images",
        str(folder),
        env=env,
    )
    assert refused.returncode == 1
    assert "needs annotated images" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "x").exists()


def test_export_cli_on_a_missing_model_is_one_line_error(tmp_path, monkeypatch, capsys):
    from visionautoml import cli

    monkeypatch.setattr(
        sys, "argv", ["visionautoml", "export", str(tmp_path / "no-model"), "--out", str(tmp_path / "x")]
    )
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "no-model" in error and "Traceback" not in error
    assert not (tmp_path / "x").exists()

"""One trial end to end on a real embedded MLflow store: logged, read back, failed, resumed, via the CLI."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import TINY_TRAINING, make_voc_dataset
from mlflow import MlflowClient

from visionautoml import cli
from visionautoml.config import parse_config
from visionautoml.data.convert import convert
from visionautoml.data.formats import read_dataset
from visionautoml.data.sources import content_digest
from visionautoml.data.versions import DatasetStore, default_store_root
from visionautoml.errors import DataError
from visionautoml.models.saved import load_model
from visionautoml.models.zoo import build_model
from visionautoml.tracking import workspace
from visionautoml.tracking.models import resolve_model
from visionautoml.tracking.schema import git_commit
from visionautoml.training.trial import dataset_tags, flat_params, load_trial_data, run_trial

SECRET = "s3cr3t-Tracking-Pa55"
TINY = {**TINY_TRAINING, "number_of_epochs": 2}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[str]:
    """One SQLite store for the module (creating one costs seconds of migrations); state restored after."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(previous)
    workspace._connected_uri = None


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return make_voc_dataset(tmp_path_factory.mktemp("data") / "voc", n_images=8)


def make_job(tmp_path: Path, store: str, data: Path, **params):
    return parse_config(
        {
            "experiment_name": tmp_path.name[:50],
            "workspace": str(tmp_path / "ws"),
            "tracking": {"uri": store},
            "training_data": str(data),
            "training_parameters": {**TINY, **params},
        }
    )


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["visionautoml", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def nan_weights(path: Path) -> Path:
    params = parse_config({"training_parameters": TINY}).training_parameters
    state = build_model(params.model_name, 3, params).state_dict()
    torch.save(
        {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, path
    )
    return path


def test_trial_data_comes_from_folders_converted_output_or_the_dataset_store(voc, tmp_path):
    params = parse_config({"training_parameters": TINY}).training_parameters
    job = parse_config({"workspace": str(tmp_path / "ws"), "training_data": str(voc)})
    version = DatasetStore(default_store_root(job.workspace)).register(voc, "tiny")

    refs = {"training_data": "tiny", "validation_data": "tiny:1"}
    by_ref = dataset_tags(load_trial_data(job.model_copy(update=refs), params))
    assert by_ref["dataset.training"] == by_ref["dataset.validation"] == "tiny:1"
    assert by_ref["dataset.validation.digest"] == version.digest
    by_path = load_trial_data(job.model_copy(update={"training_data": version.annotations}), params)
    path_tags = dataset_tags(by_path)
    assert path_tags["dataset.source"] == "tiny:1"  # split inside the trial: parts of tiny:1, not tiny:1
    assert path_tags["dataset.validation"] == "sha256:" + path_tags["dataset.validation.digest"][:16]
    assert (len(by_path.training.images), len(by_path.validation.images)) == (6, 2)

    assert content_digest(read_dataset(voc)) == version.digest  # the same content, the same digest

    converted = tmp_path / "converted"
    convert(voc, converted, "jsonl", validation_every=2)
    folder = load_trial_data(job.model_copy(update={"training_data": str(converted)}), params)
    assert (len(folder.training.images), len(folder.validation.images)) == (4, 4)
    assert dataset_tags(folder)["dataset.validation.path"] == str(converted / "validation_annotations.jsonl")

    other = make_voc_dataset(tmp_path / "other", n_images=2, classes=("green_square",))
    with pytest.raises(DataError, match="unknown label 'green_square'"):
        load_trial_data(job.model_copy(update={"validation_data": str(other)}), params)
    with pytest.raises(DataError, match="nor a dataset registered"):
        load_trial_data(job.model_copy(update={"training_data": "tiny:7"}), params)


def test_a_trial_logs_everything_to_mlflow_and_reads_back(store, voc, tmp_path, monkeypatch):
    converted = tmp_path / "converted"
    convert(voc, converted, "jsonl", validation_every=4)  # 6 training, 2 validation images
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci-bot")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    job = make_job(tmp_path, store, converted)
    job = job.model_copy(
        update={"tracking": job.tracking.model_copy(update={"username": "ci-bot", "password": SECRET})}
    )
    reports = []

    result = run_trial(job, reporter=lambda epoch, metrics: reports.append((epoch, metrics)), run_name="tiny")

    assert result.status == "FINISHED", result.failure_reason
    assert [epoch for epoch, _ in reports] == [1, 2]
    assert all(isinstance(value, float) for _, metrics in reports for value in metrics.values())
    assert {"loss", "lr", "map", "map_50", "mean_average_precision", "ap_red_square"} <= set(reports[0][1])

    client = MlflowClient(store)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params == flat_params(job.training_parameters)
    tags = run.data.tags
    assert tags["model_name"] == TINY["model_name"]
    assert tags["dataset.validation.path"] == str(converted / "validation_annotations.jsonl")
    assert tags["dataset.training"] == "sha256:" + tags["dataset.training.digest"][:16]
    assert tags["config_hash"] and tags.get("git_commit") == git_commit()
    for name in ("loss", "loss_classification", "lr", "mean_average_precision", "map_50", "ap_blue_square"):
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == [1, 2], name
    best = client.get_metric_history(result.run_id, "best_mean_average_precision")
    assert [m.value for m in best] == [result.metrics["mean_average_precision"]]

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, dst_path=str(tmp_path / "a")))
    metrics = json.loads((artifacts / "evaluation" / "metrics.json").read_text())
    assert metrics["mean_average_precision"] == result.metrics["mean_average_precision"]
    assert metrics["evaluation"]["images"] == 2
    assert (artifacts / "evaluation" / "ground_truth.json").is_file()
    assert (artifacts / "evaluation" / "plots" / "precision_recall.png").is_file()
    counts = json.loads((artifacts / "data" / "datasets.json").read_text())
    classes = json.loads(tags["classes"])  # the training set's: validation is read with the same list
    for role, path in (
        ("training", "train_annotations.jsonl"),
        ("validation", "validation_annotations.jsonl"),
    ):
        images = read_dataset(converted / path).images
        per_class = {
            label: sum(b.label == label for image in images for b in image.boxes) for label in classes
        }
        assert counts[role] == {
            "images": len(images),
            "boxes": sum(per_class.values()),
            "boxes_per_class": per_class,
        }

    _, spec = load_model(resolve_model(result.model_uri))
    assert spec.labels == ["blue_square", "red_square"] and spec.image_size == 64
    assert not any((Path(job.workspace) / "checkpoints").iterdir())

    leaked = [key for key, value in {**run.data.params, **tags}.items() if SECRET in value]
    leaked += [str(p) for p in artifacts.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_train_cli_writes_the_output_json_and_honours_mlflow_tracking_uri(
    store, voc, tmp_path, monkeypatch, capsys
):
    config = tmp_path / "job.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workspace": str(tmp_path / "ws"),
                "tracking": {"uri": f"sqlite:///{tmp_path / 'not-this.db'}"},
                "training_parameters": {**TINY, "number_of_epochs": 1},
            }
        )
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "out" / "result.json"
    code, stdout, stderr = run_cli(
        ["train", str(config), "--training-data", str(voc), "--experiment", "cli", "--output-json", str(out)],
        monkeypatch,
        capsys,
    )
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result["model_uri"] == f"runs:/{result['run_id']}/model" and result["run_id"] in stdout
    # The one output schema of train, sweeps and the pipeline: flat metrics, per class as ap_<label>.
    assert result["schema"] == "visionautoml.outcome/1" and result["status"] == "succeeded"
    assert {"map", "map_50", "map_75", "mean_average_precision", "precision", "recall"} <= set(
        result["metrics"]
    )
    assert {"ap_red_square", "ap_blue_square"} <= set(result["metrics"])
    assert not (tmp_path / "not-this.db").exists()
    run = MlflowClient(store).get_run(result["run_id"])
    assert mlflow.get_experiment(run.info.experiment_id).name == "cli"


def test_a_failed_trial_is_recorded_and_the_cli_exits_1_with_the_reason(
    store, voc, tmp_path, monkeypatch, capsys
):
    job = make_job(tmp_path, store, voc, pretrained=str(nan_weights(tmp_path / "nan.pt")))
    result = run_trial(job)
    assert result.status == "FAILED" and result.model_uri is None
    assert "nan at epoch 1, iteration 1" in result.failure_reason and "learning_rate" in result.failure_reason
    run = MlflowClient(store).get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == result.failure_reason

    missing = run_trial(make_job(tmp_path, store, tmp_path / "no-such-data"))
    assert missing.status == "FAILED" and "no-such-data' is no file or folder" in missing.failure_reason

    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json", exclude_defaults=True)))
    code, _, stderr = run_cli(["train", str(config)], monkeypatch, capsys)
    assert code == 1 and "error: the trial failed (MLflow run" in stderr and "iteration 1" in stderr
    assert "Traceback" not in stderr


def test_bad_config_values_fail_before_any_work(tmp_path, monkeypatch, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(
        yaml.safe_dump({"workspace": str(tmp_path / "ws"), "training_parameters": {"learning_rate": -1}})
    )
    code, _, stderr = run_cli(["train", str(config)], monkeypatch, capsys)
    assert code == 1 and "training_parameters.learning_rate" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "ws").exists()


def test_an_interrupted_trial_resumes_its_run_from_the_last_checkpoint(store, voc, tmp_path):
    job = make_job(tmp_path, store, voc)

    def interrupt_at_epoch_2(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(job, reporter=interrupt_at_epoch_2)
    client = MlflowClient(store)
    (interrupted,) = client.search_runs([mlflow.get_experiment_by_name(job.experiment_name).experiment_id])
    assert interrupted.info.status == "KILLED" and "resume" in interrupted.data.tags["failure_reason"]
    assert (Path(job.workspace) / "checkpoints").is_dir()

    result = run_trial(job)
    assert result.status == "FINISHED" and result.run_id == interrupted.info.run_id
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["epochs_completed"] == "2"
    assert "failure_reason" not in run.data.tags
    assert {m.step for m in client.get_metric_history(result.run_id, "mean_average_precision")} == {1, 2}
    assert not any((Path(job.workspace) / "checkpoints").iterdir())

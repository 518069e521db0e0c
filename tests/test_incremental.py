"""Incremental training (checkpoint_run_id, checkpoint_path) and single-trial registration via the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_TRAINING, make_voc_dataset
from mlflow import MlflowClient

from visionautoml import cli
from visionautoml.tracking import workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = make_voc_dataset(tmp_path / "voc", n_images=8)
    yield tmp_path, data
    workspace._connected_uri = None


def write_config(folder: Path, data: Path, **training) -> Path:
    config = {
        "experiment_name": "incremental",
        "workspace": str(folder / "ws"),
        "training_data": str(data),
        "training_parameters": {**TINY_TRAINING, "number_of_epochs": 2, **training},
    }
    path = folder / f"job-{len(list(folder.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(monkeypatch, capsys, *args: str) -> tuple[int, dict | None, str]:
    out = Path(args[0]).with_suffix(".json")
    monkeypatch.setattr(sys, "argv", ["visionautoml", "train", *args, "--output-json", str(out)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    stderr = capsys.readouterr().err
    return exited.value.code or 0, json.loads(out.read_text()) if out.exists() else None, stderr


def first_loss(client: MlflowClient, run_id: str) -> float:
    return min(client.get_metric_history(run_id, "loss"), key=lambda metric: metric.step).value


def test_a_second_run_continues_from_the_first_and_says_so(setup, monkeypatch, capsys):
    folder, data = setup
    code, first, stderr = train(monkeypatch, capsys, str(write_config(folder, data)))
    assert code == 0, stderr

    again = write_config(folder, data, checkpoint_run_id=first["run_id"])
    code, second, stderr = train(monkeypatch, capsys, str(again), "--set", "register.model_name=incremental")
    assert code == 0, stderr
    client = MlflowClient(f"sqlite:///{folder / 'ws' / 'mlflow.db'}")
    assert first_loss(client, second["run_id"]) < first_loss(client, first["run_id"])
    run = client.get_run(second["run_id"])
    assert run.data.tags["started_from"] == f"run {first['run_id']}"
    # A single trial registers when register: names a model, with the sweep's tags.
    registered = second["registered_model"]
    version = client.get_model_version(registered["name"], str(registered["version"]))
    assert version.tags["started_from"] == f"run {first['run_id']}"
    assert (
        version.tags["dataset.validation"].startswith("sha256:")
        and "metric.mean_average_precision" in version.tags
    )
    assert registered["aliases"] == ["candidate"]


def test_a_start_point_that_does_not_resolve_fails_before_any_run(setup, monkeypatch, capsys):
    folder, data = setup
    for field, value, message in (
        ("checkpoint_run_id", "does-not-exist-0000", "no run 'does-not-exist-0000' in the tracking store"),
        ("checkpoint_path", str(folder / "nowhere"), "is no file or folder"),
    ):
        code, result, stderr = train(monkeypatch, capsys, str(write_config(folder, data, **{field: value})))
        assert code == 1 and message in stderr and "Traceback" not in stderr
        assert result is None
    database = folder / "ws" / "mlflow.db"
    if database.exists():
        client = MlflowClient(f"sqlite:///{database}")
        experiments = client.search_experiments()
        assert not client.search_runs([e.experiment_id for e in experiments])


def test_a_model_for_other_classes_keeps_its_body_and_gets_a_new_head(setup, monkeypatch, capsys, caplog):
    folder, data = setup
    code, first, stderr = train(monkeypatch, capsys, str(write_config(folder, data)))
    assert code == 0, stderr
    other = make_voc_dataset(
        folder / "other", n_images=8, classes=("red_square", "blue_square", "green_square")
    )
    code, second, stderr = train(
        monkeypatch, capsys, str(write_config(folder, other, checkpoint_path=first["model_uri"]))
    )
    assert code == 0 and second["status"] == "succeeded", stderr
    assert "re-initialised" in caplog.text and "shaped for other classes" in caplog.text
    assert f"starting from {first['model_uri']}" in stderr


def test_nine_images_with_batch_size_four_train(setup, monkeypatch, capsys):
    """9 training images in batches of 4 leave a last batch of one, which batch norm cannot take."""
    folder, _ = setup
    data = make_voc_dataset(folder / "nine", n_images=12)
    job = write_config(folder, data, training_batch_size=4, number_of_epochs=1)
    code, result, stderr = train(monkeypatch, capsys, str(job), "--set", "validation_data_size=0.25")
    assert code == 0, stderr
    assert result["status"] == "succeeded" and result["trials"][0]["state"] == "completed"


def test_a_voc_folder_with_two_zero_area_boxes_trains_with_a_warning_for_each(tmp_path, monkeypatch, capsys):
    from test_repairs import imperfect_voc

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = imperfect_voc(tmp_path / "voc")
    code, result, stderr = train(monkeypatch, capsys, str(write_config(tmp_path, data, number_of_epochs=1)))
    workspace._connected_uri = None
    assert code == 0, stderr
    assert result["status"] == "succeeded" and result["trials"][0]["state"] == "completed"
    zero_area = [line for line in stderr.splitlines() if "zero area" in line]
    assert len(zero_area) == 2, stderr
    assert "img-001.xml" in stderr and "img-004.xml" in stderr  # each warning names its file

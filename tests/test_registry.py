"""The model registry on a real MLflow store: registering, aliases, evidence-based promotion, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner

from visionautoml.cli import app
from visionautoml.errors import TrackingError
from visionautoml.tracking import registry
from visionautoml.tracking.schema import Tag

VALIDATION = "raccoon-validation:1"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A workspace with one MLflow database for the module (creating one costs seconds)."""
    workspace = tmp_path_factory.mktemp("ws")
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("registry-tests", artifact_location=(workspace / "artifacts").as_uri())
    return workspace


@pytest.fixture(autouse=True)
def tracking(store, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which would override --workspace below.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def logged_model(tmp_path: Path) -> str:
    """A run holding a saved-model folder as plain artifacts; returns its runs:/ URI."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "model.json").write_text(json.dumps({"model_name": "ssdlite320_mobilenet_v3_large"}))
    (folder / "weights.pt").write_bytes(b"not really weights")
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("registry-tests").experiment_id) as run:
        mlflow.log_artifacts(str(folder), "model")
    return f"runs:/{run.info.run_id}/model"


def register(
    tmp_path: Path, name: str, value: float, validation: str = VALIDATION
) -> registry.ModelVersionInfo:
    tags = {
        "metric.mean_average_precision": str(value),
        Tag.VALIDATION_DATASET: validation,
        "config_hash": "abc123",
    }
    return registry.register_model(logged_model(tmp_path), name, tags=tags)


def test_register_tags_the_version_and_points_candidate_at_it(tmp_path):
    first = register(tmp_path, "reg-basic", 0.4)
    second = register(tmp_path, "reg-basic", 0.5)

    assert (first.version, second.version) == (1, 2)
    assert second.aliases == ["candidate"]
    assert registry.get_version("reg-basic", alias="candidate").version == 2
    assert registry.get_version("reg-basic", 1).aliases == []
    assert second.metric() == 0.5
    assert second.tags["config_hash"] == "abc123"
    downloaded = Path(
        mlflow.artifacts.download_artifacts("models:/reg-basic@candidate", dst_path=str(tmp_path))
    )
    assert (downloaded / "model.json").is_file()


def test_promote_if_better_moves_champion_only_on_a_better_metric_on_the_same_validation_set(tmp_path):
    name = "reg-promote"
    v1 = register(tmp_path, name, 0.40)
    first = registry.promote_if_better(name, v1.version)
    assert first.promoted and "first 'champion'" in first.message

    v2 = register(tmp_path, name, 0.35)
    worse = registry.promote_if_better(name, v2.version)
    assert not worse.promoted
    assert (worse.candidate_value, worse.champion_value, worse.champion_version) == (0.35, 0.40, 1)
    assert "0.3500" in worse.message and "0.4000" in worse.message and "does not beat" in worse.message

    v3 = register(tmp_path, name, 0.45, validation="other-validation:3")
    elsewhere = registry.promote_if_better(name, v3.version)
    assert not elsewhere.promoted
    assert "same validation dataset" in elsewhere.message and "other-validation:3" in elsewhere.message

    v4 = register(tmp_path, name, 0.50)
    better = registry.promote_if_better(name, v4.version)
    assert better.promoted
    assert "0.5000" in better.message and "0.4000" in better.message and "beats" in better.message
    assert registry.get_version(name, alias="champion").version == v4.version
    assert registry.get_version(name, alias="candidate").version == v4.version


def test_models_cli_lists_shows_and_promotes(store, tmp_path):
    name = "reg-cli"
    register(tmp_path, name, 0.3)
    register(tmp_path, name, 0.6)
    runner = CliRunner()

    listed = runner.invoke(app, ["models", "list", "--workspace", str(store)], terminal_width=200)
    assert listed.exit_code == 0, listed.output
    assert name in listed.output and "candidate -> v2" in listed.output

    promoted = runner.invoke(
        app, ["models", "promote", name, "1", "--alias", "champion", "--workspace", str(store)]
    )
    assert promoted.exit_code == 0, promoted.output
    assert registry.get_version(name, alias="champion").version == 1

    shown = runner.invoke(app, ["models", "show", name, "--workspace", str(store)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    lines = [line for line in shown.output.splitlines() if "0.6000" in line or "0.3000" in line]
    assert "candidate" in lines[0] and "0.6000" in lines[0]
    assert "champion" in lines[1] and "0.3000" in lines[1]


def test_models_cli_errors_name_the_problem(store, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["models", "show", "no-such-model", "--workspace", str(store)])
    assert isinstance(missing.exception, TrackingError)
    assert "no registered model named 'no-such-model'" in str(missing.exception)

    register(tmp_path, "reg-errors", 0.3)
    bad_version = runner.invoke(app, ["models", "promote", "reg-errors", "9", "--workspace", str(store)])
    assert isinstance(bad_version.exception, TrackingError)
    assert "version 9" in str(bad_version.exception)

    empty = runner.invoke(app, ["models", "list", "--workspace", str(tmp_path / "fresh")])
    assert empty.exit_code == 0 and "no registered models yet" in empty.output
    assert not (tmp_path / "fresh").exists()

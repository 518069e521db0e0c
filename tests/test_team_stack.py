"""A team's setup on one machine: PostgreSQL + an S3 store behind `mlflow server --serve-artifacts`.

The servers come from team_stack.py (moto's server stands in for S3/MinIO). Every visionautoml
command runs as a CI job or a colleague would run it: the real CLI in a process of its own, in a
folder of its own, knowing only the tracking URI; no S3 keys, no shared disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from conftest import TINY_TRAINING, make_voc_dataset

if TYPE_CHECKING:
    from team_stack import TeamServer

pytest_plugins = ["team_stack"]

VISIONAUTOML = str(Path(sys.executable).parent / "visionautoml")
MODEL_NAME = "team-detector"
MODEL_FILES = {
    "MLmodel",
    "artifacts/model/model.json",
    "artifacts/model/labels.json",
    "artifacts/model/weights.pt",
}


def cli(*arguments: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [VISIONAUTOML, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def one_trial_sweep(folder: Path, data: Path) -> Path:
    """A sweep of one trial over one value: the smallest `train` that registers its model."""
    config = {
        "experiment_name": "team-stack",
        "training_data": str(data),
        "validation_data_size": 0.25,
        "limits": {"max_trials": 1, "max_concurrent_trials": 1},
        "training_parameters": {**TINY_TRAINING, "number_of_epochs": 1, "seed": 7},
        "search_space": [{"learning_rate": {"type": "choice", "values": [0.001]}}],
        "register": {"model_name": MODEL_NAME},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _bucket_prefix(server: TeamServer, location: str) -> str:
    """The bucket prefix behind a served ``mlflow-artifacts:/PATH`` location."""
    assert location.startswith("mlflow-artifacts:/"), location  # never a direct s3:// URI for clients
    return f"{server.artifacts_prefix}/{location.removeprefix('mlflow-artifacts:').strip('/')}/"


@pytest.mark.slow
def test_a_model_trained_with_only_the_tracking_uri_lands_in_postgres_and_the_bucket_and_serves_elsewhere(
    team_server: TeamServer, tmp_path: Path
):
    trainer, reader = tmp_path / "trainer", tmp_path / "reader"
    trainer.mkdir()
    reader.mkdir()
    config = one_trial_sweep(trainer, make_voc_dataset(trainer / "voc", n_images=8))
    env = team_server.client_env()
    assert not any(key.startswith("AWS_") or key == "MLFLOW_S3_ENDPOINT_URL" for key in env)

    trained = cli("train", str(config), "--output-json", "result.json", env=env, cwd=trainer)

    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    result = json.loads((trainer / "result.json").read_text())
    registered = result["registered_model"]
    assert registered["name"] == MODEL_NAME and "candidate" in registered["aliases"]
    assert not list(trainer.rglob("mlflow.db")) and not list(trainer.rglob("mlartifacts"))

    # (a) The model version's files are objects in the bucket, put there by the server: the client
    # saw only mlflow-artifacts:/ locations, which the server maps to s3://BUCKET/PREFIX/.
    from mlflow import MlflowClient

    tracking = MlflowClient(tracking_uri=team_server.uri)
    model_location = tracking.get_model_version_download_uri(MODEL_NAME, str(registered["version"]))
    run_location = tracking.get_run(result["run_id"]).info.artifact_uri
    model_prefix, run_prefix = (
        _bucket_prefix(team_server, location) for location in (model_location, run_location)
    )
    stored = {key.removeprefix(model_prefix) for key in team_server.store.keys(model_prefix)}
    assert stored >= MODEL_FILES, (model_location, team_server.store.keys())
    assert f"{run_prefix}evaluation/metrics.json" in team_server.store.keys(run_prefix)
    assert not list(team_server.folder.rglob("weights.pt"))  # nothing kept on the server's disk

    # (b) The runs and the registered version are rows in PostgreSQL.
    database = team_server.postgres.connect()
    try:
        runs = database.run(
            "SELECT run_uuid, status FROM runs WHERE run_uuid IN (:trial, :parent)",
            trial=result["run_id"],
            parent=result["parent_run_id"],
        )
        versions = database.run(
            "SELECT version, run_id FROM model_versions WHERE name = :name", name=MODEL_NAME
        )
    finally:
        database.close()
    assert sorted(runs) == sorted([[result["run_id"], "FINISHED"], [result["parent_run_id"], "FINISHED"]])
    assert [registered["version"], result["run_id"]] in versions

    # (c) A third workspace, sharing no folder with the trainer, scores new images from the registry.
    images = make_voc_dataset(reader / "new", n_images=3, seed=11) / "images"
    predicted = cli(
        "predict", f"models:/{MODEL_NAME}@candidate", str(images), "--out", "predictions", env=env, cwd=reader
    )

    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    lines = (reader / "predictions" / "predictions.jsonl").read_text().splitlines()
    answers = [json.loads(line) for line in lines]
    assert sorted(answer["filename"] for answer in answers) == ["img-000.jpg", "img-001.jpg", "img-002.jpg"]
    assert all(isinstance(answer["boxes"], list) for answer in answers)
    labels = {box["label"] for answer in answers for box in answer["boxes"]}
    assert labels <= {"red_square", "blue_square"}

"""A team's setup: PostgreSQL + an S3 store behind `mlflow server --serve-artifacts`, and a cluster on it.

The servers come from team_stack.py (moto's server stands in for S3/MinIO). Every visionautoml
command runs as a CI job or a colleague would run it: the real CLI in a process of its own, in a
folder of its own, knowing only the tracking URI; no S3 keys, no shared disk. The last test runs a
sweep on a two-node Ray cluster (test_ray_cluster.py's network namespaces) whose worker node has
a disk of its own, with the stack in the head node's namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from conftest import TINY_TRAINING, make_voc_dataset
from test_ray_cluster import ADDRESS, HEAD_IP, WORKER_IP, running_cluster

from visionautoml.data.formats import read_dataset
from visionautoml.data.sources import resolve_training_data
from visionautoml.data.versions import DatasetStore
from visionautoml.errors import DataError
from visionautoml.tracking import checkpoints, datasets

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


def _run(server: TeamServer, name: str, **tags: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("parts") or client.get_experiment(
        client.create_experiment("parts")
    )
    return client.create_run(experiment.experiment_id, run_name=name, tags=tags).info.run_id


def _run_prefix(server: TeamServer, run_id: str) -> str:
    from mlflow import MlflowClient

    return _bucket_prefix(server, MlflowClient(server.uri).get_run(run_id).info.artifact_uri)


def test_a_dataset_version_reaches_a_node_without_the_store_through_the_server(
    team_server: TeamServer, tmp_path: Path
):
    store = DatasetStore(tmp_path / "driver" / "datasets")
    version = store.register(make_voc_dataset(tmp_path / "voc", n_images=4), "parts-train")
    run_id = _run(team_server, "sweep")

    datasets.publish_version(run_id, "training", Path(version.path), tracking_uri=team_server.uri)
    stored = team_server.store.keys(_run_prefix(team_server, run_id))
    assert {key.rsplit("/", 1)[-1] for key in stored} >= {"version.json", "annotations.jsonl", "img-000.jpg"}

    cache = tmp_path / "node" / "cache"
    fetched = datasets.local_version(
        "/nowhere/annotations.jsonl",
        version.digest,
        run_id=run_id,
        role="training",
        cache=cache,
        tracking_uri=team_server.uri,
    )
    assert Path(fetched) == cache / version.digest / "annotations.jsonl"
    data = resolve_training_data(
        fetched, fetched, validation_data_size=0.2, seed=1, store_root=str(tmp_path / "none")
    )
    assert data.reference("training") == version.ref and data.digest("training") == version.digest
    assert len(read_dataset(fetched).images) == 4
    # Once on the node, or where the driver's copy is, no server is asked.
    offline = "http://127.0.0.1:9"
    kwargs = {"run_id": run_id, "role": "training", "cache": cache, "tracking_uri": offline}
    assert datasets.local_version("", version.digest, **kwargs) == fetched
    assert datasets.local_version(version.annotations, version.digest, **kwargs) == version.annotations

    with pytest.raises(DataError, match="holds no copy"):
        datasets.local_version(
            "",
            version.digest,
            run_id=run_id,
            role="validation",
            cache=tmp_path / "c",
            tracking_uri=team_server.uri,
        )
    other = tmp_path / "other-cache"
    with pytest.raises(DataError, match="not the sweep's"):
        datasets.local_version(
            "", "0" * 64, run_id=run_id, role="training", cache=other, tracking_uri=team_server.uri
        )
    assert list(other.iterdir()) == []  # no half copy left behind


def _replace(path: Path, data: bytes) -> None:
    """As the trainer writes a checkpoint: a new file, renamed over the old one."""
    path.with_suffix(".tmp").write_bytes(data)
    os.replace(path.with_suffix(".tmp"), path)


def test_checkpoint_copies_go_through_the_server_and_a_cut_off_copy_is_never_resumed_from(
    team_server: TeamServer, tmp_path: Path
):
    from mlflow import MlflowClient

    parent = _run(team_server, "sweep")
    attempt = _run(team_server, "trial-x", **{"mlflow.parentRunId": parent})
    node_a = tmp_path / "node-a" / "key"
    node_a.mkdir(parents=True)
    _replace(node_a / "best.pt", b"best 1")
    _replace(node_a / "last.pt", b"last 1")
    (node_a / "run.json").write_text(json.dumps({"run_id": attempt}))

    mirror = checkpoints.CheckpointMirror(node_a, attempt, team_server.uri)
    assert mirror.sync() and not mirror.sync()  # a new last.pt is copied, once
    _replace(node_a / "last.pt", b"last 2")
    os.utime(node_a / "last.pt", ns=(1, 1))
    _replace(node_a / "best.pt", b"best 3")  # an epoch whose last.pt is not written yet
    assert not mirror.sync()
    _replace(node_a / "last.pt", b"last 3")
    assert mirror.sync()
    prefix = _run_prefix(team_server, attempt) + "checkpoints/"
    assert team_server.store.keys(prefix) == [
        f"{prefix}2/{name}" for name in ("best.pt", "last.pt", "manifest.json", "run.json")
    ]  # the copy before the whole one is gone

    # A copy cut off before its manifest, and one whose bytes do not match it, are passed over.
    client = MlflowClient(team_server.uri)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "last.pt").write_bytes(b"half")
    client.log_artifact(attempt, str(broken / "last.pt"), "checkpoints/4")
    (broken / "manifest.json").write_text(json.dumps({"files": {"last.pt": "0" * 64}}))
    client.log_artifacts(attempt, str(broken), "checkpoints/3")

    node_b = tmp_path / "node-b" / "key"
    found = checkpoints.fetch_checkpoints(parent, "trial-x", node_b, tracking_uri=team_server.uri)
    assert found == attempt
    assert (node_b / "last.pt").read_bytes() == b"last 3" and (node_b / "best.pt").read_bytes() == b"best 3"
    assert json.loads((node_b / "run.json").read_text()) == {"run_id": attempt}
    assert (
        checkpoints.fetch_checkpoints(parent, "trial-y", tmp_path / "c", tracking_uri=team_server.uri) is None
    )

    checkpoints.discard_checkpoints(attempt, tracking_uri=team_server.uri)
    assert team_server.store.keys(prefix) == []


_INSPECT = textwrap.dedent(
    """
    import json, sys
    from mlflow import MlflowClient
    result = json.load(open(sys.argv[1]))
    client = MlflowClient()
    registered = result["registered_model"]
    trials = {}
    for trial in result["trials"]:
        run = client.get_run(trial["run_id"])
        metric = client.get_metric_history(trial["run_id"], "loss")
        trials[trial["run_id"]] = {
            "artifact_uri": run.info.artifact_uri,
            "tags": run.data.tags,
            "loss_steps": sorted(point.step for point in metric),
        }
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    print(json.dumps({
        "model_uri": client.get_model_version_download_uri(registered["name"], str(registered["version"])),
        "parent_uri": parent.info.artifact_uri,
        "parent_tags": parent.data.tags,
        "trials": trials,
        "children": len(children),
    }))
    """
)


def inspect_sweep(cluster, server: TeamServer, result: Path) -> dict:
    """What the tracking server holds about a finished sweep, asked from the head's namespace."""
    asked = cluster.python(_INSPECT, str(result), env={"MLFLOW_TRACKING_URI": server.uri}, timeout_s=120)
    assert asked.returncode == 0, asked.stderr[-3000:]
    return json.loads(asked.stdout.strip().splitlines()[-1])


def cluster_sweep_config(folder: Path, data: Path, **compute: object) -> Path:
    """A grid sweep of two real (tiny) trials on the cluster, with no workspace: each folder has its own."""
    config = {
        "experiment_name": "no-shared-disk",
        "training_data": str(data),
        "validation_data_size": 0.25,
        "limits": {"max_trials": 2, "max_concurrent_trials": 2},
        "training_parameters": {**TINY_TRAINING, "number_of_epochs": 2, "seed": 7},
        "search_space": [{"learning_rate": {"type": "choice", "values": [0.001, 0.002]}}],
        "sweep": {"sampling_algorithm": "grid"},
        "compute": {
            "target": "ray",
            "address": ADDRESS,
            "min_nodes": 2,
            "wait_timeout_minutes": 2,
            "cpus_per_trial": 1,
            **compute,
        },
        "register": {"model_name": MODEL_NAME},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_a_sweep_on_two_nodes_without_a_shared_disk(team_stack_in, tmp_path: Path):
    """Trials on a worker whose /tmp, home and /dev/shm are its own; Tune's state in the bucket.

    The head node has no CPU for trials, so both run on the worker, which reaches the tracking
    server and nothing else: no AWS or MLflow variable, no folder of the head's. Only the driver
    (on the head) holds the bucket's keys, for Ray Tune's storage_path.
    """
    with (
        running_cluster(tmp_path, head_cpus=0, worker_cpus=2, private_disks=True) as cluster,
        team_stack_in(tmp_path / "stack", exec_prefix=cluster.exec_prefix, host=HEAD_IP) as server,
    ):
        head, reader, other = (tmp_path / name for name in ("head", "reader", "other-head"))
        for folder in (head, reader, other):
            folder.mkdir()
        config = cluster_sweep_config(
            head, make_voc_dataset(head / "voc", n_images=8), storage_path=f"s3://{server.store.bucket}/tune"
        )
        store = server.store
        driver_env = {
            **server.client_env(),
            "AWS_ACCESS_KEY_ID": store.access_key,
            "AWS_SECRET_ACCESS_KEY": store.secret_key,
            "AWS_DEFAULT_REGION": store.region,
            "AWS_ENDPOINT_URL": store.endpoint,
        }
        trained = cluster.exec(
            VISIONAUTOML, "train", str(config), "--output-json", "result.json",
            env=driver_env, cwd=head, timeout_s=600,
        )  # fmt: skip
        output = trained.stdout[-4000:] + trained.stderr[-6000:]
        assert trained.returncode == 0, output
        nodes = cluster.node_ids()

        result = json.loads((head / "result.json").read_text())
        assert [trial["state"] for trial in result["trials"]] == ["completed", "completed"]
        assert {trial["node_id"] for trial in result["trials"]} == {nodes[WORKER_IP]} != {nodes[HEAD_IP]}
        registered = result["registered_model"]
        assert registered["name"] == MODEL_NAME and "candidate" in registered["aliases"]
        seen = inspect_sweep(cluster, server, head / "result.json")

        # The worker read the data from its own cache, fetched from the parent run (it has no other way).
        for trial in seen["trials"].values():
            digest = trial["tags"]["dataset.training.digest"]
            assert trial["tags"]["dataset.training.path"].endswith(
                f"/cache/datasets/{digest}/annotations.jsonl"
            )
            assert trial["tags"]["dataset.training"] == seen["parent_tags"]["dataset.training"]
        parent_keys = store.keys(_bucket_prefix(server, seen["parent_uri"]))
        assert any(key.endswith("dataset_versions/training/version.json") for key in parent_keys)

        # The model's files, Tune's experiment state, and no checkpoint copies left behind.
        model_prefix = _bucket_prefix(server, seen["model_uri"])
        assert {key.removeprefix(model_prefix) for key in store.keys(model_prefix)} >= MODEL_FILES
        storage = seen["parent_tags"]["tune_storage"]
        assert storage.startswith(f"s3://{store.bucket}/tune/no-shared-disk-")
        tune_keys = store.keys(storage.removeprefix(f"s3://{store.bucket}/"))
        assert any(key.endswith("/tuner.pkl") for key in tune_keys), tune_keys
        assert not [key for key in store.keys("") if "/checkpoints/" in key]
        assert not list(head.rglob("*.pt"))

        # Another machine (no state file here) finds the sweep by its config in the tracking store.
        again = cluster.exec(
            VISIONAUTOML, "train", str(config), "--resume", env=driver_env, cwd=other, timeout_s=300
        )
        assert again.returncode != 0
        assert f"(parent run {result['parent_run_id']}) already finished" in again.stdout + again.stderr

        # A third workspace, sharing no folder with either node, scores new images from the registry.
        images = make_voc_dataset(reader / "new", n_images=2, seed=11) / "images"
        predicted = cluster.exec(
            VISIONAUTOML, "predict", f"models:/{MODEL_NAME}@candidate", str(images), "--out", "predictions",
            env=server.client_env(), cwd=reader, timeout_s=300,
        )  # fmt: skip
        assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
        lines = (reader / "predictions" / "predictions.jsonl").read_text().splitlines()
        assert sorted(json.loads(line)["filename"] for line in lines) == ["img-000.jpg", "img-001.jpg"]

"""Sweeps on a real in-process Ray, tracked in a real MLflow store, registered in its registry.

Most tests use a quick stand-in trial function with ``run_trial``'s signature whose metric
curve follows its learning rate, so each scheduler decision is known in advance; the
last one trains real tiny models with the real ``run_trial``.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import make_voc_dataset
from mlflow import MlflowClient
from ray import cloudpickle
from rich.console import Console

from visionautoml.automl import compute
from visionautoml.automl.sweep import SweepInterrupted
from visionautoml.automl.train import settle, train
from visionautoml.config import parse_config
from visionautoml.errors import TrainingError
from visionautoml.tracking import registry
from visionautoml.tracking.schema import PRIMARY_METRIC
from visionautoml.tracking.workspace import connect

# Ray workers cannot import this test module; ship the stand-in trial by value instead.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MODELS = ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"]
# The stand-in reads its behaviour from the seed.
RAISES, DIVERGES, DIES, INTERRUPTS = 101, 102, 103, 104


@dataclass
class ToyResult:
    run_id: str | None
    model_uri: str | None
    metrics: dict[str, Any]
    status: str
    failure_reason: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


def toy_trial(job, *, params, reporter, parent_run_id, run_name):
    """``run_trial``'s contract at toy cost: metric(epoch) = 100 * learning_rate * epoch / epochs."""
    import mlflow

    workspace = Path(job.workspace)
    with open(workspace / "calls.txt", "a", encoding="utf-8") as calls:
        calls.write(f"{run_name}\n")
    connect(job)
    with mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id) as run:
        mlflow.log_params({"model_name": params.model_name, "learning_rate": params.learning_rate})
        if params.seed == RAISES:
            raise RuntimeError("toy trial exploded")
        if params.seed == DIES:
            os.kill(os.getpid(), signal.SIGKILL)
        if params.seed == INTERRUPTS and not (workspace / "interrupted").exists():
            (workspace / "interrupted").touch()
            # What Ctrl+C does to the sweep's process: Tune stops and saves its state.
            os.kill(int((workspace / "driver.pid").read_text()), signal.SIGUSR1)
        quality = 100 * params.learning_rate
        best = 0.0
        for epoch in range(1, params.number_of_epochs + 1):
            value = (
                math.nan
                if params.seed == DIVERGES and epoch == 2
                else quality * epoch / params.number_of_epochs
            )
            mlflow.log_metric(PRIMARY_METRIC, value, step=epoch)
            best = max(best, value)
            time.sleep(0.05)
            if reporter(epoch, {PRIMARY_METRIC: value, "map_50": value}):
                break
        model_dir = Path(tempfile.mkdtemp())
        (model_dir / "model.json").write_text(json.dumps({"model_name": params.model_name}))
        mlflow.log_artifacts(str(model_dir), "model")
        shutil.rmtree(model_dir)
    return ToyResult(run.info.run_id, f"runs:/{run.info.run_id}/model", {PRIMARY_METRIC: best}, "FINISHED")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow database for the module: creating one costs seconds of schema migrations."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_job(tmp_path: Path, tracking_uri: str, **overrides: Any):
    """A job with its own workspace, experiment and model name, in the module's MLflow store."""
    data = make_voc_dataset(tmp_path / "data", n_images=10)
    name = tmp_path.name.replace("_", "-")[:40]
    raw = {
        "experiment_name": name,
        "workspace": str(tmp_path / "ws"),
        "tracking": {"uri": tracking_uri},
        "training_data": str(data),
        "training_parameters": {"number_of_epochs": 3, "pretrained": "none"},
        "limits": {"max_trials": 4, "max_concurrent_trials": 1},
        "register": {"model_name": f"{name}-detector"},
        **overrides,
    }
    return parse_config(raw)


def client_for(job) -> MlflowClient:
    connect(job)
    return MlflowClient()


def quiet() -> Console:
    return Console(file=io.StringIO(), width=150)


def test_grid_sweep_with_bandit_stops_the_weak_trials_and_registers_the_best(
    local_ray, tracking_uri, tmp_path
):
    job = make_job(
        tmp_path,
        tracking_uri,
        sweep={
            "sampling_algorithm": "grid",
            "early_termination": {"type": "bandit", "slack_factor": 0.2, "delay_evaluation": 1},
        },
        search_space=[
            {
                "model_name": {"type": "choice", "values": MODELS},
                "learning_rate": {"type": "choice", "values": [0.009, 0.001]},
            }
        ],
    )
    out = tmp_path / "sweep.json"
    result = train(settle(job), output_json=out, trial_fn=toy_trial, console=quiet())

    by_number = {trial.number: trial for trial in result.trials}
    assert [by_number[n].params for n in (1, 2, 3, 4)] == [
        {"model_name": MODELS[0], "learning_rate": 0.009},
        {"model_name": MODELS[0], "learning_rate": 0.001},
        {"model_name": MODELS[1], "learning_rate": 0.009},
        {"model_name": MODELS[1], "learning_rate": 0.001},
    ]
    # Interval 1: the strong trials report 0.3, the weak 0.033 < 0.3 / 1.2.
    assert [by_number[n].state for n in (1, 2, 3, 4)] == [
        "completed",
        "early_terminated",
        "completed",
        "early_terminated",
    ]
    assert by_number[2].evaluations == 1
    assert "bandit" in by_number[2].reason and "0.25" in by_number[2].reason
    assert result.best.number == 1
    assert result.best.metrics[PRIMARY_METRIC] == pytest.approx(0.9)

    client = client_for(job)
    children = client.search_runs(
        [result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    states = sorted((run.data.tags["trial_state"], run.info.status) for run in children)
    assert states == [("completed", "FINISHED")] * 2 + [("early_terminated", "KILLED")] * 2
    artifacts = {item.path for item in client.list_artifacts(result.parent_run_id)}
    assert {
        "leaderboard.md",
        "leaderboard.csv",
        "config.yaml",
        "search_space.json",
        "report.html",
    } <= artifacts
    # The report is written next to the output JSON, and the same page is in the parent run.
    assert result.report == tmp_path / "report.html"
    logged = client.download_artifacts(result.parent_run_id, "report.html", str(tmp_path / "logged"))
    assert Path(logged).read_bytes() == result.report.read_bytes()
    assert "leaderboard-table" in result.report.read_text()
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial_run_id"] == result.best.run_id
    leaderboard = Path(client.download_artifacts(result.parent_run_id, "leaderboard.csv", str(tmp_path)))
    assert leaderboard.read_text().splitlines()[1].startswith("1,1,completed,")

    version = registry.get_version(job.register.model_name, alias="candidate")
    assert version.version == result.registered_model.version == 1
    assert version.run_id == result.best.run_id
    assert version.metric() == pytest.approx(0.9)
    assert version.tags["dataset.validation"].startswith(f"{job.experiment_name}-validation:")
    assert version.tags["config_hash"] == job.fingerprint()
    assert "git_commit" in version.tags

    report = json.loads(out.read_text())
    assert report["registered_model"] == {
        "name": job.register.model_name,
        "version": 1,
        "aliases": ["candidate"],
    }
    assert report["parent_run_id"] == result.parent_run_id
    assert report["report"] == str(tmp_path / "report.html")
    assert [trial["state"] for trial in report["trials"]].count("early_terminated") == 2


def test_failing_trials_are_recorded_with_their_reason_and_the_sweep_goes_on(
    local_ray, tracking_uri, tmp_path
):
    job = make_job(
        tmp_path,
        tracking_uri,
        sweep={"sampling_algorithm": "grid"},
        limits={"max_trials": 4, "max_concurrent_trials": 2},
        search_space=[
            {
                "model_name": {"type": "choice", "values": MODELS[:1]},
                "seed": {"type": "choice", "values": [RAISES, DIVERGES, DIES, 7]},
            }
        ],
    )
    result = train(settle(job), trial_fn=toy_trial, console=quiet())

    by_seed = {trial.params["seed"]: trial for trial in result.trials}
    assert by_seed[7].state == "completed"
    assert result.best is by_seed[7]
    assert by_seed[RAISES].state == by_seed[DIVERGES].state == by_seed[DIES].state == "failed"
    assert by_seed[RAISES].reason == "RuntimeError: toy trial exploded"
    assert "mean_average_precision is nan at epoch 2" in by_seed[DIVERGES].reason
    assert "process died" in by_seed[DIES].reason

    client = client_for(job)
    for seed in (RAISES, DIVERGES, DIES):
        run = client.get_run(by_seed[seed].run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == by_seed[seed].reason
    assert result.registered_model.name == job.register.model_name


def test_bayesian_sweep_samples_conditional_subspaces_with_optuna(local_ray, tracking_uri, tmp_path):
    job = make_job(
        tmp_path,
        tracking_uri,
        sweep={"sampling_algorithm": "bayesian"},
        limits={"max_trials": 4, "max_concurrent_trials": 2},
        search_space=[
            {
                "model_name": {"type": "choice", "values": MODELS[:1]},
                "learning_rate": {"type": "loguniform", "min_value": 0.001, "max_value": 0.009},
            },
            {
                "model_name": {"type": "choice", "values": MODELS[1:]},
                "momentum": {"type": "uniform", "min_value": 0.5, "max_value": 0.9},
            },
        ],
    )
    result = train(settle(job), trial_fn=toy_trial, console=quiet())

    assert len(result.trials) == 4
    assert all(trial.state == "completed" for trial in result.trials)
    for trial in result.trials:
        if trial.params["model_name"] == MODELS[0]:
            assert set(trial.params) == {"model_name", "learning_rate"}
            assert 0.001 <= trial.params["learning_rate"] <= 0.009
        else:
            assert set(trial.params) == {"model_name", "momentum"}
            assert 0.5 <= trial.params["momentum"] <= 0.9
    assert result.registered_model is not None


def test_an_interrupted_sweep_resumes_where_it_stopped(local_ray, tracking_uri, tmp_path):
    job = make_job(
        tmp_path,
        tracking_uri,
        sweep={"sampling_algorithm": "grid"},
        limits={"max_trials": 3, "max_concurrent_trials": 1},
        search_space=[
            {
                "model_name": {"type": "choice", "values": MODELS[:1]},
                "seed": {"type": "choice", "values": [1, INTERRUPTS, 3]},
            }
        ],
    )
    workspace = Path(job.workspace)
    workspace.mkdir(parents=True)
    (workspace / "driver.pid").write_text(str(os.getpid()))

    with pytest.raises(SweepInterrupted, match="--resume"):
        train(settle(job), trial_fn=toy_trial, console=quiet())
    first_calls = (workspace / "calls.txt").read_text().split()
    assert len(first_calls) == 2

    result = train(settle(job), resume=True, trial_fn=toy_trial, console=quiet())
    calls = (workspace / "calls.txt").read_text().split()
    # The finished trial is not run again; the interrupted one starts over; the last runs once.
    assert calls.count(first_calls[0]) == 1
    assert calls.count(first_calls[1]) == 2
    assert len(calls) == 4
    assert [trial.state for trial in result.trials] == ["completed"] * 3
    assert result.registered_model.version == 1

    client = client_for(job)
    children = client.search_runs(
        [result.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    assert sorted(run.info.status for run in children) == ["FINISHED"] * 3 + ["KILLED"]

    with pytest.raises(Exception, match="already finished"):
        train(settle(job), resume=True, trial_fn=toy_trial, console=quiet())


def test_resume_without_an_earlier_sweep_says_so(tracking_uri, tmp_path):
    job = make_job(tmp_path, tracking_uri, limits={"max_trials": 2})
    with pytest.raises(Exception, match="no sweep of this config"):
        train(settle(job), resume=True, trial_fn=toy_trial, console=quiet())


def test_an_automatic_sweep_where_no_trial_succeeds_registers_nothing_and_fails(
    local_ray, tracking_uri, tmp_path
):
    # No search_space and max_trials > 1: the sweep picks the space; every trial raises.
    job = make_job(
        tmp_path,
        tracking_uri,
        training_parameters={"number_of_epochs": 3, "pretrained": "none", "seed": RAISES},
        limits={"max_trials": 2, "max_concurrent_trials": 2},
    )
    out = tmp_path / "out.json"
    console = quiet()
    with pytest.raises(TrainingError, match="nothing was registered"):
        train(settle(job), output_json=out, trial_fn=toy_trial, console=console)
    printed = console.file.getvalue()
    assert "the automatic mode chose the space from the data and the machine" in printed
    assert "image_size 64" not in printed and "mosaic" in printed  # the reasons are printed
    report = json.loads(out.read_text())
    assert report["registered_model"] is None and report["status"] == "failed"
    # A tiny dataset of large objects on a CPU, two trials at a time as the job says: SSDlite, the
    # fastest learner on such objects, twice (the epochs are fixed for all trials: the time plans them).
    names = [trial["params"]["model_name"] for trial in report["trials"]]
    assert names == ["ssdlite320_mobilenet_v3_large"] * 2
    assert len({trial["params"]["learning_rate"] for trial in report["trials"]}) == 2
    for trial in report["trials"]:
        assert trial["state"] == "failed"
        assert {"learning_rate", "optimizer"} <= set(trial["params"])


def test_waiting_for_more_nodes_than_the_cluster_has_times_out_clearly(local_ray):
    with pytest.raises(compute.ComputeError, match=r"did not offer 2 node\(s\).*it has 1 node\(s\)"):
        compute.wait_for_resources(min_nodes=2, min_gpus=0, timeout_s=0.5, address="local")


def test_the_local_ray_listens_on_loopback_only(local_ray):
    ours = _descendants(os.getpid())
    listening = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, check=True).stdout
    sockets = [
        line.split()[3] for line in listening.splitlines() if any(f"pid={pid}," in line for pid in ours)
    ]
    assert len(sockets) >= 3, listening  # GCS, raylet and the workers' gRPC servers at least
    for address in sockets:
        host = address.rsplit(":", 1)[0].strip("[]")
        assert host in ("127.0.0.1", "::ffff:127.0.0.1"), (address, listening)


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        frontier.extend(children)
    return found


def test_a_real_sweep_trains_two_models_and_registers_the_better(local_ray, tracking_uri, tmp_path):
    job = make_job(
        tmp_path,
        tracking_uri,
        # Small inputs keep two real detectors' epoch to seconds on a CPU.
        training_parameters={
            "number_of_epochs": 1,
            "pretrained": "none",
            "training_batch_size": 4,
            "image_size": 96,
            "min_size": 64,
            "max_size": 96,
        },
        sweep={"sampling_algorithm": "grid"},
        limits={"max_trials": 2, "max_concurrent_trials": 2, "trial_timeout_minutes": 5},
        search_space=[{"model_name": {"type": "choice", "values": MODELS}}],
    )
    console = quiet()
    result = train(settle(job), console=console)

    assert {trial.params["model_name"] for trial in result.trials} == set(MODELS)
    assert [trial.state for trial in result.trials] == ["completed", "completed"]
    best = result.best
    assert best.epoch == 1 and best.run_id and best.model_uri
    version = registry.get_version(job.register.model_name, alias="candidate")
    assert version.run_id == best.run_id
    assert version.tags["model_name"] == best.params["model_name"]
    # The registered model is the trainer's: a saved-model folder the rest of the system loads.
    from visionautoml.tracking.models import resolve_model

    saved = resolve_model(f"models:/{job.register.model_name}@candidate", tracking_uri=tracking_uri)
    assert json.loads((saved / "model.json").read_text())["model_name"] == best.params["model_name"]
    assert "Leaderboard" in console.file.getvalue()


def test_a_sweep_over_the_tile_grid_registers_the_better_and_its_export_keeps_the_grid(
    local_ray, tracking_uri, tmp_path
):
    """`tile_grid_size: [none, 2x2]`: two real trials; the registered model and its export keep its grid."""
    from visionautoml.deploy.export import export_model
    from visionautoml.deploy.runtime import ExportSettings
    from visionautoml.tracking.models import resolve_model

    job = make_job(
        tmp_path,
        tracking_uri,
        training_parameters={
            "model_name": "ssdlite320_mobilenet_v3_large",
            "number_of_epochs": 1,
            "pretrained": "none",
            "training_batch_size": 4,
            "image_size": 64,
        },
        sweep={"sampling_algorithm": "grid"},
        limits={"max_trials": 2, "max_concurrent_trials": 2, "trial_timeout_minutes": 5},
        search_space=[{"tile_grid_size": {"type": "choice", "values": ["none", "2x2"]}}],
    )
    result = train(settle(job), console=quiet())

    assert sorted(str(trial.params["tile_grid_size"]).lower() for trial in result.trials) == ["2x2", "none"]
    assert [trial.state for trial in result.trials] == ["completed", "completed"]
    searched = str(result.best.params["tile_grid_size"])
    best_grid = None if searched.lower() == "none" else searched
    assert "tile_grid_size" in result.leaderboard_markdown.splitlines()[0]
    uri = f"models:/{job.register.model_name}@candidate"
    saved = resolve_model(uri, tracking_uri=tracking_uri)
    assert registry.get_version(job.register.model_name, alias="candidate").run_id == result.best.run_id
    assert json.loads((saved / "model.json").read_text())["tiling"]["tile_grid_size"] == best_grid
    exported = export_model(str(saved), tmp_path / "onnx")
    assert ExportSettings.read(exported.directory).tiling.tile_grid_size == best_grid


def names_trial(job, *, params, reporter, parent_run_id, run_name):
    """toy_trial, after writing the names of the images the real trial loader hands the trial."""
    from visionautoml.training.trial import load_trial_data

    data = load_trial_data(job, params)
    names = {
        role: sorted(record.name for record in getattr(data, role).images)
        for role in ("training", "validation")
    }
    (Path(job.workspace) / f"{run_name}.names.json").write_text(json.dumps(names))
    return toy_trial(job, params=params, reporter=reporter, parent_run_id=parent_run_id, run_name=run_name)


def test_a_sweep_trains_on_exactly_the_train_images_of_a_version_or_a_converted_folder(
    local_ray, tracking_uri, tmp_path
):
    from visionautoml.data.convert import convert
    from visionautoml.data.formats import read_dataset
    from visionautoml.data.versions import DatasetStore

    converted = tmp_path / "converted"
    convert(make_voc_dataset(tmp_path / "voc", n_images=10), converted, "jsonl", validation_every=5)
    expected = {
        role: sorted(record.name for record in read_dataset(converted / f"{role}_annotations.jsonl").images)
        for role in ("train", "validation")
    }
    assert len(expected["train"]) == 8 and len(expected["validation"]) == 2
    store = DatasetStore(tmp_path / "ws" / "datasets")
    train_ref = store.register(converted / "train_annotations.jsonl", "shapes-train").ref
    validation_ref = store.register(converted / "validation_annotations.jsonl", "shapes-validation").ref

    for source, extra in ((str(converted), {}), (train_ref, {"validation_data": validation_ref})):
        job = make_job(
            tmp_path,
            tracking_uri,
            training_data=source,
            **extra,
            training_parameters={"number_of_epochs": 1, "pretrained": "none"},
            limits={"max_trials": 1, "max_concurrent_trials": 1},
            search_space=[{"learning_rate": {"type": "choice", "values": [0.005]}}],
        )
        result = train(settle(job), trial_fn=names_trial, console=quiet())
        assert [trial.state for trial in result.trials] == ["completed"], source
        [written] = list((tmp_path / "ws").glob("*.names.json"))
        names = json.loads(written.read_text())
        written.unlink()
        assert names == {"training": expected["train"], "validation": expected["validation"]}, source

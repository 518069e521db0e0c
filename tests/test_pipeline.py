"""`pipeline run` end to end on tiny generated data, as CI runs it: separate processes, real MLflow.

The run against an authenticated tracking server is in test_tracking_auth.py, beside its server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import make_voc_dataset

from visionautoml.pipeline.jobs import RUNNING, list_runs, load_run
from visionautoml.pipeline.run import STEPS

VISIONAUTOML = str(Path(sys.executable).parent / "visionautoml")


def tiny_pipeline_config(folder: Path, *, top_level: dict | None = None, **pipeline: object) -> Path:
    """A one-trial pipeline that trains for one short epoch: the flow, not the model, is under test.

    ``pipeline`` adds to the config's ``pipeline:`` section, ``top_level`` replaces whole sections.
    """
    config = {
        "experiment_name": "tiny",
        "workspace": str(folder / "workspace"),
        "pipeline": {"validation_every": 5, **pipeline},
        "training_parameters": {
            "model_name": "ssdlite320_mobilenet_v3_large",
            "pretrained": "none",
            "number_of_epochs": 1,
            "image_size": 64,
            "validation_batch_size": 2,
        },
        "register": {"model_name": "tiny-detector", "promote_if_better": "champion"},
        **(top_level or {}),
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pipeline_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would send the run elsewhere or print mask commands."""
    removed = (
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    )
    env = {k: v for k, v in os.environ.items() if k not in (*removed, "GITHUB_ACTIONS", "TF_BUILD")}
    env.update(VISIONAUTOML_OFFLINE="1", **extra)
    return env


def cli(
    *arguments: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [VISIONAUTOML, *arguments], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(autouse=True)
def stop_detached_runs(tmp_path) -> Iterator[None]:
    """A failed assertion must not leave a detached pipeline running: stop the ones this test started."""
    yield
    for record in list_runs(tmp_path / "workspace"):
        if record.pid and record.effective_status() == RUNNING:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)


@pytest.mark.slow
def test_pipeline_runs_every_step_and_a_detached_rerun_reuses_data_and_model(tmp_path):
    data = make_voc_dataset(tmp_path / "voc", n_images=10)
    config = tiny_pipeline_config(tmp_path)
    workspace = tmp_path / "workspace"
    env = pipeline_env(GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"))

    first = cli(
        "pipeline",
        "run",
        str(config),
        "--data",
        str(data),
        "--output-json",
        "first.json",
        env=env,
        cwd=tmp_path,
    )
    detached = cli(
        "pipeline", "run", str(config), "--data", str(data), "--detach", "--output-json", "second.json",
        env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    run_id = detached.stdout.strip().splitlines()[-1]
    waited = cli("runs", "wait", run_id, "--workspace", str(workspace), env=env, cwd=tmp_path)
    listed = cli("runs", "list", "--workspace", str(workspace), env=env, cwd=tmp_path, timeout=60)

    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for number, step in enumerate(STEPS, start=1):
        assert f"[{number}/{len(STEPS)}] {step} done in " in first.stdout
    result = json.loads((tmp_path / "first.json").read_text())
    assert result["status"] == "succeeded" and not result["reused_training"]
    assert result["datasets"]["train"]["ref"] == "tiny-train:1" and not result["datasets"]["train"]["reused"]
    assert (result["datasets"]["train"]["image_count"], result["datasets"]["validation"]["image_count"]) == (
        8,
        2,
    )
    assert result["registered_model"] == {
        "name": "tiny-detector",
        "version": 1,
        "aliases": ["candidate", "champion"],
    }
    assert (Path(result["export"]) / "model.onnx").is_file()
    assert [step["step"] for step in result["steps"]] == list(STEPS)

    assert detached.returncode == 0, detached.stderr
    assert waited.returncode == 0, waited.stdout[-3000:] + waited.stderr[-3000:]
    assert "[8/10] train done in" in waited.stdout and "reused MLflow run" in waited.stdout
    assert f"pipeline run {run_id} succeeded" in waited.stdout
    again = json.loads((tmp_path / "second.json").read_text())
    assert again["reused_training"] and again["run_id"] == result["run_id"]
    assert again["datasets"]["train"]["ref"] == "tiny-train:1" and again["datasets"]["train"]["reused"]
    assert again["datasets"]["validation"]["reused"] and again["registered_model"]["version"] == 1
    assert sorted(path.name for path in (workspace / "datasets").glob("*/*") if path.name.isdigit()) == [
        "1",
        "1",
    ]
    assert "was exported before" in again["steps"][-1]["detail"]

    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("## visionautoml pipeline") == 2
    assert "| train | `tiny-train:1` | 8 |" in summary and "### Leaderboard" in summary
    assert "`tiny-detector` version 1 (aliases: candidate, champion)" in summary
    assert listed.stdout.count("succeeded") == 2 and run_id in listed.stdout


def _wait_until_running(workspace: Path, run_id: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        record = load_run(workspace, run_id)
        if record.status == RUNNING and record.pid:
            return record.pid
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} never started")


@pytest.mark.slow
def test_runs_wait_times_out_then_reports_failed_and_lost_detached_runs(tmp_path):
    data = make_voc_dataset(tmp_path / "voc", n_images=10)
    (data / "annotations" / "img-003.xml").write_text("<annotation><object>")  # not XML
    config = tiny_pipeline_config(tmp_path, data=str(data))
    workspace = tmp_path / "workspace"
    env = pipeline_env()

    # Each detached run fails at validation a few seconds after it starts: wait on it at once.
    failing = cli("pipeline", "run", str(config), "--detach", env=env, cwd=tmp_path, timeout=120)
    failing_id = failing.stdout.strip()
    impatient = cli(
        "runs", "wait", failing_id, "--timeout", "0.06s", "-w", str(workspace), env=env, cwd=tmp_path
    )
    doomed = cli("pipeline", "run", str(config), "--detach", env=env, cwd=tmp_path, timeout=120)
    doomed_id = doomed.stdout.strip()
    os.kill(_wait_until_running(workspace, doomed_id), signal.SIGKILL)
    lost = cli("runs", "wait", doomed_id, "-w", str(workspace), env=env, cwd=tmp_path)
    waited = cli("runs", "wait", failing_id, "-w", str(workspace), env=env, cwd=tmp_path)
    shown = cli("runs", "show", failing_id, "-w", str(workspace), env=env, cwd=tmp_path, timeout=60)
    unknown = cli(
        "runs", "wait", "20200101-000000-abcdef", "-w", str(workspace), env=env, cwd=tmp_path, timeout=60
    )

    assert failing.returncode == 0 and doomed.returncode == 0, failing.stderr + doomed.stderr
    # Under load the detached process may not have recorded "running" yet: either state is "not done".
    assert impatient.returncode == 124
    assert re.search(r"is still (starting|running) after 0\.06s; wait again", impatient.stderr)
    assert lost.returncode == 1
    assert f"pipeline run {doomed_id} lost: its process ended without recording an outcome" in lost.stderr
    assert waited.returncode == 1
    assert "[4/10] validate failed after" in waited.stdout
    assert f"pipeline run {failing_id} failed: validating {data}" in waited.stderr
    assert "img-003.xml" in waited.stderr
    state = json.loads(shown.stdout)
    assert state["status"] == "failed" and state["steps"][-1]["step"] == "validate"
    assert unknown.returncode == 1 and "no pipeline run '20200101-000000-abcdef'" in unknown.stderr
    assert "Traceback" not in waited.stderr + lost.stderr + unknown.stderr

"""Detached pipeline runs on a Ray cluster, submitted as Ray jobs.

With ``compute.target: ray``, ``pipeline run --detach`` does not start a local process that
a CI agent's shutdown would kill: it submits the pipeline to the cluster through Ray's job
submission API (the dashboard's HTTP port, 8265 unless ``compute.dashboard_address`` says
otherwise), where it runs next to the trials and outlives every CI job. The run's local
record keeps the job's id and address, so ``runs wait`` from any later job follows the
job's status and log and exits with its outcome.

What the job gets: a working directory holding only the config file, the entrypoint
``python -m visionautoml.pipeline ray-job pipeline.yaml [--data DATA]`` (no secret ever on
a command line) and, as environment variables of its runtime env, the values of the
config's ``${secret:...}`` references and the well-known credential variables set here.
Ray's dashboard shows runtime-env variables redacted; our outputs mask every value. The
job must reach the tracking server (a team MLflow server, or a workspace on storage the
cluster shares) and the data (a URL, or a path readable on the cluster).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visionautoml.config import Compute, JobConfig, load_config
from visionautoml.errors import ConfigError, first_line
from visionautoml.redact import CREDENTIAL_VARIABLES, mask
from visionautoml.secrets import find_references, resolve_secret_values

RAY_JOB_PREFIX = "visionautoml-"
"""A run's Ray job is ``visionautoml-RUN_ID``, so any machine can find it from the run id."""
DASHBOARD_PORT = 8265
CONFIG_NAME = "pipeline.yaml"
RESULT_MARKER = "visionautoml-pipeline-result: "
"""The job's last line: its outcome as JSON, which ``runs wait`` copies into the local record."""
# Not secrets, but the job needs them to find the same servers as the submitter.
_PLAIN_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "VAULT_ADDR",
    "BAO_ADDR",
    "VAULT_NAMESPACE",
    "BAO_NAMESPACE",
)
_RAY_FINAL = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "failed"}
_POLL_SECONDS = 1.0


def dashboard_address(compute: Compute) -> str:
    """The job submission endpoint: ``compute.dashboard_address``, else port 8265 on the cluster's head."""
    if compute.dashboard_address:
        return compute.dashboard_address
    address = compute.address or ""
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname
    if not host:
        raise ConfigError(
            f"compute.address {address!r} names no host; set compute.dashboard_address "
            f"(http://HEAD:{DASHBOARD_PORT}) to submit detached runs to the cluster"
        )
    return f"http://{host}:{DASHBOARD_PORT}"


def _client(address: str) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise ConfigError(
            "detached runs on a Ray cluster need Ray's job submission client: "
            "pip install 'visionautoml[cluster]' (ray[default])"
        ) from None
    try:
        return JobSubmissionClient(address)
    except Exception as error:  # Ray raises ConnectionError, RuntimeError or ValueError here
        raise ConfigError(
            f"cannot reach the Ray cluster's job API at {address} ({mask(first_line(error))}); check "
            "that the head's dashboard runs (ray[default]) and its port is reachable, or set "
            "compute.dashboard_address"
        ) from None


def job_environment(config_path: str | Path) -> dict[str, str]:
    """The variables the job needs to resolve the same secrets and reach the same servers.

    A reference resolved here from a file (``/run/secrets``) travels as the variable of its name,
    which the environment provider reads first on the cluster; vault references travel as the
    vault's address and token, so the vault is read where the job runs.
    """
    raw = load_config(config_path).model_dump(mode="json", exclude_unset=True)
    references = [name for name in find_references(raw) if not name.startswith("vault://")]
    env = resolve_secret_values(references)
    for name in (*CREDENTIAL_VARIABLES, *_PLAIN_VARIABLES):
        if os.environ.get(name) and name not in env:
            env[name] = os.environ[name]
    return env


def submit(
    config_path: str | Path,
    job: JobConfig,
    *,
    data: str | None,
    run_id: str,
    settings: Sequence[str] = (),
) -> tuple[str, str]:
    """Submit the pipeline of ``config_path`` as a Ray job; returns ``(job id, dashboard address)``."""
    address = dashboard_address(job.compute)
    client = _client(address)
    entrypoint = ["python", "-m", "visionautoml.pipeline", "ray-job", CONFIG_NAME]  # the cluster's python
    if data:
        entrypoint += ["--data", data]
    for setting in settings:
        entrypoint += ["--set", setting]
    with tempfile.TemporaryDirectory(prefix="visionautoml-job-") as folder:
        shutil.copyfile(config_path, Path(folder) / CONFIG_NAME)
        try:
            job_id = client.submit_job(
                entrypoint=shlex.join(entrypoint),
                submission_id=RAY_JOB_PREFIX + run_id,
                runtime_env={"working_dir": folder, "env_vars": job_environment(config_path)},
                metadata={"visionautoml_run_id": run_id, "experiment_name": job.experiment_name},
            )
        except Exception as error:
            raise ConfigError(
                f"the Ray cluster at {address} refused the pipeline job: {mask(first_line(error))}"
            ) from None
    return job_id, address


def follow(
    job_id: str,
    address: str,
    *,
    timeout_s: float | None,
    on_output: Callable[[str], None] | None,
) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """Stream the job's log until it ends or ``timeout_s`` passes.

    Returns ``(status, result, error)``: status ``succeeded``/``failed`` when the job ended
    (None while it still runs), the result JSON the job printed, and why it failed.
    """
    client = _client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        info = client.get_job_info(job_id)
        status = _RAY_FINAL.get(str(getattr(info.status, "value", info.status)))
        logs = client.get_job_logs(job_id)
        text = logs[shown:] if status else logs[shown : logs.rfind("\n", shown) + 1]
        if text and on_output:
            on_output(
                mask("".join(line for line in text.splitlines(True) if not line.startswith(RESULT_MARKER)))
            )
        shown += len(text)
        if status or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(_POLL_SECONDS)
    if status is None:
        return None, None, None
    result = _result_from(logs)
    error = None
    if status != "succeeded":
        error = (result or {}).get("error") or mask(info.message or f"the Ray job {job_id} {info.status}")
    return status, result, error


def _result_from(logs: str) -> dict[str, Any] | None:
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER) :])
            except ValueError:
                return None
    return None

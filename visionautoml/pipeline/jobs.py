"""Pipeline runs on record: a state file per run, detached runs, and waiting on them from another process.

A CI job has a time limit and a training run may not fit in it, so a run must outlive the
process that started it: ``pipeline run --detach`` starts the pipeline as a process in a
new session (it survives its parent and the terminal), writing its output to a log file
and its progress to ``state.json``; ``runs wait`` in a later job re-attaches, streams the
log and exits with the run's outcome. Every write of the state file is atomic, so a reader
never sees half of one, and a run whose process died without saying so is reported lost
rather than running forever.

Layout: ``<workspace>/pipeline/runs/<RUN_ID>/{state.json,output.log}``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from visionautoml.config import DEFAULT_WORKSPACE
from visionautoml.errors import ConfigError
from visionautoml.files import atomic_write_text
from visionautoml.pipeline.ray_jobs import RAY_JOB_PREFIX
from visionautoml.redact import mask, mask_values

STATE_FILE = "state.json"
LOG_FILE = "output.log"
STARTING, RUNNING, SUCCEEDED, FAILED, LOST = "starting", "running", "succeeded", "failed", "lost"
FINAL = (SUCCEEDED, FAILED, LOST)
_RUN_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
_POLL_SECONDS = 0.5
# A detached run that has not written its first state this long after its start has failed to start.
_START_GRACE_SECONDS = 60.0


@dataclass
class RunRecord:
    """What is known about one pipeline run; never a secret (texts are masked before they get here)."""

    id: str
    config: str
    data: str | None = None
    output_json: str | None = None
    settings: list[str] = field(default_factory=list)
    workspace: str = DEFAULT_WORKSPACE
    detached: bool = False
    status: str = STARTING
    pid: int | None = None
    process_start: str | None = None
    created: str = ""
    finished: str | None = None
    step: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    ray_job_id: str | None = None
    ray_dashboard: str | None = None

    @property
    def folder(self) -> Path:
        return runs_root(self.workspace) / self.id

    @property
    def log_path(self) -> Path:
        return self.folder / LOG_FILE

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / STATE_FILE, json.dumps(mask_values(asdict(self)), indent=2) + "\n")

    def effective_status(self) -> str:
        """The recorded status, or ``lost`` when the process that should be running it is gone."""
        if self.status in FINAL or self.ray_job_id:  # a Ray job's status comes from the cluster (wait_for)
            return self.status
        if self.pid is None:
            age = time.time() - datetime.fromisoformat(self.created).timestamp() if self.created else 0.0
            return LOST if self.detached and age > _START_GRACE_SECONDS else self.status
        return self.status if _process_alive(self.pid, self.process_start) else LOST


def runs_root(workspace: str | Path) -> Path:
    return Path(workspace).expanduser().resolve() / "pipeline" / "runs"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_run(
    config: str | Path,
    *,
    workspace: str,
    data: str | None,
    output_json: str | None,
    detached: bool,
    settings: list[str] | None = None,
) -> RunRecord:
    """Record a new run; its id sorts by start time and is unique without coordination."""
    run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    record = RunRecord(
        id=run_id,
        config=str(Path(config).resolve()),
        data=mask(data) if data else None,
        output_json=str(Path(output_json).resolve()) if output_json else None,
        settings=list(settings or []),
        workspace=str(Path(workspace).expanduser().resolve()),
        detached=detached,
        created=_now(),
    )
    record.save()
    return record


def _check_run_id(run_id: str) -> None:
    if not _RUN_ID.fullmatch(run_id):
        raise ConfigError(f"'{run_id}' is not a run id (they look like 20260301-101500-a1b2c3)")


def load_run(workspace: str | Path, run_id: str) -> RunRecord:
    _check_run_id(run_id)
    path = runs_root(workspace) / run_id / STATE_FILE
    try:
        return RunRecord(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        known = ", ".join(record.id for record in list_runs(workspace)[-5:]) or "none"
        raise ConfigError(
            f"no pipeline run '{run_id}' in {runs_root(workspace)} (latest: {known}); "
            "`visionautoml runs list --workspace DIR` lists the runs of another workspace"
        ) from None
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"{path}: unreadable run state ({error}); the file was edited or truncated"
        ) from None


def list_runs(workspace: str | Path) -> list[RunRecord]:
    """Every run of the workspace, oldest first."""
    root = runs_root(workspace)
    if not root.is_dir():
        return []
    records = []
    for folder in sorted(root.iterdir()):
        if (folder / STATE_FILE).is_file():
            try:
                records.append(load_run(workspace, folder.name))
            except ConfigError:
                continue
    return records


def _process_start(pid: int) -> str | None:
    """When ``pid`` started: with the pid, it tells a reused pid from the original."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{process.create_time():.2f}"
    except psutil.Error:
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    current = _process_start(pid)
    return current is not None and (start is None or current == start)


def mark_running(record: RunRecord) -> None:
    """Called by the process that runs the pipeline, so others can tell if it dies."""
    record.pid = os.getpid()
    record.process_start = _process_start(record.pid)
    record.status = RUNNING
    record.save()


def finish(record: RunRecord, *, result: dict[str, Any] | None = None, error: str | None = None) -> None:
    record.status = FAILED if error else SUCCEEDED
    record.result, record.error = result, mask(error) if error else None
    record.finished = _now()
    record.step = None
    record.save()


def start_detached(record: RunRecord) -> int:
    """Start ``python -m visionautoml.pipeline detached`` on ``record`` in a new session; return its pid.

    The child inherits the environment (so secret variables reach it) but no terminal: its
    output goes to the run's log file. Arguments carry only the workspace and the run id.
    """
    record.folder.mkdir(parents=True, exist_ok=True)
    with record.log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "visionautoml.pipeline", "detached", record.workspace, record.id],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=_detached_environment(),
        )
    return process.pid


def _detached_environment() -> dict[str, str]:
    """The caller's environment, less the CI runner markers.

    Those make a process print ``::add-mask::VALUE`` lines for the runner to read; a
    detached process writes to a log file instead, where such a line would store the secret.
    """
    env = {key: value for key, value in os.environ.items() if key not in ("GITHUB_ACTIONS", "TF_BUILD")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def wait_for(
    workspace: str | Path,
    run_id: str,
    *,
    timeout_s: float | None = None,
    on_output: Callable[[str], None] | None = None,
    ray_dashboard: str | None = None,
) -> RunRecord:
    """Follow a run until it ends (or ``timeout_s`` passes), passing new log text to ``on_output``.

    With ``ray_dashboard``, a run this workspace has no record of is looked up on that cluster as
    a Ray job: the CI agent that waits need not be the one that submitted it.
    Returns the last record; the caller compares ``effective_status()`` with :data:`FINAL`.
    """
    if ray_dashboard and not (runs_root(workspace) / run_id / STATE_FILE).is_file():
        _check_run_id(run_id)
        record = RunRecord(
            id=run_id,
            config="(submitted elsewhere)",
            workspace=str(Path(workspace).expanduser().resolve()),
            detached=True,
            status=RUNNING,
            created=_now(),
            ray_job_id=RAY_JOB_PREFIX + run_id,
            ray_dashboard=ray_dashboard,
        )
        record.save()
    record = load_run(workspace, run_id)
    if record.ray_job_id and record.status not in FINAL:
        return _follow_ray_job(record, timeout_s, on_output)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    offset = 0
    while True:
        record = load_run(workspace, run_id)
        status = record.effective_status()
        offset = _stream_log(record.log_path, offset, on_output, whole=status in FINAL)
        if status in FINAL or (deadline is not None and time.monotonic() >= deadline):
            if status != record.status:
                record.status = status
            return record
        time.sleep(_POLL_SECONDS)


def _follow_ray_job(
    record: RunRecord, timeout_s: float | None, on_output: Callable[[str], None] | None
) -> RunRecord:
    """Follow the run's Ray job; once it ended, its outcome goes into the local record."""
    from visionautoml.pipeline import ray_jobs

    assert record.ray_job_id and record.ray_dashboard
    status, result, error = ray_jobs.follow(
        record.ray_job_id, record.ray_dashboard, timeout_s=timeout_s, on_output=on_output
    )
    if status is not None:  # ended: ``follow`` gives an error exactly when it did not succeed
        if result is not None:
            record.steps = result.get("steps", record.steps)
        finish(record, result=result, error=error)
    return record


def _stream_log(path: Path, offset: int, on_output: Callable[[str], None] | None, *, whole: bool) -> int:
    if on_output is None or not path.is_file():
        return offset
    with path.open("rb") as handle:
        handle.seek(offset)
        chunk = handle.read()
    # Whole lines only while the run goes on: a line being written is passed on once it is complete.
    complete = chunk if whole else chunk[: chunk.rfind(b"\n") + 1]
    if complete:
        on_output(mask(complete.decode("utf-8", errors="replace")))
    return offset + len(complete)

"""`visionautoml pipeline run`: the original CI flow as one command whose every step can be run again.

Steps, in order, each printed and recorded with its duration: resolve secrets; connect
(credentials checked against the tracking server before any work, experiment, dataset
store); fetch; validate; convert to JSONL with the every-Nth split; register the train and
validation datasets; get the compute and wait for it; train (one trial, or a sweep when
the config searches); register (and promote) the model; export it to ONNX.

Running again after a success repeats nothing it need not: a local folder is read in
place, an archive whose sha256 is known is not downloaded again, identical data maps to
the existing dataset versions, and a finished run of the same config on the same dataset
versions (found by a tag in the tracking store, so this works across CI jobs) is reused
instead of training again.

Secrets never reach the layers below: the config handed to training holds none (credentials
are in MLflow's environment variables), every output is masked, and the record, the output
JSON and the Markdown summary are masked when written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from visionautoml.automl.leaderboard import markdown_table
from visionautoml.automl.outcome import OUTPUT_SCHEMA, TrainOutcome
from visionautoml.automl.train import SettledJob, settle, train
from visionautoml.config import JobConfig, load_config, parse_config
from visionautoml.errors import ConfigError, VisionAutoMLError
from visionautoml.pipeline import data_steps, jobs
from visionautoml.pipeline.jobs import RunRecord
from visionautoml.pipeline.summary import write_outputs
from visionautoml.redact import (
    contains_secret,
    mask,
    mask_values,
    masked_output,
    register_environment_credentials,
    strip_userinfo,
)
from visionautoml.secrets import load_config_with_secrets
from visionautoml.tracking.schema import MAX_TAG_LENGTH, PRIMARY_METRIC, RunStatus, Tag

STEPS = (
    "resolve secrets",
    "connect",
    "fetch",
    "validate",
    "convert",
    "register data",
    "compute",
    "train",
    "register model",
    "export",
)
LEADERBOARD_COLUMNS = ["trial", "state", PRIMARY_METRIC, "map_50", "run_id"]


@dataclass
class PipelineResult:
    """What a run produced: the output JSON (``train``'s outcome keys plus the data versions and steps)."""

    pipeline_run_id: str
    status: str = jobs.RUNNING
    experiment_name: str = ""
    tracking_uri: str = ""
    source: str | None = None
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_id: str | None = None
    parent_run_id: str | None = None
    model_uri: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    leaderboard: list[dict[str, Any]] = field(default_factory=list)
    leaderboard_markdown: str = ""
    registered_model: dict[str, Any] | None = None
    promotion: dict[str, Any] | None = None
    export: str | None = None
    reused_training: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return mask_values(json.loads(json.dumps({"schema": OUTPUT_SCHEMA, **asdict(self)}, default=str)))


# --- entry points -----------------------------------------------------------------------------


def run_pipeline(
    config: str | Path,
    *,
    data: str | None = None,
    output_json: str | None = None,
    settings: Sequence[str] = (),
) -> PipelineResult:
    """Run the whole pipeline in this process; raises a :class:`VisionAutoMLError` when a step fails.

    ``settings`` are ``--set KEY.PATH=VALUE`` overrides of the config.
    """
    workspace = load_config(config, settings=settings).workspace  # secrets are the first step's
    record = jobs.new_run(
        config,
        workspace=workspace,
        data=_absolute(data),
        output_json=output_json,
        detached=False,
        settings=list(settings),
    )
    return run_recorded(record)


def detach_pipeline(
    config: str | Path,
    *,
    data: str | None = None,
    output_json: str | None = None,
    settings: Sequence[str] = (),
) -> RunRecord:
    """Check what fails fast (config, secrets, the tracking login), then run the pipeline in the background.

    A CI job then prints the run id and ends; ``visionautoml runs wait RUN_ID`` follows the
    run from a later job and exits with its outcome.
    """
    with masked_output():
        register_environment_credentials()
        job = settle(load_config_with_secrets(config, settings=settings)).job
    record = jobs.new_run(
        config,
        workspace=job.workspace,
        data=_absolute(data),
        output_json=output_json,
        detached=True,
        settings=list(settings),
    )
    if job.compute.target == "ray":  # the cluster runs it, beyond the reach of this CI agent's shutdown
        from visionautoml.pipeline import ray_jobs

        with masked_output():
            record.ray_job_id, record.ray_dashboard = ray_jobs.submit(
                config, job, data=_absolute(data), run_id=record.id, settings=settings
            )
        record.status = jobs.RUNNING
        record.save()
        return record
    # Not saved here: the child records its own pid, and a save from here could undo its first update.
    record.pid = jobs.start_detached(record)
    return record


def run_recorded(record: RunRecord, console: Console | None = None) -> PipelineResult:
    """Run the pipeline that ``record`` describes, keeping the record, output JSON and summary up to date."""
    console = console or Console(highlight=False)
    jobs.mark_running(record)
    result = PipelineResult(pipeline_run_id=record.id)
    with masked_output():
        try:
            _run_steps(record, result, console)
        except BaseException as error:
            result.status, result.error = jobs.FAILED, mask(str(error) or type(error).__name__)
            write_outputs(record, result)
            jobs.finish(record, result=result.to_dict(), error=result.error)
            raise
        # The record's final state comes last: whoever waits on it finds the outputs complete.
        result.status = jobs.SUCCEEDED
        write_outputs(record, result)
        console.print(f"pipeline run {record.id} [green]succeeded[/]")
        jobs.finish(record, result=result.to_dict())
    return result


# --- the steps --------------------------------------------------------------------------------


class _Steps:
    """Runs steps in order, printing each with its number and duration and recording it."""

    def __init__(self, record: RunRecord, result: PipelineResult, console: Console) -> None:
        self.record, self.result, self.console = record, result, console

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        number = f"[{STEPS.index(name) + 1}/{len(STEPS)}]"
        self._say(f"{number} {name} ...")
        self.record.step = name
        self.record.save()
        note = {"detail": ""}
        started = time.monotonic()
        try:
            yield note
        except BaseException as error:
            self._record(name, "failed", started, mask(str(error)).splitlines()[0] if str(error) else "")
            self._say(f"{number} {name} [red]failed[/] after {time.monotonic() - started:.1f} s")
            raise
        self._record(name, "done", started, note["detail"])
        detail = f": {escape(mask(note['detail']))}" if note["detail"] else ""
        self._say(f"{number} {name} [green]done[/] in {time.monotonic() - started:.1f} s{detail}")

    def _say(self, text: str) -> None:
        self.console.print(text, soft_wrap=True)

    def _record(self, name: str, status: str, started: float, detail: str) -> None:
        entry = {
            "step": name,
            "status": status,
            "seconds": round(time.monotonic() - started, 2),
            "detail": detail,
        }
        self.result.steps.append(entry)
        self.record.steps = self.result.steps
        self.record.save()


def _run_steps(record: RunRecord, result: PipelineResult, console: Console) -> None:
    from visionautoml.tracking.auth import scrubbed_tracking_errors
    from visionautoml.tracking.workspace import connect, resolve_tracking_uri

    steps = _Steps(record, result, console)
    with steps.step("resolve secrets") as note:
        register_environment_credentials()
        job = load_config_with_secrets(record.config, settings=record.settings)
        if record.data:
            job = job.model_copy(update={"pipeline": job.pipeline.model_copy(update={"data": record.data})})
        note["detail"] = f"config {record.config}"

    with steps.step("connect") as note:
        settled = settle(job)
        public = _public_job(settled.job)
        uri = resolve_tracking_uri(public)
        with scrubbed_tracking_errors(uri):
            connect(public)
        result.experiment_name, result.tracking_uri = public.experiment_name, strip_userinfo(uri)
        note["detail"] = f"{settled.login}; experiment '{public.experiment_name}'"

    with scrubbed_tracking_errors(uri):
        _data_and_model_steps(steps, settled.job, public, result, console, settled.login)


def _data_and_model_steps(
    steps: _Steps, job: JobConfig, public: JobConfig, result: PipelineResult, console: Console, login: str
) -> None:
    """The steps after the login; ``job`` still holds the data URL's secret, ``public`` holds none."""
    with steps.step("fetch") as note:
        source, result.source = job.pipeline.data, public.pipeline.data
        folder, note["detail"] = data_steps.fetch(source, job)

    datastore_root = Path(job.datastore_root) if job.datastore_root else None
    with steps.step("validate") as note:
        dataset, note["detail"] = data_steps.validate(folder, job.pipeline, datastore_root)

    with steps.step("convert") as note:
        converted, note["detail"] = data_steps.convert(folder, dataset.classes, public, datastore_root)

    with steps.step("register data") as note:
        training, validation = data_steps.register_data(converted, public)
        result.datasets = {
            "train": data_steps.version_dict(training),
            "validation": data_steps.version_dict(validation),
        }
        note["detail"] = ", ".join(
            f"{version.ref} ({version.image_count} images, {'reused' if version.reused else 'new'})"
            for version in (training, validation)
        )

    # The pipeline always registers its model: under register.model_name, else the experiment's name.
    register = public.register.model_copy(
        update={"model_name": public.register.model_name or public.experiment_name}
    )
    training_job = public.model_copy(
        update={
            "training_data": training.annotations,
            "validation_data": validation.annotations,
            "register": register,
        }
    )
    with steps.step("compute") as note:
        note["detail"] = _get_compute(public, console)

    key = _pipeline_key(training_job, training.digest, validation.digest)
    with steps.step("train") as note:
        previous = _previous_success(key, public)
        if previous is not None:
            _reuse(previous, result)
            note["detail"] = (
                f"reused MLflow run {result.run_id}: a finished run of this config on these datasets"
            )
        else:
            outcome = train(SettledJob(training_job, training_job.fingerprint(), login), console=console)
            _take(outcome, result)
            what = f"sweep {outcome.parent_run_id}: best run" if outcome.kind == "sweep" else "MLflow run"
            note["detail"] = f"{what} {outcome.run_id}"

    with steps.step("register model") as note:
        note["detail"] = _record_success(result, key)

    with steps.step("export") as note:
        note["detail"] = _export(public, result)


def _absolute(data: str | None) -> str | None:
    """A local ``--data`` path made absolute, so a detached process resolves it as the caller did."""
    if data and "://" not in data and Path(data).expanduser().exists():
        return str(Path(data).expanduser().resolve())
    return data


def _public_job(job: JobConfig) -> JobConfig:
    """The config handed to training: credentials gone, any other secret masked, checked to hold none."""
    raw = job.model_dump(mode="json")
    raw["tracking"].update(password=None, token=None)
    public = parse_config(mask_values(raw), source="the resolved config")
    if contains_secret(public.model_dump_json()):
        raise ConfigError(
            "a secret would reach MLflow through the config; use ${secret:...} only in tracking.*"
        )
    return public


def _get_compute(job: JobConfig, console: Console) -> str:
    """Join the Ray cluster and wait until it is big enough; the sweep then runs on this session."""
    if job.compute.target == "local":
        return f"this machine: {os.cpu_count()} CPU(s); trials run here"
    from visionautoml.automl.compute import join_cluster

    info = join_cluster(job.compute, on_status=lambda text: console.print(f"  {escape(text)}"))
    return info.describe()


def _pipeline_key(job: JobConfig, training_digest: str, validation_digest: str) -> str:
    """What decides the outcome: the config (less where it runs, tracks and fetches) and the data."""
    where = {"tracking", "pipeline", "workspace", "training_data", "validation_data"}
    essential = {**job.model_dump(mode="json", exclude=where), "data": [training_digest, validation_digest]}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()[:16]


def _previous_success(key: str, job: JobConfig) -> dict[str, Any] | None:
    """An earlier finished run with this key whose registered model still exists."""
    from visionautoml.tracking import registry
    from visionautoml.tracking.store import Store

    store = Store()
    experiment_id = store.experiment_id(job.experiment_name)
    if experiment_id is None:
        return None
    found = store.search(
        [experiment_id],
        f"tags.`{Tag.PIPELINE_KEY}` = '{key}' and attributes.status = '{RunStatus.FINISHED}'",
        limit=1,
    )
    if not found or Tag.PIPELINE_RESULT not in found[0].tags:
        return None
    previous = json.loads(found[0].tags[Tag.PIPELINE_RESULT])
    registered = previous.get("registered_model")
    if registered:
        try:
            if registry.get_version(registered["name"], int(registered["version"])) is None:
                return None
        except VisionAutoMLError:
            return None
    return previous


def _reuse(previous: dict[str, Any], result: PipelineResult) -> None:
    result.reused_training = True
    for name in ("run_id", "parent_run_id", "model_uri", "metrics", "leaderboard", "registered_model"):
        setattr(result, name, previous.get(name) or getattr(result, name))
    result.leaderboard_markdown = markdown_table(LEADERBOARD_COLUMNS, result.leaderboard)


def _take(outcome: TrainOutcome, result: PipelineResult) -> None:
    """The training outcome's keys into the pipeline's result (``train``'s output JSON shape)."""
    result.parent_run_id, result.run_id, result.model_uri = (
        outcome.parent_run_id,
        outcome.run_id,
        outcome.model_uri,
    )
    result.metrics = outcome.metrics
    result.leaderboard = [
        {
            "trial": trial.number,
            "state": str(trial.state),
            "run_id": trial.run_id,
            "params": trial.params,
            **trial.metrics,
        }
        for trial in outcome.trials
    ]
    result.leaderboard_markdown = outcome.leaderboard_markdown or markdown_table(
        LEADERBOARD_COLUMNS, result.leaderboard
    )
    if outcome.registered_model:
        result.registered_model = asdict(outcome.registered_model)
    if outcome.promotion:
        result.promotion = outcome.promotion.to_dict()


def _record_success(result: PipelineResult, key: str) -> str:
    """Tag the training run with this pipeline's key and outcome, so a rerun on the same data reuses it."""
    from visionautoml.tracking.store import Store

    registered = result.registered_model
    if registered is None:
        raise VisionAutoMLError("training produced no registered model")
    if result.reused_training:
        return f"{registered['name']} version {registered['version']} (registered by the reused run)"
    summary = {k: getattr(result, k) for k in ("run_id", "parent_run_id", "model_uri", "registered_model")}
    summary["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    summary["leaderboard"] = [
        {k: row.get(k) for k in ("trial", "state", "run_id", PRIMARY_METRIC)} for row in result.leaderboard
    ]
    while len(json.dumps(summary)) > MAX_TAG_LENGTH and summary["leaderboard"]:
        summary["leaderboard"].pop()
    run_id = result.parent_run_id or result.run_id
    Store().set_tags(run_id, {Tag.PIPELINE_KEY: key, Tag.PIPELINE_RESULT: json.dumps(summary)})
    promotion = f"; {result.promotion['message']}" if result.promotion else ""
    aliases = ", ".join(registered["aliases"])
    return f"{registered['name']} version {registered['version']} ({aliases}){promotion}"


def _export(job: JobConfig, result: PipelineResult) -> str:
    """ONNX export of the registered version, attached to it so serving finds it; once per version."""
    from visionautoml.tracking import registry
    from visionautoml.tracking.workspace import workspace_dir

    if not job.pipeline.export:
        return "skipped: pipeline.export is false"
    name, version = result.registered_model["name"], int(result.registered_model["version"])
    info = registry.get_version(name, version)
    if info is not None and info.tags.get(Tag.ONNX_PARITY) == "passed":
        return f"{name} version {version} was exported before (onnx.parity passed)"
    try:
        from visionautoml.deploy.export import export_model
    except ImportError as error:
        return (
            f"skipped: the ONNX export needs the deploy extra (pip install 'visionautoml[deploy]'): {error}"
        )
    target = workspace_dir(job) / "exports" / f"{name}-{version}"
    exported = export_model(f"models:/{name}/{version}", target, attach=True)
    result.export = str(exported.directory)
    return f"{exported.directory}: {exported.parity.summary()}"

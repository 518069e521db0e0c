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
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from visionautoml.config import JobConfig, Pipeline, parse_config
from visionautoml.errors import ConfigError, TrainingError, VisionAutoMLError
from visionautoml.pipeline import jobs
from visionautoml.pipeline.jobs import RunRecord
from visionautoml.pipeline.secrets import (
    contains_secret,
    load_config_with_secrets,
    mask,
    mask_values,
    masked_output,
    register_environment_credentials,
    write_masked_text,
)

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
# Where a ${secret:...} may be used: fields that go to the environment, or that only the fetch step reads.
SECRET_FIELDS = ("tracking.username", "tracking.password", "tracking.token", "pipeline.data")
KEY_TAG = "visionautoml.pipeline_key"
RESULT_TAG = "visionautoml.pipeline_result"
SUMMARY_VARIABLE = "GITHUB_STEP_SUMMARY"
_MAX_TAG = 5000  # MLflow's limit on a tag value


@dataclass
class PipelineResult:
    """What a run produced: the output JSON (``train``'s keys plus the dataset versions and steps)."""

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
    promotion: str | None = None
    export: str | None = None
    reused_training: bool = False
    steps: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return mask_values(json.loads(json.dumps(asdict(self), default=str)))


# --- entry points -----------------------------------------------------------------------------


def run_pipeline(
    config: str | Path, *, data: str | None = None, output_json: str | None = None
) -> PipelineResult:
    """Run the whole pipeline in this process; raises a :class:`VisionAutoMLError` when a step fails."""
    workspace = _workspace_of(config)
    record = jobs.new_run(
        config, workspace=workspace, data=_absolute(data), output_json=output_json, detached=False
    )
    return run_recorded(record)


def detach_pipeline(
    config: str | Path, *, data: str | None = None, output_json: str | None = None
) -> RunRecord:
    """Check what fails fast (config, secrets, the tracking login), then run the pipeline in the background.

    A CI job then prints the run id and ends; ``visionautoml runs wait RUN_ID`` follows the
    run from a later job and exits with its outcome.
    """
    from visionautoml.tracking.auth import login

    with masked_output():
        register_environment_credentials()
        job = load_config_with_secrets(config, allowed_fields=SECRET_FIELDS)
        login(job)
    record = jobs.new_run(
        config, workspace=job.workspace, data=_absolute(data), output_json=output_json, detached=True
    )
    if job.compute.target == "ray":  # the cluster runs it, beyond the reach of this CI agent's shutdown
        from visionautoml.pipeline import ray_jobs

        with masked_output():
            record.ray_job_id, record.ray_dashboard = ray_jobs.submit(
                config, job, data=_absolute(data), run_id=record.id
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
            _write_outputs(record, result)
            jobs.finish(record, result=result.to_dict(), error=result.error)
            raise
        # The record's final state comes last: whoever waits on it finds the outputs complete.
        result.status = jobs.SUCCEEDED
        _write_outputs(record, result)
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
    from visionautoml.tracking.auth import login, scrubbed_tracking_errors, server_name
    from visionautoml.tracking.workspace import connect, resolve_tracking_uri

    steps = _Steps(record, result, console)
    with steps.step("resolve secrets") as note:
        register_environment_credentials()
        job = load_config_with_secrets(record.config, allowed_fields=SECRET_FIELDS)
        if record.data:
            job = job.model_copy(update={"pipeline": job.pipeline.model_copy(update={"data": record.data})})
        note["detail"] = f"config {record.config}"

    with steps.step("connect") as note:
        job, accepted = login(job)
        public = _public_job(job)
        uri = resolve_tracking_uri(public)
        with scrubbed_tracking_errors(uri):
            connect(public)
        result.experiment_name, result.tracking_uri = public.experiment_name, server_name(uri)
        note["detail"] = f"{accepted}; experiment '{public.experiment_name}'"

    with scrubbed_tracking_errors(uri):
        _data_and_model_steps(steps, job, public, result, console)


def _data_and_model_steps(
    steps: _Steps, job: JobConfig, public: JobConfig, result: PipelineResult, console: Console
) -> None:
    """The steps after the login; ``job`` still holds the data URL's secret, ``public`` holds none."""
    with steps.step("fetch") as note:
        source, result.source = job.pipeline.data, public.pipeline.data
        folder, note["detail"] = _fetch(source, job)

    with steps.step("validate") as note:
        dataset, note["detail"] = _validate(folder, job.pipeline)

    with steps.step("convert") as note:
        converted, note["detail"] = _convert(folder, dataset.classes, public)

    with steps.step("register data") as note:
        training, validation = _register_data(converted, public)
        result.datasets = {"train": _version_dict(training), "validation": _version_dict(validation)}
        note["detail"] = ", ".join(
            f"{version.ref} ({version.image_count} images, {'reused' if version.reused else 'new'})"
            for version in (training, validation)
        )

    training_job = public.model_copy(
        update={"training_data": training.annotations, "validation_data": validation.annotations}
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
        elif _is_sweep(public):
            _sweep(training_job, result, console)
            note["detail"] = f"sweep {result.parent_run_id}: best run {result.run_id}"
        else:
            _trial(training_job, result)
            note["detail"] = f"MLflow run {result.run_id}"

    with steps.step("register model") as note:
        note["detail"] = _register_model(public, result, training, validation, key)

    with steps.step("export") as note:
        note["detail"] = _export(public, result)


def _workspace_of(config: str | Path) -> str:
    """The config's workspace, read without resolving secrets (the record is created before that step)."""
    from visionautoml.config import load_config

    return load_config(config).workspace


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


def _fetch(source: str | None, job: JobConfig) -> tuple[Path, str]:
    from visionautoml.data.fetch import fetch
    from visionautoml.tracking.workspace import workspace_dir

    if not source:
        raise ConfigError("no data to fetch: set pipeline.data in the config or pass --data URL_OR_PATH")
    local = Path(source).expanduser()
    if local.is_dir():
        return local.resolve(), f"{local.resolve()} (a folder: read in place)"
    target = workspace_dir(job) / "pipeline" / "data" / hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = fetch(source, target, job.pipeline.sha256)
    return _dataset_root(folder), f"{mask(source)} -> {folder}"


def _dataset_root(folder: Path) -> Path:
    """Step into an archive's single top folder (``odFridgeObjects/`` in the fridge zip)."""
    while True:
        entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]


def _validate(folder: Path, pipeline: Pipeline) -> tuple[Any, str]:
    from visionautoml.data.formats import read_dataset
    from visionautoml.data.problems import ProblemLog

    problems = ProblemLog()
    dataset = read_dataset(folder, pipeline.format, problems=problems)
    problems.raise_if_errors(f"validating {folder}")
    if len(dataset.images) < pipeline.validation_every:
        raise ConfigError(
            f"{folder}: {len(dataset.images)} image(s) is too few for pipeline.validation_every="
            f"{pipeline.validation_every}; add images or lower it"
        )
    warnings = f", {len(problems.warnings)} warning(s)" if problems.warnings else ""
    classes = ", ".join(dataset.classes)
    return dataset, f"{len(dataset.images)} images, {dataset.box_count} boxes, classes: {classes}{warnings}"


def _convert(folder: Path, classes: list[str], job: JobConfig) -> tuple[Path, str]:
    from visionautoml.data.convert import convert
    from visionautoml.tracking.workspace import workspace_dir

    key = hashlib.sha256(
        f"{folder}|{job.pipeline.format}|{job.pipeline.validation_every}".encode()
    ).hexdigest()
    out = workspace_dir(job) / "pipeline" / "converted" / key[:16]
    converted = convert(
        folder,
        out,
        "jsonl",
        format=job.pipeline.format,
        validation_every=job.pipeline.validation_every,
        classes=classes,
    )
    return out, f"{converted.train_images} train / {converted.validation_images} validation images in {out}"


def dataset_names(job: JobConfig) -> tuple[str, str]:
    """The names a sweep registers its data under, so the pipeline's versions are the ones it finds."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", job.experiment_name).strip("-.")[:60] or "sweep"
    return f"{slug}-train", f"{slug}-validation"


def _register_data(converted: Path, job: JobConfig) -> tuple[Any, Any]:
    from visionautoml.data.formats.jsonl import TRAIN_FILE, VALIDATION_FILE
    from visionautoml.data.versions import DatasetStore, default_store_root
    from visionautoml.tracking.workspace import workspace_dir

    store = DatasetStore(default_store_root(workspace_dir(job)))
    train_name, validation_name = dataset_names(job)
    training = store.register(converted / TRAIN_FILE, train_name, format="jsonl")
    validation = store.register(converted / VALIDATION_FILE, validation_name, format="jsonl")
    return training, validation


def _version_dict(version: Any) -> dict[str, Any]:
    return {**asdict(version), "ref": version.ref}


def _get_compute(job: JobConfig, console: Console) -> str:
    """Join the Ray cluster and wait until it is big enough; the sweep then runs on this session."""
    if job.compute.target == "local":
        return f"this machine: {os.cpu_count()} CPU(s); trials run here"
    from visionautoml.automl.compute import join_cluster

    info = join_cluster(job.compute, on_status=lambda text: console.print(f"  {escape(text)}"))
    return info.describe()


def _is_sweep(job: JobConfig) -> bool:
    return bool(job.search_space) or job.limits.max_trials > 1 or job.compute.target == "ray"


def _pipeline_key(job: JobConfig, training_digest: str, validation_digest: str) -> str:
    """What decides the outcome: the config (less where it runs, tracks and fetches) and the data."""
    where = {"tracking", "pipeline", "workspace", "training_data", "validation_data"}
    essential = {**job.model_dump(mode="json", exclude=where), "data": [training_digest, validation_digest]}
    return hashlib.sha256(json.dumps(essential, sort_keys=True).encode()).hexdigest()[:16]


def _previous_success(key: str, job: JobConfig) -> dict[str, Any] | None:
    """An earlier finished run with this key whose registered model still exists."""
    import mlflow

    from visionautoml.tracking import registry

    experiment = mlflow.get_experiment_by_name(job.experiment_name)
    if experiment is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or RESULT_TAG not in runs[0].data.tags:
        return None
    previous = json.loads(runs[0].data.tags[RESULT_TAG])
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
    result.leaderboard_markdown = _leaderboard_markdown(result.leaderboard)


def _sweep(job: JobConfig, result: PipelineResult, console: Console) -> None:
    from visionautoml.automl.sweep import run_sweep

    sweep = run_sweep(job, console=console)
    best = sweep.best
    result.parent_run_id = sweep.parent_run_id
    result.run_id, result.model_uri = (best.run_id, best.model_uri) if best else (None, None)
    result.metrics = best.metrics if best else {}
    result.leaderboard = [
        {
            "trial": trial.number,
            "state": trial.state,
            "run_id": trial.run_id,
            "params": trial.params,
            **trial.metrics,
        }
        for trial in sweep.trials
    ]
    result.leaderboard_markdown = sweep.leaderboard_markdown
    if sweep.registered_model:
        result.registered_model = asdict(sweep.registered_model)
    if sweep.promotion:
        result.promotion = sweep.promotion.message


def _trial(job: JobConfig, result: PipelineResult) -> None:
    from visionautoml.training.trial import run_trial

    trial = run_trial(job, run_name="pipeline")
    if trial.status != "FINISHED" or not trial.model_uri:
        raise TrainingError(f"the trial failed (MLflow run {trial.run_id}): {trial.failure_reason}")
    result.run_id, result.model_uri, result.metrics = trial.run_id, trial.model_uri, trial.metrics
    numbers = {key: value for key, value in trial.metrics.items() if isinstance(value, int | float)}
    result.leaderboard = [{"trial": 1, "state": "completed", "run_id": trial.run_id, **numbers}]
    result.leaderboard_markdown = _leaderboard_markdown(result.leaderboard)


def _register_model(job: JobConfig, result: PipelineResult, training: Any, validation: Any, key: str) -> str:
    """Register the trial's model (a sweep registered its best already), promote it, and tag the run."""
    from mlflow import MlflowClient

    from visionautoml.tracking import registry

    name = job.register.model_name or job.experiment_name
    if result.registered_model is None:
        numbers = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
        tags = {
            **{f"{registry.METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in numbers.items()},
            "primary_metric": registry.PRIMARY_METRIC,
            registry.TRAINING_DATASET_TAG: training.ref,
            f"{registry.TRAINING_DATASET_TAG}.digest": training.digest,
            registry.VALIDATION_DATASET_TAG: validation.ref,
            f"{registry.VALIDATION_DATASET_TAG}.digest": validation.digest,
            "config_hash": job.fingerprint(),
            "pipeline_run_id": result.pipeline_run_id,
            "model_name": job.training_parameters.model_name,
        }
        version = registry.register_model(result.model_uri, name, tags=tags)
        result.registered_model = {
            "name": version.name,
            "version": version.version,
            "aliases": version.aliases,
        }
        if job.register.promote_if_better:
            decision = registry.promote_if_better(
                version.name, version.version, job.register.promote_if_better
            )
            result.promotion = decision.message
            if decision.promoted:
                result.registered_model["aliases"] = sorted({*version.aliases, decision.alias})
    elif result.reused_training:
        return f"{name} version {result.registered_model['version']} (registered by the reused run)"
    run_id = result.parent_run_id or result.run_id
    summary = {k: getattr(result, k) for k in ("run_id", "parent_run_id", "model_uri", "registered_model")}
    summary["metrics"] = {k: v for k, v in result.metrics.items() if isinstance(v, int | float)}
    summary["leaderboard"] = [
        {k: row.get(k) for k in ("trial", "state", "run_id", registry.PRIMARY_METRIC)}
        for row in result.leaderboard
    ]
    while len(json.dumps(summary)) > _MAX_TAG and summary["leaderboard"]:
        summary["leaderboard"].pop()
    client = MlflowClient()
    client.set_tag(run_id, KEY_TAG, key)
    client.set_tag(run_id, RESULT_TAG, json.dumps(summary))
    registered = result.registered_model
    promotion = f"; {result.promotion}" if result.promotion else ""
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
    if info is not None and info.tags.get("onnx.parity") == "passed":
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


# --- outputs ----------------------------------------------------------------------------------


def _leaderboard_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = ["trial", "state", "mean_average_precision", "map_50", "run_id"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def summary_markdown(result: PipelineResult) -> str:
    """The Markdown a CI job shows: outcome, steps, data versions, leaderboard, registered model."""
    outcome = "succeeded" if result.status == jobs.SUCCEEDED else "failed"
    lines = [f"## visionautoml pipeline `{result.pipeline_run_id}` {outcome}", ""]
    if result.error:
        lines += [f"**Error:** {result.error}", ""]
    lines += ["| step | status | seconds | detail |", "|---|---|---|---|"]
    lines += [
        f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {_cell(s['detail'])} |" for s in result.steps
    ]
    if result.datasets:
        lines += ["", "### Data", "", "| dataset | version | images | boxes | new |", "|---|---|---|---|---|"]
        for role, version in result.datasets.items():
            new = "no (reused)" if version.get("reused") else "yes"
            lines.append(
                f"| {role} | `{version['ref']}` | {version['image_count']} | {version['box_count']} | {new} |"
            )
    if result.leaderboard_markdown:
        lines += ["", "### Leaderboard", "", result.leaderboard_markdown]
    if result.registered_model:
        model = result.registered_model
        lines += ["", "### Registered model", "", f"`{model['name']}` version {model['version']}"]
        lines[-1] += f" (aliases: {', '.join(model.get('aliases') or []) or 'none'})"
        if result.reused_training:
            lines[-1] += ", from an earlier run of the same config on the same data"
        if result.promotion:
            lines += ["", result.promotion]
    return "\n".join(lines) + "\n"


def _write_outputs(record: RunRecord, result: PipelineResult) -> None:
    if record.output_json:
        write_masked_text(record.output_json, json.dumps(result.to_dict(), indent=2) + "\n")
    summary = os.environ.get(SUMMARY_VARIABLE)
    if summary:
        path = Path(summary)
        before = path.read_text(encoding="utf-8") if path.is_file() else ""
        write_masked_text(path, before + summary_markdown(result))

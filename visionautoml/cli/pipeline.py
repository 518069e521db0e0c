"""`visionautoml pipeline run`, `runs ...` and `secrets check`: the whole flow from CI, and following it."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from visionautoml.cli.common import (
    DATASTORE_HELP,
    SET_HELP,
    WORKSPACE_HELP,
    console,
    err_console,
    parse_duration,
)
from visionautoml.config import DEFAULT_WORKSPACE

secrets_app = typer.Typer(
    help="Check the ${secret:...} references of a config (values are never shown).", no_args_is_help=True
)


@secrets_app.command("check")
def secrets_check(
    config: Path = typer.Argument(..., help="Job or pipeline YAML whose ${secret:...} references to try."),
    connect: bool = typer.Option(
        False, "--connect", help="Also log in to the tracking server with the resolved credentials."
    ),
) -> None:
    """List each `${secret:NAME}` of CONFIG, the provider that has it and whether it resolves.

    Values are never printed. Providers: the environment variable NAME, then the file NAME in
    `$VISIONAUTOML_SECRETS_DIR` (default `/run/secrets`); `${secret:vault://MOUNT/PATH#KEY}` reads
    Vault/OpenBao KV v2 at `VAULT_ADDR` with `VAULT_TOKEN`. Exits 1 when any reference does not
    resolve (or, with `--connect`, when the tracking server refuses the login).

    Examples:

    * `visionautoml secrets check examples/raccoon.yaml`
    * `MLFLOW_TRACKING_URI=https://mlflow.example.org visionautoml secrets check job.yaml --connect`
    """
    from rich.markup import escape

    from visionautoml.redact import masked_output
    from visionautoml.secrets import check_config_secrets, load_config_with_secrets
    from visionautoml.tracking.auth import login

    with masked_output():
        statuses = check_config_secrets(config)
        for status in statuses:
            mark = "[green]resolved[/]" if status.resolved else "[red]missing[/]"
            where = f" from {status.provider}" if status.resolved else f": {status.problem}"
            line = f"${{secret:{status.reference}}} (used by {', '.join(status.fields)}){where}"
            console.print(f"{mark} {escape(line)}", soft_wrap=True, highlight=False)
        if not statuses:
            console.print(f"{config}: no ${{secret:...}} references", soft_wrap=True)
        if not all(status.resolved for status in statuses):
            raise typer.Exit(1)
        if connect:
            _, accepted = login(load_config_with_secrets(config))
            console.print(f"tracking server {accepted}", soft_wrap=True)


pipeline_app = typer.Typer(
    help="The whole flow in one command: fetch, validate, convert, register data, train, register model.",
    no_args_is_help=True,
)
runs_app = typer.Typer(help="Pipeline runs of a workspace: list, show, logs, wait.", no_args_is_help=True)
WorkspaceOption = typer.Option(Path(DEFAULT_WORKSPACE), "--workspace", "-w", help=WORKSPACE_HELP)


@pipeline_app.command("run")
def pipeline_run(
    config: Path = typer.Argument(..., help="Pipeline YAML: a job config with a `pipeline:` section."),
    data: str | None = typer.Option(
        None, "--data", help="URL, zip/tar archive or folder to use instead of the config's pipeline.data."
    ),
    detach: bool = typer.Option(
        False,
        "--detach",
        help="Run in the background (a Ray job on the cluster when compute.target is ray, else a detached "
        "process): print the run id (alone on stdout) and exit 0.",
    ),
    output_json: Path | None = typer.Option(
        None, "--output-json", help="Write the outcome (datasets, metrics, leaderboard, model) as JSON here."
    ),
    settings: list[str] = typer.Option([], "--set", help=SET_HELP),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
) -> None:
    """Run every step of the flow, each logged with its duration; exit 1 if any fails.

    Steps: resolve secrets, connect (the tracking login is checked first), fetch, validate,
    convert to JSONL with the every-Nth split, register the train and validation datasets,
    get the compute, train (one trial, or a sweep when the config searches), register and
    promote the model, export it to ONNX. Running it again repeats nothing it need not:
    identical data reuses its dataset versions, and a finished run of the same config on the
    same data is reused. `MLFLOW_TRACKING_URI` overrides the config's tracking.uri; when
    `GITHUB_STEP_SUMMARY` is set a Markdown summary is appended to it. Credentials come from
    the environment or `${secret:...}` references in the config, never from arguments.

    Examples:

    * `visionautoml pipeline run examples/raccoon.yaml --data ../shared/datasets/raccoon`
    * `visionautoml pipeline run examples/raccoon.yaml --output-json out/result.json`
    * `visionautoml pipeline run job.yaml --set training_parameters.number_of_epochs=3`
    * `visionautoml pipeline run examples/raccoon.yaml --detach` then `visionautoml runs wait RUN_ID`
    """
    from visionautoml.pipeline.run import detach_pipeline, run_pipeline

    output = str(output_json) if output_json else None
    if datastore_root:
        settings = [*settings, f"datastore_root={datastore_root.resolve()}"]
    if detach:
        record = detach_pipeline(config, data=data, output_json=output, settings=settings)
        follow = f"visionautoml runs wait {record.id} --workspace {record.workspace}"
        where = (
            f"Ray job {record.ray_job_id} at {record.ray_dashboard}"
            if record.ray_job_id
            else f"log: {record.log_path}"
        )
        err_console.print(f"started pipeline run {record.id} in the background ({where})", soft_wrap=True)
        err_console.print(f"follow it with: {follow}", soft_wrap=True)
        typer.echo(record.id)  # alone on stdout, for RUN_ID=$(visionautoml pipeline run ... --detach)
        return
    run_pipeline(config, data=data, output_json=output, settings=settings)


@runs_app.command("list")
def runs_list(
    workspace: Path = WorkspaceOption,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (for scripts and CI) instead of a table."),
) -> None:
    """List the pipeline runs of a workspace, newest last.

    Examples: `visionautoml runs list`, `visionautoml runs list --workspace /srv/visionautoml --json`
    """
    import json

    from rich.table import Table

    from visionautoml.pipeline.jobs import list_runs

    if as_json:
        records = list_runs(workspace)
        rows = [
            {"id": r.id, "status": r.effective_status(), "step": r.step, "config": r.config} for r in records
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("status", "step", "config")
    table.add_column("run", no_wrap=True)
    for record in list_runs(workspace):
        table.add_row(record.effective_status(), record.step or "", Path(record.config).name, record.id)
    console.print(table)


@runs_app.command("show")
def runs_show(
    run_id: str = typer.Argument(..., help="A run id from `runs list`."), workspace: Path = WorkspaceOption
) -> None:
    """Print a run's state as JSON: status, steps with durations, result (datasets, model) or error.

    Example: `visionautoml runs show 20260301-101500-a1b2c3`
    """
    import json
    from dataclasses import asdict

    from visionautoml.pipeline.jobs import load_run

    record = load_run(workspace, run_id)
    state = {**asdict(record), "status": record.effective_status()}
    typer.echo(json.dumps(state, indent=2))


@runs_app.command("logs")
def runs_logs(
    run_id: str = typer.Argument(..., help="A run id from `runs list`."), workspace: Path = WorkspaceOption
) -> None:
    """Print the output of a detached run so far (`runs wait` follows it live); a Ray job's from the cluster.

    Example: `visionautoml runs logs 20260301-101500-a1b2c3`
    """
    from visionautoml.pipeline.jobs import load_run
    from visionautoml.redact import mask

    record = load_run(workspace, run_id)
    if record.ray_job_id and record.ray_dashboard:
        from visionautoml.pipeline.ray_jobs import follow

        follow(
            record.ray_job_id,
            record.ray_dashboard,
            timeout_s=0,
            on_output=lambda text: typer.echo(text, nl=False),
        )
        return
    if not record.log_path.is_file():
        console.print(f"run {run_id} ran in the foreground: its output went to that terminal. Steps:")
        for step in record.steps:
            console.print(
                f"  {step['step']}: {step['status']} in {step['seconds']} s {step['detail']}", soft_wrap=True
            )
        return
    typer.echo(mask(record.log_path.read_text(encoding="utf-8", errors="replace")), nl=False)


@runs_app.command("wait")
def runs_wait(
    run_id: str = typer.Argument(..., help="A run id printed by `pipeline run --detach`."),
    timeout: str | None = typer.Option(
        None, "--timeout", help="Give up after this long (50m, 2h, 90s) with exit code 124; the run goes on."
    ),
    workspace: Path = WorkspaceOption,
    cluster: str | None = typer.Option(
        None,
        "--cluster",
        envvar="RAY_API_SERVER_ADDRESS",
        help="Ray job API (http://HEAD:8265) to find a run submitted from another machine as a Ray job.",
    ),
) -> None:
    """Follow a run until it ends, streaming its output; exit 0 only if it succeeded.

    Exit codes: 0 succeeded, 1 failed or lost (its process died), 124 still running at `--timeout`.
    A CI job near its time limit can stop waiting and leave the run to a later job's `runs wait`.

    Examples:

    * `visionautoml runs wait 20260301-101500-a1b2c3`
    * `visionautoml runs wait 20260301-101500-a1b2c3 --timeout 50m`
    * `visionautoml runs wait 20260301-101500-a1b2c3 --cluster http://10.0.0.4:8265` (a Ray job submitted
      by another CI agent)
    """
    from visionautoml.pipeline.jobs import FINAL, SUCCEEDED, wait_for

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    timeout_s = parse_duration(timeout) if timeout is not None else None
    record = wait_for(workspace, run_id, timeout_s=timeout_s, on_output=show, ray_dashboard=cluster)
    status = record.effective_status()
    if status == SUCCEEDED:
        console.print(f"outcome of pipeline run {run_id}: succeeded")
        return
    if status not in FINAL:
        message = f"pipeline run {run_id} is still {status} after {timeout}; wait again"
        err_console.print(message, soft_wrap=True)
        raise typer.Exit(124)
    reason = record.error or "its process ended without recording an outcome (killed or out of memory)"
    err_console.print(f"pipeline run {run_id} {status}: {reason}", soft_wrap=True, markup=False)
    raise typer.Exit(1)

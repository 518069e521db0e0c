"""The `visionautoml` command line: parses arguments, calls the layers, prints results.

Kept thin on purpose: a module per command group (``data``, ``models``, ``train``,
``deploy``, ``pipeline``, ``report``), every command a few lines that call one function of
the package. Errors a user can fix (:class:`VisionAutoMLError`) are printed as one message
with exit code 1, never as a traceback.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import PackageNotFoundError, version

import typer
from rich.text import Text

from visionautoml.cli import data, deploy, models, pipeline, report, train
from visionautoml.cli.common import console, err_console, refuse_secret_arguments
from visionautoml.errors import VisionAutoMLError

app = typer.Typer(
    name="visionautoml",
    help=(
        "Self-hosted AutoML for object detection.\n\n"
        "Typical flow: `data fetch` a labelled zip, `data validate` it, `data convert` it to JSONL with a "
        "train/validation split, `data register` a version, then `train` a config (one trial or a sweep) "
        "and `serve` the registered model. `pipeline run` does all of it in one command."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(pipeline.pipeline_app, name="pipeline")
app.add_typer(pipeline.runs_app, name="runs")
app.add_typer(pipeline.secrets_app, name="secrets")
app.command("train")(train.train)
app.command("evaluate")(train.evaluate)
app.command("export")(deploy.export)
app.command("predict")(deploy.predict)
app.command("serve")(deploy.serve)
app.command("report")(report.report)


def _version() -> str:
    try:
        return version("visionautoml")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"visionautoml {_version()}")
        raise typer.Exit()


@app.callback()
def _before_every_command(
    _version_flag: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    # A credential typed as an argument is readable in the process list: refused before anything runs.
    refuse_secret_arguments(sys.argv[1:])


class _LevelPrefix(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def _log_to_stderr() -> None:
    """The package's warnings (a repaired box, an ignored cloud setting) as ``warning: ...`` lines.

    Below WARNING only when asked (a cloud job's ``log_verbosity``); library chatter stays out.
    """
    logger = logging.getLogger("visionautoml")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LevelPrefix("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 1."""
    _log_to_stderr()
    try:
        app()
    except VisionAutoMLError as error:
        err_console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


__all__ = ["app", "console", "err_console", "main"]

"""The `visionautoml` command line: parses arguments, calls the layers, prints results.

Kept thin on purpose: every command is a few lines that call one function of the
package. Errors a user can fix (:class:`VisionAutoMLError`) are printed as one
message with exit code 1, never as a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.text import Text

from visionautoml.errors import VisionAutoMLError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="visionautoml",
    help=(
        "Self-hosted AutoML for object detection.\n\n"
        "Typical flow: `data fetch` a labelled zip, `data validate` it, `data convert` it to JSONL with a "
        "train/validation split, `data register` a version, then `train` a config (one trial or a sweep) "
        "and `serve` the registered model."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(
    help="Read, check, convert, fetch and version labelled datasets.", no_args_is_help=True
)
app.add_typer(data_app, name="data")

# --- data: validate, convert (owner: data-formats) ------------------------------------------

# --- data: fetch, register, list, show, stats (owner: data-ops) -------------------------------

# --- models zoo (owner: models) ---------------------------------------------------------------

# --- train, evaluate (owner: trainer) ---------------------------------------------------------

# --- models list/show/promote, sweep (owner: automl) ------------------------------------------

# --- export, predict, serve (owner: deploy) ----------------------------------------------------

# --- pipeline, runs, secrets (owner: pipeline) -------------------------------------------------

# --- report (owner: reports) ------------------------------------------------------------------


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 1."""
    try:
        app()
    except VisionAutoMLError as error:
        err_console.print(Text.assemble(("error: ", "bold red"), str(error)), soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

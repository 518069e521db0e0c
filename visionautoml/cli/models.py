"""`visionautoml models ...`: the model zoo, and the registered models with their versions and aliases."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer

from visionautoml.cli.common import WORKSPACE_HELP, console

app = typer.Typer(help="The model zoo, and trained and registered models.", no_args_is_help=True)

STORE_CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Job YAML whose tracking store to use (its tracking.uri or workspace)."
)
STORE_WORKSPACE_OPTION = typer.Option(None, "--workspace", "-w", help=WORKSPACE_HELP)
JSON_OPTION = typer.Option(False, "--json", help="Print JSON (for scripts and CI) instead of a table.")


@app.command("zoo")
def models_zoo(
    num_classes: int = typer.Option(
        91, "--num-classes", min=2, help="Classes including background, for the parameter count (91 = COCO)."
    ),
) -> None:
    """List the detectors `training_parameters.model_name` accepts, with size and pretrained weights.

    *Input* is the default `min_size-max_size` (shorter side scaled to min_size, longer side capped at
    max_size) or the square `image_size` of the SSD family; change it with those parameters.
    *layers* is the number of backbone layers `layers_to_freeze` can freeze. `pretrained: coco`
    needs a COCO column entry; `imagenet` works for every model.

    Examples:

    * `visionautoml models zoo`
    * `visionautoml models zoo --num-classes 2` (parameter counts for a one-class dataset)
    """
    from rich.table import Table

    from visionautoml.models.zoo import ZOO, parameter_count

    table = Table(title=f"Model zoo (parameters for {num_classes} classes including background)")
    table.add_column("model_name", no_wrap=True)
    for column in ("params", "input", "COCO", "layers"):
        table.add_column(column, justify="right" if column == "params" else "left", no_wrap=True)
    notes = []
    for name, entry in ZOO.items():
        if entry.note:
            notes.append(f"{name}: {entry.note}")
        table.add_row(
            name,
            f"{parameter_count(name, num_classes) / 1e6:.1f}M",
            entry.default_size.describe(),
            "yes" if entry.has_coco_weights else "-",
            str(entry.backbone_layers),
        )
    console.print(table)
    for line in notes:  # under the table, so the columns keep their width at 80 columns
        console.print(line, soft_wrap=True, highlight=False)


@app.command("list")
def models_list(
    config: Path | None = STORE_CONFIG_OPTION,
    workspace: str | None = STORE_WORKSPACE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List registered models: latest version and where each alias points.

    Examples:

    * `visionautoml models list`
    * `visionautoml models list --config examples/raccoon-sweep.yaml`
    * `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 visionautoml models list`
    """
    from rich.table import Table

    from visionautoml.tracking.registry import list_models, use_store_for

    models = list_models() if use_store_for(config, workspace) else []
    if as_json:
        typer.echo(json.dumps([asdict(model) for model in models], indent=2))
        return
    if not models:
        console.print("no registered models yet; `visionautoml train` a sweep config to register one.")
        return
    table = Table("model", "latest version", "aliases", "description")
    for model in models:
        aliases = ", ".join(f"{alias} -> v{version}" for alias, version in sorted(model.aliases.items()))
        table.add_row(model.name, str(model.latest_version or "-"), aliases, model.description)
    console.print(table)


@app.command("show")
def models_show(
    name: str = typer.Argument(..., help="Registered model name (see `visionautoml models list`)."),
    config: Path | None = STORE_CONFIG_OPTION,
    workspace: str | None = STORE_WORKSPACE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show every version of a registered model: aliases, primary metric, datasets, run.

    Examples:

    * `visionautoml models show raccoon-detector`
    * `visionautoml models show raccoon-detector --config examples/raccoon-sweep.yaml`
    """
    from rich.table import Table

    from visionautoml.errors import TrackingError
    from visionautoml.tracking.registry import list_versions, use_store_for
    from visionautoml.tracking.schema import Tag

    if not use_store_for(config, workspace):
        raise TrackingError(f"no registered model named '{name}': the tracking store does not exist yet")
    versions = list_versions(name)
    if as_json:
        typer.echo(json.dumps([version.to_dict() for version in versions], indent=2))
        return
    table = Table("version", "aliases", "mAP", "validation dataset", "model_name", "run", title=name)
    for version in versions:
        metric = version.metric()
        table.add_row(
            str(version.version),
            ", ".join(version.aliases),
            f"{metric:.4f}" if metric is not None else "-",
            version.tags.get(Tag.VALIDATION_DATASET, "-"),
            version.tags.get(Tag.MODEL_NAME, "-"),
            version.run_id or "-",
        )
    console.print(table)


@app.command("promote")
def models_promote(
    name: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Argument(..., min=1, help="The version to point the alias at."),
    alias: str = typer.Option(
        "champion", "--alias", "-a", help="The alias to move (champion, candidate ...)."
    ),
    config: Path | None = STORE_CONFIG_OPTION,
    workspace: str | None = STORE_WORKSPACE_OPTION,
) -> None:
    """Point an alias at a version by hand (a sweep's `promote_if_better` does it on evidence).

    Whatever loads `models:/NAME@ALIAS` from then on (serve, predict, export) gets that version.

    Examples:

    * `visionautoml models promote raccoon-detector 3 --alias champion`
    * `visionautoml models promote raccoon-detector 2 --alias champion` (roll back)
    """
    from visionautoml.errors import TrackingError
    from visionautoml.tracking.registry import set_alias, use_store_for

    if not use_store_for(config, workspace):
        raise TrackingError(f"no registered model named '{name}': the tracking store does not exist yet")
    info = set_alias(name, version, alias)
    console.print(
        f"{name}: alias '{alias}' -> version {info.version} (aliases now: {', '.join(info.aliases)})"
    )

"""The `visionautoml` command line: parses arguments, calls the layers, prints results.

Kept thin on purpose: every command is a few lines that call one function of the
package. Errors a user can fix (:class:`VisionAutoMLError`) are printed as one
message with exit code 1, never as a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

_FORMAT_HELP = "Input format: auto (from the layout), voc, coco, yolo or jsonl."
_DATASTORE_HELP = (
    "Local copy of the cloud datastore that AmlDatastore:// and azureml:// image URLs point into."
)


def _class_list(classes: str | None) -> list[str] | None:
    if classes is None:
        return None
    names = [name.strip() for name in classes.split(",") if name.strip()]
    if not names:
        raise typer.BadParameter(
            "give at least one class name, e.g. --classes cat,dog", param_hint="--classes"
        )
    return names


def _problem_table(problems: list, root: Path, title: str, limit: int | None = None):
    """Files inside the dataset are shown relative to it (the title names it), so rows stay short."""
    from rich.markup import escape
    from rich.table import Table

    base = f"{root.absolute()}/" if root.is_dir() else f"{root.absolute().parent}/"
    table = Table(title=f"{root}: {title}", title_justify="left", show_lines=False)
    table.add_column("severity")
    table.add_column("file", overflow="fold")
    table.add_column("field", overflow="fold")
    table.add_column("problem", overflow="fold")
    for problem in problems[:limit]:
        colour = "red" if problem.severity == "error" else "yellow"
        where = problem.file.removeprefix(base)
        where = where if problem.line is None else f"{where}:{problem.line}"
        table.add_row(
            f"[{colour}]{problem.severity}[/]",
            escape(where),
            escape(problem.field or ""),
            escape(problem.message),
        )
    if limit is not None and len(problems) > limit:
        table.caption = f"... and {len(problems) - limit} more"
    return table


@data_app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="Dataset folder, COCO .json file or AutoML .jsonl file."),
    source_format: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    classes: str | None = typer.Option(
        None, "--classes", help="Comma-separated class list; any other label is an error."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON (for CI) instead of a table."
    ),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) on warnings too."),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=_DATASTORE_HELP),
) -> None:
    """Check a labelled dataset and report every problem, not only the first.

    Reads the annotations (malformed XML/JSON, boxes outside the image or without area, unknown labels,
    images annotated twice) and decodes every image (missing, truncated or corrupt files; a real size
    that differs from the annotation, where the real size wins; EXIF rotation; the same picture under
    two names). Errors exit with status 1, warnings with 0 unless `--strict`.

    Layouts: VOC `annotations/*.xml` + `images/`; COCO `annotations.json`; YOLO `images/` + `labels/`
    + `data.yaml` or `classes.txt`; the cloud service's AutoML JSONL (a file, or a folder of `*.jsonl`).

    Examples:

    * `visionautoml data validate data/raccoon`
    * `visionautoml data validate data/raccoon --classes raccoon --strict`
    * `visionautoml data validate train_annotations.jsonl --datastore-root ./datastore --json`
    """
    from rich.markup import escape
    from rich.progress import Progress

    from visionautoml.data.validate import validate_dataset

    with Progress(console=err_console, transient=True, disable=as_json) as progress:
        task = progress.add_task("checking images", total=None)
        report = validate_dataset(
            path,
            source_format,
            classes=_class_list(classes),
            datastore_root=datastore_root,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if as_json:
        print(report.to_json())
    else:
        if report.problems.problems:
            console.print(_problem_table(report.problems.problems, path, "problems"))
        errors, warnings = len(report.problems.errors), len(report.problems.warnings)
        colour = "red" if report.failed(strict) else "green"
        console.print(
            f"[{colour}]{report.format}: {len(report.dataset.images)} usable images, "
            f"{report.dataset.box_count} boxes, classes: {escape(', '.join(report.dataset.classes))}; "
            f"{errors} errors, {warnings} warnings[/]",
            soft_wrap=True,
        )
    if report.failed(strict):
        raise typer.Exit(1)


@data_app.command("convert")
def data_convert(
    source: Path = typer.Argument(..., help="Dataset folder, COCO .json file or AutoML .jsonl file."),
    to: str = typer.Option(..., "--to", help="Output format: jsonl, coco, voc or yolo."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (created); what the format writes is replaced, the rest kept."
    ),
    source_format: str = typer.Option("auto", "--format", "-f", help=_FORMAT_HELP),
    validation_every: int | None = typer.Option(
        None,
        "--validation-every",
        min=2,
        help="Every Nth image (sorted by name, from the first) to validation.",
    ),
    validation_fraction: float | None = typer.Option(
        None,
        "--validation-fraction",
        min=0.0,
        max=1.0,
        help="This share of images to validation, stratified.",
    ),
    seed: int = typer.Option(42, "--seed", help="Seed of --validation-fraction's shuffle."),
    copy_images: bool = typer.Option(
        False, "--copy-images", help="JSONL/COCO: copy images to OUT/images/ so OUT is self-contained."
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="Comma-separated class list (fixes the order); other labels are errors."
    ),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=_DATASTORE_HELP),
) -> None:
    """Convert a dataset between VOC, COCO, YOLO and AutoML JSONL, optionally splitting it.

    JSONL output is `OUT/train_annotations.jsonl`, plus `OUT/validation_annotations.jsonl` with a split;
    without a split every image goes to the training file (training then holds out
    `validation_data_size` itself, as the cloud service does). `image_url`s are relative to OUT, or
    `images/NAME` with `--copy-images`. Other formats with a split get `OUT/train/` and
    `OUT/validation/`, each a complete dataset; VOC and YOLO always copy the images.

    `--validation-every N` sends image i (0-based, sorted by name) to validation when i % N == 0, as the
    original CI flow did with N=5. `--validation-fraction F --seed S` sends about F of the images,
    stratified by each image's rarest class. The same input and options give byte-identical output;
    outputs are written all at once (nothing half-written on failure). A dataset with errors is
    refused: run `visionautoml data validate` for the full report. Warnings are shown.

    Examples:

    * `visionautoml data convert data/raccoon --to jsonl --out data/jsonl --validation-every 5`
    * `visionautoml data convert data/raccoon --to coco --out data/coco --validation-fraction 0.2 --seed 1`
    * `visionautoml data convert export.jsonl --to voc --out data/voc --datastore-root ./datastore`
    """
    from visionautoml.data.convert import convert

    with err_console.status(f"converting {source}"):
        result = convert(
            source,
            out,
            to,
            format=source_format,
            validation_every=validation_every,
            validation_fraction=validation_fraction,
            seed=seed,
            copy_images=copy_images,
            classes=_class_list(classes),
            datastore_root=datastore_root,
        )
    if result.warnings:
        err_console.print(_problem_table(result.warnings, source, "warnings", limit=20))
    split = f", {result.validation_images} for validation" if result.validation_images else ""
    console.print(
        f"{to}: {result.train_images} training images{split}, classes: {', '.join(result.classes)}; "
        f"wrote {', '.join(str(path) for path in result.outputs)}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


# --- data: fetch, register, list, show, stats (owner: data-ops) -------------------------------


@data_app.command("fetch")
def data_fetch(
    source: str = typer.Argument(..., help="http(s):// or file:// URL, local zip/tar archive, or folder."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder to fill: created; must be empty or an earlier fetch's output."
    ),
    sha256: str | None = typer.Option(None, "--sha256", help="Expected sha256; checked before unpacking."),
    max_size: str = typer.Option("10GiB", "--max-size", help="Refuse archives unpacking to more than this."),
    max_ratio: float = typer.Option(
        200.0, "--max-ratio", help="Refuse archives that unpack to more than this many times their size."
    ),
    force: bool = typer.Option(False, "--force", help="Download and unpack again even if already fetched."),
) -> None:
    """Download or copy a labelled dataset into a folder, verified and unpacked safely.

    Archives (zip, tar, tar.gz/.bz2/.xz) are unpacked; entries that would land outside `--out`
    (`../x`, absolute paths), links, device files and decompression bombs are refused. Transient
    server errors are retried with backoff. Fetching the same verified archive again does nothing.

    Examples:

    * `visionautoml data fetch https://example.org/raccoon.zip --out data/raccoon --sha256 9f86d0...`
    * `visionautoml data fetch file:///srv/exports/voc.tar.gz --out data/voc`
    * `visionautoml data fetch ~/Downloads/raccoon.zip --out data/raccoon --max-size 2GiB`
    """
    from visionautoml.data.fetch import fetch, parse_size, read_marker

    before = read_marker(out)
    path = fetch(source, out, sha256, max_size=parse_size(max_size), max_ratio=max_ratio, force=force)
    after = read_marker(path) or {}
    if before == after:
        message = f"{path}: already holds this content (sha256 {after.get('sha256')}); nothing to do."
        console.print(message, soft_wrap=True)
    else:
        console.print(f"{path}: fetched {after.get('source')} (sha256 {after.get('sha256')})", soft_wrap=True)


_STORE_OPTION = typer.Option(
    ".visionautoml/datasets",
    "--store",
    envvar="VISIONAUTOML_DATASET_STORE",
    help="Dataset store: a folder or any fsspec URL (s3://bucket/datasets ...).",
)


@data_app.command("register")
def data_register(
    path: str = typer.Argument(..., help="Dataset folder (VOC, COCO ...) or AutoML JSONL file."),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name: letters, digits, '.', '_', '-'."),
    format: str = typer.Option("auto", "--format", help="Input format; auto-detected by default."),
    datastore_root: Path | None = typer.Option(
        None, "--datastore-root", help="Local folder that AmlDatastore:// image URLs in a JSONL point into."
    ),
    store: str = _STORE_OPTION,
) -> None:
    """Register an immutable, numbered version of a dataset and print `NAME:VERSION`.

    The images and annotations are copied into the store as AutoML JSONL plus images. The
    version is content-addressed: registering identical content again (from any path or
    format) prints the existing version and copies nothing.

    Examples:

    * `visionautoml data register data/raccoon --name raccoon` prints `raccoon:1`
    * `visionautoml data register out/train_annotations.jsonl --name raccoon-train`
    * `visionautoml data register data/voc --name voc --store s3://team-bucket/datasets`
    """
    from visionautoml.data.versions import DatasetStore

    version = DatasetStore(store).register(path, name, format=format, datastore_root=datastore_root)
    if version.reused:
        err_console.print(f"identical content is already {version.ref}; nothing copied.")
    else:
        err_console.print(
            f"registered {version.image_count} images, {version.box_count} boxes "
            f"(digest {version.digest[:12]}) in {version.path}",
            soft_wrap=True,
        )
    typer.echo(version.ref)


@data_app.command("list")
def data_list(
    name: str | None = typer.Argument(None, help="Only this dataset's versions."), store: str = _STORE_OPTION
) -> None:
    """List registered dataset versions.

    Examples:

    * `visionautoml data list`
    * `visionautoml data list raccoon --store /mnt/shared/datasets`
    """
    from rich.table import Column, Table

    from visionautoml.data.versions import DatasetStore

    versions = DatasetStore(store).list(name)
    if not versions:
        console.print(f"no datasets registered in {store}; add one with `visionautoml data register`.")
        return
    fixed = [Column(heading, no_wrap=True) for heading in ("dataset", "version", "images", "boxes")]
    folded = [Column(heading, overflow="fold") for heading in ("classes", "digest", "created", "source")]
    table = Table(*fixed, *folded)
    for item in versions:
        more = len(item.classes) - 5
        classes = ", ".join(item.classes[:5]) + (f" (+{more})" if more > 0 else "")
        row = (item.name, str(item.version), str(item.image_count), str(item.box_count), classes)
        table.add_row(*row, item.digest[:12], item.created[:16].replace("T", " "), item.source)
    console.print(table)


@data_app.command("show")
def data_show(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION (latest version when omitted)."),
    store: str = _STORE_OPTION,
) -> None:
    """Show one dataset version: where it is, its digest, counts and classes.

    Examples:

    * `visionautoml data show raccoon` (latest version)
    * `visionautoml data show raccoon:2`
    """
    from rich.table import Column, Table

    from visionautoml.data.versions import DatasetStore, parse_ref

    version = DatasetStore(store).get(*parse_ref(ref))
    table = Table("field", Column("value", overflow="fold"), title=version.ref, show_header=False)
    for field, value in (
        ("path", version.path),
        ("annotations", version.annotations),
        ("digest", version.digest),
        ("images", str(version.image_count)),
        ("boxes", str(version.box_count)),
        ("classes", ", ".join(version.classes)),
        ("created", version.created),
        ("source", version.source),
    ):
        table.add_row(field, value)
    console.print(table)


@data_app.command("stats")
def data_stats(
    path: str = typer.Argument(..., help="Dataset folder or annotation file (any supported format)."),
    format: str = typer.Option("auto", "--format", help="Input format; auto-detected by default."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write histograms and sample images here."),
    samples: int = typer.Option(8, "--samples", min=0, help="Sample images in the plot."),
    datastore_root: Path | None = typer.Option(
        None, "--datastore-root", help="Local folder that AmlDatastore:// image URLs in a JSONL point into."
    ),
    html: Path | None = typer.Option(
        None, "--html", help="Also write a self-contained HTML overview (charts, sample images) here."
    ),
) -> None:
    """Summarise a dataset: images, boxes per class, boxes per image, box sizes and shapes.

    Examples:

    * `visionautoml data stats data/raccoon`
    * `visionautoml data stats train_annotations.jsonl --plot stats.png`
    * `visionautoml data stats data/raccoon --html raccoon.html` (open it in any browser, offline)
    """
    from visionautoml.data.formats import read_dataset
    from visionautoml.data.problems import ProblemLog
    from visionautoml.data.stats import compute_stats, plot_stats, stats_tables

    problems = ProblemLog()
    dataset = read_dataset(path, format, problems=problems, datastore_root=datastore_root)
    if problems.errors:
        err_console.print(
            f"warning: {len(problems.errors)} problem(s) in the dataset; the numbers cover what could be "
            "read. Run `visionautoml data validate` for the details."
        )
    stats = compute_stats(dataset)
    for table in stats_tables(stats):
        console.print(table)
    if plot is not None:
        console.print(f"plot written to {plot_stats(dataset, stats, plot, samples)}", soft_wrap=True)
    if html is not None:
        from visionautoml.data.overview import write_overview

        page = write_overview(dataset, html, stats=stats, samples=samples, source=str(path))
        console.print(f"overview written to {page}", soft_wrap=True)


# --- models zoo (owner: models) ---------------------------------------------------------------

models_app = typer.Typer(help="The model zoo, and trained and registered models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("zoo")
def models_zoo(
    num_classes: int = typer.Option(
        91, "--num-classes", min=2, help="Classes including background, for the parameter count (91 = COCO)."
    ),
) -> None:
    """List the detectors `training_parameters.model_name` accepts, with size and pretrained weights.

    *Input* is the default `min_size-max_size` (shorter side scaled to min_size, longer side capped at
    max_size) or the square `image_size` of the SSD family; change it with those parameters.
    *Freezable* is the number of backbone layers `layers_to_freeze` can freeze. `pretrained: coco`
    needs a COCO column entry; `imagenet` works for every model.

    Examples:

    * `visionautoml models zoo`
    * `visionautoml models zoo --num-classes 2` (parameter counts for a one-class dataset)
    """
    from rich.table import Table

    from visionautoml.models.zoo import ZOO, parameter_count

    table = Table(title=f"Model zoo (parameters for {num_classes} classes including background)")
    table.add_column("model_name", no_wrap=True)
    table.add_column("parameters", justify="right")
    for column in ("input", "COCO", "freezable", "notes"):
        table.add_column(column)
    for name, entry in ZOO.items():
        table.add_row(
            name,
            f"{parameter_count(name, num_classes) / 1e6:.1f}M",
            entry.default_size.describe(),
            "yes" if entry.coco_weights else "-",
            str(entry.backbone_layers),
            entry.note,
        )
    console.print(table)


# --- train, evaluate (owner: trainer) ---------------------------------------------------------


@app.command("train")
def train(
    config: Path = typer.Argument(
        ..., help="Job config YAML: data, training_parameters, tracking (see examples/)."
    ),
    training_data: str | None = typer.Option(
        None,
        "--training-data",
        help="Overrides training_data: a dataset folder or file (VOC, COCO, YOLO, JSONL), a `data convert` "
        "output folder (its validation_annotations.jsonl becomes the validation data) or a registered "
        "NAME:VERSION.",
    ),
    validation_data: str | None = typer.Option(
        None,
        "--validation-data",
        help="Overrides validation_data; without any, validation_data_size of the training images is "
        "split off.",
    ),
    experiment: str | None = typer.Option(None, "--experiment", help="Overrides experiment_name (MLflow)."),
    output_json: Path | None = typer.Option(
        None,
        "--output-json",
        help="Write run_id, model_uri and the best evaluation's metrics here (atomically).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Sweeps: continue this config's interrupted sweep (finished trials are kept)."
    ),
) -> None:
    """Train a detector: one trial, or a sweep when the config has a search_space or limits.max_trials > 1.

    The run goes to MLflow: `MLFLOW_TRACKING_URI` if set, else the config's tracking.uri, else a
    SQLite store in the workspace (`mlflow ui --backend-store-uri sqlite:///.visionautoml/mlflow.db`
    shows it). Params, per-epoch losses and metrics, dataset digests, the git commit and the model
    (an MLflow pyfunc answering in the AutoML box format) are logged. Bad config values fail
    before any work, naming the field. Interrupted? Run the same command again: the trial
    resumes from its last checkpoint. Exits 1 when the trial fails, printing the reason.

    Examples:

    * `visionautoml data convert ../shared/datasets/raccoon --to jsonl --out data/raccoon
      --validation-every 5`, then `visionautoml train examples/raccoon-single.yaml`
    * `visionautoml train job.yaml --experiment nightly --output-json out/result.json`
    * `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 visionautoml train job.yaml`
    """
    from visionautoml.config import load_config
    from visionautoml.tracking.auth import login

    overrides = {
        "training_data": training_data,
        "validation_data": validation_data,
        "experiment_name": experiment,
    }
    job, who = login(load_config(config, overrides))
    err_console.print(f"tracking: {who}", soft_wrap=True)
    if job.search_space or job.limits.max_trials > 1:
        from visionautoml.automl.sweep import run_sweep

        run_sweep(job, resume=resume, output_json=output_json, console=err_console)
        return

    from visionautoml.training.trial import run_trial, summary_line, write_result

    result = run_trial(job)
    if result.status != "FINISHED":
        from visionautoml.errors import TrainingError

        raise TrainingError(f"the trial failed (MLflow run {result.run_id}): {result.failure_reason}")
    if output_json:
        write_result(result, output_json)
    console.print(summary_line(result), soft_wrap=True)


@app.command("evaluate")
def evaluate(
    model: str = typer.Argument(
        ..., help="runs:/RUN_ID/model, models:/NAME@ALIAS, models:/NAME/VERSION or a saved-model folder."
    ),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Labelled validation data in any supported format (VOC, COCO, JSONL, YOLO)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for metrics.json, ground_truth.json, detections.json and plots/."
    ),
    metric_type: str | None = typer.Option(
        None, "--metric-type", help="What mean_average_precision is: voc (default), coco or coco_voc."
    ),
    iou_threshold: float | None = typer.Option(
        None, "--iou-threshold", help="IoU of map_voc, precision and recall (validation_iou_threshold, 0.5)."
    ),
    score_threshold: float | None = typer.Option(
        None, "--score-threshold", help="Score of precision and recall; default: the model's threshold."
    ),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N; default: cuda if any."),
    plots: bool = typer.Option(
        True, "--plots/--no-plots", help="Also draw PR curves, a confusion matrix and the worst images."
    ),
) -> None:
    """Score a model on labelled data: COCO mAP, the cloud service's VOC mAP, precision, recall, per-class AP.

    Writes `metrics.json`, plus `ground_truth.json` (COCO instances) and `detections.json` (COCO
    results) from which pycocotools reproduces the COCO numbers, and diagnostic plots in `plots/`.

    Examples:

    * `visionautoml evaluate models:/raccoon@champion --data data/raccoon-val --out eval/`
    * `visionautoml evaluate runs:/3f2a.../model --data validation.jsonl --out eval/ --metric-type coco`
    * `visionautoml evaluate ./model --data data/voc --out eval/ --iou-threshold 0.75 --no-plots`
    """
    from visionautoml.config import parse_config
    from visionautoml.training.evaluate import evaluate_model, summary_table, write_evaluation
    from visionautoml.training.plots import write_trial_plots

    chosen = {
        "validation_metric_type": metric_type,
        "validation_iou_threshold": iou_threshold,
        "box_score_threshold": score_threshold,
    }
    raw = {"training_parameters": {key: value for key, value in chosen.items() if value is not None}}
    params = parse_config(raw, source="command line").training_parameters
    evaluation, dataset = evaluate_model(model, data, params, device=device, console=err_console)
    written = write_evaluation(out, evaluation)
    if plots:
        written += write_trial_plots(out / "plots", evaluation, dataset)
    console.print(summary_table(evaluation))
    console.print(f"wrote {len(written)} files to {out}", soft_wrap=True)


# --- models list/show/promote, sweep (owner: automl) ------------------------------------------

_STORE_CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Job YAML whose tracking store to use (its tracking.uri or workspace)."
)
_STORE_WORKSPACE_OPTION = typer.Option(
    None, "--workspace", help="Workspace whose SQLite store to use (default: the config's, or .visionautoml)."
)


def _use_model_store(config: Path | None, workspace: str | None) -> str | None:
    """MLFLOW_TRACKING_URI > the config's tracking.uri > the workspace's SQLite store; None if absent."""
    from visionautoml.config import JobConfig, load_config
    from visionautoml.tracking.registry import use_store

    job = load_config(config) if config else JobConfig()
    if workspace:
        job = job.model_copy(update={"workspace": workspace})
    return use_store(job)


@models_app.command("list")
def models_list(
    config: Path | None = _STORE_CONFIG_OPTION, workspace: str | None = _STORE_WORKSPACE_OPTION
) -> None:
    """List registered models: latest version and where each alias points.

    Examples:

    * `visionautoml models list`
    * `visionautoml models list --config examples/raccoon-sweep.yaml`
    * `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 visionautoml models list`
    """
    from rich.table import Table

    from visionautoml.tracking.registry import list_models

    models = list_models() if _use_model_store(config, workspace) else []
    if not models:
        console.print("no registered models yet; `visionautoml train` a sweep config to register one.")
        return
    table = Table("model", "latest version", "aliases", "description")
    for model in models:
        aliases = ", ".join(f"{alias} -> v{version}" for alias, version in sorted(model.aliases.items()))
        table.add_row(model.name, str(model.latest_version or "-"), aliases, model.description)
    console.print(table)


@models_app.command("show")
def models_show(
    name: str = typer.Argument(..., help="Registered model name (see `visionautoml models list`)."),
    config: Path | None = _STORE_CONFIG_OPTION,
    workspace: str | None = _STORE_WORKSPACE_OPTION,
) -> None:
    """Show every version of a registered model: aliases, primary metric, datasets, run.

    Examples:

    * `visionautoml models show raccoon-detector`
    * `visionautoml models show raccoon-detector --config examples/raccoon-sweep.yaml`
    """
    from rich.table import Table

    from visionautoml.errors import TrackingError
    from visionautoml.tracking.registry import VALIDATION_DATASET_TAG, list_versions

    if not _use_model_store(config, workspace):
        raise TrackingError(f"no registered model named '{name}': the tracking store does not exist yet")
    table = Table("version", "aliases", "mAP", "validation dataset", "model_name", "run", title=name)
    for version in list_versions(name):
        metric = version.metric()
        table.add_row(
            str(version.version),
            ", ".join(version.aliases),
            f"{metric:.4f}" if metric is not None else "-",
            version.tags.get(VALIDATION_DATASET_TAG, "-"),
            version.tags.get("model_name", "-"),
            version.run_id or "-",
        )
    console.print(table)


@models_app.command("promote")
def models_promote(
    name: str = typer.Argument(..., help="Registered model name."),
    version: int = typer.Argument(..., min=1, help="The version to point the alias at."),
    alias: str = typer.Option(
        "champion", "--alias", "-a", help="The alias to move (champion, candidate ...)."
    ),
    config: Path | None = _STORE_CONFIG_OPTION,
    workspace: str | None = _STORE_WORKSPACE_OPTION,
) -> None:
    """Point an alias at a version by hand (a sweep's `promote_if_better` does it on evidence).

    Whatever loads `models:/NAME@ALIAS` from then on (serve, predict, export) gets that version.

    Examples:

    * `visionautoml models promote raccoon-detector 3 --alias champion`
    * `visionautoml models promote raccoon-detector 2 --alias champion` (roll back)
    """
    from visionautoml.errors import TrackingError
    from visionautoml.tracking.registry import set_alias

    if not _use_model_store(config, workspace):
        raise TrackingError(f"no registered model named '{name}': the tracking store does not exist yet")
    info = set_alias(name, version, alias)
    console.print(
        f"{name}: alias '{alias}' -> version {info.version} (aliases now: {', '.join(info.aliases)})"
    )


# --- export, predict, serve (owner: deploy) ----------------------------------------------------

_MODEL_ARGUMENT_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a saved-model folder or an ONNX export "
    "folder. The tracking store is MLFLOW_TRACKING_URI, else ./.visionautoml/mlflow.db."
)
_BACKEND_HELP = "auto: ONNX Runtime when an export is found (--onnx, the model's onnx/ folder), else PyTorch."


def _check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise typer.BadParameter(f"'{value}' is not one of {', '.join(choices)}", param_hint=option)
    return value


@app.command("export")
def export(
    model: str = typer.Argument(..., help=_MODEL_ARGUMENT_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx, labels.json, settings.json."),
    format: str = typer.Option("onnx", "--format", help="Export format; onnx is the one there is."),
    images: list[Path] = typer.Option(
        [], "--images", help="Images or folders for the parity check (repeatable); default: validation data."
    ),
    attach: bool = typer.Option(
        False, "--attach", help="Also upload the export into the tracked model, where `serve` finds it."
    ),
    tolerance: float = typer.Option(0.01, "--tolerance", help="Largest box difference (px) parity accepts."),
) -> None:
    """Export a trained detector to ONNX and check it predicts what PyTorch predicts.

    The whole inference path (resize, NMS, box scaling) is in the graph; it takes one float
    CHW image of any size. Parity: ONNX Runtime and PyTorch must give the same labels and
    boxes (within `--tolerance` px) for the top detections of sample images: `--images`, else the
    model's validation images, else synthetic ones. The result goes to `parity.json` and, for a
    tracked model, to tags on the model version. Nothing is written if parity fails.

    Examples:

    * `visionautoml export models:/raccoon@champion --format onnx --out exports/raccoon`
    * `visionautoml export runs:/3f2a.../model --out exports/trial --images data/raccoon/images`
    * `visionautoml export models:/raccoon/3 --out exports/raccoon-3 --attach`
    """
    from visionautoml.deploy.export import export_model

    _check_choice(format, ("onnx",), "--format")
    result = export_model(model, out, images=images, attach=attach, tolerance_px=tolerance)
    console.print(result.parity.summary(), soft_wrap=True)
    for record in result.recorded_on:
        console.print(record, soft_wrap=True)
    console.print(f"wrote {result.directory}", soft_wrap=True)


@app.command("predict")
def predict(
    model: str = typer.Argument(..., help=_MODEL_ARGUMENT_HELP),
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for predictions.jsonl/.csv (and images/)."),
    output_format: str = typer.Option("jsonl", "--format", help="jsonl (one /score answer a line) or csv."),
    draw: bool = typer.Option(False, "--draw", help="Also write each image with its boxes to OUT/images/."),
    onnx: Path | None = typer.Option(None, "--onnx", help="An export folder to run instead of the model."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images decoded and scored together."),
) -> None:
    """Score images in batch; boxes in the cloud service's format (fractions of the image size).

    Unreadable images are listed in `OUT/skipped.jsonl` and skipped; the rest are scored.

    Examples:

    * `visionautoml predict models:/raccoon@champion data/new-photos --out predictions/`
    * `visionautoml predict ./model photo1.jpg photo2.png --out out/ --format csv --draw`
    * `visionautoml predict models:/raccoon/3 data/ --out out/ --onnx exports/raccoon-3`
    """
    from visionautoml.deploy.predict import predict_images
    from visionautoml.deploy.runtime import load_for_inference

    _check_choice(output_format, ("jsonl", "csv"), "--format")
    _check_choice(backend, ("auto", "onnx", "pytorch"), "--backend")
    loaded = load_for_inference(model, onnx=onnx, backend=backend)
    err_console.print(f"scoring with {loaded.spec.model_name} on {loaded.backend}", soft_wrap=True)
    summary = predict_images(
        loaded,
        images,
        out,
        output_format=output_format,
        draw=draw,
        batch_size=batch_size,
        console=err_console,
    )
    for name, reason in summary.skipped:
        err_console.print(Text.assemble(("skipped ", "yellow"), f"{name}: {reason}"), soft_wrap=True)
    console.print(
        f"scored {summary.scored} images ({summary.boxes} boxes), skipped {len(summary.skipped)}: "
        f"{summary.output}",
        soft_wrap=True,
    )


@app.command("serve")
def serve(
    model: str = typer.Argument(..., help=_MODEL_ARGUMENT_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 means every one."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
    workers: int = typer.Option(1, "--workers", min=1, help="Server processes, each loads the model."),
    onnx: Path | None = typer.Option(None, "--onnx", help="An export folder to run instead of the model."),
    backend: str = typer.Option("auto", "--backend", help=_BACKEND_HELP),
    concurrency: int = typer.Option(2, "--concurrency", min=1, help="Inference threads per process."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds a request may wait (else 504)."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb", min=0.001, help="Largest request body (413)."),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", min=1, help="Largest image, in pixels (413)."),
    max_images: int = typer.Option(16, "--max-images", min=1, help="Most images in one request (413)."),
) -> None:
    """Serve the model over HTTP with the cloud endpoint's request and response.

    `POST /score` takes multipart uploads (field `file` or `files`) or the JSON
    `{"input_data": {"columns": ["image"], "data": ["<base64>", ...]}}` and returns
    `[{"filename", "boxes": [{"box": {"topX", "topY", "bottomX", "bottomY"}, "label", "score"}]}]`.
    Also `GET /health`, `/ready`, `/metadata` and the OpenAPI docs at `/docs`.

    Set `VISIONAUTOML_API_KEY` in the environment to require `Authorization: Bearer KEY` or
    `x-api-key: KEY` on `/score` and `/metadata` (401 otherwise); `/health` and `/ready` stay open
    for probes. There is no flag for the key on purpose: flags show in `ps` and shell history.

    Examples:

    * `visionautoml serve models:/raccoon@champion`
    * `VISIONAUTOML_API_KEY=... visionautoml serve models:/raccoon/3 --host 0.0.0.0 --workers 2`
    * `curl -F file=@raccoon.jpg http://127.0.0.1:8080/score`
    """
    from visionautoml.deploy.runtime import locate_model
    from visionautoml.deploy.serve import API_KEY_ENV, ServeSettings, api_key_from_environment
    from visionautoml.deploy.serve import serve as run_server

    _check_choice(backend, ("auto", "onnx", "pytorch"), "--backend")
    location = locate_model(model, onnx=onnx, backend=backend)
    settings = ServeSettings(
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_pixels=max_pixels,
        max_images=max_images,
        timeout_s=timeout,
        concurrency=concurrency,
    )
    key = "required" if api_key_from_environment() else f"not required (set {API_KEY_ENV} to require one)"
    address = f"http://{host}:{port}"
    err_console.print(
        f"serving {location.source} ({location.backend}) on {address}, docs at {address}/docs, API key {key}",
        soft_wrap=True,
    )
    run_server(location, host=host, port=port, workers=workers, settings=settings)


# --- pipeline, runs, secrets (owner: pipeline) -------------------------------------------------

secrets_app = typer.Typer(
    help="Check the ${secret:...} references of a config (values are never shown).", no_args_is_help=True
)
app.add_typer(secrets_app, name="secrets")


@app.callback()
def _refuse_secrets_on_command_line() -> None:
    # Runs before every command: a credential typed as an argument is readable in the process list.
    from visionautoml.pipeline.secrets import refuse_secret_arguments

    refuse_secret_arguments(sys.argv[1:])


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

    from visionautoml.pipeline.secrets import check_config_secrets, load_config_with_secrets, masked_output
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
app.add_typer(pipeline_app, name="pipeline")
runs_app = typer.Typer(help="Pipeline runs of a workspace: list, show, logs, wait.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
WorkspaceOption = typer.Option(
    Path(".visionautoml"), "--workspace", "-w", help="The config's workspace folder."
)


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
    * `visionautoml pipeline run examples/raccoon.yaml --detach` then `visionautoml runs wait RUN_ID`
    """
    from visionautoml.pipeline.run import detach_pipeline, run_pipeline

    output = str(output_json) if output_json else None
    if detach:
        record = detach_pipeline(config, data=data, output_json=output)
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
    run_pipeline(config, data=data, output_json=output)


@runs_app.command("list")
def runs_list(workspace: Path = WorkspaceOption) -> None:
    """List the pipeline runs of a workspace, newest last.

    Examples: `visionautoml runs list`, `visionautoml runs list --workspace /srv/visionautoml`
    """
    from rich.table import Table

    from visionautoml.pipeline.jobs import list_runs

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
    from visionautoml.pipeline.secrets import mask

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
    timeout: float | None = typer.Option(
        None, "--timeout", help="Give up after this many minutes with exit code 124 (the run goes on)."
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
    * `visionautoml runs wait 20260301-101500-a1b2c3 --timeout 50`
    * `visionautoml runs wait 20260301-101500-a1b2c3 --cluster http://10.0.0.4:8265` (a Ray job submitted
      by another CI agent)
    """
    from visionautoml.pipeline.jobs import FINAL, SUCCEEDED, wait_for

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    timeout_s = timeout * 60 if timeout is not None else None
    record = wait_for(workspace, run_id, timeout_s=timeout_s, on_output=show, ray_dashboard=cluster)
    status = record.effective_status()
    if status == SUCCEEDED:
        console.print(f"outcome of pipeline run {run_id}: succeeded")
        return
    if status not in FINAL:
        message = f"pipeline run {run_id} is still {status} after {timeout:g} minute(s); wait again"
        err_console.print(message, soft_wrap=True)
        raise typer.Exit(124)
    reason = record.error or "its process ended without recording an outcome (killed or out of memory)"
    err_console.print(f"pipeline run {run_id} {status}: {reason}", soft_wrap=True, markup=False)
    raise typer.Exit(1)


# --- report (owner: reports) ------------------------------------------------------------------


@app.command("report")
def report(
    run_id: str = typer.Argument(..., help="MLflow run id of a sweep's parent run, or of a single trial."),
    out: Path = typer.Option(..., "--out", "-o", help="HTML file to write (one self-contained file)."),
    workspace: Path = typer.Option(
        Path(".visionautoml"), "--workspace", "-w", help="Workspace whose SQLite MLflow store holds the run."
    ),
    tracking_uri: str | None = typer.Option(
        None, "--tracking-uri", help="MLflow store to read instead (overrides MLFLOW_TRACKING_URI too)."
    ),
) -> None:
    """Write the HTML report of a sweep or a trial, from the tracking store alone.

    A sweep's report has its leaderboard, the metric curves of every trial on one chart,
    hyperparameters against the primary metric, which trials early termination stopped and
    when, the best model's diagnostic plots (drawn predictions, precision-recall, confusion
    matrix), the dataset versions with their class counts and the config. A trial's report has
    its curves, plots, datasets and parameters. Images are embedded: open the file anywhere,
    offline. The store is `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the workspace's
    `mlflow.db`; credentials come from MLflow's usual environment variables.

    Examples:

    * `visionautoml report 3f2a9c... --out sweep.html` (run id from the sweep's output or `mlflow ui`)
    * `visionautoml report 3f2a9c... --out sweep.html --workspace /srv/visionautoml`
    * `MLFLOW_TRACKING_URI=https://mlflow.example.org visionautoml report 3f2a9c... -o report.html`
    """
    from mlflow import MlflowClient

    from visionautoml.automl.report import build_sweep_report
    from visionautoml.config import JobConfig
    from visionautoml.errors import TrackingError
    from visionautoml.tracking.workspace import resolve_tracking_uri

    uri = tracking_uri or resolve_tracking_uri(JobConfig(workspace=str(workspace)))
    database = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if database is not None and not database.is_file():
        raise TrackingError(
            f"{database}: no MLflow store there; pass the sweep's --workspace, or --tracking-uri / "
            "MLFLOW_TRACKING_URI for a tracking server"
        )
    with err_console.status(f"reading run {run_id}"):
        path = build_sweep_report(run_id, out, MlflowClient(uri))
    console.print(f"report written to {path}", soft_wrap=True)


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

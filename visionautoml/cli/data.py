"""`visionautoml data ...`: read, check, convert, fetch, version and summarise labelled datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from visionautoml.cli.common import (
    DATASTORE_HELP,
    DEFAULT_STORE,
    FORMAT_HELP,
    STORE_HELP,
    DataFormat,
    InputFormat,
    class_list,
    console,
    err_console,
    parse_duration,
    problem_table,
    repairs_line,
)

DROP_INVALID_HELP = (
    "Skip images with errors that cannot be repaired (unreadable image, a box wholly outside), each "
    "reported, instead of refusing the dataset. Zero-area boxes are dropped and boxes partly outside "
    "clipped either way, with a warning each; the source files are never changed."
)
IMAGE_ROOT_HELP = (
    "A folder the dataset's image paths may point into besides the dataset's own (paths that leave "
    "both are refused)."
)

app = typer.Typer(help="Read, check, convert, fetch and version labelled datasets.", no_args_is_help=True)


@app.command("validate")
def data_validate(
    path: Path = typer.Argument(..., help="Dataset folder, COCO .json file or AutoML .jsonl file."),
    source_format: InputFormat = typer.Option(InputFormat.auto, "--format", "-f", help=FORMAT_HELP),
    classes: str | None = typer.Option(
        None, "--classes", help="Comma-separated class list; any other label is an error."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the report as JSON (for CI) instead of a table."
    ),
    strict: bool = typer.Option(False, "--strict", help="Fail (exit 1) on warnings too."),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
    drop_invalid: bool = typer.Option(False, "--drop-invalid", help=DROP_INVALID_HELP),
    image_root: Path | None = typer.Option(None, "--image-root", help=IMAGE_ROOT_HELP),
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

    from visionautoml.data.validate import validate_dataset
    from visionautoml.progress import progress_bar

    with progress_bar(Console(stderr=True, quiet=as_json)) as progress:
        task = progress.add_task("checking images", total=None)
        report = validate_dataset(
            path,
            source_format,
            classes=class_list(classes),
            datastore_root=datastore_root,
            image_root=image_root,
            drop_invalid=drop_invalid,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if as_json:
        print(report.to_json())
    else:
        if report.problems.problems:
            console.print(problem_table(report.problems.problems, path, "problems"))
        errors, warnings = len(report.problems.errors), len(report.problems.warnings)
        colour = "red" if report.failed(strict) else "green"
        console.print(
            f"[{colour}]{report.format}: {len(report.dataset.images)} usable images, "
            f"{report.dataset.box_count} boxes, classes: {escape(', '.join(report.dataset.classes))}; "
            f"{errors} errors, {warnings} warnings[/]",
            soft_wrap=True,
        )
        repaired = repairs_line(report.problems.summary())
        if repaired:
            console.print(repaired, soft_wrap=True, markup=False)
    if report.failed(strict):
        raise typer.Exit(1)


@app.command("convert")
def data_convert(
    source: Path = typer.Argument(..., help="Dataset folder, COCO .json file or AutoML .jsonl file."),
    to: DataFormat = typer.Option(..., "--to", help="Output format: jsonl, coco, voc or yolo."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder (created); what the format writes is replaced, the rest kept."
    ),
    source_format: InputFormat = typer.Option(InputFormat.auto, "--format", "-f", help=FORMAT_HELP),
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
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
    drop_invalid: bool = typer.Option(False, "--drop-invalid", help=DROP_INVALID_HELP),
    image_root: Path | None = typer.Option(None, "--image-root", help=IMAGE_ROOT_HELP),
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
            classes=class_list(classes),
            datastore_root=datastore_root,
            image_root=image_root,
            drop_invalid=drop_invalid,
        )
    if result.warnings:
        err_console.print(problem_table(result.warnings, source, "warnings", limit=20))
    split = f", {result.validation_images} for validation" if result.validation_images else ""
    console.print(
        f"{to.value}: {result.train_images} training images{split}, classes: {', '.join(result.classes)}; "
        f"wrote {', '.join(str(path) for path in result.outputs)}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )
    repaired = repairs_line(result.summary)
    if repaired:
        err_console.print(repaired, soft_wrap=True, markup=False)


@app.command("fetch")
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
    timeout: str = typer.Option(
        "30s", "--timeout", help="Give up on a server that sends nothing for this long: 30s, 2m ..."
    ),
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
    path = fetch(
        source,
        out,
        sha256,
        max_size=parse_size(max_size),
        max_ratio=max_ratio,
        force=force,
        timeout=parse_duration(timeout),
    )
    after = read_marker(path) or {}
    if before == after:
        message = f"{path}: already holds this content (sha256 {after.get('sha256')}); nothing to do."
        console.print(message, soft_wrap=True)
    else:
        console.print(f"{path}: fetched {after.get('source')} (sha256 {after.get('sha256')})", soft_wrap=True)


_STORE_OPTION = typer.Option(DEFAULT_STORE, "--store", envvar="VISIONAUTOML_DATASET_STORE", help=STORE_HELP)


@app.command("register")
def data_register(
    path: str = typer.Argument(..., help="Dataset folder (VOC, COCO ...) or AutoML JSONL file."),
    name: str = typer.Option(..., "--name", "-n", help="Dataset name: letters, digits, '.', '_', '-'."),
    source_format: InputFormat = typer.Option(InputFormat.auto, "--format", "-f", help=FORMAT_HELP),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
    drop_invalid: bool = typer.Option(False, "--drop-invalid", help=DROP_INVALID_HELP),
    image_root: Path | None = typer.Option(None, "--image-root", help=IMAGE_ROOT_HELP),
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

    version = DatasetStore(store).register(
        path,
        name,
        format=source_format,
        datastore_root=datastore_root,
        image_root=image_root,
        drop_invalid=drop_invalid,
    )
    if version.reused:
        err_console.print(f"identical content is already {version.ref}; nothing copied.")
    else:
        err_console.print(
            f"registered {version.image_count} images, {version.box_count} boxes "
            f"(digest {version.digest[:12]}) in {version.path}",
            soft_wrap=True,
        )
    typer.echo(version.ref)


@app.command("list")
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


@app.command("show")
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
        ("repairs", repairs_line(version.repairs) or "none"),
    ):
        table.add_row(field, value)
    console.print(table)


@app.command("stats")
def data_stats(
    path: str = typer.Argument(..., help="Dataset folder or annotation file (any supported format)."),
    source_format: InputFormat = typer.Option(InputFormat.auto, "--format", "-f", help=FORMAT_HELP),
    plot: Path | None = typer.Option(None, "--plot", help="Also write histograms and sample images here."),
    samples: int = typer.Option(8, "--samples", min=0, help="Sample images in the plot."),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
    html: Path | None = typer.Option(
        None, "--html", help="Also write a self-contained HTML overview (charts, sample images) here."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON instead of tables."),
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
    dataset = read_dataset(path, source_format, problems=problems, datastore_root=datastore_root)
    if problems.errors:
        err_console.print(
            f"warning: {len(problems.errors)} problem(s) in the dataset; the numbers cover what could be "
            "read. Run `visionautoml data validate` for the details."
        )
    stats = compute_stats(dataset)
    if as_json:  # stdout holds the JSON alone; what was written is said on stderr
        typer.echo(json.dumps(stats.to_dict(), indent=2, default=str))
    else:
        for table in stats_tables(stats):
            console.print(table)
    say = err_console if as_json else console
    if plot is not None:
        say.print(f"plot written to {plot_stats(dataset, stats, plot, samples)}", soft_wrap=True)
    if html is not None:
        from visionautoml.reports.overview import write_overview

        page = write_overview(dataset, html, stats=stats, samples=samples, source=str(path))
        say.print(f"overview written to {page}", soft_wrap=True)

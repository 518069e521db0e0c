"""`visionautoml train` and `visionautoml evaluate`: train a config (one trial or a sweep), score a model."""

from __future__ import annotations

from pathlib import Path

import typer

from visionautoml.cli.common import (
    DATASTORE_HELP,
    SET_HELP,
    TILE_GRID_HELP,
    TILE_NMS_HELP,
    TILE_OVERLAP_HELP,
    MetricType,
    console,
    err_console,
)


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
    settings: list[str] = typer.Option([], "--set", help=SET_HELP),
    datastore_root: Path | None = typer.Option(None, "--datastore-root", help=DATASTORE_HELP),
    drop_invalid: bool = typer.Option(
        False,
        "--drop-invalid",
        help="Skip images with errors (each reported) instead of failing: invalid_data: drop.",
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
    * `visionautoml train job.yaml --set training_parameters.number_of_epochs=2 --set limits.max_trials=1`
    * `MLFLOW_TRACKING_URI=http://127.0.0.1:5000 visionautoml train job.yaml`
    * `visionautoml train azureml-job.yml --datastore-root ./datastore` (a cloud AutoML job file as it is)
    """
    from visionautoml.redact import masked_output, register_environment_credentials
    from visionautoml.secrets import load_config_with_secrets

    overrides = {
        "training_data": training_data,
        "validation_data": validation_data,
        "experiment_name": experiment,
        "datastore_root": str(datastore_root) if datastore_root else None,
        "invalid_data": "drop" if drop_invalid else None,
    }
    with masked_output():
        register_environment_credentials()
        job = load_config_with_secrets(config, overrides, settings)
        # Ray Tune and MLflow take seconds to import: a config refused above is answered without them.
        from visionautoml.automl.train import settle
        from visionautoml.automl.train import train as run

        settled = settle(job)
        err_console.print(f"tracking: {settled.login}", soft_wrap=True)
        outcome = run(settled, resume=resume, output_json=output_json, console=err_console)
    console.print(outcome.summary(), soft_wrap=True)


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
    metric_type: MetricType | None = typer.Option(
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
    tile_grid_size: str | None = typer.Option(None, "--tile-grid-size", help=TILE_GRID_HELP),
    tile_overlap_ratio: float | None = typer.Option(None, "--tile-overlap-ratio", help=TILE_OVERLAP_HELP),
    tile_nms_threshold: float | None = typer.Option(
        None, "--tile-predictions-nms-threshold", help=TILE_NMS_HELP
    ),
) -> None:
    """Score a model on labelled data: COCO mAP, the cloud service's VOC mAP, precision, recall, per-class AP.

    Writes `metrics.json`, plus `ground_truth.json` (COCO instances) and `detections.json` (COCO
    results) from which pycocotools reproduces the COCO numbers, and diagnostic plots in `plots/`.

    Examples:

    * `visionautoml evaluate models:/raccoon@champion --data data/raccoon-val --out eval/`
    * `visionautoml evaluate runs:/3f2a.../model --data validation.jsonl --out eval/ --metric-type coco`
    * `visionautoml evaluate ./model --data data/voc --out eval/ --iou-threshold 0.75 --no-plots`
    * `visionautoml evaluate ./model --data data/voc --out eval/ --tile-grid-size none` (a tiled model
      scored on whole images only)
    """
    from visionautoml.evaluation.scoring import summary_table, write_evaluation
    from visionautoml.reports.plots import write_trial_plots
    from visionautoml.training.evaluate import evaluate_model, evaluation_parameters

    params = evaluation_parameters(
        metric_type=metric_type,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        tile_grid_size=tile_grid_size,
        tile_overlap_ratio=tile_overlap_ratio,
        tile_predictions_nms_threshold=tile_nms_threshold,
    )
    evaluation, dataset = evaluate_model(model, data, params, device=device, console=err_console)
    written = write_evaluation(out, evaluation)
    if plots:
        written += write_trial_plots(out / "plots", evaluation, dataset)
    console.print(summary_table(evaluation))
    console.print(f"wrote {len(written)} files to {out}", soft_wrap=True)

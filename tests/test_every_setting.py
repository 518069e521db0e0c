"""No setting without an effect: every field of every config model changes behaviour, or is refused.

Each field has a probe: a small function of the parameters whose answer must differ between the
default and another value (the optimizer it builds, the schedule, the loader, the model's
thresholds, the trainer's stopping ...). Fields whose effect needs a server or a cluster point
at the test that shows it; the test checks that test still exists. A field with neither fails
here, so a new setting cannot land as a silent no-op.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_voc_dataset
from pydantic import BaseModel

from visionautoml.automl import compute
from visionautoml.config import models as config_models
from visionautoml.config import parse_config
from visionautoml.data.formats import read_dataset
from visionautoml.evaluation.metrics import ImageDetections, ImageGroundTruth
from visionautoml.evaluation.scoring import evaluate_predictions
from visionautoml.models import weights
from visionautoml.models.saved import ModelSpec, save_model
from visionautoml.models.zoo import build_model, concrete_parameters, get_entry
from visionautoml.pipeline.ray_jobs import dashboard_address
from visionautoml.training import trainer
from visionautoml.training.augment import PhasedLoader
from visionautoml.training.dataset import make_data_loader
from visionautoml.training.ema import ema_enabled
from visionautoml.training.start import resolve_start
from visionautoml.training.trainer import build_optimizer, fit, learning_rate_factor

TESTS = Path(__file__).parent
SSD = {"model_name": "ssdlite320_mobilenet_v3_large", "pretrained": "none", "image_size": 64}
RCNN = {"model_name": "fasterrcnn_mobilenet_v3_large_320_fpn", "pretrained": "none"}
YOLOX = {"model_name": "yolox_nano", "pretrained": "none", "image_size": 64}


def params(base: dict[str, Any], **changed: Any) -> Any:
    return parse_config({"training_parameters": {**base, **changed}}).training_parameters


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    return read_dataset(make_voc_dataset(tmp_path_factory.mktemp("every") / "voc", n_images=6))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    p = params(SSD)
    return save_model(
        build_model(p.model_name, 3, p),
        ModelSpec.from_params(p, ["a", "b"]),
        tmp_path_factory.mktemp("m") / "model",
    )


# --- probes -------------------------------------------------------------------------------------


def detector_settings(p: Any) -> tuple:
    model = build_model(p.model_name, 3, p)
    owner = getattr(model, "roi_heads", model)
    transform = getattr(model, "transform", None)
    trainable = sum(1 for parameter in model.parameters() if parameter.requires_grad)
    return (
        type(model).__name__,
        float(getattr(owner, "score_thresh", 0)),
        float(getattr(owner, "nms_thresh", 0)),
        getattr(owner, "detections_per_img", 0),
        tuple(getattr(transform, "min_size", ())),
        getattr(transform, "max_size", 0),
        getattr(model, "image_size", getattr(transform, "fixed_size", None)),
        getattr(model, "train_sizes", ()),
        trainable,
    )


def optimizer_settings(p: Any) -> tuple:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1, 1))], p)
    group = {key: value for key, value in optimizer.param_groups[0].items() if key != "params"}
    return type(optimizer).__name__, tuple(sorted((key, str(value)) for key, value in group.items()))


def schedule(p: Any) -> tuple:
    factor = learning_rate_factor(p, steps_per_epoch=10)
    return tuple(round(factor(step), 6) for step in range(0, 10 * p.number_of_epochs + 40, 7))


def loader_settings(p: Any, voc: Any) -> tuple:
    loader = make_data_loader(voc, p, train=True)
    phased = isinstance(loader, PhasedLoader)
    active = loader.augmented if phased else loader
    dataset = active.dataset
    first = [
        int(target["image_id"]) for _, targets in make_data_loader(voc, p, train=True) for target in targets
    ]
    return (
        active.batch_size,
        active.num_workers,
        phased,
        getattr(loader, "plain_from_epoch", None),
        getattr(dataset, "mixup", None),
        getattr(dataset, "transforms", "mosaic") is None,
        first,
        make_data_loader(voc, p, train=False).batch_size,
    )


class _Toy(torch.nn.Module):
    """A detector that learns nothing but counts its steps: enough to see the trainer's decisions."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, images: list, targets: list | None = None) -> Any:
        return {"loss": (self.weight**2).sum() * len(images)}


def trainer_decisions(p: Any, tmp_path: Path) -> tuple:
    """How often it evaluated and checkpointed, why it stopped, the learning rate after each epoch."""
    batches = [([torch.zeros(3, 4, 4)], [{}])] * 4
    evaluated, saved = [], []

    def evaluate(module: torch.nn.Module) -> dict[str, float]:
        evaluated.append(len(evaluated))
        return {"mean_average_precision": 0.5 if len(evaluated) == 1 else 0.1}

    folder = tmp_path / f"ck-{len(list(tmp_path.glob('ck-*')))}"
    save = trainer._save_checkpoint

    def saving(*args: Any, **kwargs: Any) -> None:
        saved.append(1)
        save(*args, **kwargs)

    trainer._save_checkpoint = saving
    try:
        result = fit(_Toy(), batches, evaluate, p, folder)
    finally:
        trainer._save_checkpoint = save
    lrs = tuple(round(entry["lr"], 8) for entry in result.history)  # one scheduler step per optimizer step
    return len(evaluated), result.stop_reason, result.epochs_completed, lrs, len(saved)


def evaluation_settings(p: Any) -> float:
    truth = ImageGroundTruth(boxes=[[10, 10, 50, 50]], labels=[1], iscrowd=[False], width=100, height=100)
    found = ImageDetections(boxes=[[12, 12, 58, 58]], scores=[0.9], labels=[1])
    return evaluate_predictions([truth], [found], ["thing"], p).metrics["mean_average_precision"]


# --- the table ----------------------------------------------------------------------------------

TRAINING: dict[str, tuple[dict[str, Any], Any, str]] = {
    # field: (base parameters, another value, probe)
    "box_score_threshold": (SSD, 0.6, "detector"),
    "nms_iou_threshold": (SSD, 0.2, "detector"),
    "box_detections_per_image": (SSD, 7, "detector"),
    "model_name": (SSD, "yolox_nano", "detector"),
    "image_size": (SSD, 96, "detector"),
    "min_size": (RCNN, 288, "detector"),
    "max_size": (RCNN, 480, "detector"),
    "layers_to_freeze": (RCNN, 3, "detector"),
    "multi_scale": (YOLOX, True, "detector"),
    "optimizer": ({}, "adamw", "optimizer"),
    "learning_rate": ({}, 0.02, "optimizer"),
    "momentum": ({}, 0.5, "optimizer"),
    "weight_decay": ({}, 0.01, "optimizer"),
    "nesterov": ({}, False, "optimizer"),
    "beta1": ({"optimizer": "adam"}, 0.8, "optimizer"),
    "beta2": ({"optimizer": "adam"}, 0.99, "optimizer"),
    "ams_gradient": ({"optimizer": "adam"}, True, "optimizer"),
    "learning_rate_scheduler": ({}, "step", "schedule"),
    "warmup_cosine_lr_cycles": ({}, 0.2, "schedule"),
    "warmup_cosine_lr_warmup_epochs": ({}, 5, "schedule"),
    "step_lr_gamma": ({"learning_rate_scheduler": "step"}, 0.1, "schedule"),
    "step_lr_step_size": ({"learning_rate_scheduler": "step"}, 2, "schedule"),
    "number_of_epochs": ({}, 3, "schedule"),
    "training_batch_size": ({**SSD, "number_of_workers": 0}, 3, "loader"),
    "validation_batch_size": ({**SSD, "number_of_workers": 0}, 3, "loader"),
    "number_of_workers": ({**SSD, "number_of_workers": 0}, 1, "loader"),
    "apply_automl_train_augmentations": ({**SSD, "number_of_workers": 0}, False, "loader"),
    "apply_mosaic_for_yolo": ({**SSD, "number_of_workers": 0}, True, "loader"),
    "mixup_probability": ({**YOLOX, "number_of_workers": 0}, 0.5, "loader"),
    "no_augmentation_epochs": ({**YOLOX, "number_of_workers": 0, "number_of_epochs": 10}, 4, "loader"),
    "seed": ({**SSD, "number_of_workers": 0, "training_batch_size": 1}, 7, "loader"),
    "gradient_accumulation_step": ({"number_of_epochs": 2, "early_stopping": False}, 2, "trainer"),
    "early_stopping": (
        {"number_of_epochs": 6, "early_stopping_patience": 1, "early_stopping_delay": 1},
        False,
        "trainer",
    ),
    "early_stopping_patience": (
        {"number_of_epochs": 6, "early_stopping_patience": 1, "early_stopping_delay": 1},
        3,
        "trainer",
    ),
    "early_stopping_delay": (
        {"number_of_epochs": 6, "early_stopping_patience": 1, "early_stopping_delay": 1},
        4,
        "trainer",
    ),
    "evaluation_frequency": ({"number_of_epochs": 4, "early_stopping": False}, 2, "trainer"),
    "max_minutes": ({"number_of_epochs": 3, "early_stopping": False}, 1e-9, "trainer"),
    "checkpoint_frequency": ({"number_of_epochs": 4, "early_stopping": False}, 3, "trainer"),
    "validation_metric_type": ({}, "coco", "evaluation"),
    "validation_iou_threshold": ({}, 0.9, "evaluation"),
    "model_size": ({"model_name": "yolox"}, "small", "concrete"),
    "weights_ema": (SSD, True, "ema"),
    "pretrained": (SSD, "saved", "pretrained"),
    "checkpoint_path": (SSD, "saved", "start"),
}

ELSEWHERE: dict[str, str] = {
    # field: the test (file::function) that shows its effect with the real component it needs
    "TrainingParameters.checkpoint_run_id": "test_incremental.py::test_a_second_run_continues_from_the_first_and_says_so",
    "JobConfig.experiment_name": "test_trial.py::test_train_cli_writes_the_output_json_and_honours_mlflow_tracking_uri",
    "JobConfig.workspace": "test_tracking.py::test_tracking_uri_is_env_then_config_then_workspace_sqlite",
    "JobConfig.training_data": "test_trial.py::test_trial_data_comes_from_folders_converted_output_or_the_dataset_store",
    "JobConfig.validation_data": "test_trial.py::test_trial_data_comes_from_folders_converted_output_or_the_dataset_store",
    "JobConfig.validation_data_size": "test_incremental.py::test_nine_images_with_batch_size_four_train",
    "JobConfig.datastore_root": "test_boundaries.py::test_datastore_urls_stay_under_the_datastore_root",
    "JobConfig.search_space": "test_sweep.py::test_grid_sweep_with_bandit_stops_the_weak_trials_and_registers_the_best",
    "Tracking.uri": "test_tracking.py::test_tracking_uri_is_env_then_config_then_workspace_sqlite",
    "Tracking.username": "test_tracking_auth.py::test_right_credentials_log_in_create_a_run_and_register_a_model",
    "Tracking.password": "test_tracking_auth.py::test_right_credentials_log_in_create_a_run_and_register_a_model",
    "Tracking.token": "test_tracking_auth.py::test_the_environment_wins_over_the_config_and_conflicting_credentials_are_refused",
    "Limits.max_trials": "test_sweep.py::test_grid_sweep_with_bandit_stops_the_weak_trials_and_registers_the_best",
    "Limits.max_concurrent_trials": "test_ray_cluster.py::test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out",
    "Limits.timeout_minutes": "test_sweep.py::test_an_interrupted_sweep_resumes_where_it_stopped",
    "Limits.trial_timeout_minutes": "test_sweep.py::test_failing_trials_are_recorded_with_their_reason_and_the_sweep_goes_on",
    "Sweep.sampling_algorithm": "test_sweep.py::test_bayesian_sweep_samples_conditional_subspaces_with_optuna",
    "Compute.target": "test_ray_cluster.py::test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out",
    "Compute.address": "test_ray_cluster.py::test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out",
    "Compute.min_nodes": "test_ray_cluster.py::test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out",
    "Compute.min_gpus": "test_sweep.py::test_waiting_for_more_nodes_than_the_cluster_has_times_out_clearly",
    "Compute.wait_timeout_minutes": "test_ray_cluster.py::test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out",
    "Compute.max_failures": "test_ray_cluster.py::test_a_lost_node_is_survived_and_the_trial_retried",
    "Compute.storage_path": "test_team_stack.py::test_a_sweep_on_two_nodes_without_a_shared_disk",
    "Register.model_name": "test_incremental.py::test_a_second_run_continues_from_the_first_and_says_so",
    "Register.promote_if_better": "test_registry.py::test_promote_if_better_moves_champion_only_on_a_better_metric_on_the_same_validation_set",
    "Pipeline.data": "test_pipeline.py::test_pipeline_runs_every_step_and_a_detached_rerun_reuses_data_and_model",
    "Pipeline.sha256": "test_pipeline.py::test_pipeline_runs_every_step_and_a_detached_rerun_reuses_data_and_model",
    "Pipeline.format": "test_pipeline.py::test_runs_wait_times_out_then_reports_failed_and_lost_detached_runs",
    "Pipeline.validation_every": "test_pipeline.py::test_pipeline_runs_every_step_and_a_detached_rerun_reuses_data_and_model",
    "Pipeline.export": "test_pipeline.py::test_pipeline_runs_every_step_and_a_detached_rerun_reuses_data_and_model",
    "EarlyTermination.type": "test_schedulers.py::test_build_scheduler_maps_each_config_to_its_scheduler",
    "EarlyTermination.evaluation_interval": "test_schedulers.py::test_delay_and_interval_decide_when_a_policy_acts",
    "EarlyTermination.delay_evaluation": "test_schedulers.py::test_delay_and_interval_decide_when_a_policy_acts",
    "EarlyTermination.slack_factor": "test_schedulers.py::test_bandit_slack_factor_compares_with_the_best_trial_at_the_same_interval",
    "EarlyTermination.slack_amount": "test_schedulers.py::test_bandit_slack_amount_and_minimised_metrics",
    "EarlyTermination.truncation_percentage": "test_schedulers.py::test_truncation_selection_cancels_the_lowest_percentage_with_ties_continuing",
}
for _field in ("type", "values", "min_value", "max_value", "mu", "sigma", "q", "lower", "upper"):
    ELSEWHERE[f"ParameterDistribution.{_field}"] = (
        "test_space.py::test_every_distribution_type_samples_values_of_its_kind"
    )
for _field in ("tile_grid_size", "tile_overlap_ratio", "tile_predictions_nms_threshold"):
    ELSEWHERE[f"TrainingParameters.{_field}"] = (
        "test_tiling.py::test_each_tiling_setting_changes_the_merged_answer"
    )

CONSTANTS = {
    "JobConfig.task": "one value (image_object_detection); any other is refused when the config loads",
    "JobConfig.training_parameters": "a section: its fields are probed one by one",
    "JobConfig.tracking": "a section",
    "JobConfig.limits": "a section",
    "JobConfig.sweep": "a section",
    "JobConfig.compute": "a section",
    "JobConfig.register": "a section",
    "JobConfig.pipeline": "a section",
    "Sweep.early_termination": "a section (its absence is FIFO: test_schedulers)",
    "Compute.dashboard_address": "probed below",
    "JobConfig.invalid_data": "probed below",
    "Compute.cpus_per_trial": "probed below",
    "Compute.gpus_per_trial": "probed below",
}


def every_field() -> list[str]:
    fields = []
    for name in dir(config_models):
        model = getattr(config_models, name)
        if (
            isinstance(model, type)
            and issubclass(model, BaseModel)
            and model.__module__ == config_models.__name__
        ):
            if name.startswith("_") or name in ("Thresholds", "Tiling"):  # mixed into TrainingParameters
                continue
            fields += [f"{name}.{field}" for field in model.model_fields]
    return fields


def test_every_field_has_a_probe_or_a_test_that_shows_its_effect():
    covered = {f"TrainingParameters.{field}" for field in TRAINING} | set(ELSEWHERE) | set(CONSTANTS)
    assert sorted(set(every_field()) - covered) == []


@pytest.mark.parametrize("field", sorted(ELSEWHERE))
def test_the_test_that_shows_a_field_exists(field):
    file, _, function = ELSEWHERE[field].partition("::")
    path = TESTS / file
    assert path.is_file(), f"{field}: {file} is gone"
    names = {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    assert function in names, f"{field}: {ELSEWHERE[field]} is gone"


@pytest.mark.parametrize("field", sorted(TRAINING))
def test_each_training_parameter_changes_behaviour(field, voc, saved_model, tmp_path, one_torch_thread):
    base, value, probe = TRAINING[field]
    if value == "saved":
        value = str(saved_model)
    default, changed = params(base), params(base, **{field: value})
    probes: dict[str, Callable[[Any], Any]] = {
        "detector": detector_settings,
        "optimizer": optimizer_settings,
        "schedule": schedule,
        "loader": lambda p: loader_settings(p, voc),
        "trainer": lambda p: trainer_decisions(p, tmp_path),
        "evaluation": evaluation_settings,
        "concrete": lambda p: concrete_parameters(p).model_name,
        "ema": ema_enabled,
        "pretrained": lambda p: weights.pretrained_source(get_entry(p.model_name), p.pretrained).kind,
        "start": resolve_start,
    }
    assert probes[probe](default) != probes[probe](changed), field


def test_compute_settings_change_what_a_trial_asks_for_and_where_jobs_go():
    info = compute.ClusterInfo(address="local", nodes=1, cpus=8, gpus=2)
    plain = parse_config({}).compute
    assert compute.trial_resources(plain, info, 2) != compute.trial_resources(
        plain.model_copy(update={"cpus_per_trial": 1}), info, 2
    )
    assert compute.trial_resources(plain, info, 2) != compute.trial_resources(
        plain.model_copy(update={"gpus_per_trial": 0.25}), info, 2
    )
    cluster = parse_config({"compute": {"target": "ray", "address": "ray://10.0.0.4:10001"}}).compute
    assert dashboard_address(cluster) == "http://10.0.0.4:8265"
    assert (
        dashboard_address(cluster.model_copy(update={"dashboard_address": "http://jobs:9000"}))
        == "http://jobs:9000"
    )


def test_invalid_data_drop_skips_a_broken_image_that_error_refuses(tmp_path):
    from visionautoml.errors import DataError
    from visionautoml.training.trial import load_trial_data

    data = make_voc_dataset(tmp_path / "voc", n_images=6)
    (data / "images" / "img-002.jpg").write_bytes(b"not a jpeg")
    job = parse_config({"training_data": str(data), "workspace": str(tmp_path / "ws")})
    with pytest.raises(DataError, match="img-002"):
        load_trial_data(job, job.training_parameters)
    dropped = job.model_copy(update={"invalid_data": "drop"})
    loaded = load_trial_data(dropped, dropped.training_parameters)
    assert len(loaded.training.images) + len(loaded.validation.images) == 5


def test_a_setting_that_does_not_apply_to_the_model_is_refused():
    """Sizes of another model family, model_size of a model that has none, multi_scale for SSD."""
    from visionautoml.errors import ConfigError
    from visionautoml.models.zoo import check_model_names

    with pytest.raises(
        ConfigError, match="image_size applies to the SSD and YOLOX models, and this job trains none"
    ):
        check_model_names(parse_config({"training_parameters": {**RCNN, "image_size": 320}}))
    with pytest.raises(ConfigError, match="min_size applies to the R-CNN-style models"):
        check_model_names(parse_config({"training_parameters": {**SSD, "min_size": 320}}))
    both = {
        "training_parameters": {"image_size": 64, "min_size": 96, "pretrained": "none"},
        "search_space": [
            {"model_name": {"type": "choice", "values": [SSD["model_name"], RCNN["model_name"]]}}
        ],
    }
    check_model_names(parse_config(both))  # a sweep over both families sets each family's size once
    with pytest.raises(ConfigError, match=r"search_space\[0\].min_size: none of this sub-space's models"):
        check_model_names(
            parse_config(
                {
                    "search_space": [
                        {
                            "model_name": {"type": "choice", "values": [SSD["model_name"]]},
                            "min_size": {"type": "choice", "values": [300]},
                        }
                    ]
                }
            )
        )
    with pytest.raises(ConfigError, match="model_size: 'small' applies to model_name: yolox only"):
        concrete_parameters(params(SSD, model_size="small"))


def test_more_concurrent_trials_than_cores_share_them_instead_of_waiting():
    info = compute.ClusterInfo(address="local", nodes=1, cpus=2, gpus=0)
    plain = parse_config({}).compute
    assert compute.trial_resources(plain, info, 1) == {"cpu": 2.0}
    assert compute.trial_resources(plain, info, 2) == {"cpu": 1.0}
    assert compute.trial_resources(plain, info, 3) == {"cpu": 0.66}  # 3 x 0.66 fit in 2 cores: 3 at a time

"""Search spaces: grid, random and Optuna sampling of conditional sub-spaces; validation; automatic mode."""

from __future__ import annotations

import math

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from visionautoml.automl import space
from visionautoml.automl.automatic import DataProfile, automatic_plan
from visionautoml.config import (
    EarlyTermination,
    ParameterDistribution,
    TrainingParameters,
    parse_config,
    search_space_problems,
)
from visionautoml.errors import ConfigError, VisionAutoMLError
from visionautoml.models.zoo import check_model_names

SSD, FRCNN = "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"
ZOO_NAMES = [SSD, FRCNN, "fcos_resnet50_fpn", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"]


def subspaces(raw: list[dict]) -> list[space.SubSpace]:
    return parse_config({"search_space": raw}).search_space


CONDITIONAL = subspaces(
    [
        {
            "model_name": {"type": "choice", "values": [SSD]},
            "learning_rate": {"type": "loguniform", "min_value": 0.0005, "max_value": 0.01},
            "training_batch_size": {"type": "quniform", "min_value": 2, "max_value": 8, "q": 2},
        },
        {
            "model_name": {"type": "choice", "values": [FRCNN, "fcos_resnet50_fpn"]},
            "optimizer": {"type": "choice", "values": ["sgd", "adamw"]},
        },
    ]
)


def test_grid_runs_every_combination_of_each_subspace_in_order():
    grid = subspaces(
        [
            {
                "model_name": {"type": "choice", "values": [SSD]},
                "learning_rate": {"type": "choice", "values": [0.1, 0.2]},
            },
            {
                "model_name": {"type": "choice", "values": [FRCNN]},
                "optimizer": {"type": "choice", "values": ["sgd", "adam"]},
            },
        ]
    )
    plan = space.plan_search(grid, "grid", max_trials=10, seed=0)
    assert plan.trials == [
        {"model_name": SSD, "learning_rate": 0.1},
        {"model_name": SSD, "learning_rate": 0.2},
        {"model_name": FRCNN, "optimizer": "sgd"},
        {"model_name": FRCNN, "optimizer": "adam"},
    ]
    assert plan.notes == []
    capped = space.plan_search(grid, "grid", max_trials=3, seed=0)
    assert len(capped.trials) == 3 and "4 combinations" in capped.notes[0]


def test_grid_refuses_continuous_distributions_naming_them():
    with pytest.raises(ConfigError, match=r"search_space\[0\]\.learning_rate \(loguniform\)"):
        space.plan_search(CONDITIONAL, "grid", max_trials=4, seed=0)


def test_random_samples_a_subspace_then_only_its_parameters_reproducibly():
    plan = space.plan_search(CONDITIONAL, "random", max_trials=40, seed=3)
    assert plan.trials == space.plan_search(CONDITIONAL, "random", max_trials=40, seed=3).trials
    assert plan.trials != space.plan_search(CONDITIONAL, "random", max_trials=40, seed=4).trials
    kinds = {trial["model_name"] for trial in plan.trials}
    assert kinds == {SSD, FRCNN, "fcos_resnet50_fpn"}
    for trial in plan.trials:
        if trial["model_name"] == SSD:
            assert set(trial) == {"model_name", "learning_rate", "training_batch_size"}
            assert 0.0005 <= trial["learning_rate"] <= 0.01
            assert trial["training_batch_size"] in (2, 4, 6, 8)
            assert isinstance(trial["training_batch_size"], int)
        else:
            assert set(trial) == {"model_name", "optimizer"}


@settings(max_examples=40, deadline=None)
@given(
    low=st.floats(1e-5, 10, allow_nan=False),
    span=st.floats(1.01, 1000, allow_nan=False),
    kind=st.sampled_from(["uniform", "loguniform"]),
    seed=st.integers(0, 2**16),
)
def test_random_values_stay_within_their_bounds(low, span, kind, seed):
    distribution = ParameterDistribution(type=kind, min_value=low, max_value=low * span)
    for trial in space.sample_random([{"momentum": distribution}], 5, seed):
        assert low <= trial["momentum"] <= low * span


def test_every_distribution_type_samples_values_of_its_kind():
    kinds = subspaces(
        [
            {
                "warmup_cosine_lr_cycles": {"type": "normal", "mu": 0.5, "sigma": 0.01},
                "learning_rate": {"type": "lognormal", "mu": math.log(0.01), "sigma": 0.1},
                "step_lr_step_size": {"type": "randint", "lower": 2, "upper": 5},
                "min_size": {"type": "qloguniform", "min_value": 320, "max_value": 640, "q": 32},
            }
        ]
    )
    for trial in space.plan_search(kinds, "random", max_trials=30, seed=1).trials:
        assert 0.4 < trial["warmup_cosine_lr_cycles"] < 0.6
        assert 0 < trial["learning_rate"] < 0.1
        assert trial["step_lr_step_size"] in (2, 3, 4)
        assert trial["min_size"] % 32 == 0 and 320 <= trial["min_size"] <= 640


def test_optuna_space_samples_conditional_subspaces():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    define = space.OptunaSpace(CONDITIONAL)
    seen = set()
    for _ in range(20):
        trial = study.ask()
        params = define(trial)["params"]
        seen.add(params["model_name"])
        index = trial.params["subspace"]
        assert set(params) == set(CONDITIONAL[index])
        # Each sub-space's parameters are Optuna parameters of their own.
        assert {name for name in trial.params if name != "subspace"} == {f"{index}:{name}" for name in params}
        study.tell(trial, 0.5)
    assert seen == {SSD, FRCNN, "fcos_resnet50_fpn"}


def test_the_space_is_checked_when_the_config_loads_naming_the_bad_parameter_and_value():
    bad = [
        {
            "lerning_rate": {"type": "uniform", "min_value": 0.1, "max_value": 0.2},
            "optimizer": {"type": "choice", "values": ["sgd", "adan"]},
            "model_name": {"type": "choice", "values": [SSD, "yolo_v99"]},
        }
    ]
    with pytest.raises(ConfigError) as error:
        parse_config({"search_space": bad})
    message = str(error.value)
    assert "search_space[0].lerning_rate: not a training parameter; did you mean 'learning_rate'?" in message
    assert "search_space[0].optimizer: value 'adan' is invalid" in message
    with pytest.raises(ConfigError, match=r"search_space.0.learning_rate: .*min_value > 0"):
        parse_config(
            {"search_space": [{"learning_rate": {"type": "loguniform", "min_value": 0, "max_value": 0.1}}]}
        )
    job = parse_config({"search_space": [{"model_name": bad[0]["model_name"]}]})
    with pytest.raises(ConfigError, match=r"search_space\[0\].model_name: unknown model 'yolo_v99'"):
        check_model_names(job)


def test_the_automatic_mode_reads_the_data_the_machine_and_the_time():
    large = DataProfile(images=160, classes=1, boxes=180, median_relative_side=0.6, small_share=0.0)
    medium = DataProfile(images=160, classes=2, boxes=400, median_relative_side=0.2, small_share=0.05)
    small = DataProfile(images=160, classes=3, boxes=900, median_relative_side=0.04, small_share=0.5)
    models = [*ZOO_NAMES, "yolox_nano", "yolox_tiny", "yolox_s"]
    cpu = automatic_plan(
        medium, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=2, available=models
    )
    names = [subspace["model_name"].values[0] for subspace in cpu.subspaces]
    assert names == ["yolox_nano", "ssdlite320_mobilenet_v3_large"]
    assert cpu.fixed["image_size"] == 320 and cpu.fixed["apply_mosaic_for_yolo"] is True
    # CPUs alone: each model once, side by side, for the whole time (not 2 rounds of 9 minutes).
    assert cpu.trials == 2 and cpu.fixed["max_minutes"] == 19.0
    assert cpu.fixed["number_of_epochs"] == 300  # the trainer plans the epochs that fit in max_minutes
    one_at_a_time = automatic_plan(
        medium, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=1, available=models
    )
    assert one_at_a_time.trials == 2 and one_at_a_time.fixed["max_minutes"] == 9.0
    # Large objects on CPUs: SSDlite alone on every core, for the whole time, no mosaic.
    alone = automatic_plan(
        large, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=None, available=models
    )
    assert [s["model_name"].values[0] for s in alone.subspaces] == ["ssdlite320_mobilenet_v3_large"]
    assert (alone.concurrent, alone.trials, alone.fixed["max_minutes"]) == (1, 1, 19.0)
    assert alone.fixed["apply_mosaic_for_yolo"] is False
    assert any("a mosaic would cut most objects apart" in reason for reason in alone.reasons)
    assert any("alone, on every core" in reason for reason in alone.reasons)
    assert any("1 trial at a time on 2 CPU(s)" in reason for reason in alone.reasons)
    # The job's own concurrency is kept: two SSDlite trials side by side, each with its learning rate.
    two = automatic_plan(
        large, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=2, available=models
    )
    assert (two.concurrent, two.trials) == (2, 2)
    # Without SSDlite in the zoo, the large objects fall back to the pair's remaining model.
    no_ssd = automatic_plan(
        large, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=None, available=["yolox_nano"]
    )
    assert [s["model_name"].values[0] for s in no_ssd.subspaces] == ["yolox_nano"]
    tiny = automatic_plan(
        small, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=2, available=models
    )
    assert tiny.fixed["image_size"] == 640 and tiny.fixed["apply_mosaic_for_yolo"] is True
    gpu = automatic_plan(
        large, cpus=8, gpus=1, timeout_minutes=60, max_trials=4, max_concurrent=1, available=models
    )
    assert [s["model_name"].values[0] for s in gpu.subspaces] == ["yolox_s", "yolox_tiny"]
    assert gpu.trials == 4 and gpu.fixed["max_minutes"] == 14.0  # a GPU affords the variety
    # Trials that queue get ASHA (bench_sweep: the best kept at 60% of the compute); side by side, none.
    assert (gpu.early_termination.type, gpu.early_termination.delay_evaluation) == ("asha", 2)
    assert cpu.early_termination is None and any("no early termination" in r for r in cpu.reasons)
    bandit = EarlyTermination(type="bandit", slack_factor=0.1)
    own = automatic_plan(
        large,
        cpus=8,
        gpus=1,
        timeout_minutes=60,
        max_trials=4,
        max_concurrent=1,
        available=models,
        early_termination=bandit,
    )
    assert own.early_termination == bandit  # the job's policy is kept
    chosen = automatic_plan(
        medium, cpus=2, gpus=0, timeout_minutes=20, max_trials=4, max_concurrent=None, available=models
    )
    assert (chosen.concurrent, chosen.trials, chosen.fixed["max_minutes"]) == (2, 2, 19.0)
    assert any("2 trial(s) at a time on 2 CPU(s)" in reason for reason in chosen.reasons)
    trials = space.plan_search(cpu.subspaces, "random", cpu.trials, 42, each_subspace_in_turn=True).trials
    assert [trial["model_name"] for trial in trials] == ["yolox_nano", "ssdlite320_mobilenet_v3_large"]
    assert search_space_problems(cpu.subspaces + gpu.subspaces, TrainingParameters()) == []


def test_trial_parameters_override_the_fixed_ones():
    fixed = TrainingParameters(number_of_epochs=3, learning_rate=0.01)
    params = space.trial_parameters(fixed, {"learning_rate": 0.002, "model_name": SSD})
    assert (params.number_of_epochs, params.learning_rate, params.model_name) == (3, 0.002, SSD)


def test_the_automatic_mode_starts_from_scratch_where_no_coco_weights_can_be_had(monkeypatch, tmp_path):
    """Offline, an empty torch cache: the plan trains from scratch and says why; settling does not fail."""
    monkeypatch.setenv("VISIONAUTOML_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    profile = DataProfile(images=160, classes=1, boxes=180, median_relative_side=0.6, small_share=0.0)
    models = [*ZOO_NAMES, "yolox_nano"]
    options = {"cpus": 2, "gpus": 0, "timeout_minutes": 20, "max_trials": 4, "max_concurrent": 2}
    chosen = automatic_plan(profile, **options, available=models, choose_start=True)
    assert chosen.fixed["pretrained"] == "none"
    assert any(reason.startswith("pretrained none: no COCO weights for") for reason in chosen.reasons)
    assert "pretrained" not in automatic_plan(profile, **options, available=models).fixed
    # The default model's COCO weights are not asked for: the automatic mode does not train it.
    check_model_names(parse_config({"limits": {"max_trials": 4}}))
    with pytest.raises(VisionAutoMLError, match="needs the file"):  # one trial of it does: a FetchError
        check_model_names(parse_config({}))

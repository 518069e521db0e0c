"""Early-termination policies: decisions on hand-made histories, then each policy inside a real Tune run."""

from __future__ import annotations

import sys

import pytest
from ray import cloudpickle, tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from visionautoml.automl.schedulers import (
    BanditPolicy,
    MedianStoppingPolicy,
    PolicyScheduler,
    TruncationSelectionPolicy,
    build_policy,
    build_scheduler,
    stop_reasons,
)
from visionautoml.config import EarlyTermination

cloudpickle.register_pickle_by_value(sys.modules[__name__])

METRIC = "mean_average_precision"


def replay(policy, reports):
    """Feed (trial, interval, value) reports in order, as Tune would; return where trials were stopped."""
    stopped = []
    for trial, interval, value in reports:
        if trial not in dict(stopped) and policy.observe(trial, interval, value):
            stopped.append((trial, interval))
    return stopped


def test_bandit_slack_factor_compares_with_the_best_trial_at_the_same_interval():
    policy = BanditPolicy(slack_factor=0.2, evaluation_interval=1, delay_evaluation=0)
    stopped = replay(
        policy,
        [
            ("a", 1, 0.60),
            ("b", 1, 0.51),  # limit 0.6 / 1.2 = 0.5: within
            ("c", 1, 0.49),  # outside
            ("a", 2, 0.90),
            ("b", 2, 0.74),  # limit 0.75: outside, though above a's earlier values
        ],
    )
    assert stopped == [("c", 1), ("b", 2)]
    assert "limit 0.75" in policy.stopped["b"] and "evaluation 2" in policy.stopped["b"]


def test_bandit_slack_amount_and_minimised_metrics():
    amount = BanditPolicy(slack_amount=0.1, mode="max")
    assert replay(amount, [("a", 1, 0.5), ("b", 1, 0.41), ("c", 1, 0.39)]) == [("c", 1)]
    factor_min = BanditPolicy(slack_factor=0.5, mode="min")
    # Minimising a loss: the limit is best * 1.5 = 3.0.
    assert replay(factor_min, [("a", 1, 2.0), ("b", 1, 2.9), ("c", 1, 3.1)]) == [("c", 1)]
    amount_min = BanditPolicy(slack_amount=1.0, mode="min")
    assert replay(amount_min, [("a", 1, 2.0), ("b", 1, 3.0), ("c", 1, 3.5)]) == [("c", 1)]


def test_delay_and_interval_decide_when_a_policy_acts():
    policy = BanditPolicy(slack_amount=0.01, evaluation_interval=2, delay_evaluation=3)
    assert [t for t in range(1, 9) if policy.applies_at(t)] == [4, 6, 8]
    reports = [("a", t, 1.0) for t in range(1, 7)] + [("b", t, 0.0) for t in range(1, 7)]
    assert replay(policy, reports) == [("b", 4)]


def test_median_stopping_compares_the_best_value_with_the_median_of_running_averages():
    policy = MedianStoppingPolicy(delay_evaluation=2)
    stopped = replay(
        policy,
        [
            *(("a", t, v) for t, v in enumerate([0.5, 0.6, 0.7], 1)),
            *(("b", t, v) for t, v in enumerate([0.3, 0.9, 0.9], 1)),
            # at 2: averages a .55, b .6, c .6 -> median .6; c's best .6 is not worse
            *(("c", t, v) for t, v in enumerate([0.6, 0.6, 0.6], 1)),
            # at 2: averages .55 .6 .6 .25 -> median .575 > d's best .3
            *(("d", t, v) for t, v in enumerate([0.2, 0.3, 0.4], 1)),
        ],
    )
    assert stopped == [("d", 2)]
    assert "median 0.575" in policy.stopped["d"]


def test_truncation_selection_cancels_the_lowest_percentage_with_ties_continuing():
    policy = TruncationSelectionPolicy(truncation_percentage=50, delay_evaluation=1)
    stopped = replay(
        policy,
        [
            ("a", 1, 0.5),  # alone: 50% of 1 trial is 0 trials
            ("b", 1, 0.7),  # 1 of 2 cut; b is the best
            ("c", 1, 0.1),  # 1 of 3 cut; c is the lowest
            ("d", 1, 0.6),  # 2 of 4 cut; d is second best
        ],
    )
    assert stopped == [("c", 1)]
    tied = TruncationSelectionPolicy(truncation_percentage=50)
    assert replay(tied, [("a", 1, 0.0), ("b", 1, 0.0), ("c", 1, 0.0), ("d", 1, 0.0)]) == []


def test_build_scheduler_maps_each_config_to_its_scheduler():
    def settings(**values):
        return EarlyTermination.model_validate(values)

    assert isinstance(build_scheduler(None, metric=METRIC), FIFOScheduler)
    asha = build_scheduler(settings(type="asha", delay_evaluation=2), metric=METRIC, max_intervals=10)
    assert isinstance(asha, ASHAScheduler)
    assert (asha._time_attr, asha._max_t, asha._metric, asha._mode) == ("evaluation", 10, METRIC, "max")
    bandit = build_scheduler(settings(type="bandit", slack_factor=0.1), metric=METRIC)
    assert isinstance(bandit, PolicyScheduler) and isinstance(bandit.policy, BanditPolicy)
    truncation = build_policy(settings(type="truncation_selection", truncation_percentage=20))
    assert truncation.truncation_percentage == 20
    with pytest.raises(ValueError, match="exactly one"):
        BanditPolicy(slack_factor=0.1, slack_amount=0.1)


# --- the policies inside real Tune runs ------------------------------------------------------------


def replay_curve(config):
    for interval, value in enumerate(config["curve"], start=1):
        tune.report({METRIC: value, "evaluation": interval})


def run_policy(settings: dict, curves: list[list[float]], storage) -> dict[int, int]:
    """Run one trial per curve, one at a time; return each stopped trial's index and its last interval."""
    scheduler = build_scheduler(EarlyTermination.model_validate(settings), metric=METRIC)
    tuner = tune.Tuner(
        replay_curve,
        param_space={"curve": tune.grid_search(curves)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(storage), name="policy", verbose=0),
    )
    results = tuner.fit()
    reasons = stop_reasons(scheduler)
    stopped = {}
    for result in results:
        index = curves.index(result.config["curve"])
        if result.metrics["trial_id"] in reasons:
            stopped[index] = result.metrics["evaluation"]
        else:
            assert result.metrics["evaluation"] == len(curves[index])
    return stopped


@pytest.mark.parametrize(
    ("settings", "curves", "expected"),
    [
        (
            {"type": "bandit", "slack_amount": 0.1, "delay_evaluation": 2},
            [[0.5, 0.6, 0.7, 0.8], [0.45, 0.55, 0.65, 0.75], [0.5, 0.3, 0.3, 0.3]],
            {2: 2},
        ),
        (
            {"type": "median_stopping", "delay_evaluation": 2},
            [[0.5, 0.6, 0.7], [0.3, 0.9, 0.9], [0.6, 0.6, 0.6], [0.2, 0.3, 0.4]],
            {3: 2},
        ),
        (
            {"type": "truncation_selection", "truncation_percentage": 50, "delay_evaluation": 1},
            [[0.5, 0.6], [0.7, 0.8], [0.1, 0.2], [0.6, 0.7]],
            {2: 1},
        ),
    ],
    ids=["bandit", "median_stopping", "truncation_selection"],
)
def test_each_policy_stops_the_expected_trials_in_a_real_tune_run(
    local_ray, tmp_path, settings, curves, expected
):
    assert run_policy(settings, curves, tmp_path) == expected


def replay_curve_then_finish(config):
    """A trainer's reports: one per evaluation, then its summary flagged final (which logs the model)."""
    for interval, value in enumerate(config["curve"], start=1):
        tune.report({METRIC: value, "evaluation": interval})
    tune.report({METRIC: max(config["curve"]), "evaluation": len(config["curve"]), "final": True})


def test_asha_lets_the_trials_it_keeps_finish_with_their_final_report(local_ray, tmp_path):
    """Ray's ASHA stops a trial at max_t before its last report by default: no finished trial had a model."""
    curves = [[0.5, 0.6, 0.7, 0.8], [0.1, 0.1, 0.1, 0.1], [0.6, 0.7, 0.75, 0.9]]
    scheduler = build_scheduler(
        EarlyTermination.model_validate({"type": "asha", "delay_evaluation": 1}),
        metric=METRIC,
        max_intervals=4,
    )
    tuner = tune.Tuner(
        replay_curve_then_finish,
        param_space={"curve": tune.grid_search(curves)},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0),
    )
    finished = {
        curves.index(result.config["curve"]): bool(result.metrics.get("final")) for result in tuner.fit()
    }
    assert finished == {0: True, 1: False, 2: True}

"""Early-termination policies with the cloud service's semantics, as Ray Tune schedulers.

Ray's built-in schedulers decide differently (its median rule compares running means
with a grace period in seconds, it has no bandit or truncation policy), so each policy
here is a small pure class that sees every trial's metric history and answers "stop this
trial?" when a trial reports; :class:`PolicyScheduler` plugs any of them into Tune.
Keeping the decision pure makes each policy testable on hand-made histories.

An *interval* is one reported evaluation (the trainer reports after every evaluation).
A policy acts at interval ``t`` when ``t >= delay_evaluation`` and ``t`` is a multiple
of ``evaluation_interval``, comparing the reporting trial with every trial (running,
finished or stopped) that reached ``t``. Trials report asynchronously, so a trial is
judged against the trials that got there before it. Ties always favour continuing.

- bandit: stop when the metric at ``t`` is not within ``slack_factor`` (``best / (1 +
  slack_factor)`` when maximising, ``best * (1 + slack_factor)`` when minimising) or
  ``slack_amount`` (``best -/+ slack_amount``) of the best metric any trial had at ``t``.
- median_stopping: stop when the trial's best metric up to ``t`` is worse than the
  median of all trials' running averages up to ``t``.
- truncation_selection: stop when the trial is among the lowest ``truncation_percentage``
  percent (rounded down) of the trials' metrics at ``t``.
- asha: Ray's :class:`ASHAScheduler` (its own semantics), with ``delay_evaluation`` as
  the grace period.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from visionautoml.config import EarlyTermination

# The result key that counts evaluations; results flagged FINAL_KEY repeat the last
# evaluation (the trial's summary) and are not a new interval.
INTERVAL_KEY = "evaluation"
FINAL_KEY = "final"


class Policy:
    """Histories of every trial and the decision rule shared by the policies."""

    name = "policy"

    def __init__(self, *, evaluation_interval: int = 1, delay_evaluation: int = 0, mode: str = "max"):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
        self.evaluation_interval = evaluation_interval
        self.delay_evaluation = delay_evaluation
        self.mode = mode
        self.histories: dict[str, dict[int, float]] = {}
        self.stopped: dict[str, str] = {}

    def applies_at(self, interval: int) -> bool:
        return interval >= self.delay_evaluation and interval % self.evaluation_interval == 0

    def observe(self, trial_id: str, interval: int, value: float) -> bool:
        """Record a trial's metric at an interval; True means stop the trial now."""
        self.histories.setdefault(trial_id, {})[interval] = value
        if not self.applies_at(interval):
            return False
        reason = self.reason_to_stop(trial_id, interval)
        if reason is not None:
            self.stopped[trial_id] = f"{self.name}: {reason} at evaluation {interval}"
        return reason is not None

    def values_at(self, interval: int) -> dict[str, float]:
        return {
            trial_id: history[interval] for trial_id, history in self.histories.items() if interval in history
        }

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def best(self, values: list[float]) -> float:
        return max(values) if self.mode == "max" else min(values)

    def reason_to_stop(self, trial_id: str, interval: int) -> str | None:
        raise NotImplementedError


class BanditPolicy(Policy):
    name = "bandit"

    def __init__(
        self, *, slack_factor: float | None = None, slack_amount: float | None = None, **common: Any
    ):
        super().__init__(**common)
        if (slack_factor is None) == (slack_amount is None):
            raise ValueError("bandit needs exactly one of slack_factor or slack_amount")
        self.slack_factor = slack_factor
        self.slack_amount = slack_amount

    def threshold(self, best: float) -> float:
        sign = 1 if self.mode == "max" else -1
        if self.slack_factor is not None:
            return best / (1 + self.slack_factor) if self.mode == "max" else best * (1 + self.slack_factor)
        return best - sign * self.slack_amount

    def reason_to_stop(self, trial_id: str, interval: int) -> str | None:
        values = self.values_at(interval)
        value, best = values[trial_id], self.best(list(values.values()))
        threshold = self.threshold(best)
        if self.better(threshold, value):
            return f"{value:.4g} is outside the slack of the best {best:.4g} (limit {threshold:.4g})"
        return None


class MedianStoppingPolicy(Policy):
    name = "median_stopping"

    def reason_to_stop(self, trial_id: str, interval: int) -> str | None:
        averages = []
        for history in self.histories.values():
            if interval in history:
                upto = [value for step, value in history.items() if step <= interval]
                averages.append(sum(upto) / len(upto))
        median = statistics.median(averages)
        mine = [value for step, value in self.histories[trial_id].items() if step <= interval]
        best = self.best(mine)
        if self.better(median, best):
            return f"best {best:.4g} is worse than the median {median:.4g} of the running averages"
        return None


class TruncationSelectionPolicy(Policy):
    name = "truncation_selection"

    def __init__(self, *, truncation_percentage: int, **common: Any):
        super().__init__(**common)
        if not 0 < truncation_percentage < 100:
            raise ValueError("truncation_percentage must be between 1 and 99")
        self.truncation_percentage = truncation_percentage

    def reason_to_stop(self, trial_id: str, interval: int) -> str | None:
        values = self.values_at(interval)
        cut = len(values) * self.truncation_percentage // 100
        value = values[trial_id]
        # Counting only strictly better trials puts a tied trial as high as it can go.
        better = sum(1 for other in values.values() if self.better(other, value))
        if cut and better >= len(values) - cut:
            return (
                f"{value:.4g} is in the lowest {self.truncation_percentage}% ({cut} of {len(values)} trials)"
            )
        return None


POLICIES: dict[str, type[Policy]] = {
    "bandit": BanditPolicy,
    "median_stopping": MedianStoppingPolicy,
    "truncation_selection": TruncationSelectionPolicy,
}


def build_policy(settings: EarlyTermination, mode: str = "max") -> Policy:
    common = {
        "evaluation_interval": settings.evaluation_interval,
        "delay_evaluation": settings.delay_evaluation,
        "mode": mode,
    }
    if settings.type == "bandit":
        return BanditPolicy(slack_factor=settings.slack_factor, slack_amount=settings.slack_amount, **common)
    if settings.type == "truncation_selection":
        return TruncationSelectionPolicy(truncation_percentage=settings.truncation_percentage, **common)
    return POLICIES[settings.type](**common)


def build_scheduler(
    settings: EarlyTermination | None, *, metric: str, mode: str = "max", max_intervals: int = 1
) -> TrialScheduler:
    """The Tune scheduler for a config's ``sweep.early_termination`` (FIFO when there is none)."""
    if settings is None:
        return FIFOScheduler()
    if settings.type == "asha":
        grace = max(1, settings.delay_evaluation, settings.evaluation_interval)
        # stop_last_trials=False: a trial at its last evaluation ends itself, with its final report
        # and its model; Ray's default stops it there first, which cost every finished trial its model.
        return ASHAScheduler(
            time_attr=INTERVAL_KEY,
            metric=metric,
            mode=mode,
            max_t=max(max_intervals, grace),
            grace_period=grace,
            reduction_factor=3,
            stop_last_trials=False,
        )
    return PolicyScheduler(build_policy(settings, mode), metric=metric)


class PolicyScheduler(FIFOScheduler):
    """Runs trials first-in first-out and stops the ones ``policy`` rejects after an evaluation."""

    def __init__(self, policy: Policy, *, metric: str):
        super().__init__()
        self.policy = policy
        self._metric = metric
        self._mode = policy.mode

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        value = result.get(self._metric)
        interval = result.get(INTERVAL_KEY)
        if result.get(FINAL_KEY) or interval is None or not _is_number(value):
            return TrialScheduler.CONTINUE
        if self.policy.observe(trial.trial_id, int(interval), float(value)):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"Using {self.policy.name} early termination; stopped {len(self.policy.stopped)} trial(s)."


def stop_reasons(scheduler: Any) -> dict[str, str]:
    """Why each trial was stopped early, by trial id (empty for FIFO; ASHA gives no reasons)."""
    policy = getattr(scheduler, "policy", None)
    return dict(policy.stopped) if isinstance(policy, Policy) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

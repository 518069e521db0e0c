"""What training produced, in one shape for a single trial, a sweep and the pipeline.

``train``, a sweep and ``pipeline run`` all write :meth:`TrainOutcome.to_dict` to their
``--output-json`` (the pipeline adds its own keys around it), so a CI step reads the same
``status``, ``model_uri``, ``registered_model`` and ``promotion`` whatever ran. Registration
lives here too, so a single trial and a sweep register with the same tags and the same
promotion rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from visionautoml.automl import runs
from visionautoml.automl.leaderboard import TrialRecord
from visionautoml.config import JobConfig
from visionautoml.tracking import registry
from visionautoml.tracking.schema import PRIMARY_METRIC

OUTPUT_SCHEMA = "visionautoml.outcome/1"
"""The ``schema`` key of every ``--output-json``: bumped when a key changes meaning or goes away."""
SUCCEEDED, FAILED = "succeeded", "failed"


@dataclass
class RegisteredModel:
    name: str
    version: int
    aliases: list[str]


@dataclass
class TrainOutcome:
    """A finished single trial (``kind == "trial"``) or sweep; ``failure_reason`` set when it failed."""

    kind: Literal["trial", "sweep"]
    experiment_id: str | None = None
    parent_run_id: str | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    best: TrialRecord | None = None
    registered_model: RegisteredModel | None = None
    promotion: registry.PromotionDecision | None = None
    leaderboard_markdown: str = ""
    report: Path | None = None
    failure_reason: str | None = None

    @property
    def status(self) -> str:
        return FAILED if self.failure_reason else SUCCEEDED

    @property
    def run_id(self) -> str | None:
        return self.best.run_id if self.best else None

    @property
    def model_uri(self) -> str | None:
        return self.best.model_uri if self.best else None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.best.metrics if self.best else {}

    def summary(self) -> str:
        """One line for the console: the best run, its scores and what was registered."""
        metrics = self.metrics
        shown = ", ".join(
            f"{key} {metrics[key]:.4f}" for key in ("map", "map_50", "map_voc") if key in metrics
        )
        what = (
            f"sweep {self.parent_run_id}: best trial {self.best.number}, "
            if self.kind == "sweep" and self.best
            else ""
        )
        line = (
            f"{what}run {self.run_id}: {PRIMARY_METRIC} {metrics.get(PRIMARY_METRIC, 0.0):.4f} ({shown}) "
            f"at epoch {self.best.epoch if self.best else 0}; model {self.model_uri}"
        )
        if self.registered_model:
            model = self.registered_model
            line += f"; registered {model.name} version {model.version} ({', '.join(model.aliases)})"
        return line

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "schema": OUTPUT_SCHEMA,
            "status": self.status,
            "kind": self.kind,
            "failure_reason": self.failure_reason,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "primary_metric": PRIMARY_METRIC,
            "metrics": self.metrics,
            "best_trial": best.trial_id if best else None,
            "trials": [asdict(trial) for trial in self.trials],
            "registered_model": asdict(self.registered_model) if self.registered_model else None,
            "promotion": self.promotion.to_dict() if self.promotion else None,
            "report": str(self.report) if self.report else None,
        }


def register_and_promote(
    job: JobConfig,
    outcome: TrainOutcome,
    model_uri: str,
    metrics: dict[str, Any],
    dataset_tags: dict[str, str],
    *,
    fingerprint: str,
    model_name: str,
    started_from: str | None = None,
    console: Console | None = None,
) -> None:
    """Register ``model_uri`` as ``candidate`` and promote it if asked and it earns it; into ``outcome``."""
    numbers = {key: float(value) for key, value in metrics.items() if isinstance(value, int | float)}
    version = runs.register_model_version(
        job,
        model_uri,
        numbers,
        dataset_tags,
        config_hash=fingerprint,
        model_name=model_name,
        sweep_parent_run_id=outcome.parent_run_id,
        started_from=started_from,
    )
    registered = RegisteredModel(version.name, version.version, list(version.aliases))
    source = f"trial {outcome.best.number} ({outcome.best.run_id})" if outcome.best else model_uri
    if console is not None:
        console.print(
            f"Registered [bold]{registered.name}[/bold] version {registered.version} "
            f"(aliases: {', '.join(registered.aliases)}) from {source}"
        )
    if job.register.promote_if_better:
        outcome.promotion = registry.promote_if_better(
            registered.name, registered.version, job.register.promote_if_better, metric=PRIMARY_METRIC
        )
        if console is not None:
            console.print(outcome.promotion.message)
        if outcome.promotion.promoted:
            registered.aliases = sorted({*registered.aliases, outcome.promotion.alias})
    outcome.registered_model = registered

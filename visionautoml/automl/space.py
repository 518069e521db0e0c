"""Search spaces: the cloud service's YAML shape turned into what Ray Tune runs.

A search space is a list of *conditional sub-spaces*: each entry holds the models and
hyperparameters that make sense together (``ssdlite`` with its learning rates, the
Faster R-CNNs with theirs). Every trial picks one sub-space first and then samples only
that sub-space's parameters, so a parameter never applies to a model it was not meant
for. How each sampling algorithm does that:

- ``grid``: every combination of every sub-space's ``choice`` values, sub-space after
  sub-space, capped at ``limits.max_trials``. Only ``choice`` is allowed: a continuous
  distribution has no grid.
- ``random``: each trial picks a sub-space uniformly at random, then draws each of its
  parameters with Ray Tune's samplers. The draws are made up front with the sweep's
  seed, so a sweep (and its ``--resume``) runs exactly the same trials.
- ``bayesian``: Optuna's TPE chooses the sub-space as a categorical parameter and the
  parameters of the chosen sub-space as conditional parameters (named ``<index>:<name>``,
  because two sub-spaces may give one name different ranges), so it learns which
  sub-space pays off as well as which values.

``min_value``/``max_value`` are bounds of the value itself for every distribution,
including ``loguniform`` (the issue's ``{type: loguniform, min_value: 0.0005,
max_value: 0.01}`` means a learning rate between 0.0005 and 0.01); ``normal`` and
``lognormal`` take ``mu``/``sigma`` (``lognormal`` is ``exp(normal(mu, sigma))``);
``randint`` is an integer in ``[lower, upper)`` with ``lower`` defaulting to 0.

Every trial's parameters travel to Tune as ``{"params": {...}}``: a plain dict of
:class:`TrainingParameters` fields that overrides ``training_parameters``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from visionautoml.config import ParameterDistribution, TrainingParameters
from visionautoml.errors import ConfigError

SubSpace = dict[str, ParameterDistribution]


@dataclass(frozen=True)
class SearchPlan:
    """What the sweep will run: the sub-spaces, and for grid/random the trials' parameters."""

    algorithm: str
    subspaces: list[SubSpace]
    trials: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def searched_names(subspaces: list[SubSpace]) -> list[str]:
    """The searched hyperparameters in first-seen order: the leaderboard's columns."""
    names: dict[str, None] = {}
    for subspace in subspaces:
        names.update(dict.fromkeys(subspace))
    return list(names)


def plan_search(
    subspaces: list[SubSpace],
    algorithm: str,
    max_trials: int,
    seed: int,
    *,
    each_subspace_in_turn: bool = False,
) -> SearchPlan:
    """Turn sub-spaces into the trials grid/random will run (bayesian asks Optuna as it goes).

    The sub-spaces were checked when the config loaded (:func:`~visionautoml.config.search_space_problems`).
    ``each_subspace_in_turn``: random sampling takes the sub-spaces in turn instead of drawing one
    (the automatic mode's sub-spaces are its models, each to be tried).
    """
    if not subspaces:
        raise ConfigError("search_space is empty: give at least one sub-space, or remove it")
    if algorithm == "grid":
        return _plan_grid(subspaces, max_trials)
    if algorithm == "random":
        return SearchPlan(
            "random", subspaces, sample_random(subspaces, max_trials, seed, in_turn=each_subspace_in_turn)
        )
    if algorithm == "bayesian":
        _check_bayesian(subspaces)
        return SearchPlan("bayesian", subspaces)
    raise ConfigError(f"sweep.sampling_algorithm: unknown '{algorithm}'; use grid, random or bayesian")


def _plan_grid(subspaces: list[SubSpace], max_trials: int) -> SearchPlan:
    continuous = [
        f"search_space[{index}].{name} ({distribution.type})"
        for index, subspace in enumerate(subspaces)
        for name, distribution in subspace.items()
        if distribution.type != "choice"
    ]
    if continuous:
        raise ConfigError(
            "grid sampling needs every searched parameter to be a `choice`, but these are not: "
            f"{', '.join(continuous)}. List the values to try with `type: choice`, or use "
            "sweep.sampling_algorithm random or bayesian"
        )
    combinations = [
        dict(zip(subspace, values, strict=True))
        for subspace in subspaces
        for values in itertools.product(*(distribution.values for distribution in subspace.values()))
    ]
    notes = []
    if len(combinations) > max_trials:
        notes.append(
            f"the grid has {len(combinations)} combinations; limits.max_trials={max_trials} runs the first "
            f"{max_trials} (raise max_trials to run them all)"
        )
    return SearchPlan("grid", subspaces, combinations[:max_trials], notes)


def sample_random(
    subspaces: list[SubSpace], count: int, seed: int, *, in_turn: bool = False
) -> list[dict[str, Any]]:
    """``count`` trials: a sub-space drawn uniformly (or each ``in_turn``), then each of its parameters
    from Tune's samplers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    trials = []
    for index in range(count):
        subspace = subspaces[index % len(subspaces) if in_turn else int(rng.integers(len(subspaces)))]
        trials.append(_typed({name: _sample(distribution, rng) for name, distribution in subspace.items()}))
    return trials


def _typed(params: dict[str, Any]) -> dict[str, Any]:
    """Give each value its field's type, so a quantised batch size of ``4.0`` is shown and logged as ``4``."""
    typed = {}
    for name, value in params.items():
        try:
            typed[name] = getattr(TrainingParameters.model_validate({name: value}), name)
        except ValidationError:
            typed[name] = value
    return typed


def _sample(distribution: ParameterDistribution, rng: Any) -> Any:
    from ray import tune

    kind = distribution.type
    if kind == "choice":
        return tune.choice(distribution.values).sample(random_state=rng)
    if kind == "randint":
        return int(tune.randint(distribution.lower or 0, distribution.upper).sample(random_state=rng))
    if kind == "normal":
        return float(tune.randn(distribution.mu, distribution.sigma).sample(random_state=rng))
    if kind == "lognormal":
        return float(math.exp(tune.randn(distribution.mu, distribution.sigma).sample(random_state=rng)))
    low, high = distribution.min_value, distribution.max_value
    domain = {
        "uniform": lambda: tune.uniform(low, high),
        "loguniform": lambda: tune.loguniform(low, high),
        "quniform": lambda: tune.quniform(low, high, distribution.q),
        "qloguniform": lambda: tune.qloguniform(low, high, distribution.q),
    }[kind]()
    return float(domain.sample(random_state=rng))


def _check_bayesian(subspaces: list[SubSpace]) -> None:
    for index, subspace in enumerate(subspaces):
        for name, distribution in subspace.items():
            if distribution.type == "choice" and not all(
                value is None or isinstance(value, bool | int | float | str) for value in distribution.values
            ):
                raise ConfigError(
                    f"search_space[{index}].{name}: bayesian sampling needs choice values that are "
                    "numbers, strings, booleans or null"
                )


class OptunaSpace:
    """The define-by-run space OptunaSearch calls: the sub-space first, then its parameters.

    A class rather than a closure because Tune pickles the searcher for ``--resume``.
    """

    def __init__(self, subspaces: list[SubSpace]):
        self.subspaces = subspaces

    def __call__(self, trial: Any) -> dict[str, Any]:
        index = trial.suggest_categorical("subspace", list(range(len(self.subspaces))))
        params = {
            name: _suggest(trial, f"{index}:{name}", distribution)
            for name, distribution in self.subspaces[index].items()
        }
        return {"params": _typed(params)}


def _suggest(trial: Any, name: str, distribution: ParameterDistribution) -> Any:
    kind = distribution.type
    if kind == "choice":
        return trial.suggest_categorical(name, distribution.values)
    if kind == "randint":
        return trial.suggest_int(name, distribution.lower or 0, distribution.upper - 1)
    if kind in ("normal", "lognormal"):
        # TPE needs bounds; mu +- 3 sigma holds 99.7% of the mass.
        low, high = distribution.mu - 3 * distribution.sigma, distribution.mu + 3 * distribution.sigma
        value = trial.suggest_float(name, low, high)
        return math.exp(value) if kind == "lognormal" else value
    low, high = distribution.min_value, distribution.max_value
    if kind == "uniform":
        return trial.suggest_float(name, low, high)
    if kind == "loguniform":
        return trial.suggest_float(name, low, high, log=True)
    value = trial.suggest_float(name, low, high, log=kind == "qloguniform")
    return round(value / distribution.q) * distribution.q


def trial_parameters(fixed: TrainingParameters, searched: dict[str, Any]) -> TrainingParameters:
    """The parameters one trial trains with: the fixed ones, overridden by its searched values."""
    try:
        return TrainingParameters.model_validate({**fixed.model_dump(), **searched})
    except ValidationError as error:
        raise ConfigError(
            f"trial parameters {searched} are invalid: {error.errors()[0]['msg']}; narrow the search_space"
        ) from None

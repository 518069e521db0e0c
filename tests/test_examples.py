"""The example configs the README and the benchmarks run: each loads; a sweep plans what its comments say."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionautoml.automl import space
from visionautoml.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_example_config_loads(path):
    job = load_config(path)

    assert job.experiment_name


def test_the_yolox_example_gives_ssdlite_a_core_for_the_whole_budget_and_nano_then_tiny_the_other():
    job = load_config(EXAMPLES / "raccoon-yolox.yaml")
    limits, seed = job.limits, job.training_parameters.seed
    plan = space.plan_search(list(job.search_space), job.sweep.sampling_algorithm, limits.max_trials, seed)
    trials = [space.trial_parameters(job.training_parameters, trial) for trial in plan.trials]

    # Two at a time on two cores: the first two start together, the third when one of them ends.
    assert limits.max_concurrent_trials == 2
    models = [trial.model_name for trial in trials]
    assert models == ["ssdlite320_mobilenet_v3_large", "yolox_nano", "yolox_tiny"]
    ssdlite, nano, tiny = (trial.max_minutes for trial in trials)
    assert nano + tiny <= ssdlite <= limits.timeout_minutes

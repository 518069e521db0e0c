"""The config is one validated object: bad values fail before any work, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from visionautoml.config import JobConfig, load_config, parse_config
from visionautoml.errors import ConfigError


def test_defaults_follow_the_cloud_service() -> None:
    job = JobConfig()
    params = job.training_parameters
    assert params.optimizer == "sgd"
    assert params.learning_rate_scheduler == "warmup_cosine"
    assert params.validation_metric_type == "voc"
    assert params.box_score_threshold == pytest.approx(0.3)
    assert job.limits.max_trials == 1


def test_bad_value_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("training_parameters:\n  learning_rate: -1\n  optimizer: rmsprop\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message
    assert "training_parameters.learning_rate" in message
    assert "training_parameters.optimizer" in message


def test_unknown_key_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(ConfigError, match=r"training_parameters\.learnig_rate"):
        parse_config({"training_parameters": {"learnig_rate": 0.01}})


def test_search_space_distributions_are_checked() -> None:
    with pytest.raises(ConfigError, match="loguniform"):
        parse_config({"search_space": [{"learning_rate": {"type": "loguniform", "min_value": 0.001}}]})
    job = parse_config(
        {
            "limits": {"max_trials": 4, "max_concurrent_trials": 2},
            "sweep": {"early_termination": {"type": "bandit", "slack_factor": 0.2}},
            "search_space": [{"model_name": {"type": "choice", "values": ["ssdlite320_mobilenet_v3_large"]}}],
        }
    )
    assert job.search_space[0]["model_name"].values == ["ssdlite320_mobilenet_v3_large"]


def test_bandit_needs_exactly_one_slack() -> None:
    with pytest.raises(ConfigError, match="slack"):
        parse_config({"sweep": {"early_termination": {"type": "bandit"}}})


def test_fingerprint_is_stable_and_sensitive() -> None:
    a = parse_config({"training_parameters": {"learning_rate": 0.01}})
    b = parse_config({"training_parameters": {"learning_rate": 0.01}})
    c = parse_config({"training_parameters": {"learning_rate": 0.02}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_malformed_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("training_parameters: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)

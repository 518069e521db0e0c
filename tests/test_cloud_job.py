"""The cloud service's AutoML job file, read as it is (examples/azureml), and its SDK v1 habits."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, make_voc_dataset

from visionautoml.config import load_config, parse_config
from visionautoml.config.cloud import translate_cloud_job
from visionautoml.data.convert import convert
from visionautoml.errors import ConfigError

EXAMPLE = REPO_ROOT / "examples" / "azureml"
JOB = "cli-automl-image-object-detection-task-fridge-items.yml"
VISIONAUTOML = Path(sys.executable).parent / "visionautoml"


def test_the_example_job_is_understood_field_by_field_and_says_what_it_ignores(caplog):
    with caplog.at_level(logging.WARNING, logger="visionautoml"):
        job = load_config(EXAMPLE / JOB)
    assert job.training_data == str(EXAMPLE / "data" / "training-mltable-folder")  # relative to the file
    assert job.validation_data == str(EXAMPLE / "data" / "validation-mltable-folder")
    assert (job.limits.max_trials, job.limits.max_concurrent_trials, job.limits.timeout_minutes) == (
        10,
        2,
        60,
    )
    termination = job.sweep.early_termination
    assert (termination.type, termination.evaluation_interval, termination.delay_evaluation) == (
        "bandit",
        2,
        6,
    )
    assert job.search_space[0]["model_size"].values == ["small", "medium"]
    assert job.compute.target == "local"
    for ignored in ("$schema", "type", "description", "compute"):
        assert sum(f"{JOB}: {ignored} " in message for message in caplog.messages) == 1, ignored


def test_sdk_v1_names_and_string_expressions_are_mapped():
    raw = translate_cloud_job(
        {
            "type": "automl",
            "training_data": {"type": "mltable", "path": "train"},
            "training_parameters": {"img_size": 320, "box_score_thresh": 0.4, "split_ratio": 0.3},
            "search_space": [
                {
                    "model_name": "choice('ssdlite320_mobilenet_v3_large', 'fasterrcnn_resnet18_fpn')",
                    "lr_scheduler": "choice(['step', 'warmup_cosine'])",
                    "learning_rate": "loguniform(-7, -3)",
                    "momentum": "uniform(0.8, 0.95)",
                }
            ],
        },
        source="job.yml",
    )
    job = parse_config(raw)
    params = job.training_parameters
    assert (params.image_size, params.box_score_threshold, job.validation_data_size) == (320, 0.4, 0.3)
    subspace = job.search_space[0]
    assert subspace["model_name"].values == ["ssdlite320_mobilenet_v3_large", "fasterrcnn_resnet18_fpn"]
    assert subspace["learning_rate_scheduler"].values == ["step", "warmup_cosine"]
    learning_rate = subspace["learning_rate"]  # the cloud SDK's bounds are logarithms
    assert learning_rate.type == "loguniform" and round(learning_rate.min_value, 6) == 0.000912
    assert (subspace["momentum"].min_value, subspace["momentum"].max_value) == (0.8, 0.95)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"task": "image_classification", "type": "automl"}, "task 'image_classification' is not supported"),
        ({"type": "automl", "primary_metric": "accuracy"}, "primary_metric 'accuracy' is not supported"),
        (
            {"type": "automl", "training_data": {"type": "mltable", "path": "azureml:fridge:1"}},
            "cloud data asset",
        ),
        ({"type": "command"}, "is not an AutoML job"),
    ],
)
def test_what_cannot_be_honoured_is_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        translate_cloud_job(raw, source="job.yml")


def test_a_typo_is_answered_with_the_closest_field():
    with pytest.raises(
        ConfigError, match=r"training_parameters.lerning_rate: unknown field; did you mean 'learning_rate'"
    ):
        parse_config({"training_parameters": {"lerning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"limits.max_trails: unknown field; did you mean 'max_trials'"):
        parse_config({"limits": {"max_trails": 3}})


@pytest.fixture
def example_copy(tmp_path):
    """The example folder with local data: what a user gets after the README's two commands."""
    folder = tmp_path / "azureml"
    shutil.copytree(EXAMPLE, folder)
    data = make_voc_dataset(tmp_path / "voc", n_images=10)
    convert(data, folder / "data" / "jsonl", "jsonl", validation_every=5)
    return folder


@pytest.fixture
def yolov5_job(example_copy) -> Path:
    """The example job as a migrating user has it: the cloud service's default model, yolov5."""
    job = example_copy / JOB
    job.write_text(job.read_text().replace("values: [yolox]", "values: [yolov5]"))
    return job


def test_the_unchanged_cloud_job_with_yolov5_is_refused_before_any_run(yolov5_job, tmp_path):
    done = subprocess.run(
        [str(VISIONAUTOML), "train", str(yolov5_job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "'yolov5' (Ultralytics YOLO) is AGPL-3.0" in done.stderr and "use model_name: yolox" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / ".visionautoml").exists()


def test_a_refused_job_is_answered_without_importing_ray_or_mlflow(yolov5_job):
    """What keeps the refusal under a second: Ray Tune and MLflow (seconds to import) load after it."""
    probe = (
        "import sys\n"
        "from visionautoml.cli import main\n"
        f"sys.argv = ['visionautoml', 'train', {str(yolov5_job)!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        "    loaded = sorted({'ray', 'mlflow', 'torch'} & set(sys.modules))\n"
        "    print('exit', done.code, 'loaded', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "AGPL-3.0" in done.stderr
    assert done.stdout.strip() == "exit 1 loaded []"


@pytest.mark.slow
def test_the_example_job_trains_and_registers(example_copy, tmp_path, local_ray):
    small = [
        "limits.max_trials=1",
        "limits.max_concurrent_trials=1",
        "training_parameters.pretrained=none",  # no network here for the COCO weights the cloud starts from
        "training_parameters.number_of_epochs=1",
        "training_parameters.image_size=64",
        "training_parameters.number_of_workers=0",
    ]
    command = [
        str(VISIONAUTOML),
        "train",
        str(example_copy / JOB),
        "--output-json",
        str(tmp_path / "out.json"),
    ]
    for setting in small:
        command += ["--set", setting]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads((tmp_path / "out.json").read_text())
    assert outcome["status"] == "succeeded" and outcome["kind"] == "sweep"
    assert outcome["trials"][0]["params"]["model_name"] == "yolox"
    assert outcome["registered_model"]["name"] == "dpv2-cli-automl-image-object-detection-experiment"
    assert yaml.safe_load((example_copy / JOB).read_text())["search_space"][0]["model_name"]["values"] == [
        "yolox"
    ]

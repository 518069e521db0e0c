"""Tracking against a real embedded MLflow store: where runs go, and models logged and found again."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image

from visionautoml.config import JobConfig, TrainingParameters, parse_config
from visionautoml.errors import TrackingError
from visionautoml.models.saved import ModelSpec, load_model, save_model
from visionautoml.models.zoo import build_model
from visionautoml.tracking import workspace
from visionautoml.tracking.models import log_saved_model, resolve_model
from visionautoml.tracking.workspace import connect, resolve_tracking_uri

TINY = TrainingParameters(
    model_name="ssdlite320_mobilenet_v3_large", pretrained="none", image_size=64, box_score_threshold=0.0
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[JobConfig]:
    """One workspace (and so one SQLite store) for the module: creating one costs seconds of migrations."""
    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield parse_config({"workspace": str(root / "ws"), "experiment_name": "tracking-tests"})
    mlflow.set_tracking_uri(previous)
    workspace._connected_uri = None


@pytest.fixture(autouse=True)
def current_store(store):
    """Every test talks to the module's store: the suite resets MLflow's current store after each test."""
    connect(store)


@pytest.fixture(scope="module")
def logged(store, tmp_path_factory) -> dict:
    """A tiny detector saved, logged as a pyfunc model and registered as version 1 of ``tiny``."""
    connect(store)
    torch.manual_seed(0)
    module = build_model(TINY.model_name, 3, TINY)
    spec = ModelSpec.from_params(TINY, ["cat", "dog"])
    saved = save_model(module, spec, tmp_path_factory.mktemp("saved") / "model")
    with mlflow.start_run() as run:
        uri = log_saved_model(saved)
    version = mlflow.register_model(uri, "tiny")
    MlflowClient().set_registered_model_alias("tiny", "champion", version.version)
    logged_model = mlflow.get_run(run.info.run_id).outputs.model_outputs[0].model_id
    return {"uri": uri, "run_id": run.info.run_id, "saved": saved, "module": module, "model_id": logged_model}


def test_tracking_uri_is_env_then_config_then_workspace_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = parse_config({"workspace": str(tmp_path / "ws")})
    assert resolve_tracking_uri(job) == f"sqlite:///{tmp_path / 'ws' / 'mlflow.db'}"
    configured = job.model_copy(
        update={"tracking": job.tracking.model_copy(update={"uri": "http://127.0.0.1:5"})}
    )
    assert resolve_tracking_uri(configured) == "http://127.0.0.1:5"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlflow.db")
    assert resolve_tracking_uri(configured) == "sqlite:////elsewhere/mlflow.db"


def test_connect_keeps_runs_and_artifacts_inside_the_workspace(store):
    first = connect(store)
    assert connect(store) == first
    experiment = mlflow.get_experiment(first)
    root = Path(store.workspace)
    assert (root / "mlflow.db").is_file()
    assert experiment.artifact_location == (root / "artifacts").as_uri()
    other = connect(store, experiment_name="to-delete")
    MlflowClient().delete_experiment(other)
    with pytest.raises(TrackingError, match=r"experiment 'to-delete' .* is deleted: restore it"):
        connect(store, experiment_name="to-delete")


def test_a_logged_model_resolves_from_every_uri_form(logged, tmp_path):
    expected = logged["module"].state_dict()
    downloaded = Path(mlflow.artifacts.download_artifacts(logged["uri"], dst_path=str(tmp_path / "mlflow")))
    forms = [
        logged["uri"],
        "models:/tiny/1",
        "models:/tiny@champion",
        f"models:/{logged['model_id']}",
        str(logged["saved"]),
        str(downloaded),
    ]
    for form in forms:
        directory = resolve_model(form)
        module, spec = load_model(directory)
        assert spec.labels == ["cat", "dog"] and spec.model_name == TINY.model_name, form
        assert all(torch.equal(module.state_dict()[key], value) for key, value in list(expected.items())[:5])


def test_the_logged_pyfunc_answers_in_the_automl_box_format(logged):
    buffer = io.BytesIO()
    Image.new("RGB", (80, 60), (200, 40, 40)).save(buffer, format="PNG")
    request = pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode()], "filename": ["red.png"]})
    answer = mlflow.pyfunc.load_model(logged["uri"]).predict(request)
    assert list(answer["filename"]) == ["red.png"]
    boxes = answer["boxes"][0]
    assert boxes, "box_score_threshold 0 keeps the top detections of even an untrained model"
    for box in boxes:
        assert box["label"] in ("cat", "dog") and 0 <= box["score"] <= 1
        assert 0 <= box["box"]["topX"] <= box["box"]["bottomX"] <= 1
        assert 0 <= box["box"]["topY"] <= box["box"]["bottomY"] <= 1
    mlmodel = yaml.safe_load((resolve_model(logged["uri"]).parent.parent / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"python_function"}, "weights travel as a state dict, never pickled"


def test_unresolvable_models_raise_errors_that_say_what_to_give(logged, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    cases = {
        str(tmp_path / "missing"): "no such model",
        str(tmp_path / "empty"): "not a model directory",
        str(tmp_path / "foreign"): "not one logged by visionautoml",
        "runs:/0123456789abcdef0123456789abcdef/model": "cannot fetch the model",
        "models:/no-such-model/1": "cannot fetch the model",
        "models:/tiny@no-such-alias": "cannot fetch the model",
    }
    for uri, message in cases.items():
        with pytest.raises(TrackingError, match=message):
            resolve_model(uri)
    with pytest.raises(TrackingError, match="no tracking store at"):
        resolve_model("models:/tiny/1", tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")

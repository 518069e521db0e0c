"""Saved-model folders, the Predictor, the cloud response format and the MLflow pyfunc."""

from __future__ import annotations

import base64
import io
import json

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from visionautoml.config import TrainingParameters
from visionautoml.data.images import decode_image_bytes
from visionautoml.errors import DataError
from visionautoml.models.predictor import Detections, Predictor, automl_boxes
from visionautoml.models.saved import ModelSpec, load_model, save_model
from visionautoml.models.zoo import build_model
from visionautoml.tracking import pyfunc

LITE = "ssdlite320_mobilenet_v3_large"
LABELS = ["raccoon", "dog"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _params(**changes) -> TrainingParameters:
    values = {
        "model_name": LITE,
        "pretrained": "none",
        "image_size": 96,
        "box_score_threshold": 0.0,
    } | changes
    return TrainingParameters(**values)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small untrained detector saved as a model folder (a random model still returns boxes)."""
    torch.manual_seed(0)
    params = _params(box_detections_per_image=5)
    directory = tmp_path_factory.mktemp("models") / "model"
    save_model(build_model(LITE, 3, params), ModelSpec.from_params(params, LABELS), directory)
    return directory


def _png(size=(80, 60), colour=(200, 40, 40)) -> bytes:
    image = Image.new("RGB", size, (110, 110, 110))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 35], fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_saved_model_folder_round_trips_to_identical_predictions(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["labels.json", "model.json", "weights.pt"]
    spec = json.loads((saved / "model.json").read_text())
    assert spec["model_name"] == LITE and spec["labels"] == LABELS and spec["num_classes"] == 3
    assert spec["image_size"] == 96 and spec["thresholds"]["box_detections_per_image"] == 5
    assert spec["format_version"] == 2
    assert json.loads((saved / "labels.json").read_text()) == LABELS

    module, loaded_spec = load_model(saved)
    assert not module.training and loaded_spec.labels == LABELS
    image = decode_image_bytes(_png())
    first, second = (
        Predictor(module, loaded_spec).predict([image]),
        Predictor.from_directory(saved).predict([image]),
    )
    assert torch.equal(first[0].boxes, second[0].boxes) and first[0].labels == second[0].labels


def test_predictions_are_sorted_named_in_image_pixels_and_independent_of_batching(saved):
    predictor = Predictor.from_directory(saved, batch_size=2)
    images = [decode_image_bytes(_png(size)) for size in [(80, 60), (50, 90), (120, 40)]]

    together = predictor.predict(images)
    alone = [Predictor.from_directory(saved, batch_size=1).predict([image])[0] for image in images]

    for found, single, image in zip(together, alone, images, strict=True):
        assert 0 < len(found) <= 5 and set(found.labels) <= set(LABELS)
        assert found.scores.tolist() == sorted(found.scores.tolist(), reverse=True)
        assert found.boxes[:, 2].max() <= image.shape[2] and found.boxes[:, 3].max() <= image.shape[1]
        assert torch.allclose(found.boxes, single.boxes, atol=1e-3) and found.labels == single.labels


def test_predictor_never_reports_the_background_label(tmp_path):
    # RetinaNet scores label 0 like any class (sigmoid head); untrained, it predicts it often.
    torch.manual_seed(0)
    params = TrainingParameters(
        model_name="retinanet_resnet18_fpn",
        pretrained="none",
        min_size=64,
        max_size=64,
        box_score_threshold=0.0,
    )
    module = build_model(params.model_name, 3, params)
    raw = module.eval()([torch.rand(3, 48, 64)])[0]
    assert (raw["labels"] == 0).any()
    torch.manual_seed(0)
    found = Predictor(module, ModelSpec.from_params(params, LABELS)).predict([decode_image_bytes(_png())])[0]
    assert len(found) > 0 and set(found.labels) <= set(LABELS)


def test_automl_boxes_are_normalised_clipped_and_rounded():
    detections = Detections(
        boxes=torch.tensor([[10.0, 20.0, 50.0, 60.0], [-5.0, 30.0, 250.0, 120.0]]),
        scores=torch.tensor([0.987654, 0.5]),
        labels=["raccoon", "dog"],
    )
    assert automl_boxes(detections, width=200, height=100) == [
        {
            "box": {"topX": 0.05, "topY": 0.2, "bottomX": 0.25, "bottomY": 0.6},
            "label": "raccoon",
            "score": 0.9877,
        },
        {"box": {"topX": 0.0, "topY": 0.3, "bottomX": 1.0, "bottomY": 1.0}, "label": "dog", "score": 0.5},
    ]
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), [])
    assert automl_boxes(empty, 10, 10) == []


def test_save_model_is_atomic(tmp_path, monkeypatch):
    params = _params()
    module = build_model(LITE, 3, params)
    spec = ModelSpec.from_params(params, LABELS)
    save_model(module, spec, tmp_path / "model")
    before = (tmp_path / "model" / "weights.pt").read_bytes()

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(module, spec, tmp_path / "model")
    with pytest.raises(OSError, match="No space left"):
        save_model(module, spec, tmp_path / "other")

    assert (tmp_path / "model" / "weights.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_broken_model_folders_are_clear_errors(saved, tmp_path):
    with pytest.raises(DataError, match="not a model folder"):
        load_model(tmp_path / "absent")

    def broken(name: str, edit) -> None:
        folder = tmp_path / name
        folder.mkdir()
        for file in saved.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        edit(folder)

    broken("no-spec", lambda f: (f / "model.json").unlink())
    broken("bad-json", lambda f: (f / "model.json").write_text("{"))
    broken("no-weights", lambda f: (f / "weights.pt").unlink())
    broken("labels-edited", lambda f: (f / "labels.json").write_text('["cat", "dog"]'))

    def respec(folder, **changes):
        spec = json.loads((folder / "model.json").read_text()) | changes
        (folder / "model.json").write_text(json.dumps(spec))

    broken("newer", lambda f: respec(f, format_version=7))
    broken("unknown-model", lambda f: respec(f, model_name="yolov9"))
    broken("bad-count", lambda f: respec(f, num_classes=5))
    broken(
        "other-classes",
        lambda f: (
            respec(f, num_classes=4, labels=[*LABELS, "cat"]),
            (f / "labels.json").write_text('["raccoon", "dog", "cat"]'),
        ),
    )

    expected = {
        "no-spec": r"no-spec/model.json: missing",
        "bad-json": r"bad-json/model.json: unreadable or not JSON",
        "no-weights": r"no-weights/weights.pt: missing",
        "labels-edited": r"labels-edited/labels.json: labels differ",
        "newer": r"format_version 7 was written by a newer visionautoml",
        "unknown-model": r"model_name 'yolov9' is not in this version's model zoo",
        "bad-count": r"bad-count/model.json: invalid model spec: num_classes must be len\(labels\) \+ 1",
        "other-classes": r"weights.pt: does not match ssdlite320_mobilenet_v3_large with 4 classes "
        r"from model.json \(wrong shape: head.classification_head",
    }
    for name, message in expected.items():
        with pytest.raises(DataError, match=message):
            load_model(tmp_path / name)


def test_mlflow_pyfunc_logged_from_code_answers_in_the_cloud_format(saved, tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc.CODE_PATH,
                artifacts={pyfunc.ARTIFACT_KEY: str(saved)},
                signature=pyfunc.signature(),
                pip_requirements=["torch", "torchvision"],
            )
        model = mlflow.pyfunc.load_model(info.model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    assert not list((tmp_path / "artifacts").rglob("*.pkl"))  # models from code: nothing pickled

    data = [_png(), _png((40, 70), (40, 40, 200))]
    request = pd.DataFrame(
        {"image": [base64.b64encode(image).decode() for image in data], "filename": ["a.png", "b.png"]}
    )
    response = model.predict(request)

    predictor = Predictor.from_directory(saved)
    images = [decode_image_bytes(image) for image in data]
    expected = [automl_boxes(found, 80, 60) for found in predictor.predict(images[:1])]
    expected += [automl_boxes(found, 40, 70) for found in predictor.predict(images[1:])]
    assert response["filename"].tolist() == ["a.png", "b.png"]
    assert response["boxes"].tolist() == expected
    assert set(response["boxes"][0][0]) == {"box", "label", "score"}

    raw = model.unwrap_python_model().predict(None, pd.DataFrame({"image": [data[0]]}))
    assert raw["filename"].tolist() == ["0"] and raw["boxes"].tolist() == expected[:1]
    with pytest.raises(DataError, match="0: the image is not valid base64"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"image": ["not base64!"]}))
    with pytest.raises(DataError, match="needs an `image` column"):
        model.unwrap_python_model().predict(None, pd.DataFrame({"picture": ["x"]}))

"""The MLflow pyfunc of a detector, written for MLflow's "models from code".

MLflow logs this file's source instead of pickling an object, so a logged model holds
only code from this package, the saved-model folder (tensors + JSON) and no pickle:
loading it runs no code from the artifact store. Log it with::

    mlflow.pyfunc.log_model(
        name="model",
        python_model=pyfunc.CODE_PATH,
        artifacts={pyfunc.ARTIFACT_KEY: "path/to/saved-model-folder"},
        signature=pyfunc.signature(),
    )

Input: a DataFrame with an ``image`` column of base64 strings (or raw bytes) and an
optional ``filename`` column. Output: the cloud service's response, one row per image
with ``filename`` and ``boxes`` (see :func:`~visionautoml.models.predictor.automl_boxes`).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from visionautoml.data.images import decode_image_bytes
from visionautoml.errors import DataError
from visionautoml.models.predictor import Predictor, automl_boxes
from visionautoml.models.tiling import with_tiling

CODE_PATH = str(Path(__file__).resolve())
ARTIFACT_KEY = "model"


def signature() -> ModelSignature:
    """The request schema MLflow serving enforces: base64 images, optionally named."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "filename", required=False)])
    )


def image_bytes(value: Any, *, name: str) -> bytes:
    """Raw bytes of one request image given as bytes or base64 (optionally a ``data:`` URL)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str):
        raise DataError(f"{name}: the image must be a base64 string or bytes, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{name}: the image is not valid base64") from None


class DetectorModel(mlflow.pyfunc.PythonModel):
    """Loads the saved-model folder from the model's artifacts and answers in the cloud format."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # The model's own tiling, as `predict` and `serve` run it.
        self.predictor = with_tiling(Predictor.from_directory(context.artifacts[ARTIFACT_KEY]))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise DataError("the request needs an `image` column of base64-encoded images")
        given = frame["filename"] if "filename" in frame.columns else [None] * len(frame)
        names = [str(index) if pd.isna(name) else str(name) for index, name in enumerate(given)]
        images = [
            decode_image_bytes(image_bytes(value, name=name), name=name)
            for value, name in zip(frame["image"], names, strict=True)
        ]
        detections = self.predictor.predict(images)
        return pd.DataFrame(
            {
                "filename": names,
                "boxes": [
                    automl_boxes(found, image.shape[2], image.shape[1])
                    for found, image in zip(detections, images, strict=True)
                ],
            }
        )


mlflow.models.set_model(DetectorModel())

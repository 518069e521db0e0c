"""Shared fixtures: tiny generated datasets, and the path to the real raccoon data when present."""

from __future__ import annotations

import os
import random
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parent.parent
RACCOON_DIR = REPO_ROOT.parent / "shared" / "datasets" / "raccoon"

COLOURS = {"red_square": (220, 30, 30), "blue_square": (30, 30, 220)}

TINY_TRAINING = {
    "model_name": "ssdlite320_mobilenet_v3_large",
    "pretrained": "none",
    "image_size": 64,
    "training_batch_size": 4,
    "validation_batch_size": 4,
    "number_of_workers": 0,
    "optimizer": "adamw",
    "learning_rate": 0.001,
    "warmup_cosine_lr_warmup_epochs": 1,
    "early_stopping": False,
}
"""Training parameters for tests that train a real model: the loop, not the model, is under test."""


def make_voc_dataset(
    root: Path,
    n_images: int = 10,
    size: tuple[int, int] = (64, 48),
    classes: tuple[str, ...] = ("red_square", "blue_square"),
    seed: int = 0,
    difficult_every: int = 0,
) -> Path:
    """Write a VOC folder (images/ + annotations/) of noisy images with coloured boxes.

    Each image holds one or two solid rectangles whose colour gives the class, so a
    detector can learn the task in a few iterations. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    width, height = size
    for index in range(n_images):
        image = Image.new("RGB", size, (rng.randint(90, 160),) * 3)
        draw = ImageDraw.Draw(image)
        objects = []
        for obj_index in range(1 + index % 2):
            label = classes[(index + obj_index) % len(classes)]
            w, h = rng.randint(width // 5, width // 2), rng.randint(height // 5, height // 2)
            x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
            colour = COLOURS.get(label, (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)))
            draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=colour)
            difficult = int(bool(difficult_every) and index % difficult_every == 0 and obj_index == 0)
            objects.append((label, x0, y0, x0 + w, y0 + h, difficult))
        name = f"img-{index:03d}"
        image.save(root / "images" / f"{name}.jpg", quality=95)
        xml_objects = "".join(
            f"<object><name>{label}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for label, x0, y0, x1, y1, difficult in objects
        )
        (root / "annotations" / f"{name}.xml").write_text(
            f"<annotation><folder>images</folder><filename>{name}.jpg</filename>"
            f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
            f"<segmented>0</segmented>{xml_objects}</annotation>",
            encoding="utf-8",
        )
    return root


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    return make_voc_dataset(tmp_path / "tiny_voc")


@pytest.fixture
def raccoon_dir() -> Path:
    if not (RACCOON_DIR / "annotations").is_dir():
        pytest.skip(f"real dataset not found at {RACCOON_DIR} (only present on the project's machines)")
    return RACCOON_DIR


# --- deploy: one tiny trained detector for test_export, test_predict and test_serve (owner: deploy) ---


@dataclass(frozen=True)
class DeployModel:
    data: Path  # VOC folder of textured images it was trained on
    saved: Path  # saved-model folder
    export: Path  # its ONNX export, parity checked


@pytest.fixture(scope="session")
def deploy_model(tmp_path_factory: pytest.TempPathFactory) -> DeployModel:
    """SSDlite trained four steps on noisy squares: barely a detector, but its scores differ box to box."""
    import numpy as np
    import torch

    from visionautoml.config import TrainingParameters
    from visionautoml.data.images import decode_image_file
    from visionautoml.deploy.export import export_saved_model, synthetic_images
    from visionautoml.deploy.runtime import ExportSettings
    from visionautoml.models.saved import ModelSpec, save_model
    from visionautoml.models.zoo import build_model

    root = tmp_path_factory.mktemp("deploy")
    data = make_voc_dataset(root / "data", n_images=4, size=(96, 72))
    noise = np.random.default_rng(0)
    images, targets, classes = [], [], ["blue_square", "red_square"]
    for xml in sorted((data / "annotations").glob("*.xml")):
        path = data / "images" / f"{xml.stem}.jpg"
        pixels = np.asarray(Image.open(path), dtype=np.int16) + noise.integers(-25, 26, (72, 96, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
        objects = ET.parse(xml).findall("object")
        corners = [
            [float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects
        ]
        labels = [classes.index(o.findtext("name")) + 1 for o in objects]
        images.append(decode_image_file(path).float() / 255)
        targets.append({"boxes": torch.tensor(corners), "labels": torch.tensor(labels)})
    params = TrainingParameters(
        model_name="ssdlite320_mobilenet_v3_large",
        pretrained="none",
        image_size=64,
        box_score_threshold=0.05,
    )
    torch.manual_seed(0)
    model = build_model(params.model_name, len(classes) + 1, params)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(4):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    spec = ModelSpec.from_params(params, classes)
    saved = save_model(model.eval(), spec, root / "model")
    settings = ExportSettings.from_spec(spec)
    export = export_saved_model(
        model, settings, root / "export", synthetic_images(), sample_source="synthetic"
    )
    return DeployModel(data, saved, export.directory)


_REGISTER_SCRIPT = """
import sys
from pathlib import Path

import mlflow

from visionautoml.config import JobConfig
from visionautoml.tracking.models import log_saved_model
from visionautoml.tracking.registry import register_model
from visionautoml.tracking.workspace import connect

connect(JobConfig(workspace=sys.argv[1]))
with mlflow.start_run():
    mlflow.set_tag("dataset.validation.path", sys.argv[3])
    uri = log_saved_model(Path(sys.argv[2]))
register_model(uri, "deploy-tiny")
"""


@pytest.fixture(scope="session")
def deploy_registry(deploy_model: DeployModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """``deploy_model`` logged and registered in a fresh workspace: (tracking URI, models:/ URI).

    Registered in a subprocess so this process's MLflow settings stay untouched; pass the
    tracking URI to what uses it (MLFLOW_TRACKING_URI of a CLI call, MlflowClient(uri)).
    """
    import os
    import subprocess
    import sys

    workspace = tmp_path_factory.mktemp("deploy-workspace")
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    command = [
        sys.executable,
        "-c",
        _REGISTER_SCRIPT,
        str(workspace),
        str(deploy_model.saved),
        str(deploy_model.data),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return f"sqlite:///{workspace / 'mlflow.db'}", "models:/deploy-tiny@candidate"


_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def no_tracking_store_leaks_between_tests():
    """`connect()` makes a store MLflow's process-wide current one and exports MLFLOW_TRACKING_URI,
    which overrides a config's tracking URI; no test may inherit a store an earlier test or fixture
    chose, so both go back to what the user's environment had."""
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None
    if _USER_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = _USER_TRACKING_URI


@pytest.fixture
def one_torch_thread():
    """Two intra-op threads on two cores shared with other test processes thrash (measured 100x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """One loopback-only Ray for the module; run_sweep and Tune use a running Ray as it is."""
    import shutil
    import tempfile

    import ray

    from visionautoml.automl import compute

    temp_dir = tempfile.mkdtemp(prefix="vaml-test-ray-", dir="/tmp")
    try:
        compute.start_local_ray(num_cpus=2, temp_dir=temp_dir)
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)

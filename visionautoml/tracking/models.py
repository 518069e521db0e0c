"""Models in MLflow: log a saved-model directory as a pyfunc model, and find it again from any URI.

A model is logged with MLflow's models-from-code: the pyfunc is the source file
``visionautoml/models/pyfunc.py`` and the saved-model directory (``weights.pt`` state dict,
``model.json``, ``labels.json``) travels as its artifact. Nothing is pickled, so loading a
model never runs code stored in the artifact store (``mlflow.pytorch.log_model`` would try
torch.export, which fails on these detectors, then fall back to pickling the module).

Everything else (evaluate, export, serve) needs only the saved-model directory, which
:func:`resolve_model` returns for ``runs:/``, ``models:/`` URIs and plain paths alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from visionautoml.errors import TrackingError
from visionautoml.tracking.auth import scrub_credentials, server_name
from visionautoml.tracking.workspace import ENV_TRACKING_URI, current_tracking_uri, sqlite_path

MODEL_ARTIFACT_NAME = "model"
SAVED_MODEL_FILE = "model.json"
URI_FORMS = "runs:/RUN_ID/model, models:/NAME@ALIAS, models:/NAME/VERSION or a saved-model directory"

# What a fresh environment needs to load the pyfunc, pinned to what trained it.
_REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "mlflow")


def log_saved_model(directory: Path, *, name: str = MODEL_ARTIFACT_NAME) -> str:
    """Log ``directory`` (a saved model) to the active MLflow run; returns ``runs:/RUN_ID/NAME``."""
    import mlflow

    from visionautoml.models import pyfunc

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_saved_model needs an active MLflow run (mlflow.start_run)")
    with warnings.catch_warnings():
        # MLflow suggests an input example (logging one would run the model once more) and type
        # hints it cannot use with an explicit signature; neither applies here.
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*", category=UserWarning)
        mlflow.pyfunc.log_model(
            name=name,
            python_model=pyfunc.CODE_PATH,
            artifacts={pyfunc.ARTIFACT_KEY: str(directory)},
            signature=pyfunc.signature(),
            pip_requirements=_pinned_requirements(),
        )
    return f"runs:/{run.info.run_id}/{name}"


def resolve_model(uri: str, *, tracking_uri: str | None = None, dst: Path | None = None) -> Path:
    """The local saved-model directory behind ``uri``, downloading it from MLflow when needed.

    Accepts ``runs:/RUN_ID/model``, ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an MLflow
    logged-model URI (``models:/m-...``), an MLflow model directory or a saved-model directory.
    The store is ``tracking_uri``, else the one :func:`~visionautoml.tracking.workspace.connect`
    chose, else ``MLFLOW_TRACKING_URI`` or the default workspace's.
    """
    local = Path(uri).expanduser()
    if "://" not in uri and not uri.startswith(("runs:", "models:")):
        if not local.exists():
            raise TrackingError(f"{uri}: no such model. Give {URI_FORMS}")
        return _saved_model_in(local, uri)

    import mlflow
    from mlflow.exceptions import MlflowException

    store = tracking_uri or current_tracking_uri()
    database = sqlite_path(store)
    if database is not None and not database.is_file():
        raise TrackingError(
            f"{uri}: there is no tracking store at {database} to look the model up in. Run from the folder "
            "holding the workspace (.visionautoml), or set MLFLOW_TRACKING_URI to the store the model was "
            "logged to"
        )
    destination = dst or Path(tempfile.mkdtemp(prefix="visionautoml-model-"))
    try:
        with _current_store(store):
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=store
            )
    except MlflowException as error:
        raise TrackingError(
            f"{uri}: cannot fetch the model from the tracking store {server_name(store)}: "
            f"{scrub_credentials(_first_line(error.message))}. Check the run id, model name, alias or "
            "version (`visionautoml models list`), and MLFLOW_TRACKING_URI"
        ) from None
    except OSError as error:
        raise TrackingError(f"{uri}: cannot download the model: {error}") from None
    return _saved_model_in(Path(downloaded), uri)


@contextmanager
def _current_store(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's current store, then restore exactly what was there before.

    ``models:/`` URIs are looked up in the process-wide registry whatever ``tracking_uri`` says.
    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI (and unsets it on None), so both
    the module global and the variable are put back by hand.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_global, saved_variable = utils._tracking_uri, os.environ.get(ENV_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = saved_global
        if saved_variable is None:
            os.environ.pop(ENV_TRACKING_URI, None)
        else:
            os.environ[ENV_TRACKING_URI] = saved_variable


def _saved_model_in(directory: Path, uri: str) -> Path:
    """The saved-model folder: ``directory`` itself, or the pyfunc artifact inside an MLflow model."""
    if (directory / SAVED_MODEL_FILE).is_file():
        return directory
    mlmodel = directory / "MLmodel"
    if mlmodel.is_file():
        try:
            flavor = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))["flavors"]["python_function"]
            for artifact in (flavor.get("artifacts") or {}).values():
                candidate = directory / artifact["path"]
                if (candidate / SAVED_MODEL_FILE).is_file():
                    return candidate
        except (yaml.YAMLError, KeyError, TypeError):
            pass
        raise TrackingError(
            f"{uri}: an MLflow model, but not one logged by visionautoml (no saved-model artifact "
            f"with {SAVED_MODEL_FILE}); train it with `visionautoml train` or give a saved-model directory"
        )
    raise TrackingError(f"{uri}: not a model directory (no {SAVED_MODEL_FILE} or MLmodel). Give {URI_FORMS}")


def _pinned_requirements() -> list[str]:
    pinned = []
    for package in _REQUIREMENTS:
        try:
            version = importlib.metadata.version(package).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            continue
        pinned.append(f"{package}=={version}")
    return pinned


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text and text.strip() else "unknown error"

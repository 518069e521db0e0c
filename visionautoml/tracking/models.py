"""Models in MLflow: log a saved-model directory as a pyfunc model, and find it again from any URI.

A model is logged with MLflow's models-from-code: the pyfunc is the source file
``visionautoml/tracking/pyfunc.py`` and the saved-model directory (``weights.pt`` state dict,
``model.json``, ``labels.json``) travels as its artifact. Nothing is pickled, so loading a
model never runs code stored in the artifact store (``mlflow.pytorch.log_model`` would try
torch.export, which fails on these detectors, then fall back to pickling the module).

Everything else (evaluate, export, serve) needs only the saved-model directory, which
:func:`resolve_model` returns for ``runs:/``, ``models:/`` URIs and plain paths alike.
"""

from __future__ import annotations

import importlib.metadata
import tempfile
import warnings
from pathlib import Path

import yaml

from visionautoml.errors import TrackingError, first_line
from visionautoml.redact import scrub, strip_userinfo
from visionautoml.tracking.workspace import current_tracking_uri, sqlite_path, use_tracking_uri

MODEL_ARTIFACT_NAME = "model"
SAVED_MODEL_FILE = "model.json"
EXPORT_SUBDIR = "onnx"
"""Where an export attached to a saved model lives, inside the saved-model folder."""
URI_FORMS = "runs:/RUN_ID/model, models:/NAME@ALIAS, models:/NAME/VERSION or a saved-model directory"

# What a fresh environment needs to load the pyfunc, pinned to what trained it.
_REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "mlflow")


def log_saved_model(directory: Path, *, name: str = MODEL_ARTIFACT_NAME) -> str:
    """Log ``directory`` (a saved model) to the active MLflow run; returns ``runs:/RUN_ID/NAME``."""
    import mlflow

    from visionautoml.tracking import pyfunc

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


def model_run_tags(model_uri: str) -> dict[str, str]:
    """The tags of the run that logged ``model_uri`` (``runs:/`` or ``models:/``); empty if unknown."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
        return dict(mlflow.MlflowClient(current_tracking_uri()).get_run(run_id).data.tags) if run_id else {}
    except (MlflowException, OSError):
        return {}


def record_export(model_uri: str, tags: dict[str, str], export_dir: Path | None) -> list[str]:
    """Tag the logged model and its registry version with an export's result; attach the export too.

    With ``export_dir`` the export is uploaded into the saved-model artifact's ``onnx/`` folder,
    where serving and prediction look for it. Returns what was recorded, for the user.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionautoml.tracking import pyfunc
    from visionautoml.tracking.registry import registry_reference, set_version_tags

    client = mlflow.MlflowClient(current_tracking_uri())
    recorded = []
    try:
        info = mlflow.models.get_model_info(model_uri)
        if info.model_id:
            client.set_logged_model_tags(info.model_id, tags)
            recorded.append(f"tags on logged model {info.model_id}")
        registered = registry_reference(model_uri)
        if registered is not None:
            set_version_tags(*registered, tags)
            recorded.append(f"tags on model {registered[0]} version {registered[1]}")
        if export_dir is not None:
            saved = (info.flavors.get("python_function", {}).get("artifacts") or {}).get(
                pyfunc.ARTIFACT_KEY, {}
            )
            if not info.model_id or "path" not in saved:
                raise TrackingError(
                    f"{model_uri}: not a visionautoml pyfunc model, so the export cannot be attached"
                )
            target = f"{saved['path']}/{EXPORT_SUBDIR}"
            client.log_model_artifacts(info.model_id, str(export_dir), target)
            recorded.append(f"export attached to logged model {info.model_id} as {target}")
    except MlflowException as error:
        raise TrackingError(
            f"{model_uri}: recording the export in MLflow failed: {first_line(error)}"
        ) from None
    return recorded


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
        with use_tracking_uri(store):
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=store
            )
    except MlflowException as error:
        raise TrackingError(
            f"{uri}: cannot fetch the model from the tracking store {strip_userinfo(store)}: "
            f"{scrub(first_line(error))}. Check the run id, model name, alias or "
            "version (`visionautoml models list`), and MLFLOW_TRACKING_URI"
        ) from None
    except OSError as error:
        raise TrackingError(f"{uri}: cannot download the model: {error}") from None
    return _saved_model_in(Path(downloaded), uri)


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

"""The MLflow Model Registry: register a trial's model, move aliases, promote only on evidence.

A version carries everything needed to judge it later as tags: its metrics
(``metric.<name>``), the dataset versions it was trained and validated on
(``dataset.training`` / ``dataset.validation``), the config hash and the git commit.
``promote_if_better`` compares a candidate with the current champion only when both
were measured on the same validation dataset version: numbers from different
validation sets say nothing about which model is better.

Every function works on the tracking store MLflow is pointed at (see
:func:`visionautoml.tracking.workspace.connect`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from visionautoml.config import JobConfig
from visionautoml.errors import TrackingError, first_line
from visionautoml.tracking.schema import CANDIDATE_ALIAS, CHAMPION_ALIAS, PRIMARY_METRIC, Tag


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: int
    aliases: list[str]
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0

    def metric(self, name: str = PRIMARY_METRIC) -> float | None:
        value = self.tags.get(Tag.METRIC_PREFIX + name)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RegisteredModelInfo:
    name: str
    latest_version: int | None
    aliases: dict[str, int]
    description: str = ""


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of ``promote_if_better``, with both numbers so it can be printed as is."""

    promoted: bool
    alias: str
    candidate_version: int
    candidate_value: float | None
    champion_version: int | None
    champion_value: float | None
    metric: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client() -> MlflowClient:
    return MlflowClient()


def _version_info(version: Any) -> ModelVersionInfo:
    return ModelVersionInfo(
        name=version.name,
        version=int(version.version),
        aliases=sorted(version.aliases or []),
        run_id=version.run_id,
        source=version.source,
        tags=dict(version.tags or {}),
        created_ms=int(version.creation_timestamp or 0),
    )


def register_model(
    model_uri: str,
    name: str,
    *,
    tags: dict[str, str] | None = None,
    aliases: Iterable[str] = (CANDIDATE_ALIAS,),
) -> ModelVersionInfo:
    """Register ``model_uri`` as a new version of ``name``, tag it, and point ``aliases`` at it.

    A ``runs:/`` URI of a model logged as plain artifacts (no MLflow model) is registered
    from the run's artifact folder, since MLflow 3 only resolves logged models itself.
    """
    tags = {key: str(value) for key, value in (tags or {}).items()}
    client = _client()
    try:
        try:
            version = mlflow.register_model(model_uri, name, tags=tags)
        except MlflowException as error:
            if not model_uri.startswith("runs:/") or "logged_model" not in str(error):
                raise
            run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
            source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
            _ensure_registered_model(client, name)
            version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version.version)
        return _version_info(client.get_model_version(name, version.version))
    except MlflowException as error:
        raise TrackingError(f"cannot register {model_uri} as model '{name}': {first_line(error)}") from None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)


def set_alias(name: str, version: int, alias: str) -> ModelVersionInfo:
    """Point ``alias`` at ``version`` (what ``visionautoml models promote`` does)."""
    client = _client()
    try:
        client.get_model_version(name, str(version))
        client.set_registered_model_alias(name, alias, str(version))
        return _version_info(client.get_model_version(name, str(version)))
    except MlflowException as error:
        raise TrackingError(
            f"cannot set alias '{alias}' on model '{name}' version {version}: {first_line(error)}. "
            f"`visionautoml models show {name}` lists its versions"
        ) from None


def get_version(name: str, version: int | None = None, alias: str | None = None) -> ModelVersionInfo | None:
    """One version by number or alias; None when the alias points nowhere."""
    client = _client()
    try:
        if alias is not None:
            return _version_info(client.get_model_version_by_alias(name, alias))
        return _version_info(client.get_model_version(name, str(version)))
    except MlflowException as error:
        if alias is not None and _is_missing(error):
            return None
        raise TrackingError(f"cannot read model '{name}': {first_line(error)}") from None


def promote_if_better(
    name: str,
    version: int,
    alias: str = CHAMPION_ALIAS,
    *,
    metric: str = PRIMARY_METRIC,
    mode: str = "max",
) -> PromotionDecision:
    """Move ``alias`` to ``version`` only if it beats the alias's current version.

    Both versions must carry ``metric.<metric>`` and the same ``dataset.validation`` tag;
    when the datasets differ the alias stays and the message says how to decide by hand.
    """
    candidate = get_version(name, version)
    current = get_version(name, alias=alias)
    value = candidate.metric(metric)
    label = metric

    def decide(promoted: bool, message: str) -> PromotionDecision:
        if promoted:
            set_alias(name, version, alias)
        return PromotionDecision(
            promoted=promoted,
            alias=alias,
            candidate_version=version,
            candidate_value=value,
            champion_version=current.version if current else None,
            champion_value=current.metric(metric) if current else None,
            metric=metric,
            message=message,
        )

    if value is None:
        return decide(False, f"not promoted: version {version} has no '{Tag.METRIC_PREFIX}{metric}' tag")
    if current is None:
        return decide(
            True, f"promoted: version {version} ({label} {value:.4f}) is the first '{alias}' of {name}"
        )
    if current.version == version:
        return decide(False, f"unchanged: version {version} already is '{alias}' ({label} {value:.4f})")
    champion_value = current.metric(metric)
    if champion_value is None:
        return decide(
            False,
            f"not promoted: the current '{alias}' (version {current.version}) has no {label} to compare "
            f"with; candidate {label} {value:.4f}. Promote by hand: visionautoml models promote {name} "
            f"{version} --alias {alias}",
        )
    ours, theirs = candidate.tags.get(Tag.VALIDATION_DATASET), current.tags.get(Tag.VALIDATION_DATASET)
    if _validation_key(candidate.tags) is None or _validation_key(candidate.tags) != _validation_key(
        current.tags
    ):
        return decide(
            False,
            f"not promoted: version {version} ({label} {value:.4f}, validation dataset {ours or 'unknown'}) "
            f"and '{alias}' version {current.version} ({label} {champion_value:.4f}, validation dataset "
            f"{theirs or 'unknown'}) were not measured on the same validation dataset; evaluate both on "
            f"one and promote by hand with `visionautoml models promote {name} VERSION --alias {alias}`",
        )
    better = value > champion_value if mode == "max" else value < champion_value
    verdict = "promoted" if better else "not promoted"
    relation = "beats" if better else "does not beat"
    return decide(
        better,
        f"{verdict}: version {version} ({label} {value:.4f}) {relation} '{alias}' version {current.version} "
        f"({label} {champion_value:.4f}) on validation dataset {ours}",
    )


def _validation_key(tags: dict[str, str]) -> str | None:
    """What identifies a validation set: its content digest when tagged, else its version reference."""
    return tags.get(Tag.dataset("validation", "digest")) or tags.get(Tag.VALIDATION_DATASET)


def list_models() -> list[RegisteredModelInfo]:
    client = _client()
    try:
        models = client.search_registered_models(max_results=1000)
    except MlflowException as error:
        raise TrackingError(f"cannot list registered models: {first_line(error)}") from None
    infos = []
    for model in sorted(models, key=lambda item: item.name):
        versions = [int(version.version) for version in model.latest_versions or []]
        infos.append(
            RegisteredModelInfo(
                name=model.name,
                latest_version=max(versions) if versions else None,
                aliases={alias: int(version) for alias, version in (model.aliases or {}).items()},
                description=model.description or "",
            )
        )
    return infos


def list_versions(name: str) -> list[ModelVersionInfo]:
    """Every version of ``name``, newest first."""
    client = _client()
    try:
        model = client.get_registered_model(name)
        versions = client.search_model_versions(f"name = '{_quote(name)}'", max_results=1000)
    except MlflowException as error:
        if _is_missing(error):
            raise TrackingError(
                f"no registered model named '{name}'; `visionautoml models list` shows the registered ones"
            ) from None
        raise TrackingError(f"cannot read model '{name}': {first_line(error)}") from None
    # Searched versions come without their aliases; the registered model has them all.
    aliases: dict[int, list[str]] = {}
    for alias, number in (model.aliases or {}).items():
        aliases.setdefault(int(number), []).append(alias)
    infos = [_version_info(version) for version in versions]
    infos = [replace(info, aliases=sorted(aliases.get(info.version, []))) for info in infos]
    return sorted(infos, key=lambda info: -info.version)


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


def _is_missing(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(error).lower()


def registry_reference(uri: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` URI, else None.

    The alias is looked up in the current store, so the answer names the version that a
    load of the URI gets right now.
    """
    reference = uri.removeprefix("models:/").strip("/") if uri.startswith("models:/") else ""
    name, alias = reference.split("@", 1) if "@" in reference else (reference, "")
    if not alias:
        name, _, version = reference.partition("/")
        return (name, version) if version.isdigit() else None
    try:
        return name, str(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException as error:
        raise TrackingError(
            f"{uri}: no version of model '{name}' has alias '{alias}' ({first_line(error)}); "
            "`visionautoml models list` shows the aliases"
        ) from None


def set_version_tags(name: str, version: int | str, tags: dict[str, str]) -> None:
    client = _client()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
    except MlflowException as error:
        raise TrackingError(f"cannot tag model '{name}' version {version}: {first_line(error)}") from None


def use_store_for(config: Path | None, workspace: str | None) -> str | None:
    """:func:`use_store` of a config file's store (its secrets resolved), or of a workspace's."""
    from visionautoml.secrets import load_config_with_secrets

    job = load_config_with_secrets(config) if config else JobConfig()
    if workspace:
        job = job.model_copy(update={"workspace": workspace})
    return use_store(job)


def use_store(job: JobConfig) -> str | None:
    """Point MLflow at ``job``'s tracking store for registry commands; None if its local store is absent.

    Unlike a training run this creates nothing: listing models of a workspace that has no
    database yet must not make one.
    """
    from visionautoml.tracking.auth import apply_credentials
    from visionautoml.tracking.workspace import resolve_tracking_uri

    job = apply_credentials(job)
    uri = resolve_tracking_uri(job)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    mlflow.set_tracking_uri(uri)
    return uri

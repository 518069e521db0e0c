"""Credentials for a team's MLflow server, and the check that runs before any work.

MLflow reads its credentials from the environment at every request
(``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` for basic auth, or
``MLFLOW_TRACKING_TOKEN``), so that is where config credentials go; the config object handed
on keeps none, and so cannot leak one into params or tags. The check fails in seconds on
wrong credentials instead of after an hour of training, and waits a little for a server that
is still starting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import requests

from visionautoml.config import JobConfig
from visionautoml.errors import ConfigError, TrackingError
from visionautoml.redact import scrub, strip_userinfo
from visionautoml.tracking.workspace import resolve_tracking_uri

USERNAME_VARIABLE = "MLFLOW_TRACKING_USERNAME"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"
TOKEN_VARIABLE = "MLFLOW_TRACKING_TOKEN"
CHECK_ENDPOINT = "/api/2.0/mlflow/experiments/search"
# Statuses a starting or overloaded server answers; anything else is final.
_RETRIED_STATUSES = (429, 500, 502, 503, 504)


def apply_credentials(job: JobConfig) -> JobConfig:
    """Put ``job.tracking``'s credentials into MLflow's environment; return the job without password/token.

    As with ``MLFLOW_TRACKING_URI``, a variable already set in the environment (a CI secret
    variable) wins over the config, so one config serves laptops and CI alike.
    """
    tracking = job.tracking
    if tracking.token and (tracking.username or tracking.password):
        raise ConfigError("tracking: set either username and password (basic auth) or token, not both")
    if tracking.password and not (tracking.username or os.environ.get(USERNAME_VARIABLE)):
        raise ConfigError(
            f"tracking.password is set but no user is: set tracking.username or {USERNAME_VARIABLE}"
        )
    for variable, value in (
        (USERNAME_VARIABLE, tracking.username),
        (PASSWORD_VARIABLE, tracking.password),
        (TOKEN_VARIABLE, tracking.token),
    ):
        if value and not os.environ.get(variable):
            os.environ[variable] = value
    return job.model_copy(update={"tracking": tracking.model_copy(update={"password": None, "token": None})})


def _identity() -> str:
    if os.environ.get(USERNAME_VARIABLE):
        return f"user '{os.environ[USERNAME_VARIABLE]}'"
    return (
        "the token in MLFLOW_TRACKING_TOKEN"
        if os.environ.get(TOKEN_VARIABLE)
        else "anonymous access (no credentials set)"
    )


def _request_options() -> dict[str, object]:
    """The auth and TLS settings MLflow's own client takes from the environment."""
    options: dict[str, object] = {}
    username, password = os.environ.get(USERNAME_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
    if username and password:
        options["auth"] = (username, password)
    elif os.environ.get(TOKEN_VARIABLE):
        options["headers"] = {"Authorization": f"Bearer {os.environ[TOKEN_VARIABLE]}"}
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        options["verify"] = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        options["verify"] = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    if os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH"):
        options["cert"] = os.environ["MLFLOW_TRACKING_CLIENT_CERT_PATH"]
    return options


def _connection_problem(error: requests.RequestException) -> str:
    text = str(error)
    if isinstance(error, requests.Timeout):
        return "the connection timed out"
    if "Connection refused" in text:
        return "connection refused"
    if "NameResolution" in text or "Name or service not known" in text:
        return "the host name does not resolve"
    return scrub(type(error).__name__)


def check_server(uri: str, *, timeout_s: float = 20.0) -> str:
    """Log in to the tracking server at ``uri`` once, before any work; say who was accepted where.

    Local stores (SQLite, folders) need no login.

    401 and 403 fail at once (retrying cannot fix a password). A server that does not answer,
    or answers that it is starting or overloaded, is retried with doubling pauses for about
    ``timeout_s`` seconds in all, then the check fails naming the server and the last problem.
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return f"{strip_userinfo(uri)} (a local store: no login)"
    server = strip_userinfo(uri)
    if os.environ.get(USERNAME_VARIABLE) and not os.environ.get(PASSWORD_VARIABLE):
        raise TrackingError(
            f"tracking server {server}: user '{os.environ[USERNAME_VARIABLE]}' has no password: set "
            f"{PASSWORD_VARIABLE} (a CI secret variable) or tracking.password: ${{secret:NAME}}"
        )
    netloc = parts.netloc.rpartition("@")[2]
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + CHECK_ENDPOINT, "", ""))
    options = _request_options()
    if "auth" not in options and parts.username and parts.password:
        options["auth"] = (parts.username, parts.password)
    deadline = time.monotonic() + timeout_s
    pause, attempts = 0.5, 0
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            response = requests.get(
                url, params={"max_results": 1}, timeout=max(1.0, min(5.0, remaining)), **options
            )
        except requests.exceptions.SSLError:
            raise TrackingError(
                f"tracking server {server}: the TLS certificate was refused; set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH to the CA bundle (or MLFLOW_TRACKING_INSECURE_TLS=true "
                "for a test server)"
            ) from None
        except requests.RequestException as error:
            problem = _connection_problem(error)
        else:
            if response.ok:
                return f"{server} accepted {_identity()}"
            if response.status_code == 401:
                raise TrackingError(
                    f"tracking server {server} refused {_identity()} (401 Unauthorized): check "
                    f"{USERNAME_VARIABLE} and {PASSWORD_VARIABLE} (or {TOKEN_VARIABLE})"
                )
            if response.status_code == 403:
                raise TrackingError(
                    f"tracking server {server} denied {_identity()} (403 Forbidden): the login worked but "
                    "lacks permission; ask the server's admin for access"
                )
            if response.status_code not in _RETRIED_STATUSES:
                raise TrackingError(
                    f"tracking server {server} answered HTTP {response.status_code} to {CHECK_ENDPOINT}: "
                    "is this the URI of an MLflow tracking server?"
                )
            problem = f"HTTP {response.status_code}"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TrackingError(
                f"cannot reach the tracking server {server} ({problem}; {attempts} tries in "
                f"{timeout_s:.0f} s): check the tracking URI (MLFLOW_TRACKING_URI or tracking.uri) "
                "and that the server is running"
            )
        time.sleep(min(pause, remaining))
        pause *= 2


def login(job: JobConfig, *, timeout_s: float = 20.0) -> tuple[JobConfig, str]:
    """Credentials into the environment, then the check: the job (without secrets) and who logged in where."""
    job = apply_credentials(job)
    return job, check_server(resolve_tracking_uri(job), timeout_s=timeout_s)


@contextmanager
def scrubbed_tracking_errors(uri: str) -> Iterator[None]:
    """Turn MLflow and HTTP failures into a :class:`TrackingError` whose text holds no credentials.

    MLflow and requests put request URLs in their messages, and a URL may carry ``user:password@``.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException) as error:
        raise TrackingError(f"tracking server {strip_userinfo(uri)}: {scrub(str(error))}") from None

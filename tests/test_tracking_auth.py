"""Credentials against a real `mlflow server --app-name basic-auth` on 127.0.0.1, started once here."""

from __future__ import annotations

import json
import os
import secrets as random_tokens
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from conftest import make_voc_dataset
from mlflow import MlflowClient
from test_pipeline import cli, pipeline_env, tiny_pipeline_config

from visionautoml.config import JobConfig
from visionautoml.errors import ConfigError, TrackingError
from visionautoml.redact import scrub
from visionautoml.tracking.auth import apply_credentials, check_server, scrubbed_tracking_errors

VENV_BIN = Path(sys.executable).parent
CREDENTIAL_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


@dataclass(frozen=True)
class AuthServer:
    uri: str
    root: Path
    log: Path
    user: str
    password: str

    def files_containing(self, text: str) -> list[Path]:
        """Every file of the server (stores, artifacts, auth database, log) whose bytes hold ``text``."""
        return [
            path for path in self.root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()
        ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    """A basic-auth MLflow server with an admin and one ordinary user, ``ci-bot``."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    admin_password = f"admin-{random_tokens.token_hex(8)}"
    (root / "auth.ini").write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Without it every request pays a PBKDF2 check (about a second on 2 busy cores), and
        # logging one model makes dozens of requests.
        "auth_cache_ttl_seconds = 600\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_FLASK_SERVER_SECRET_KEY=random_tokens.token_hex(16),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin_password,
        MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    port = _free_port()
    log = root / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *(str(VENV_BIN / "mlflow"), "server", "--app-name", "basic-auth"),
                *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
                *("--artifacts-destination", str(root / "artifacts")),
            ],
            cwd=root,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the MLflow basic-auth server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        user, password = "ci-bot", f"bot-{random_tokens.token_hex(8)}"
        requests.post(
            f"{uri}/api/2.0/mlflow/users/create",
            json={"username": user, "password": password},
            auth=("admin", admin_password),
            timeout=30,
        ).raise_for_status()
        yield AuthServer(uri, root, log, user, password)
    finally:
        # The group is the server and the uvicorn worker it started, nothing else.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def clean_credentials(monkeypatch) -> None:
    for variable in (*CREDENTIAL_VARIABLES, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(variable, raising=False)


def test_right_credentials_log_in_create_a_run_and_register_a_model(
    auth_server, monkeypatch, clean_credentials
):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.user)
    job = JobConfig(tracking={"uri": auth_server.uri, "password": auth_server.password})

    stripped = apply_credentials(job)
    accepted = check_server(auth_server.uri)
    client = MlflowClient(tracking_uri=auth_server.uri)
    experiment_id = client.create_experiment(f"auth-{random_tokens.token_hex(4)}")
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "model_name", "tiny")
    client.log_text(run.info.run_id, "tiny model", "model/MLmodel")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tiny-detector")
    version = client.create_model_version(
        "tiny-detector", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )

    assert accepted == f"{auth_server.uri} accepted user 'ci-bot'"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == auth_server.password
    assert stripped.tracking.password is None and stripped.tracking.uri == auth_server.uri
    assert version.version == "1"
    assert client.get_run(run.info.run_id).data.params == {"model_name": "tiny"}
    assert auth_server.files_containing(auth_server.password) == []


def _pipeline_against(server: AuthServer, folder: Path, password: str) -> tuple[Path, dict[str, str]]:
    """A tiny pipeline: the password from a secret file, the user and the server from the environment."""
    data = make_voc_dataset(folder / "voc", n_images=10)
    config = tiny_pipeline_config(folder, data=str(data), export=False)
    raw = yaml.safe_load(config.read_text())
    raw["tracking"] = {"password": "${secret:TEAM_MLFLOW_PASSWORD}"}
    config.write_text(yaml.safe_dump(raw))
    (folder / "secrets").mkdir()
    (folder / "secrets" / "TEAM_MLFLOW_PASSWORD").write_text(password + "\n")
    env = pipeline_env(
        MLFLOW_TRACKING_URI=server.uri,
        MLFLOW_TRACKING_USERNAME=server.user,
        VISIONAUTOML_SECRETS_DIR=str(folder / "secrets"),
        GITHUB_STEP_SUMMARY=str(folder / "summary.md"),
    )
    return config, env


def _files_containing(root: Path, text: str) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]


@pytest.mark.slow
def test_the_pipeline_registers_the_model_on_the_server_and_shows_the_password_nowhere(
    auth_server, tmp_path, monkeypatch, clean_credentials
):
    config, env = _pipeline_against(auth_server, tmp_path, auth_server.password)

    checked = cli("secrets", "check", str(config), "--connect", env=env, cwd=tmp_path, timeout=60)
    run = cli("pipeline", "run", str(config), "--output-json", "result.json", env=env, cwd=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.password)
    client = MlflowClient(tracking_uri=auth_server.uri)

    assert (
        checked.returncode == 0
        and f"tracking server {auth_server.uri} accepted user 'ci-bot'" in checked.stdout
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["tracking_uri"] == auth_server.uri
    version = client.get_model_version("tiny-detector", str(result["registered_model"]["version"]))
    assert version.run_id == result["run_id"]
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    for output in (checked.stdout, checked.stderr, run.stdout, run.stderr):
        assert auth_server.password not in output
    assert _files_containing(tmp_path, auth_server.password) == [
        tmp_path / "secrets" / "TEAM_MLFLOW_PASSWORD"
    ]
    assert auth_server.files_containing(auth_server.password) == []


@pytest.mark.slow
def test_train_resolves_the_secret_reference_in_the_config_as_the_pipeline_does(
    auth_server, tmp_path, monkeypatch, clean_credentials
):
    """`train` on the same config: the password comes from the `${secret:...}` reference, not its text."""
    from conftest import TINY_TRAINING

    config, env = _pipeline_against(auth_server, tmp_path, auth_server.password)
    raw = yaml.safe_load(config.read_text())
    raw.pop("pipeline", None)
    raw.update(
        training_data=str(tmp_path / "voc"), training_parameters={**TINY_TRAINING, "number_of_epochs": 1}
    )
    config.write_text(yaml.safe_dump(raw))

    trained = cli("train", str(config), "--output-json", "trained.json", env=env, cwd=tmp_path)

    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    result = json.loads((tmp_path / "trained.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_server.user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.password)
    assert MlflowClient(tracking_uri=auth_server.uri).get_run(result["run_id"]).info.status == "FINISHED"
    assert auth_server.password not in trained.stdout + trained.stderr
    assert auth_server.files_containing(auth_server.password) == []


def test_a_wrong_password_fails_the_pipeline_at_once_naming_server_and_user_and_is_shown_nowhere(
    auth_server, tmp_path
):
    wrong = f"wrong-{random_tokens.token_hex(8)}"
    config, env = _pipeline_against(auth_server, tmp_path, wrong)

    started = time.monotonic()
    run = cli(
        "pipeline", "run", str(config), "--output-json", "result.json", env=env, cwd=tmp_path, timeout=60
    )
    elapsed = time.monotonic() - started

    assert run.returncode == 1
    assert elapsed < 30
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [
        f"error: tracking server {auth_server.uri} refused user 'ci-bot' (401 Unauthorized): check "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
    ]
    assert "[2/10] connect failed after" in run.stdout
    assert "Traceback" not in run.stderr
    assert wrong not in run.stdout + run.stderr
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "failed"
    assert "refused user 'ci-bot'" in (tmp_path / "summary.md").read_text()
    assert _files_containing(tmp_path, wrong) == [tmp_path / "secrets" / "TEAM_MLFLOW_PASSWORD"]
    assert auth_server.files_containing(wrong) == []
    assert "401" in auth_server.log.read_text()


def test_an_unreachable_server_is_retried_with_backoff_then_fails_clearly(clean_credentials):
    with socket.socket() as probe:  # a port that is bound but never listens: connection refused
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
        with pytest.raises(TrackingError) as caught:
            check_server(uri, timeout_s=2)

    message = str(caught.value)
    assert message.startswith(f"cannot reach the tracking server {uri} (connection refused; ")
    tries = int(message.split("; ")[1].split(" tries")[0])
    assert 2 <= tries <= 4
    assert "MLFLOW_TRACKING_URI" in message


def test_local_stores_need_no_login_and_a_user_without_password_is_refused(monkeypatch, clean_credentials):
    assert check_server("sqlite:///tmp/x/mlflow.db").endswith("(a local store: no login)")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci-bot")
    with pytest.raises(TrackingError, match="user 'ci-bot' has no password: set MLFLOW_TRACKING_PASSWORD"):
        check_server("http://127.0.0.1:1")


def test_the_environment_wins_over_the_config_and_conflicting_credentials_are_refused(
    monkeypatch, clean_credentials
):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "from-ci-variable")
    job = JobConfig(tracking={"username": "alice", "password": "from-config"})

    stripped = apply_credentials(job)

    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "from-ci-variable"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert "from-config" not in stripped.model_dump_json()
    with pytest.raises(ConfigError, match=r"either username and password .* or token"):
        apply_credentials(JobConfig(tracking={"username": "alice", "token": "t"}))


def test_credentials_in_library_errors_are_scrubbed(monkeypatch, clean_credentials):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa55-word-9")
    text = "GET https://bot:pa55-word-9@mlflow.example.org/api failed; auth pa55-word-9"

    assert scrub(text) == "GET https://***@mlflow.example.org/api failed; auth ***"
    with pytest.raises(TrackingError) as caught, scrubbed_tracking_errors("https://bot:x@mlflow.example.org"):
        raise requests.ConnectionError(text)
    assert str(caught.value) == (
        "tracking server https://mlflow.example.org: GET https://***@mlflow.example.org/api failed; auth ***"
    )

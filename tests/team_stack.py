"""A team's tracking stack on 127.0.0.1, started by the tests that use it and stopped by PID.

Three real servers, as docs/production.md sets them up, each in a temporary folder of its own:

* PostgreSQL 15 (Debian's ``/usr/lib/postgresql/15/bin``): ``initdb`` with a password (scram-sha-256)
  and ``pg_ctl start`` on a free port, listening on 127.0.0.1 only. PostgreSQL refuses to run as
  root, so as root it runs as the ``postgres`` user (``runuser``); the folder is that user's.
* An S3 object store: moto's standalone server (``moto_server``, from ``moto[server]``) stands in for
  S3 or MinIO. No MinIO package exists where these tests run; moto speaks the same S3 HTTP API
  (buckets, objects, multipart uploads) that boto3 and MLflow use, keeping the objects in memory.
* ``mlflow server`` with its runs and registry in that database (``postgresql+pg8000://``) and its
  artifacts in the bucket (``--artifacts-destination s3://BUCKET/mlflow --serve-artifacts``). Only
  the server holds the S3 keys and the database password, in its environment (never on its command
  line); a client needs only the tracking URI: :func:`client_env`.

Use the fixtures with ``pytest_plugins = ["team_stack"]`` in a test module and reach the helpers
through them (importing this module as well would keep pytest from rewriting its asserts). They are
module-scoped: they start for the first test of a module that asks, and stop after its last. The
``running_*`` context managers start the same servers elsewhere (``exec_prefix``: inside a test's own
network namespace, ``host``: an address a second node reaches), for multi-node tests; those get
:func:`running_stack` through the ``team_stack_in`` fixture.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

VENV_BIN = Path(sys.executable).parent
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
DATABASE = "mlflow"
BUCKET = "team-mlflow"
ARTIFACTS_PREFIX = "mlflow"
_STARTUP_S = 120.0


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str
    folder: Path
    pid: int

    @property
    def sqlalchemy_uri(self) -> str:
        """What ``mlflow server --backend-store-uri`` takes (pure-Python pg8000 driver)."""
        return f"postgresql+pg8000://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def connect(self, database: str | None = None) -> Any:
        """A pg8000 connection (autocommit), to query what the tracking server stored."""
        import pg8000.native

        return pg8000.native.Connection(
            self.user,
            host=self.host,
            port=self.port,
            password=self.password,
            database=database or self.database,
        )


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    exec_prefix: tuple[str, ...] = ()
    """How to enter the network namespace the store listens in (empty: this one)."""

    def server_env(self) -> dict[str, str]:
        """The variables a process that talks to the store itself needs: the tracking server, a test."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket (listed from inside the store's namespace)."""
        if self.exec_prefix:
            listed = subprocess.run(
                [*self.exec_prefix, sys.executable, "-c", _LIST_KEYS, self.endpoint, self.bucket, prefix],
                env=_server_env(**self.server_env()),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            return json.loads(listed.stdout)
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


@dataclass(frozen=True)
class TeamServer:
    uri: str
    postgres: Postgres
    store: ObjectStore
    folder: Path
    log: Path
    pid: int
    artifacts_prefix: str = ARTIFACTS_PREFIX  # where in the bucket the server keeps artifacts

    def client_env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI run against this server: see :func:`client_env`."""
        return client_env(self.uri, **extra)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """This test process's environment for a CLI run that knows the tracking URI and nothing else.

    No AWS_* variable, no MLFLOW_S3_ENDPOINT_URL, no other MLflow setting: a client that tried to
    reach the object store itself would not know where it is, so a run that stores its artifacts
    proves they went through the tracking server.
    """
    # RAY_ too: a local Ray of an earlier test in this process leaves its token in os.environ.
    dropped = ("AWS_", "MLFLOW_", "RAY_", "GITHUB_ACTIONS", "TF_BUILD", "VAULT_", "BAO_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, VISIONAUTOML_OFFLINE="1", **extra)
    return env


def _server_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MLFLOW_"))}
    env.update(extra)
    return env


def wait_until(ready: Callable[[], bool], process_alive: Callable[[], bool], what: str, log: Path) -> None:
    """Poll ``ready`` until it holds; fail at once if the process died, or at the deadline."""
    deadline = time.monotonic() + _STARTUP_S
    while not ready():
        if not process_alive():
            pytest.fail(f"{what} exited while starting:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not become ready within {_STARTUP_S:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-3000:]
    except OSError:
        return "(no log)"


_PROBE = """
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)
except OSError:
    sys.exit(1)
"""


def _http_ok(url: str, exec_prefix: Sequence[str] = ()) -> bool:
    """GET ``url`` answers 200; from inside ``exec_prefix``'s network namespace when there is one."""
    if exec_prefix:
        probe = [*exec_prefix, sys.executable, "-c", _PROBE, url]
        return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(command: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server in a process group of its own, so that stopping it stops its workers too."""
    with log.open("wb") as output:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group this module started (the server and its own workers), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- PostgreSQL -------------------------------------------------------------------------------


def _as_postgres_user() -> tuple[list[str], int | None]:
    """The command prefix that runs PostgreSQL's programs, and the uid that must own its folder."""
    if os.geteuid() != 0:
        return [], None
    runuser = shutil.which("runuser")
    try:
        uid = pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("running as root, and PostgreSQL refuses root: no `postgres` user to run it as")
    if runuser is None:
        pytest.skip("running as root, and PostgreSQL refuses root: `runuser` (util-linux) is missing")
    return [runuser, "-u", "postgres", "--"], uid


def _pg(prefix: list[str], tool: str, *arguments: str, log: Path, env: dict[str, str] | None = None) -> None:
    with log.open("ab") as output:
        result = subprocess.run(
            [*prefix, str(POSTGRES_BIN / tool), *arguments],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=120,
        )
    if result.returncode != 0:
        pytest.fail(f"{tool} {arguments[:2]} failed ({result.returncode}):\n{_tail(log)}")


def _postmaster_pid(data: Path) -> int:
    """The server's PID, as it wrote it (first line of postmaster.pid)."""
    return int((data / "postmaster.pid").read_text().splitlines()[0])


@contextlib.contextmanager
def running_postgres(*, exec_prefix: Sequence[str] = (), host: str = "127.0.0.1") -> Iterator[Postgres]:
    """A fresh PostgreSQL 15 cluster listening on ``host`` only, with an empty ``mlflow`` database.

    ``exec_prefix`` runs it elsewhere, e.g. ``["ip", "netns", "exec", NAMESPACE]`` for a test's own
    network namespace; :meth:`Postgres.connect` then works only from inside that namespace.
    """
    if not (POSTGRES_BIN / "initdb").is_file():
        pytest.skip(
            f"PostgreSQL 15 is not installed ({POSTGRES_BIN / 'initdb'} is missing): "
            "`apt-get install postgresql-15` to run the team-stack tests"
        )
    as_postgres, owner = _as_postgres_user()
    prefix = [*exec_prefix, *as_postgres]
    # Not under pytest's tmp_path: the postgres user must be able to reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="vaml-pg-", dir="/tmp"))
    data, password_file = folder / "data", folder / "password"
    log, server_log = folder / "tools.log", folder / "server.log"  # ours; the server's (postgres writes it)
    password = secrets.token_hex(16)
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    if owner is not None:
        for path in (folder, password_file):
            os.chown(path, owner, -1)
    folder.chmod(0o700)
    pid = None
    try:
        _pg(
            prefix,
            "initdb",
            *("-D", str(data), "-U", "mlflow", "--pwfile", str(password_file)),
            *("--auth=scram-sha-256", "--encoding=UTF8", "--no-sync", "--no-instructions"),
            log=log,
        )
        password_file.unlink()
        port = free_port()
        settings = (
            f"-c listen_addresses={host} -c port={port} -c unix_socket_directories={folder} -c fsync=off"
        )
        # -w: pg_ctl itself waits until the server accepts connections (or its -t timeout).
        _pg(
            prefix,
            "pg_ctl",
            "-D",
            str(data),
            "-l",
            str(server_log),
            "-w",
            "-t",
            "60",
            "-o",
            settings,
            "start",
            log=log,
        )
        pid = _postmaster_pid(data)
        # The password through the environment of createdb only, never its command line.
        created_env = {**os.environ, "PGPASSWORD": password}
        _pg(
            prefix,
            "createdb",
            "-h",
            host,
            "-p",
            str(port),
            "-U",
            "mlflow",
            DATABASE,
            log=log,
            env=created_env,
        )
        yield Postgres(host, port, "mlflow", password, DATABASE, folder, pid)
    finally:
        if pid is not None:
            _stop_postgres(prefix, data, pid, log)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_postgres(prefix: list[str], data: Path, pid: int, log: Path) -> None:
    """``pg_ctl stop`` of this data folder (it signals the PID in its postmaster.pid); SIGKILL if it fails."""
    with log.open("ab") as output:
        stopped = subprocess.run(
            [*prefix, str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop"],
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=60,
            check=False,
        )
    if stopped.returncode != 0:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the object store -------------------------------------------------------------------------

_CREATE_BUCKET = """
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket=sys.argv[2])
"""


_LIST_KEYS = """
import json, sys, boto3
pages = boto3.client("s3", endpoint_url=sys.argv[1]).get_paginator("list_objects_v2")
found = pages.paginate(Bucket=sys.argv[2], Prefix=sys.argv[3])
print(json.dumps(sorted(item["Key"] for page in found for item in page.get("Contents", []))))
"""


@contextlib.contextmanager
def running_object_store(
    folder: Path, *, exec_prefix: Sequence[str] = (), host: str = "127.0.0.1"
) -> Iterator[ObjectStore]:
    """moto's S3 server (standing in for S3/MinIO) on ``host`` with one empty bucket."""
    moto_server = VENV_BIN / "moto_server"
    if not moto_server.is_file():
        pytest.skip("moto_server is not installed: pip install -e '.[dev]' (moto[server])")
    log, port = folder / "moto.log", free_port()
    process = _start(
        [*exec_prefix, str(moto_server), "-H", host, "-p", str(port)], cwd=folder, env=_server_env(), log=log
    )
    try:
        endpoint = f"http://{host}:{port}"
        ready = functools.partial(_http_ok, f"{endpoint}/", exec_prefix)
        wait_until(ready, lambda: process.poll() is None, "moto_server", log)
        store = ObjectStore(
            endpoint,
            BUCKET,
            "team-test-key",
            secrets.token_hex(16),
            "us-east-1",
            process.pid,
            tuple(exec_prefix),
        )
        # Made where the server is (a namespace of its own, perhaps), with the keys in the environment.
        subprocess.run(
            [*exec_prefix, sys.executable, "-c", _CREATE_BUCKET, endpoint, BUCKET],
            env=_server_env(**store.server_env()),
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield store
    finally:
        _stop_group(process)


# --- the tracking server ----------------------------------------------------------------------


@contextlib.contextmanager
def running_team_server(
    postgres: Postgres,
    store: ObjectStore,
    folder: Path,
    *,
    exec_prefix: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> Iterator[TeamServer]:
    """``mlflow server`` on ``postgres`` with artifacts in ``store``'s bucket, served through the server.

    ``host`` is the address clients use: 127.0.0.1, or a test namespace's address that a second node
    reaches (with ``exec_prefix`` entering the namespace where ``postgres`` and ``store`` run).
    """
    log, port = folder / "server.log", free_port()
    env = _server_env(
        **store.server_env(),
        # The database password stays off the command line (ps shows it): mlflow reads this variable.
        MLFLOW_BACKEND_STORE_URI=postgres.sqlalchemy_uri,
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )
    command = [
        *exec_prefix,
        *(str(VENV_BIN / "mlflow"), "server", "--host", host, "--port", str(port), "--workers", "1"),
        *("--artifacts-destination", f"s3://{store.bucket}/{ARTIFACTS_PREFIX}", "--serve-artifacts"),
    ]
    process = _start(command, cwd=folder, env=env, log=log)
    try:
        uri = f"http://{host}:{port}"
        ready = functools.partial(_http_ok, f"{uri}/health", exec_prefix)
        wait_until(ready, lambda: process.poll() is None, "mlflow server", log)
        yield TeamServer(uri, postgres, store, folder, log, process.pid)
    finally:
        _stop_group(process)


@contextlib.contextmanager
def running_stack(
    folder: Path, *, exec_prefix: Sequence[str] = (), host: str = "127.0.0.1"
) -> Iterator[TeamServer]:
    """The whole stack in ``folder``: the database and the bucket on the loopback of ``exec_prefix``'s
    namespace, the tracking server on ``host`` there (the address other nodes reach it at)."""
    (folder / "s3").mkdir(parents=True, exist_ok=True)
    with (
        running_postgres(exec_prefix=exec_prefix) as database,
        running_object_store(folder / "s3", exec_prefix=exec_prefix) as store,
        running_team_server(database, store, folder, exec_prefix=exec_prefix, host=host) as server,
    ):
        yield server


# --- fixtures: the stack on this machine's loopback ---------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """PostgreSQL 15 on 127.0.0.1 with an empty ``mlflow`` database; about 2 s."""
    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    """moto's S3 server on 127.0.0.1 with one empty bucket (standing in for S3/MinIO)."""
    with running_object_store(tmp_path_factory.mktemp("s3")) as store:
        yield store


@pytest.fixture(scope="module")
def team_server(
    postgres: Postgres, object_store: ObjectStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TeamServer]:
    """``mlflow server`` on 127.0.0.1, PostgreSQL behind it, artifacts in the bucket."""
    with running_team_server(postgres, object_store, tmp_path_factory.mktemp("mlflow-team")) as server:
        yield server


@pytest.fixture
def team_stack_in() -> Callable[..., contextlib.AbstractContextManager[TeamServer]]:
    """:func:`running_stack`, for a test that starts the stack in a network namespace it made."""
    return running_stack

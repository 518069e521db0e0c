"""A real two-node Ray cluster: a head and a second node, each in a network namespace of its own.

Ray binds to a machine's interface address, never to loopback alone, once it runs as a
cluster; the namespaces (joined by one veth pair, 10.213.0.1 <-> 10.213.0.2) give each
node an address that exists only inside them, so no traffic leaves this test's own
hosts. The sweep's driver runs on the head (as it would on a real cluster); every process
is stopped by its PID and the namespaces are deleted, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, TINY_TRAINING, make_voc_dataset
from test_pipeline import tiny_pipeline_config

HEAD_IP, WORKER_IP, PORT, DASHBOARD_PORT = "10.213.0.1", "10.213.0.2", 6379, 8265
ADDRESS = f"{HEAD_IP}:{PORT}"
VENV_BIN = Path(sys.executable).parent
MEMORY, OBJECT_STORE = 400 * 1024**2, 100 * 1024**2
FAST_NODE_DEATH = {
    # The GCS declares a node dead after this many missed checks (defaults: 5 of 3 s after 5 s).
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def netns_available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


def descendants(root: int) -> dict[int, str]:
    """``pid: command name`` of every process below ``root``."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            names[pid] = stat[stat.index("(") + 1 : stat.rindex(")")]
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = names[pid]
                frontier.append(pid)
    return found


@dataclass
class Node:
    """One worker node: its namespace, address, ``ray start`` process and log."""

    namespace: str
    address: str
    process: subprocess.Popen
    log: Path

    def raylet_pid(self) -> int:
        pids = [pid for pid, name in descendants(self.process.pid).items() if name == "raylet"]
        assert len(pids) == 1, (pids, self.log.read_text()[-2000:])
        return pids[0]


class Cluster:
    """A head namespace and one namespace per worker node; ``close`` undoes everything ``start`` did.

    Worker ``i`` lives on 10.213.i.0/24, linked to the head's namespace by a veth pair of its own
    and routed through it, so any number of nodes reach the head at 10.213.0.1. With
    ``private_disks`` a worker node also gets a mount namespace whose /tmp, /dev/shm and home
    are empty memory file systems: it shares no folder with the head (the pytest folders, the
    head's Ray session and every server's data are under /tmp), only the installed code.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        workers: int = 1,
        dashboard: bool = False,
        head_cpus: int = 1,
        worker_cpus: int = 1,
        private_disks: bool = False,
        env: dict[str, str] | None = None,
    ):
        self.workers, self.dashboard = workers, dashboard
        self.head_cpus, self.worker_cpus, self.private_disks = head_cpus, worker_cpus, private_disks
        self.tag = f"{os.getpid() % 100000}"
        self.head_ns = f"vaml{self.tag}h"
        self.workdir = workdir
        self.env = {
            # Not this process's Ray settings: a local Ray started by an earlier test in it leaves
            # RAY_AUTH_TOKEN and the "no clusters" switch in os.environ, and a head started with that
            # switch binds to loopback, where no other node reaches it.
            **{key: value for key, value in os.environ.items() if not key.startswith("RAY_")},
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}",
            # Ray jobs run `python` from the head's PATH: this environment's, with visionautoml
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            **(env or {}),
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.namespaces: list[str] = []
        self.nodes: list[subprocess.Popen] = []
        self.worker_nodes: list[Node] = []
        self.temp_dirs: list[str] = []

    @property
    def worker_ns(self) -> str:
        return self.worker_nodes[0].namespace

    @property
    def exec_prefix(self) -> list[str]:
        """Run a command in the head's namespace (where the team stack runs, for instance)."""
        return ["ip", "netns", "exec", self.head_ns]

    def start(self) -> None:
        run("ip", "netns", "add", self.head_ns)
        self.namespaces.append(self.head_ns)
        run("ip", "-n", self.head_ns, "link", "set", "lo", "up")
        run("ip", "netns", "exec", self.head_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self._link(0)  # the head's address must exist before its node listens on it
        self.nodes.append(
            self._ray_start(
                self.head_ns,
                "head",
                self.head_cpus,
                self.env,
                "--head",
                f"--port={PORT}",
                *(
                    (f"--dashboard-host={HEAD_IP}", f"--dashboard-port={DASHBOARD_PORT}")
                    if self.dashboard
                    else ("--include-dashboard=false",)
                ),
                address=HEAD_IP,
                private=False,
            )
        )
        self._wait_for_port(self.head_ns, PORT)
        if self.dashboard:
            self._wait_for_port(self.head_ns, DASHBOARD_PORT)
        for _ in range(self.workers):
            self.add_worker()

    def _link(self, index: int) -> tuple[str, str]:
        """The namespace of worker ``index`` and its address, linked to the head's namespace."""
        namespace, veth = f"vaml{self.tag}w{index}", (f"vv{self.tag}{index}a", f"vv{self.tag}{index}b")
        head_side, address = f"10.213.{index}.1", f"10.213.{index}.2"
        run("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for ns, device, ip in ((self.head_ns, veth[0], head_side), (namespace, veth[1], address)):
            run("ip", "link", "set", device, "netns", ns)
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", device)
            run("ip", "-n", ns, "link", "set", device, "up")
        if index:
            run("ip", "-n", namespace, "route", "add", "default", "via", head_side)
        return namespace, address

    def add_worker(self, *, env: dict[str, str] | None = None, cpus: int | None = None) -> Node:
        """Start one more worker node, in a namespace of its own; ``env`` is added to its environment.

        A worker's environment has no AWS or MLflow variable: what a trial needs it gets
        through the job (the tracking URI) or the tracking server.
        """
        index = len(self.worker_nodes)
        namespace, address = self._link(index) if index else (f"vaml{self.tag}w0", WORKER_IP)
        worker_env = {
            key: value for key, value in self.env.items() if not key.startswith(("AWS_", "MLFLOW_"))
        }
        worker_env.update(env or {})
        name = f"worker{index}"
        process = self._ray_start(
            namespace,
            name,
            self.worker_cpus if cpus is None else cpus,
            worker_env,
            f"--address={ADDRESS}",
            address=address,
            private=self.private_disks,
        )
        self.nodes.append(process)
        node = Node(namespace, address, process, self.workdir / f"{name}.log")
        self.worker_nodes.append(node)
        return node

    def _ray_start(
        self,
        namespace: str,
        name: str,
        cpus: int,
        env: dict[str, str],
        *arguments: str,
        address: str,
        private: bool,
    ) -> subprocess.Popen:
        # A short temp dir of its own: Ray's socket paths must stay under 107 bytes.
        ray = [
            str(VENV_BIN / "ray"), "start", *arguments, "--node-ip-address", address,
            f"--num-cpus={cpus}", f"--memory={MEMORY}", f"--object-store-memory={OBJECT_STORE}",
            "--disable-usage-stats", "--block",
        ]  # fmt: skip
        if private:
            hidden = ["/tmp", "/dev/shm", *_private_homes()]
            script = " && ".join(
                [*(f"mount -t tmpfs vaml-node {folder}" for folder in hidden), "mkdir -p /tmp/vrn"]
            )
            command = [
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", f'{script} && exec "$@"', "sh", *ray, "--temp-dir=/tmp/vrn",
            ]  # fmt: skip
        else:
            temp_dir = tempfile.mkdtemp(prefix=f"vr{name[0]}", dir="/tmp")
            self.temp_dirs.append(temp_dir)
            command = [*ray, f"--temp-dir={temp_dir}"]
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - the node outlives this call
        return subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command], env=env, stdout=log, stderr=subprocess.STDOUT
        )

    def _wait_for_port(self, namespace: str, port: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            listening = subprocess.run(
                ["ip", "netns", "exec", namespace, "ss", "-Hltn"], capture_output=True, text=True
            ).stdout
            if f":{port} " in listening:
                return
            time.sleep(0.5)
        raise AssertionError(
            f"the Ray head did not listen on {port}: {(self.workdir / 'head.log').read_text()}"
        )

    def python(
        self, script: str, *arguments: str, timeout_s: float = 240, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a Python script on the head node, where a sweep's driver runs."""
        return self.exec(str(VENV_BIN / "python"), "-c", script, *arguments, timeout_s=timeout_s, env=env)

    def exec(
        self,
        *command: str,
        timeout_s: float = 240,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.head_ns, *command],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=cwd or self.workdir,
        )

    def node_ids(self) -> dict[str, str]:
        """``node IP: node id`` of every node the head counts alive."""
        listed = self.python(
            f"import json, ray; ray.init(address='{ADDRESS}', log_to_driver=False); "
            "print(json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}))",
            timeout_s=120,
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        return json.loads(listed.stdout.strip().splitlines()[-1])

    def close(self) -> None:
        for node in self.nodes:  # `ray start --block` stops its own processes on SIGTERM
            node.send_signal(signal.SIGTERM)
        for node in self.nodes:
            try:
                node.wait(timeout=40)
            except subprocess.TimeoutExpired:
                node.kill()
        for namespace in self.namespaces:  # whatever is left in our namespaces is ours
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _private_homes() -> list[str]:
    """The home folder, hidden on a private node unless the code lives under it (pyenv's Python does)."""
    home = Path.home().resolve()
    code = (REPO_ROOT.resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve())
    return [] if any(path.is_relative_to(home) for path in code) or str(home) == "/" else [str(home)]


@contextlib.contextmanager
def running_cluster(workdir: Path, **options: object) -> Iterator[Cluster]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(workdir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
    assert not set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    ) & set(cluster.namespaces)


@pytest.fixture
def cluster(tmp_path):
    with running_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def head_with_job_api(tmp_path):
    """One head node whose dashboard serves Ray's job submission API."""
    with running_cluster(tmp_path, workers=0, dashboard=True) as cluster:
        yield cluster


DRIVER = textwrap.dedent(
    """
    import json, sys
    import ray
    from test_sweep import toy_trial
    from visionautoml.automl.compute import ComputeError, join_cluster
    from visionautoml.automl.train import settle, train
    from visionautoml.config import parse_config

    config, out = json.loads(sys.argv[1]), sys.argv[2]
    job = parse_config(config)
    train(settle(job), trial_fn=toy_trial, output_json=out)
    too_many = job.compute.model_copy(update={"min_nodes": 3, "wait_timeout_minutes": 0.05})
    try:
        join_cluster(too_many)
    except ComputeError as error:
        open(out + ".refused", "w").write(str(error))
    ray.init(address=config["compute"]["address"], log_to_driver=False)
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
    ray.shutdown()
    json.dump({"nodes": nodes}, open(out + ".nodes", "w"))
    """
)


def test_trials_run_on_both_nodes_and_a_too_small_cluster_times_out(cluster, tmp_path):
    data = make_voc_dataset(tmp_path / "data", n_images=6)
    config = {
        "experiment_name": "two-nodes",
        "workspace": str(tmp_path / "workspace"),
        "training_data": str(data),
        "training_parameters": {"number_of_epochs": 3, "pretrained": "none"},
        "limits": {"max_trials": 2, "max_concurrent_trials": 2},
        "search_space": [
            {
                "model_name": {"type": "choice", "values": ["ssdlite320_mobilenet_v3_large"]},
                "learning_rate": {"type": "choice", "values": [0.004, 0.008]},
            }
        ],
        "sweep": {"sampling_algorithm": "grid"},
        "compute": {
            "target": "ray",
            "address": ADDRESS,
            "min_nodes": 2,
            "wait_timeout_minutes": 1,
            "cpus_per_trial": 1,
        },
        "register": {"model_name": "two-node-detector"},
    }
    out = tmp_path / "sweep.json"
    done = cluster.python(DRIVER, json.dumps(config), str(out))
    assert done.returncode == 0, done.stdout + done.stderr

    report = json.loads(out.read_text())
    nodes = json.loads(Path(f"{out}.nodes").read_text())["nodes"]
    assert len(nodes) == 2
    assert [trial["state"] for trial in report["trials"]] == ["completed", "completed"]
    assert sorted(trial["node_id"] for trial in report["trials"]) == nodes
    assert report["registered_model"]["aliases"] == ["candidate"]

    refused = Path(f"{out}.refused").read_text()
    assert "did not offer 3 node(s) and 0 GPU(s) within compute.wait_timeout_minutes=0.05" in refused
    assert "it has 2 node(s), 2 CPU(s)" in refused


def test_the_cluster_template_is_valid_and_scales_gpu_workers_like_the_original():
    import jsonschema
    import ray

    template = yaml.safe_load((REPO_ROOT / "deploy" / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(template, schema)
    workers = template["available_node_types"]["gpu_worker"]
    assert (workers["min_workers"], workers["max_workers"], template["idle_timeout_minutes"]) == (0, 4, 30)
    assert workers["resources"]["GPU"] >= 1
    assert template["available_node_types"][template["head_node_type"]]["resources"] == {"CPU": 0}


def test_a_detached_pipeline_runs_as_a_ray_job_and_a_second_process_waits_for_it(head_with_job_api, tmp_path):
    cluster = head_with_job_api
    data = make_voc_dataset(tmp_path / "data", n_images=10)
    # Resolved on the cluster: the job gets the data's path only through its runtime env.
    path = tiny_pipeline_config(
        tmp_path,
        data="${secret:CLUSTER_DATA_SOURCE}",
        export=False,
        top_level={
            "experiment_name": "on-the-cluster",
            "compute": {"target": "ray", "address": ADDRESS},
            "register": {"model_name": "cluster-detector"},
        },
    )
    secret = str(data)
    visionautoml = str(VENV_BIN / "visionautoml")

    cluster.env["CLUSTER_DATA_SOURCE"] = secret
    started = cluster.exec(visionautoml, "pipeline", "run", str(path), "--detach", timeout_s=120)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = started.stdout.strip()
    record = json.loads((tmp_path / "workspace" / "pipeline" / "runs" / run_id / "state.json").read_text())
    assert record["ray_job_id"] == f"visionautoml-{run_id}"
    assert record["ray_dashboard"] == f"http://{HEAD_IP}:{DASHBOARD_PORT}"

    # A later CI job on another agent: no record of the run, no secret, only the cluster's address.
    del cluster.env["CLUSTER_DATA_SOURCE"]
    other = str(tmp_path / "other-agent")
    dashboard = f"http://{HEAD_IP}:{DASHBOARD_PORT}"
    waited = cluster.exec(
        visionautoml, "runs", "wait", run_id, "--workspace", other, "--cluster", dashboard, timeout_s=300
    )
    output = waited.stdout + waited.stderr
    assert waited.returncode == 0, output
    assert "[10/10] export done" in output
    assert f"outcome of pipeline run {run_id}: succeeded" in output
    assert secret not in output and "***" in output

    shown = cluster.exec(visionautoml, "runs", "show", run_id, "--workspace", other)
    state = json.loads(shown.stdout)
    assert state["status"] == "succeeded"
    assert state["result"]["registered_model"]["name"] == "cluster-detector"
    assert [step["status"] for step in state["steps"]] == ["done"] * 10
    assert secret not in shown.stdout


def _checkpoints(workspace: Path) -> list[Path]:
    return sorted((workspace / "checkpoints").glob("*/last.pt"))


@pytest.mark.slow
def test_a_lost_node_is_survived_and_the_trial_retried(tmp_path):
    """The worker's raylet is killed (by PID) while its trial trains: the trial is retried on the head.

    One CPU per node and per trial, so each node runs one of the two trials. Once both have a
    checkpoint the worker node dies; Ray Tune retries its trial (``compute.max_failures``) on the
    head when the head's own trial is done, which carries on from the lost trial's last checkpoint
    (the workspace is on a disk both nodes share here; test_team_stack.py covers the nodes that
    share none), and the sweep registers a model.
    """
    with running_cluster(tmp_path, env=FAST_NODE_DEATH) as cluster:
        workspace = tmp_path / "workspace"
        config = {
            "experiment_name": "lost-node",
            "workspace": str(workspace),
            "training_data": str(make_voc_dataset(tmp_path / "data", n_images=6)),
            "training_parameters": {**TINY_TRAINING, "number_of_epochs": 10, "seed": 3},
            "limits": {"max_trials": 2, "max_concurrent_trials": 2},
            "search_space": [{"learning_rate": {"type": "choice", "values": [0.001, 0.002]}}],
            "sweep": {"sampling_algorithm": "grid"},
            "compute": {
                "target": "ray",
                "address": ADDRESS,
                "min_nodes": 2,
                "wait_timeout_minutes": 2,
                "cpus_per_trial": 1,
                "max_failures": 2,
            },
            "register": {"model_name": "lost-node-detector"},
        }
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(config))
        result_path, log_path = tmp_path / "result.json", tmp_path / "sweep.log"
        command = [str(VENV_BIN / "visionautoml"), "train", str(job), "--output-json", str(result_path)]
        with open(log_path, "w") as log:
            sweep = subprocess.Popen(
                [*cluster.exec_prefix, *command], env=cluster.env, cwd=tmp_path, stdout=log, stderr=log
            )
        try:
            worker = cluster.worker_nodes[0]
            deadline = time.monotonic() + 300
            while len(_checkpoints(workspace)) < 2:
                assert sweep.poll() is None, log_path.read_text()[-4000:]
                assert time.monotonic() < deadline, "the trials saved no checkpoint within 5 minutes"
                time.sleep(0.2)
            nodes = cluster.node_ids()  # both are up: the sweep waited for min_nodes
            os.kill(worker.raylet_pid(), signal.SIGKILL)
            returncode = sweep.wait(timeout=480)
        finally:
            if sweep.poll() is None:
                sweep.kill()
                sweep.wait()
        output = log_path.read_text()
        assert returncode == 0, output[-6000:]

    result = json.loads(result_path.read_text())
    trials = result["trials"]
    assert [trial["state"] for trial in trials] == ["completed", "completed"], output[-4000:]
    retried = [trial for trial in trials if trial["retries"]]
    assert len(retried) == 1 and retried[0]["retries"] == 1
    assert retried[0]["node_id"] == nodes[HEAD_IP] != nodes[WORKER_IP]  # it finished on the head
    assert result["registered_model"]["aliases"] == ["candidate"]

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(retried[0]["run_id"])
    assert int(run.data.tags["resumed_from_epoch"]) >= 1  # carried on from the lost attempt's checkpoint
    assert run.data.tags["retries"] == "1"
    parent = client.get_run(result["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    assert len(children) == 2  # the retry continued the lost attempt's run instead of starting one
    leaderboard = client.download_artifacts(result["parent_run_id"], "leaderboard.md", str(tmp_path))
    header = Path(leaderboard).read_text().splitlines()[0]
    assert "retries" in header

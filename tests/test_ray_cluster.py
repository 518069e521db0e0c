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
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, make_voc_dataset
from test_pipeline import tiny_pipeline_config

HEAD_IP, WORKER_IP, PORT, DASHBOARD_PORT = "10.213.0.1", "10.213.0.2", 6379, 8265
ADDRESS = f"{HEAD_IP}:{PORT}"
VENV_BIN = Path(sys.executable).parent
MEMORY, OBJECT_STORE = 400 * 1024**2, 100 * 1024**2


def netns_available() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)


class Cluster:
    """Two namespaces with a Ray node each; ``close`` undoes everything ``start`` did."""

    def __init__(self, workdir: Path, *, workers: int = 1, dashboard: bool = False):
        self.workers, self.dashboard = workers, dashboard
        tag = f"{os.getpid() % 100000}"
        self.head_ns, self.worker_ns = f"vaml{tag}h", f"vaml{tag}w"
        self.veth = (f"vv{tag}a", f"vv{tag}b")
        self.workdir = workdir
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}",
            # Ray jobs run `python` from the head's PATH: this environment's, with visionautoml
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.namespaces: list[str] = []
        self.nodes: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []

    def start(self) -> None:
        for namespace in (self.head_ns, self.worker_ns):
            run("ip", "netns", "add", namespace)
            self.namespaces.append(namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        for namespace, device, address in (
            (self.head_ns, self.veth[0], HEAD_IP),
            (self.worker_ns, self.veth[1], WORKER_IP),
        ):
            run("ip", "link", "set", device, "netns", namespace)
            run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            run("ip", "-n", namespace, "link", "set", device, "up")
        self.nodes.append(
            self._ray_start(
                self.head_ns,
                "head",
                "--head",
                f"--port={PORT}",
                "--node-ip-address",
                HEAD_IP,
                *(
                    (f"--dashboard-host={HEAD_IP}", f"--dashboard-port={DASHBOARD_PORT}")
                    if self.dashboard
                    else ("--include-dashboard=false",)
                ),
            )
        )
        self._wait_for_port(self.head_ns, PORT)
        if self.dashboard:
            self._wait_for_port(self.head_ns, DASHBOARD_PORT)
        if self.workers:
            self.nodes.append(
                self._ray_start(
                    self.worker_ns, "worker", f"--address={ADDRESS}", "--node-ip-address", WORKER_IP
                )
            )

    def _ray_start(self, namespace: str, name: str, *arguments: str) -> subprocess.Popen:
        # A short temp dir of its own: Ray's socket paths must stay under 107 bytes.
        temp_dir = tempfile.mkdtemp(prefix=f"vr{name[0]}", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        log = open(self.workdir / f"{name}.log", "w")  # noqa: SIM115 - the node outlives this call
        return subprocess.Popen(
            [
                "ip", "netns", "exec", namespace, str(VENV_BIN / "ray"), "start", *arguments,
                "--num-cpus=1", f"--memory={MEMORY}", f"--object-store-memory={OBJECT_STORE}",
                f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

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

    def python(self, script: str, *arguments: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
        """Run a Python script on the head node, where a sweep's driver runs."""
        return self.exec(str(VENV_BIN / "python"), "-c", script, *arguments, timeout_s=timeout_s)

    def exec(self, *command: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.head_ns, *command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.workdir,
        )

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
    assert not set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()) & {
        cluster.head_ns,
        cluster.worker_ns,
    }


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

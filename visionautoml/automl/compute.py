"""Where trials run: Ray in this process (``compute.target: local``) or an existing Ray cluster.

The local Ray binds to 127.0.0.1 only, keeps its temporary files in a private folder
that is removed afterwards, and authenticates with a token made for this one session, so
a laptop sweep opens nothing to the network and leaves nothing behind. A cluster is
joined as a driver and waited for until it offers ``min_nodes`` and ``min_gpus`` (the
original flow's wait for its autoscaling GPU cluster), showing what it has meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from visionautoml.config import Compute
from visionautoml.errors import VisionAutoMLError, first_line

# Object store for the local Ray: trials get paths, not data, so little is needed.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
_POLL_SECONDS = 2.0


class ComputeError(VisionAutoMLError):
    """The Ray cluster cannot be reached or does not offer what the sweep asked for in time."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the sweep can use: alive nodes and their total CPUs and GPUs."""

    address: str
    nodes: int
    cpus: float
    gpus: float

    def describe(self) -> str:
        return f"{self.nodes} node(s), {self.cpus:g} CPU(s), {self.gpus:g} GPU(s) at {self.address}"


def cluster_info(address: str = "local") -> ClusterInfo:
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = sum(node["Resources"].get("CPU", 0.0) for node in nodes)
    gpus = sum(node["Resources"].get("GPU", 0.0) for node in nodes)
    return ClusterInfo(address, len(nodes), cpus, gpus)


def start_local_ray(*, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Start Ray in this process, reachable on 127.0.0.1 only.

    Ray picks the machine's interface address unless its "no clusters" switch is set;
    that switch is read once, when Ray is imported, so it is set in the environment
    before the import and on Ray's constant in case Ray was imported already.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray turns token authentication on for a new local cluster and would write a token to
    # ~/.ray; a token of our own in the environment is used instead and dies with the process.
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    _quiet_tune()
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray warns that it turned token authentication on, which is what is wanted here.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
        _temp_dir=temp_dir,
    )


def _quiet_tune() -> None:
    """The sweep draws its own live table: Tune's console reports go."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


@contextmanager
def ray_session(compute: Compute, *, on_status: Callable[[str], None] | None = None) -> Iterator[ClusterInfo]:
    """Ray ready to run trials for the length of the block, and released after it.

    A Ray already initialised in this process (a notebook, a test fixture) is used as it
    is and left running; otherwise this starts (local) or joins (ray) one and shuts it down.
    """
    import ray

    if ray.is_initialized():
        yield cluster_info(compute.address or "local")
        return
    temp_dir = None
    try:
        if compute.target == "local":
            # Short path: Ray's socket paths must stay under the 107-byte limit.
            temp_dir = tempfile.mkdtemp(prefix="vaml-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            start_local_ray(temp_dir=temp_dir)
            info = cluster_info("local")
        else:
            info = join_cluster(compute, on_status=on_status)
        yield info
    finally:
        if ray.is_initialized():
            if compute.target == "ray":
                _withdraw_gpu_request(compute)
            ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


def join_cluster(compute: Compute, *, on_status: Callable[[str], None] | None = None) -> ClusterInfo:
    """Connect to ``compute.address`` and wait until it offers ``min_nodes`` and ``min_gpus``."""
    _quiet_tune()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    import ray
    from ray._private import ray_constants

    # The reverse of the local case: a driver of a cluster must find its node by its real address.
    ray_constants.ENABLE_RAY_CLUSTER = True
    try:
        ray.init(address=compute.address, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ComputeError(
            f"compute.address: cannot connect to the Ray cluster at {compute.address}: "
            f"{first_line(error)}. Check that the head node is up (`ray status` on it), that this "
            "machine can reach it, and that RAY_AUTH_TOKEN holds the cluster's token"
        ) from None
    try:
        return wait_for_resources(
            min_nodes=compute.min_nodes,
            min_gpus=compute.min_gpus,
            timeout_s=compute.wait_timeout_minutes * 60,
            address=compute.address or "",
            on_status=on_status,
        )
    except BaseException:
        _withdraw_gpu_request(compute)
        ray.shutdown()
        raise


def wait_for_resources(
    *,
    min_nodes: int,
    min_gpus: int,
    timeout_s: float,
    address: str,
    on_status: Callable[[str], None] | None = None,
) -> ClusterInfo:
    """Ask the autoscaler for ``min_gpus``, then poll the cluster until it is big enough.

    An autoscaling cluster at zero workers starts GPU nodes only for work that asks for them,
    and a sweep starts its trials only once the GPUs are there: the request breaks that wait
    (it does nothing on a cluster without an autoscaler). Nodes cannot be asked for as such,
    so ``min_nodes`` is only waited for. The error at the timeout says what the cluster had.
    """
    if min_gpus:
        request_gpus(min_gpus)
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        info = cluster_info(address)
        if info.nodes >= min_nodes and info.gpus >= min_gpus:
            return info
        status = f"waiting for {min_nodes} node(s) and {min_gpus} GPU(s); the cluster has {info.describe()}"
        if on_status and status != last:
            on_status(status)
            last = status
        if time.monotonic() >= deadline:
            raise ComputeError(
                f"the Ray cluster at {address} did not offer {min_nodes} node(s) and {min_gpus} GPU(s) "
                f"within compute.wait_timeout_minutes={timeout_s / 60:g}: it has {info.describe()}. "
                "Add nodes (or let the autoscaler start them), lower compute.min_nodes/min_gpus, "
                "or raise the timeout"
            )
        time.sleep(min(_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


def request_gpus(count: int) -> None:
    """Ask the autoscaler to keep ``count`` one-GPU bundles' worth of nodes; 0 withdraws the request.

    The request stands until replaced, so the sweep withdraws it when it ends: otherwise the
    autoscaler would keep the GPU nodes past their idle timeout.
    """
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * count)


def _withdraw_gpu_request(compute: Compute) -> None:
    if compute.min_gpus:
        with contextlib.suppress(Exception):  # the cluster may be gone, and the request with it
            request_gpus(0)


def trial_resources(compute: Compute, info: ClusterInfo, max_concurrent: int) -> dict[str, float]:
    """CPUs and GPUs per trial: as configured, else an even share of the cluster per concurrent trial.

    The share may be a fraction of a CPU (3 trials on 2 cores get 0.66 each): rounding it up to
    one would run fewer trials at a time than ``max_concurrent_trials`` asks for. Ray gives a
    trial with less than one CPU one thread.
    """
    cpus = compute.cpus_per_trial
    if cpus is None:
        share = info.cpus / max(1, max_concurrent)
        cpus = float(int(share)) if share >= 1 else math.floor(share * 100) / 100
    if cpus > info.cpus and compute.target == "local":
        raise ComputeError(
            f"compute.cpus_per_trial={cpus:g} is more than this machine's {info.cpus:g} CPUs; lower it"
        )
    resources = {"cpu": cpus}
    if compute.gpus_per_trial:
        resources["gpu"] = compute.gpus_per_trial
    elif compute.target == "local" and info.gpus:
        resources["gpu"] = max(0.0, min(1.0, info.gpus / max(1, max_concurrent)))
    return resources

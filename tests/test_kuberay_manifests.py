"""deploy/kuberay/: every document valid against the vendored KubeRay and Kubernetes schemas, offline.

No cluster here or in CI, so the schemas are what `kubectl apply --validate=strict` would check,
vendored under deploy/kuberay/schemas/ (README.md there says from where). Beyond the schemas, the
tests hold the manifests to the flow they promise: the cluster's shape, the credentials from the
Secret on every Ray pod, no disk shared between pods, Ray Tune's object-store keys on the head only,
the job's entrypoint and config, and the image the Dockerfile builds.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from packaging.requirements import Requirement

from visionautoml.config import load_config

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "deploy" / "kuberay"
SCHEMAS = KUBERAY / "schemas"
SCHEMA_FILES = {
    ("ray.io/v1", "RayCluster"): "raycluster-ray-v1.json",
    ("ray.io/v1", "RayJob"): "rayjob-ray-v1.json",
    ("v1", "Secret"): "secret-v1.json",
    ("v1", "ConfigMap"): "configmap-v1.json",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaim-v1.json",
}
TRACKING_SECRET = "visionautoml-tracking"
TRACKING_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
TUNE_STORAGE_SECRET = "visionautoml-tune-storage"
OPTIONAL_TUNE_STORAGE_VARIABLES = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
TUNE_STORAGE_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *OPTIONAL_TUNE_STORAGE_VARIABLES)
SHARED_DISKS = {"persistentVolumeClaim", "nfs", "hostPath", "csi"}  # a claim, a share, a node's disk
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                found.append((f"{path.name}:{document['kind']}/{document['metadata']['name']}", document))
    return found


DOCUMENTS = dict(_documents())


def _one(kind: str) -> dict[str, Any]:
    (document,) = [document for document in DOCUMENTS.values() if document["kind"] == kind]
    return document


def _secret(name: str) -> dict[str, Any]:
    (document,) = [d for d in DOCUMENTS.values() if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return document


@cache
def _validator(api_version: str, kind: str) -> Draft202012Validator:
    name = SCHEMA_FILES.get((api_version, kind))
    if name is None:
        raise AssertionError(
            f"no vendored schema for {api_version} {kind}: add it to deploy/kuberay/schemas/"
        )
    return Draft202012Validator(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Every violation, as `path: message`, of the schema of the document's apiVersion and kind."""
    validator = _validator(document.get("apiVersion", ""), document.get("kind", ""))
    return [
        f"{'.'.join(str(part) for part in error.absolute_path) or '<root>'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda error: list(error.absolute_path))
    ]


def test_the_manifests_are_there():
    assert {document["kind"] for document in DOCUMENTS.values()} == {
        "RayCluster",
        "RayJob",
        "ConfigMap",
        "Secret",
    }


@pytest.mark.parametrize("name", list(DOCUMENTS))
def test_every_document_passes_its_vendored_schema(name):
    assert schema_errors(DOCUMENTS[name]) == []


def _misspell_max_replicas(cluster: dict[str, Any]) -> None:
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["maxReplica"] = group.pop("maxReplicas")


def _idle_timeout_as_text(cluster: dict[str, Any]) -> None:
    cluster["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] = "30m"


def _secret_key_misspelled(cluster: dict[str, Any]) -> None:
    reference = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]
    reference["valueFrom"]["secretKeyRef"]["keys"] = reference["valueFrom"]["secretKeyRef"].pop("key")


def _gpu_count_not_a_quantity(cluster: dict[str, Any]) -> None:
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"]["nvidia.com/gpu"] = "one"


def _no_head(cluster: dict[str, Any]) -> None:
    del cluster["spec"]["headGroupSpec"]


BREAKAGES = {
    "misspelled field": (_misspell_max_replicas, "'maxReplica' was unexpected"),
    "wrong type": (_idle_timeout_as_text, "'30m' is not of type 'integer'"),
    "misspelled secretKeyRef field": (_secret_key_misspelled, "'keys' was unexpected"),
    "bad quantity": (_gpu_count_not_a_quantity, "'one' does not match"),
    "missing required section": (_no_head, "'headGroupSpec' is a required property"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_a_broken_cluster_manifest_fails_the_check(breakage, tmp_path):
    break_it, expected = BREAKAGES[breakage]
    cluster = copy.deepcopy(_one("RayCluster"))
    break_it(cluster)
    # Through a file, as CI reads the real ones: the failure is the document's, not a Python object's.
    broken = tmp_path / "raycluster.yaml"
    broken.write_text(yaml.safe_dump(cluster))

    errors = schema_errors(yaml.safe_load(broken.read_text()))

    assert any(expected in error for error in errors), errors


def test_a_broken_job_and_an_unknown_kind_fail_the_check():
    job = copy.deepcopy(_one("RayJob"))
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    config_map = copy.deepcopy(_one("ConfigMap"))
    config_map["data"] = ["not", "a", "mapping"]

    assert any("'shutdownAfterJobFinish' was unexpected" in error for error in schema_errors(job))
    assert any("is not of type 'object'" in error for error in schema_errors(config_map))
    with pytest.raises(AssertionError, match="no vendored schema for v1 Deployment"):
        schema_errors({"apiVersion": "v1", "kind": "Deployment", "metadata": {"name": "x"}})


def test_the_vendored_schemas_are_json_schemas_with_their_licence():
    for name in SCHEMA_FILES.values():
        Draft202012Validator.check_schema(json.loads((SCHEMAS / name).read_text(encoding="utf-8")))
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License, Version 2.0" in (SCHEMAS / "LICENSE.kubernetes-validate").read_text()
    assert "59d663aeec13760646da3db9c1cf8cfe883e30b7" in (SCHEMAS / "README.md").read_text()


# --- what the manifests promise -----------------------------------------------------------------


def _clusters() -> dict[str, dict[str, Any]]:
    return {"RayCluster": _one("RayCluster")["spec"], "RayJob": _one("RayJob")["spec"]["rayClusterSpec"]}


def _pods(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_the_cluster_is_the_original_flows_cpu_head_and_autoscaled_gpu_workers(owner):
    cluster = _clusters()[owner]
    head = cluster["headGroupSpec"]
    (group,) = cluster["workerGroupSpecs"]
    head_limits = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    worker_limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == 1800
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head schedules no trials
    assert not any("gpu" in resource for resource in head_limits)
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (0, 4, 0)
    assert worker_limits["nvidia.com/gpu"] == 1


def test_the_jobs_cluster_is_the_standing_clusters_plus_the_config_volume():
    standing, job = _clusters()["RayCluster"], copy.deepcopy(_clusters()["RayJob"])
    head = job["headGroupSpec"]["template"]["spec"]
    head["volumes"] = [volume for volume in head["volumes"] if volume["name"] != "pipeline-config"]
    mounts = head["containers"][0]["volumeMounts"]
    head["containers"][0]["volumeMounts"] = [mount for mount in mounts if mount["name"] != "pipeline-config"]
    # The config volume was the head's only one: what is left is nothing, as on the standing cluster.
    for owner, key in ((head, "volumes"), (head["containers"][0], "volumeMounts")):
        if not owner[key]:
            del owner[key]

    assert job == standing


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_no_pod_mounts_a_claim_or_a_disk_another_pod_sees(owner):
    """Datasets, checkpoints and Tune's state reach the nodes through the tracking server and the bucket."""
    assert not [d for d in DOCUMENTS.values() if d["kind"] == "PersistentVolumeClaim"]
    head, *workers = _pods(_clusters()[owner])
    for pod in (head, *workers):
        for volume in pod["spec"].get("volumes", []):
            assert not set(volume) & SHARED_DISKS, volume
    head_volumes = {volume["name"] for volume in head["spec"].get("volumes", [])}
    for worker in workers:
        volumes = worker["spec"].get("volumes", [])
        assert all(set(volume) == {"name", "emptyDir"} for volume in volumes), volumes  # the pod's own
        assert not head_volumes & {volume["name"] for volume in volumes}


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_every_ray_pod_gets_the_tracking_credentials_from_the_secret(owner):
    for pod in _pods(_clusters()[owner]):
        (container,) = pod["spec"]["containers"]
        env = {variable["name"]: variable for variable in container["env"]}
        for name in TRACKING_VARIABLES:
            assert "value" not in env[name], f"{name} must come from the Secret, not the manifest"
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": TRACKING_SECRET, "key": name}
    assert set(_secret(TRACKING_SECRET)["stringData"]) == set(TRACKING_VARIABLES)


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_only_the_head_gets_the_tune_storage_keys_from_their_secret(owner):
    """The driver (on the head) alone uses Ray Tune's storage; the workers hold no object-store keys."""
    head, *workers = _pods(_clusters()[owner])
    (container,) = head["spec"]["containers"]
    aws = {variable["name"]: variable for variable in container["env"] if variable["name"].startswith("AWS_")}
    assert set(aws) == set(TUNE_STORAGE_VARIABLES)
    for name, variable in aws.items():
        assert "value" not in variable, f"{name} must come from the Secret, not the manifest"
        expected = {"name": TUNE_STORAGE_SECRET, "key": name}
        if name in OPTIONAL_TUNE_STORAGE_VARIABLES:
            expected["optional"] = True
        assert variable["valueFrom"]["secretKeyRef"] == expected
    assert workers
    for worker in workers:
        (container,) = worker["spec"]["containers"]
        names = [variable["name"] for variable in container.get("env", [])]
        assert not [name for name in names if name.startswith("AWS_")]  # workers need no object-store keys
        assert not container.get("envFrom")
    assert set(_secret(TUNE_STORAGE_SECRET)["stringData"]) == set(TUNE_STORAGE_VARIABLES)


def test_the_job_runs_the_pipeline_on_the_config_its_head_mounts(tmp_path):
    job = _one("RayJob")["spec"]
    config_map = _one("ConfigMap")
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [volume for volume in head["volumes"] if "configMap" in volume]
    (mount,) = [mount for mount in head["containers"][0]["volumeMounts"] if mount["name"] == volume["name"]]
    command = shlex.split(job["entrypoint"])
    (config_key,) = config_map["data"]
    config = tmp_path / config_key
    config.write_text(config_map["data"][config_key])

    assert command == ["visionautoml", "pipeline", "run", f"{mount['mountPath']}/{config_key}"]
    assert "visionautoml" in PYPROJECT["project"]["scripts"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert job["shutdownAfterJobFinishes"] is True
    job_config = load_config(config)
    assert job_config.compute.target == "ray" and job_config.compute.gpus_per_trial == 1
    assert job_config.tracking.uri is None  # the pods' MLFLOW_TRACKING_URI says where


def test_the_jobs_config_keeps_tune_in_the_bucket_and_its_workspace_on_no_shared_path(tmp_path):
    config_map = _one("ConfigMap")
    (config_key,) = config_map["data"]
    config = tmp_path / config_key
    config.write_text(config_map["data"][config_key])
    job_config = load_config(config)
    cluster = _clusters()["RayJob"]
    mounts = [
        mount["mountPath"]
        for pod in _pods(cluster)
        for container in pod["spec"]["containers"]
        for mount in container.get("volumeMounts", [])
    ]

    assert re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]+/\S+", job_config.compute.storage_path or "")
    assert job_config.compute.max_failures >= 1  # a trial on a lost node is retried
    assert job_config.compute.min_gpus == 1  # asks the autoscaler for the first GPU worker
    workspace = Path(job_config.workspace)
    assert workspace.is_absolute()  # the same path on every pod, each pod's own disk
    assert not [mount for mount in mounts if workspace.is_relative_to(mount)], mounts


# --- the image ----------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in joined.splitlines()
        if line.strip()
    ]


def _arg(name: str) -> str:
    instructions = _dockerfile_instructions()
    (value,) = [
        args.split("=", 1)[1] for op, args in instructions if op == "ARG" and args.startswith(f"{name}=")
    ]
    return value


def test_the_manifests_run_the_image_and_the_ray_the_dockerfile_builds():
    version = PYPROJECT["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_version = _arg("RAY_VERSION")
    cluster_extra = PYPROJECT["project"]["optional-dependencies"]["cluster"]
    (ray_requirement,) = [Requirement(spec) for spec in cluster_extra if spec.startswith("ray")]
    for owner, cluster in _clusters().items():
        head_image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
        worker_image = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
        assert (head_image, worker_image) == (
            f"registry.example.com/visionautoml:{version}-cpu",
            f"registry.example.com/visionautoml:{version}-gpu",
        ), owner
        assert f"-t {head_image} ." in dockerfile and f"-t {worker_image} ." in dockerfile
        assert cluster["rayVersion"] == ray_version, owner
    assert ray_requirement.specifier.contains(ray_version)


def test_the_dockerfile_installs_pyprojects_torch_pins_and_copies_only_what_it_may(tmp_path):
    instructions = _dockerfile_instructions()
    (pins_step,) = [args for op, args in instructions if op == "RUN" and "> /tmp/torch-pins.txt" in args]
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    command = pins_step.replace("/tmp/torch-pins.txt", str(tmp_path / "pins.txt"))
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, check=True, timeout=30)
    pins = (tmp_path / "pins.txt").read_text().split()
    dependencies = PYPROJECT["project"]["dependencies"]
    copied = [part for op, args in instructions if op == "COPY" for part in args.split()[:-1]]
    allowed = [line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]

    assert instructions[0] == ("FROM", "python:3.11-slim-bookworm")
    assert pins == [d for d in dependencies if d.startswith(("torch==", "torchvision=="))] and len(pins) == 2
    assert copied and all((ROOT / part).exists() and part in allowed for part in copied)
    assert any(op == "RUN" and 'pip install ".[all]"' in args for op, args in instructions)
    assert ("USER", "ray") in instructions

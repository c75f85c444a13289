"""Regenerate ``kuberay_crds_v1.json`` (the vendored, trimmed KubeRay CRD schemas) from a
KubeRay checkout: ``python tests/cluster/trim_kuberay_crds.py KUBERAY_DIR COMMIT``.

Kept: the field tree of ``ray.io/v1`` RayCluster and RayJob (``type``, ``properties``, ``items``,
``additionalProperties``, ``required``, ``enum``, int-or-string and preserve-unknown-fields
markers); dropped: descriptions, formats and defaults. RayJob's ``spec.rayClusterSpec`` is the
RayCluster ``spec`` (stored once, as ``{"$ref": "RayCluster.spec"}``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

KEEP = {"type", "properties", "items", "additionalProperties", "required", "enum", "anyOf",
        "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}
CRD = "ray-operator/config/crd/bases/ray.io_{}.yaml"


def trim(s):
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k not in KEEP:
            continue
        if k == "properties":
            out[k] = {pk: trim(pv) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = trim(v)
        elif k == "anyOf":
            out[k] = [trim(x) for x in v]
        else:
            out[k] = v
    return out


def main(root: str, commit: str) -> None:
    out = {"source": f"github.com/ray-project/kuberay@{commit} {CRD.format('*')} (v1)"}
    for kind, plural in (("RayCluster", "rayclusters"), ("RayJob", "rayjobs")):
        crd = yaml.safe_load((Path(root) / CRD.format(plural)).read_text())
        ver = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[kind] = trim(ver["schema"]["openAPIV3Schema"])
    job_spec = out["RayJob"]["properties"]["spec"]["properties"]
    assert job_spec["rayClusterSpec"] == out["RayCluster"]["properties"]["spec"]
    job_spec["rayClusterSpec"] = {"$ref": "RayCluster.spec"}
    dest = Path(__file__).with_name("kuberay_crds_v1.json")
    dest.write_text(json.dumps(out, separators=(",", ":"), sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])

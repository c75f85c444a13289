"""The cluster recipes are valid and agree with each other: the launcher YAML against Ray's own
cluster schema (shipped in the ray package), the KubeRay manifests against the RayCluster /
RayJob CRD field trees of KubeRay 1.7.0 (vendored, trimmed: kuberay_crds_v1.json; unknown
fields fail), and the image the recipes run against the project's version."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRDS = json.loads((Path(__file__).with_name("kuberay_crds_v1.json")).read_text())


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _strict(schema, root: dict):
    """The CRD field tree as a strict JSON schema: objects with ``properties`` allow no other
    keys (Kubernetes would silently drop them), int-or-string is either."""
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:  # "RayCluster.spec"
        kind, field = schema["$ref"].split(".")
        return _strict(root[kind]["properties"][field], root)
    out = {}
    for k, v in schema.items():
        if k == "properties":
            out[k] = {pk: _strict(pv, root) for pk, pv in v.items()}
        elif k in ("items", "additionalProperties") and isinstance(v, dict):
            out[k] = _strict(v, root)
        elif k == "anyOf":
            out[k] = [_strict(x, root) for x in v]
        elif k.startswith("x-kubernetes"):
            continue
        else:
            out[k] = v
    if schema.get("x-kubernetes-int-or-string"):
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
    elif ("properties" in out and "additionalProperties" not in out
          and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(kind: str):
    """The strict schema of ``kind``, checked once against its meta-schema (that check takes
    ~2 s on this large schema, so it is not repeated for every document)."""
    schema = _strict(CRDS[kind], CRDS)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _validate_crd(doc: dict) -> None:
    _crd_validator(doc["kind"]).validate(doc)


def _ray_version() -> str:
    import ray

    return ray.__version__


# ---------------------------------------------------------------------------------------------
# launcher


def test_launcher_yaml_passes_rays_cluster_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    jsonschema.validate(cfg, schema)  # what `ray up` checks (autoscaler/_private/util.py)
    bad = copy.deepcopy(cfg)
    bad["docker"]["imagee"] = "typo"
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(bad, schema)

    # one image (the Dockerfile's), a CUDA-12.8-capable AMI family on every node, no GPU head
    # (the instance profiles are checked against what the guide creates: test_cluster_iam.py)
    assert cfg["docker"]["image"].endswith(":0.1.0") and "head_image" not in cfg["docker"]
    for name, nt in cfg["available_node_types"].items():
        assert "base-oss-nvidia-driver-gpu-ubuntu-22.04" in nt["node_config"]["ImageId"], name
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    assert cfg["setup_commands"] == []  # everything is in the image


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_kuberay_manifests_match_the_crds_and_name_what_they_use():
    cluster = _docs("kuberay.yaml")
    job = _docs("kuberay-job.yaml")
    secret = _docs("kuberay-s3-secret.yaml")
    sa_docs = _docs("kuberay-serviceaccount.yaml")
    assert [d["kind"] for d in cluster] == ["RayCluster"]
    assert [d["kind"] for d in job] == ["RayJob"]
    assert [d["kind"] for d in secret] == ["Secret"]
    assert [d["kind"] for d in sa_docs] == ["ServiceAccount"]
    for d in cluster + job:
        _validate_crd(d)
    bad = copy.deepcopy(cluster[0])
    bad["spec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        _validate_crd(bad)
    bad = copy.deepcopy(job[0])
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resource"] = {}
    with pytest.raises(jsonschema.ValidationError, match="resource"):
        _validate_crd(bad)

    specs = [cluster[0]["spec"], job[0]["spec"]["rayClusterSpec"]]
    assert specs[0] == specs[1]  # the RayJob runs the same cluster
    for spec in specs:
        assert spec["rayVersion"] == _ray_version()
        templates = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec["workerGroupSpecs"]]
        for t in templates:
            for c in t["spec"]["containers"]:
                assert c["image"] == cluster_image()
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
                assert refs == [secret[0]["metadata"]["name"]]
                assert not any(e["name"].startswith("AWS_SECRET") for e in c.get("env", []))
    sub = job[0]["spec"]["submitterPodTemplate"]["spec"]
    assert sub["containers"][0]["image"] == cluster_image()
    assert "secret" not in job[0]["spec"].get("runtimeEnvYAML", "").lower()
    assert set(secret[0]["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def cluster_image() -> str:
    return yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())["docker"]["image"]


# ---------------------------------------------------------------------------------------------
# image and versions


def test_the_image_tag_is_the_project_version():
    # the Ray and torch pins, as the build expands them: test_cluster_image.py
    version = re.search(r'^version = "(\S+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert cluster_image().endswith(f":{version.group(1)}")


def test_runtime_env_yaml_is_valid_and_holds_no_secret_or_pip():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "ray_jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray accepts every field
    assert set(env) <= {"env_vars", "excludes"}  # no pip: no per-job virtualenv, no network
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {}))
    assert {".venv", ".git"} <= set(env["excludes"])

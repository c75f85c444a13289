"""The KubeRay recipes schedule: one definition of each ServiceAccount (a second one, applied
later, resets the first one's IAM role), every ServiceAccount a pod names exists, and every
Ray pod fits a node of a group it may land on (cluster/eks-cluster.yaml), less what the kubelet
and the daemonsets keep; the Train workers the RayJob asks for fit the Ray resources of the gpu
pods."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

import cluster_checks as cc

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
BAD = Path(__file__).with_name("bad_recipes")

#: Nominal shapes (AWS's instance-type pages) and the pods an EKS node may run (VPC CNI without
#: prefix delegation: ENIs x (IPs per ENI - 1) + 2, EKS's eni-max-pods.txt), which the kubelet's
#: memory reservation grows with.
INSTANCE_SHAPES = {
    "g5.2xlarge": {"vcpus": 8, "memory_gib": 32, "gpus": 1, "max_pods": 58},
    "m6i.4xlarge": {"vcpus": 16, "memory_gib": 64, "gpus": 0, "max_pods": 234},
    "c6i.8xlarge": {"vcpus": 32, "memory_gib": 64, "gpus": 0, "max_pods": 234},
}
#: what the daemonsets on every node request, with room to spare (VPC CNI 25m, kube-proxy 100m,
#: EKS pod identity agent, the NVIDIA device plugin on GPU nodes)
DAEMONSETS = {"cpu": 300, "memory": 512 * 2**20}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(name, pod spec) of every pod a RayCluster or RayJob creates."""
    if doc["kind"] not in ("RayCluster", "RayJob"):
        return []
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        out = [("submitter", spec["submitterPodTemplate"]["spec"])] if (
            "submitterPodTemplate" in spec) else []
        return out + _pod_specs({"kind": "RayCluster", "spec": spec["rayClusterSpec"]})
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (f"worker group {g['groupName']}", g["template"]["spec"])
        for g in spec["workerGroupSpecs"]]


def service_account_problems(paths: list[Path]) -> list[str]:
    docs = [(p.name, d) for p in paths for d in _docs(p)]
    defined = Counter(d["metadata"]["name"] for _, d in docs if d["kind"] == "ServiceAccount")
    out = [f"ServiceAccount {n} is defined {k} times: the last one applied sets its IAM role"
           for n, k in defined.items() if k > 1]
    for name, d in docs:
        for pod, spec in _pod_specs(d):
            sa = spec.get("serviceAccountName", "default")
            if sa != "default" and sa not in defined:
                out.append(f"{name} {pod}: ServiceAccount {sa} is defined nowhere")
    return out


def _manifests(folder: Path) -> list[Path]:
    return sorted(folder.glob("kuberay*.yaml"))


def test_each_service_account_is_defined_once_and_every_pod_names_one_that_exists():
    assert service_account_problems(_manifests(CLUSTER)) == []
    # the ServiceAccount is not in the files the pods are in: applying them keeps its role
    for p in (CLUSTER / "kuberay.yaml", CLUSTER / "kuberay-job.yaml"):
        assert [d["kind"] for d in _docs(p)] in (["RayCluster"], ["RayJob"])


def test_a_service_account_defined_twice_is_caught():
    problems = service_account_problems(_manifests(BAD))
    assert problems == ["ServiceAccount multimix is defined 2 times: the last one applied sets "
                        "its IAM role"]
    problems = service_account_problems([CLUSTER / "kuberay.yaml"])
    assert any("ServiceAccount multimix is defined nowhere" in p for p in problems)


def _node_groups(path: Path = CLUSTER / "eks-cluster.yaml") -> list[dict]:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["apiVersion"] == "eksctl.io/v1alpha5" and cfg["kind"] == "ClusterConfig"
    return cfg["managedNodeGroups"]


def _requests(spec: dict) -> dict:
    total = {"cpu": 0, "memory": 0, "nvidia.com/gpu": 0}
    for c in spec["containers"]:
        req = {**c.get("resources", {}).get("limits", {}),
               **c.get("resources", {}).get("requests", {})}  # requests default to limits
        total["cpu"] += cc.cpu_millis(req.get("cpu", 0))
        total["memory"] += cc.mem_bytes(req.get("memory", 0))
        total["nvidia.com/gpu"] += int(req.get("nvidia.com/gpu", 0))
    return total


def placement_problems(manifests: list[Path], groups: list[dict]) -> list[str]:
    """For every Ray pod: the node groups it may land on (its nodeSelector matches the group's
    labels, it tolerates the group's taints) and, among them, one whose node's allocatable less
    the daemonsets holds its requests. A pod with none stays Pending."""
    out = []
    for path in manifests:
        for doc in _docs(path):
            for pod, spec in _pod_specs(doc):
                req = _requests(spec)
                eligible, fits = [], []
                for g in groups:
                    labels = g.get("labels", {})
                    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
                        continue
                    if not all(cc.tolerates(spec.get("tolerations", []), t)
                               for t in g.get("taints", [])):
                        continue
                    eligible.append(g["name"])
                    alloc = cc.eks_allocatable(INSTANCE_SHAPES[g["instanceType"]])
                    free = {"cpu": alloc["cpu"] - DAEMONSETS["cpu"],
                            "memory": alloc["memory"] - DAEMONSETS["memory"],
                            "nvidia.com/gpu": alloc["nvidia.com/gpu"]}
                    if all(req[k] <= free[k] for k in req):
                        fits.append(g["name"])
                    else:
                        out.append(f"{path.name} {pod}: requests {req} exceed a "
                                   f"{g['instanceType']} node's {free} (group {g['name']})")
                if not eligible:
                    out.append(f"{path.name} {pod}: no node group it may run on")
                elif fits:  # the scheduler only uses nodes it fits
                    out = [p for p in out if not p.startswith(f"{path.name} {pod}:")]
    return out


def test_every_ray_pod_fits_a_node_it_may_land_on():
    groups = _node_groups()
    assert {g["instanceType"] for g in groups} <= set(INSTANCE_SHAPES)
    assert placement_problems(_manifests(CLUSTER), groups) == []
    gpu = [g for g in groups if INSTANCE_SHAPES[g["instanceType"]]["gpus"]]
    assert gpu and all(any(t["key"] == "nvidia.com/gpu" for t in g.get("taints", []))
                       for g in gpu), "CPU pods would take the GPU nodes"


def test_the_old_gpu_pods_are_caught():
    problems = placement_problems([BAD / "kuberay.yaml"], _node_groups())
    assert any("worker group gpu: requests" in p and "g5.2xlarge" in p for p in problems)
    assert any("worker group cpu: requests" in p and "m6i.4xlarge" in p for p in problems)


def test_the_allocatable_model():
    # EKS's kube-reserved CPU for 8 vCPU: 60 + 10 + 2 x 5 + 4 x 2.5 = 90 millicores
    assert cc.eks_kube_reserved_cpu_millis(8) == 90
    a = cc.eks_allocatable(INSTANCE_SHAPES["g5.2xlarge"])
    assert a["cpu"] == 7910 and 28 * 2**30 < a["memory"] < 30 * 2**30
    assert cc.tolerates([{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                        {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"})
    assert not cc.tolerates([], {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"})


def test_the_rayjobs_train_workers_fit_the_gpu_pods():
    """Ray in a KubeRay pod has the container's CPU limit as CPUs and its nvidia.com/gpu as
    GPUs; a Train worker needing more than one pod holds is never placed (the job hangs)."""
    from multimix.cli import build_parser
    from multimix.config import load_config

    [job] = _docs(CLUSTER / "kuberay-job.yaml")
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "/home/ray/multimix/ray_jobs/train.py"]
    args = build_parser("train").parse_args(["train", *words[2:]])
    cfg = load_config(args.config, args.set)
    gpu_pods = [g["template"]["spec"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                if _requests(g["template"]["spec"])["nvidia.com/gpu"]]
    assert cfg.scaling.use_gpu and gpu_pods
    req = _requests(gpu_pods[0])
    assert cfg.scaling.cpus_per_worker * 1000 <= req["cpu"]
    assert cfg.scaling.gpus_per_worker <= req["nvidia.com/gpu"]
    max_gpu_pods = sum(g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                       if _requests(g["template"]["spec"])["nvidia.com/gpu"])
    assert cfg.scaling.num_workers <= max_gpu_pods

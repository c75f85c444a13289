"""The IAM documents under cluster/iam/ are valid policies, and the roles that cluster/README.md
builds from them (its `aws iam` and `eksctl` commands, replayed here) let every part of a
cluster do its work: the launcher's head launches and stops workers the way Ray's AWS node
provider does, every node pulls the image and reads/writes the bucket, and the pods' IRSA role
does the same for the ServiceAccount the manifests run as."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

import cluster_checks as cc

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
BAD = Path(__file__).with_name("bad_recipes")

#: The EC2 API calls of Ray's AWS node provider, which the autoscaler makes on the head with the
#: head's instance profile. Read from ray 2.60.0, python/ray/autoscaler/_private/aws/
#: node_provider.py (the head loads no other AWS module: config.py's bootstrap runs where
#: `ray up` runs); test_the_recorded_calls_are_those_of_the_installed_ray re-derives them.
AUTOSCALER_EC2_CALLS = {
    "ec2:DescribeInstances": "non_terminated_nodes, create_node: ec2.instances.filter; "
                             "Instance.wait_until_stopped",
    "ec2:RunInstances": "_create_node: ec2_fail_fast.create_instances",
    "ec2:CreateTags": "set_node_tags: client.create_tags (and RunInstances' TagSpecifications)",
    "ec2:TerminateInstances": "terminate_node(s): Instance.terminate, client.terminate_instances",
    "ec2:StopInstances": "terminate_node(s) with cache_stopped_nodes: client.stop_instances",
    "ec2:StartInstances": "create_node reusing stopped nodes: client.start_instances",
    "ec2:DescribeImages": "_check_ami_cwa_installation (with a CloudWatch agent config)",
    "ec2:DescribeInstanceTypes": "list_ec2_instances (fillout_available_node_types_resources)",
}
#: S3 calls of the Ray processes (pyarrow's S3FileSystem: list, read, write, multipart, delete)
S3_BUCKET_ACTIONS = ["s3:ListBucket"]
S3_OBJECT_ACTIONS = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
#: `aws ecr get-login-password` and an image pull
ECR_LOGIN = "ecr:GetAuthorizationToken"
ECR_PULL = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]


def _launcher(path: Path = CLUSTER / "aws-gpu.yaml") -> dict:
    return yaml.safe_load(path.read_text())


# ---------------------------------------------------------------------------------------------
# the policy documents


@pytest.mark.parametrize("name", ["head-policy.json", "worker-policy.json"])
def test_the_policies_are_valid_identity_policies(name):
    cc.check_policy_document(json.loads((CLUSTER / "iam" / name).read_text()))


def test_the_trust_policy_lets_ec2_take_the_role():
    doc = json.loads((CLUSTER / "iam" / "ec2-trust.json").read_text())
    assert doc["Version"] == "2012-10-17"
    [s] = doc["Statement"]
    assert (s["Effect"], s["Principal"], s["Action"]) == (
        "Allow", {"Service": "ec2.amazonaws.com"}, "sts:AssumeRole")


def test_the_policy_checks():
    with pytest.raises(ValueError, match="Version"):
        cc.check_policy_document({"Statement": []})
    with pytest.raises(ValueError, match="malformed action"):
        cc.check_policy_document({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "ec2 RunInstances", "Resource": "*"}]})
    p = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["ec2:Describe*", "s3:GetObject"],
         "Resource": ["*", "arn:aws:s3:::b/*"]},
        {"Effect": "Deny", "Action": "ec2:DescribeImages", "Resource": "*"}]}
    assert cc.allows([p], "ec2:describeinstances")
    assert not cc.allows([p], "ec2:DescribeImages")  # an explicit Deny wins
    assert not cc.allows([p], "ec2:RunInstances")
    assert cc.allows([p], "s3:GetObject", "arn:aws:s3:::b/k")


def _node_provider_calls() -> set[str]:
    """The EC2 operations the installed Ray's node_provider.py calls, by name: boto3 client
    methods (botocore's EC2 model), resource actions and waiters (boto3's resource model),
    collections (``ec2.instances.filter``). Method names of Python's own containers are not
    counted (``tags.copy()`` is no CopySnapshot)."""
    boto3 = pytest.importorskip("boto3")
    import botocore.session
    import ray
    from botocore import xform_name

    src = Path(ray.__file__).parent / "autoscaler" / "_private" / "aws" / "node_provider.py"
    called = set()
    for n in ast.walk(ast.parse(src.read_text())):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            called.add(n.func.attr)
            if isinstance(n.func.value, ast.Attribute):
                called.add(f"{n.func.value.attr}.{n.func.attr}")
    builtin = set(dir(dict)) | set(dir(list)) | set(dir(set)) | set(dir(str))
    session = botocore.session.get_session()
    client = {xform_name(op): op for op in session.get_service_model("ec2").operation_names}
    waiters = session.get_component("data_loader").load_service_model("ec2", "waiters-2")
    model = json.loads(sorted((Path(boto3.__file__).parent / "data" / "ec2").glob(
        "*/resources-1.json"))[-1].read_text())
    actions: dict[str, set[str]] = {}
    for res in [model["service"], *model["resources"].values()]:
        for name, a in res.get("actions", {}).items():
            actions.setdefault(xform_name(name), set()).add(a["request"]["operation"])
        for name, w in res.get("waiters", {}).items():
            op = waiters["waiters"][w["waiterName"]]["operation"]
            actions.setdefault(f"wait_until_{xform_name(name)}", set()).add(op)
    collections = {xform_name(k): v["request"]["operation"]
                   for k, v in model["service"]["hasMany"].items()}
    ops = set()
    for c in called:
        if "." in c:
            coll, method = c.split(".")
            if coll in collections and method in ("filter", "all", "limit", "page_size"):
                ops.add(collections[coll])
        elif c not in builtin:
            ops |= {client[c]} if c in client else set()
            ops |= actions.get(c, set())
    return {f"ec2:{op}" for op in ops}


def test_the_recorded_calls_are_those_of_the_installed_ray():
    import ray

    derived = _node_provider_calls()
    assert derived, "no EC2 call found: has node_provider.py moved?"
    assert derived <= set(AUTOSCALER_EC2_CALLS), (
        f"Ray {ray.__version__}'s AWS node provider makes {sorted(derived - set(AUTOSCALER_EC2_CALLS))}"
        " too: add them to AUTOSCALER_EC2_CALLS and cluster/iam/head-policy.json")


# ---------------------------------------------------------------------------------------------
# the roles the guide builds


@dataclass
class Iam:
    policies: dict[str, dict] = field(default_factory=dict)        # ARN -> document
    roles: dict[str, list[dict]] = field(default_factory=dict)     # role -> attached documents
    profiles: dict[str, str] = field(default_factory=dict)         # instance profile -> role
    irsa: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, SA) -> role


def _doc(uri: str, root: Path) -> dict:
    assert uri.startswith("file://"), uri
    return json.loads((root / uri[len("file://"):]).read_text())


def iam_from_guide(readme: Path, root: Path = REPO) -> Iam:
    """Replay the guide's `aws iam` and `eksctl create iamserviceaccount` commands."""
    iam, acct = Iam(), cc.PLACEHOLDERS["ACCOUNT"]
    for w in cc.guide_commands(readme):
        opt = lambda name: (cc.option_values(w, name) or [None])[0]  # noqa: E731
        if w[:2] == ["aws", "iam"]:
            verb = w[2]
            if verb == "create-policy":
                iam.policies[f"arn:aws:iam::{acct}:policy/{opt('--policy-name')}"] = _doc(
                    opt("--policy-document"), root)
            elif verb == "create-role":
                iam.roles.setdefault(opt("--role-name"), [])
            elif verb == "put-role-policy":
                iam.roles[opt("--role-name")].append(_doc(opt("--policy-document"), root))
            elif verb == "attach-role-policy":
                iam.roles[opt("--role-name")].append(iam.policies[opt("--policy-arn")])
            elif verb == "create-instance-profile":
                iam.profiles.setdefault(opt("--instance-profile-name"), None)
            elif verb == "add-role-to-instance-profile":
                iam.profiles[opt("--instance-profile-name")] = opt("--role-name")
        elif w[:3] == ["eksctl", "create", "iamserviceaccount"]:
            role = opt("--role-name")
            iam.roles[role] = [iam.policies[a] for a in cc.option_values(w, "--attach-policy-arn")]
            iam.irsa[(opt("--namespace") or "default", opt("--name"))] = role
    return iam


def _s3_uris(texts: list[str]) -> set[str]:
    return {m for t in texts for m in re.findall(r"s3://[a-z0-9][a-z0-9.-]+", t)}


def _buckets(readme: Path) -> set[str]:
    """Every bucket the guide's commands and the RayJob's entrypoint name."""
    words = [w for c in cc.guide_commands(readme) for w in c]
    job = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-job.yaml").read_text()) if d
           and d["kind"] == "RayJob"]
    uris = _s3_uris(words + [d["spec"]["entrypoint"] for d in job])
    return {u[len("s3://"):] for u in uris}


def data_problems(who: str, docs: list[dict], buckets: set[str], image: str | None) -> list[str]:
    out = []
    for b in sorted(buckets):
        out += [f"{who}: no {a} on bucket {b}" for a in S3_BUCKET_ACTIONS
                if not cc.allows(docs, a, f"arn:aws:s3:::{b}")]
        out += [f"{who}: no {a} on s3://{b}/..." for a in S3_OBJECT_ACTIONS
                if not cc.allows(docs, a, f"arn:aws:s3:::{b}/runs/x/checkpoint.pt")]
    if image:  # 123456789012.dkr.ecr.us-east-1.amazonaws.com/multimix:0.1.0
        m = re.fullmatch(r"(\d+)\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/([^:]+):.+", image)
        repo_arn = f"arn:aws:ecr:{m.group(2)}:{m.group(1)}:repository/{m.group(3)}"
        if not cc.allows(docs, ECR_LOGIN):
            out.append(f"{who}: no {ECR_LOGIN}")
        out += [f"{who}: no {a} on {repo_arn}" for a in ECR_PULL
                if not cc.allows(docs, a, repo_arn)]
    return out


def launcher_problems(iam: Iam, launcher: dict, buckets: set[str]) -> list[str]:
    """What stops the launcher's cluster: a node whose profile is not made by the guide; a head
    role without the autoscaler's EC2 calls, PassRole on each worker role or the AMI parameter;
    a node that cannot pull the image or use the bucket."""
    acct, out = cc.PLACEHOLDERS["ACCOUNT"], []
    region = launcher["provider"]["region"]
    head_type = launcher["head_node_type"]
    image = launcher["docker"]["image"]
    for name, nt in launcher["available_node_types"].items():
        nc = nt["node_config"]
        profile = nc.get("IamInstanceProfile", {}).get("Name")
        role = iam.profiles.get(profile)
        if role is None:
            out.append(f"{name}: instance profile {profile!r} is not created (with a role) by "
                       "the guide")
            continue
        docs = iam.roles.get(role, [])
        out += data_problems(f"{name} ({role})", docs, buckets, image)
        if name != head_type:
            continue
        out += [f"head ({role}): no {a} (autoscaler)" for a in AUTOSCALER_EC2_CALLS
                if not cc.allows(docs, a)]
        for wname, wt in launcher["available_node_types"].items():
            wrole = iam.profiles.get(wt["node_config"].get("IamInstanceProfile", {}).get("Name"))
            if wname != head_type and wrole and not cc.allows(
                    docs, "iam:PassRole", f"arn:aws:iam::{acct}:role/{wrole}"):
                out.append(f"head ({role}): no iam:PassRole on {wrole} (launches {wname})")
        ami = nc.get("ImageId", "")
        if ami.startswith("resolve:ssm:"):
            arn = f"arn:aws:ssm:{region}::parameter{ami[len('resolve:ssm:'):]}"
            if not cc.allows(docs, "ssm:GetParameters", arn):
                out.append(f"head ({role}): no ssm:GetParameters on {arn} (ImageId)")
    return out


def test_the_launchers_head_can_launch_workers_and_every_node_can_work():
    iam = iam_from_guide(CLUSTER / "README.md")
    assert launcher_problems(iam, _launcher(), _buckets(CLUSTER / "README.md")) == []


def test_a_head_with_only_s3_and_ecr_rights_is_caught():
    iam = iam_from_guide(CLUSTER / "README.md")
    launcher = _launcher()
    head_role = iam.profiles[launcher["available_node_types"]["head"]["node_config"][
        "IamInstanceProfile"]["Name"]]
    iam.roles[head_role] = [json.loads((CLUSTER / "iam" / "worker-policy.json").read_text())]
    problems = launcher_problems(iam, launcher, _buckets(CLUSTER / "README.md"))
    assert "head (multimix-head): no ec2:RunInstances (autoscaler)" in problems
    assert any("no iam:PassRole on multimix-worker" in p for p in problems)


def test_the_old_recipes_are_caught():
    iam = iam_from_guide(BAD / "README.md")
    problems = launcher_problems(iam, _launcher(BAD / "aws-gpu.yaml"), {"my-bucket"})
    assert any("'multimix-s3-access' is not created" in p for p in problems), problems


def test_the_pods_irsa_role_is_the_service_accounts_and_can_work():
    iam = iam_from_guide(CLUSTER / "README.md")
    [sa] = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-serviceaccount.yaml").read_text())
            if d and d["kind"] == "ServiceAccount"]
    key = (sa["metadata"].get("namespace", "default"), sa["metadata"]["name"])
    assert key in iam.irsa, f"the guide makes no IRSA role for {key}"
    annotated = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert annotated == f"arn:aws:iam::{cc.PLACEHOLDERS['ACCOUNT']}:role/{iam.irsa[key]}"
    assert data_problems("pods", iam.roles[iam.irsa[key]], _buckets(CLUSTER / "README.md"),
                         None) == []

"""End to end on a real Ray cluster: `ray job submit` exactly as README / cluster/README.md say.

A Ray head on loopback (`ray start --head`, its own ports and temp dir, stopped by its pid) gets
the S3 credentials of a real S3 server (SeaweedFS) ONLY in its environment, as an instance
profile or IRSA would give them on AWS. Jobs: prepare (real X-rays → s3://) → train (cpu-small,
data and runs on s3://, `--evaluate`) → evaluate `--out s3://` → tune (2 tiny trials). Each job
SUCCEEDED; history, checkpoints, reports and Tune results are on S3; the secret and the key id
are in no object, no job log, no job metadata and no Ray log; jobs that cannot start (bad
config, keys in the config, missing bucket, wrong keys) are FAILED with one clear last line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from multimix.testing import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SIZE = 64
#: the per-run settings of a tiny training job (2 CPUs: 0.5 for the Train worker, data tasks)
TINY = ["--config", "cpu-small", "--set", "optim.epochs=2", "--set", "optim.steps_per_epoch=2",
        "--set", "run.log_every=1", "--set", "data.cls_labeled=40", "--set", "data.seg_labeled=10",
        "--set", "scaling.data_concurrency=1"]


class Head:
    """A `ray start --head --block` on 127.0.0.1 in its own process group and temp dir."""

    def __init__(self, env: dict, root: Path):
        self.root = root
        # token authentication (Ray's default) with this head's own token
        self.token = uuid.uuid4().hex + uuid.uuid4().hex
        (root / "auth_token").write_text(self.token)
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(root / "auth_token")}
        # no drain on SIGTERM (Ray's default waits up to 30 s for it at every stop): no Serve here
        env = {**env, **self.auth_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S":  # as tests/conftest.py sets it
               os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")}
        self.temp_dir = tempfile.mkdtemp(prefix="mmray-", dir="/tmp")  # short: socket paths
        lo = 20000 + (os.getpid() % 200) * 100
        names = ["--port", "--dashboard-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port", "--node-manager-port", "--object-manager-port",
                 "--ray-client-server-port"]
        ports = dict(zip(names, free_ports(len(names), avoid=range(lo, lo + 100))))
        self.gcs, self.dashboard = ports["--port"], ports["--dashboard-port"]
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2",
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--include-dashboard", "true", "--temp-dir", self.temp_dir,
               "--disable-usage-stats", "--min-worker-port", str(lo),
               "--max-worker-port", str(lo + 99)]
        for k, v in ports.items():
            cmd += [k, str(v)]
        self.log = open(root / "ray-start.log", "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def api(self, path: str):
        """GET the job REST API (what `ray job status/logs/list` read) as JSON."""
        req = urllib.request.Request(f"{self.address}{path}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start exited: "
                                   + (self.root / "ray-start.log").read_text()[-3000:])
            # the dashboard answers before the raylet is up: wait for `ray start` to say so too
            started = "Ray runtime started" in (self.root / "ray-start.log").read_text()
            try:
                if started:
                    self.api("/api/jobs/")
                    return
            except OSError:  # not up yet
                pass
            time.sleep(1)
        raise RuntimeError("Ray head not ready: "
                           + (self.root / "ray-start.log").read_text()[-3000:])

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops the processes it started), then SIGKILL to
        what is left of this head: processes whose command line names its temp dir."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in self._pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        # this head never became the machine's default cluster
        default = Path("/tmp/ray/ray_current_cluster")
        if default.exists() and f":{self.gcs}" in default.read_text():
            default.unlink()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _pids(self) -> list[int]:
        """Processes of this head: those whose command line names its temp dir."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if self.temp_dir.encode() in (d / "cmdline").read_bytes():
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def logs_text(self) -> str:
        """Every Ray log of this head (session logs), as one string."""
        out = []
        for p in Path(self.temp_dir).rglob("*"):
            if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json", ""):
                try:
                    out.append(p.read_text(errors="replace"))
                except OSError:
                    pass
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster(s3_server, shared_data, tmp_path_factory):
    """(head, s3_server, bucket): credentials only in the head's environment."""
    root = tmp_path_factory.mktemp("raycluster")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_")) and k != "MULTIMIX_FAULT_INJECT"}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", AWS_ACCESS_KEY_ID=s3_server.access_key,
               AWS_SECRET_ACCESS_KEY=s3_server.secret_key, AWS_ENDPOINT_URL=s3_server.endpoint,
               AWS_REGION=s3_server.region, AWS_EC2_METADATA_DISABLED="true")
    head = Head(env, root)
    try:
        head.wait_ready()
        bucket = s3_server.make_bucket(f"mmjobs-{uuid.uuid4().hex[:8]}")
        yield head, s3_server, bucket
    finally:
        head.stop()


class Submitted:
    """A `ray job submit` under way (it follows the job's logs until the job ends); its output
    goes to a file, so that several can run at once without filling a pipe."""

    def __init__(self, head: Head, script: str, *args: str,
                 runtime_env: str = "ray_jobs/runtime_env.yaml", timeout: float = 400):
        self.head, self.script, self.timeout = head, script, timeout
        self.sid = f"mm-{Path(script).stem}-{uuid.uuid4().hex[:6]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
        env.update(head.auth_env)
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address,
               "--submission-id", self.sid, "--working-dir", ".", "--runtime-env", runtime_env,
               "--", "python", script, *args]
        self.out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT)
        self.started = time.time()

    def result(self) -> tuple[str, str, str]:
        """Wait for `ray job submit` to return; (status, logs, submit output)."""
        try:
            self.proc.wait(timeout=max(1.0, self.timeout - (time.time() - self.started)))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.seek(0)
        out = self.out.read().decode(errors="replace")
        self.out.close()
        jobs = {j.get("submission_id") for j in self.head.api("/api/jobs/")}
        assert self.sid in jobs, (f"`ray job submit` did not submit (rc "
                                  f"{self.proc.returncode}):\n" + out[-3000:])
        status = self.head.api(f"/api/jobs/{self.sid}")["status"]
        return status, self.head.api(f"/api/jobs/{self.sid}/logs")["logs"], out


def submit(head: Head, script: str, *args: str, runtime_env: str = "ray_jobs/runtime_env.yaml",
           timeout: float = 400) -> tuple[str, str, str]:
    """`ray job submit` as documented; returns (status, logs, submit output)."""
    return Submitted(head, script, *args, runtime_env=runtime_env, timeout=timeout).result()


def _last_line(logs: str) -> str:
    return [ln for ln in logs.strip().splitlines() if ln.strip()][-1]


def test_jobs_on_a_ray_cluster_with_s3(cluster, shared_data, tmp_path):
    head, s3, bucket = cluster
    b = f"s3://{bucket}"
    t0 = time.time()
    seen_logs: list[str] = []
    took: list[str] = []

    def ok(*jobs):
        """Submit ``(script, *args)`` jobs at once (independent steps: the cluster runs them side
        by side, as it would for several users) and wait for all; each must succeed. Returns
        their logs, in order."""
        t = time.time()
        running = [Submitted(head, script, *args) for script, *args in jobs]
        results = [r.result() for r in running]
        names = "+".join(Path(script).stem for script, *_ in jobs)
        took.append(f"{names} {time.time() - t:.0f} s")
        for (script, *_), (status, logs, out) in zip(jobs, results):
            seen_logs.extend([logs, out])
            (tmp_path / f"job{len(seen_logs) // 2}-{Path(script).stem}.log").write_text(logs)
            assert status == "SUCCEEDED", f"{script}: {status}\n{logs[-4000:]}\n{out[-2000:]}"
        return [logs for _, logs, _ in results]

    # 1. prepare real chest X-rays straight to S3: 240 Kermany images (a CSV manifest of
    #    absolute paths, 120 per class) and the 418 V7 image-mask pairs (folder layout)
    kermany = shared_data / "kermany-cxr" / "train"
    rows = [f"{p},{cls}" for cls in ("NORMAL", "PNEUMONIA")
            for p in sorted((kermany / cls).glob("*.jpeg"))[:120]]
    (tmp_path / "kermany240.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ok(("ray_jobs/prepare.py", str(tmp_path / "kermany240.csv"), "--out", f"{b}/cls",
        "--size", str(SIZE), "--workers", "2", "--quiet"),
       ("ray_jobs/prepare.py", str(shared_data / "v7-covid-lungs"), "--out", f"{b}/seg",
        "--size", str(SIZE), "--workers", "2", "--quiet"))
    data = ["--set", f"data.cls_data={b}/cls", "--set", f"data.seg_data={b}/seg",
            "--set", f"run.storage_path={b}/runs"]

    # 2. train (Ray Train on the cluster), report into the run directory
    logs, = ok(("ray_jobs/train.py", *TINY, *data, "--set", "run.name=e2e", "--evaluate"))
    # one summary line per epoch (no progress bar: the job's output is not a terminal)
    lines = logs.splitlines()
    assert any(ln.startswith("epoch 1/2  loss ") for ln in lines), logs[-3000:]
    assert any(ln.startswith("epoch 2/2  loss ") for ln in lines), logs[-3000:]
    assert "training finished: 2 epochs" in logs
    assert f"evaluation report: {b}/runs/e2e/eval/report.md" in logs

    # 3.-5. from the trained run and the prepared data, side by side: evaluate a checkpoint
    # into s3://; tune 2 tiny trials (both fit the 2-CPU head: 2 x (0.25 + 2 x 0.25) CPUs; the
    # evaluate job holds none); predict on the laptop (credentials from its environment) with
    # --out on S3
    img = sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[-1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))},
           "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "AWS_ENDPOINT_URL": s3.endpoint, "AWS_REGION": s3.region}
    pred = subprocess.Popen([str(BIN / "multimix"), "predict", "--checkpoint", f"{b}/runs/e2e",
                             str(img), "--out", f"{b}/pred"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, logs = ok(("ray_jobs/evaluate.py", "--checkpoint", f"{b}/runs/e2e", "--cls-data",
                      f"{b}/cls", "--seg-data", f"{b}/seg", "--out", f"{b}/eval-e2e"),
                     ("ray_jobs/tune.py", *TINY, *data, "--set", "optim.epochs=1", "--set",
                      "run.name=e2etune", "--space", "objective.threshold=choice:0.6,0.9",
                      "--num-samples", "2", "--concurrent", "2",
                      "--set", "scaling.cpus_per_worker=0.25",
                      "--set", "scaling.data_cpus_per_task=0.25"))
    finally:
        try:
            pred_out, pred_err = pred.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            pred.kill()
            pred_out, pred_err = pred.communicate()
    assert "best: val_score_balanced=" in logs
    t_jobs = time.time()
    assert pred.returncode == 0, pred_err[-3000:]
    assert f"wrote 1 prediction(s) to {b}/pred" in pred_out
    seen_logs.extend([pred_out, pred_err])

    # everything landed on S3
    client = s3.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    ks = set(keys)
    for k in ("runs/e2e/history.json", "runs/e2e/best.json", "runs/e2e/last.json",
              "runs/e2e/config.json", "runs/e2e/eval/report.json", "runs/e2e/eval/report.md",
              "eval-e2e/report.json", "eval-e2e/report.md", "eval-e2e/roc.png",
              "runs/e2etune/results.csv", "runs/e2etune/results.md", "runs/e2etune/best.yaml",
              "runs/e2etune/tuner.pkl", "runs/e2etune/search.json",
              "pred/predictions.json", f"pred/{img.stem}_overlay.png"):
        assert k in ks, (k, sorted(ks)[:50])
    assert any(k.startswith("runs/e2e/checkpoint_epoch-") and k.endswith("checkpoint.pt")
               for k in keys)
    assert any(k.startswith("runs/e2etune/") and "experiment_state" in k for k in keys)
    hist = json.loads(client.get_object(Bucket=bucket, Key="runs/e2e/history.json")["Body"]
                      .read())
    assert [h["epoch"] for h in hist] == [0, 1]
    rows = list(csv.DictReader(io.StringIO(client.get_object(
        Bucket=bucket, Key="runs/e2etune/results.csv")["Body"].read().decode())))
    assert len(rows) == 2 and all(r["status"] == "done" and r["epochs"] == "1" for r in rows)
    assert all(r["checkpoint"].startswith(f"{b}/runs/e2etune/trials/") for r in rows)
    rep = json.loads(client.get_object(Bucket=bucket, Key="eval-e2e/report.json")["Body"].read())
    assert rep["plots"]["roc"] == f"{b}/eval-e2e/roc.png"
    assert 0.0 <= rep["cls"][next(iter(rep["cls"]))]["accuracy"] <= 1.0

    # the secret (and the key id) nowhere: S3 objects, job logs, job metadata, Ray's logs
    secrets = (s3.secret_key.encode(), s3.access_key.encode())
    for k in keys:
        body = client.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert not any(s in body for s in secrets), k
    meta = json.dumps(head.api("/api/jobs/"))  # what `ray job list` and the dashboard show
    text = "\n".join(seen_logs) + meta + head.logs_text()
    for s in secrets:
        assert s.decode() not in text
    print(f"\n[e2e] jobs: {t_jobs - t0:.0f} s ({', '.join(took)}), {len(keys)} objects on S3")


def _tiny_sets_on_s3(s3, bucket: str, shared_data: Path, root: Path) -> list[str]:
    """``--set`` arguments naming a tiny classification set (80 Kermany) and segmentation set
    (20 V7) at 64 px, written with pyarrow and uploaded to ``s3://<bucket>/tiny/``: a test of its
    own, not leaning on the datasets another test prepared."""
    from multimix.data import verify
    from multimix.testing import kermany_rows, v7_rows, write_dataset

    write_dataset(str(root / "cls"), kermany_rows(shared_data, 80, SIZE), "cls", SIZE)
    write_dataset(str(root / "seg"), v7_rows(shared_data, 20, SIZE), "seg", SIZE)
    client = s3.client()
    for name in ("cls", "seg"):
        verify.add_shard_info(str(root / name))
        for p in sorted((root / name).rglob("*")):
            if p.is_file():
                client.upload_file(str(p), bucket, f"tiny/{name}/{p.relative_to(root / name)}")
    return ["--set", f"data.cls_data=s3://{bucket}/tiny/cls",
            "--set", f"data.seg_data=s3://{bucket}/tiny/seg"]


def test_jobs_that_cannot_start_fail_with_one_line(cluster, shared_data, tmp_path):
    head, s3, bucket = cluster
    b = f"s3://{bucket}"
    data = _tiny_sets_on_s3(s3, bucket, shared_data, tmp_path / "sets")
    cases = [
        (["--set", "optim.epochs=0", "--set", f"run.storage_path={b}/runs"], "default",
         "multimix train: error: optim.epochs"),
        (["--set", f"run.storage_path={b}/runs", "--set", "storage.access_key_id=AKIAXXXX",
          "--set", "storage.secret_access_key=inline-secret-xyz"], "default",
         "multimix train: error: storage.access_key_id/secret_access_key/session_token are "
         "for local runs"),
        (["--set", "run.storage_path=s3://no-such-bucket-mm/runs"], "default",
         "multimix train: error: run.storage_path: bucket 'no-such-bucket-mm' does not exist"),
        (["--set", f"run.storage_path={b}/runs"], "wrong-keys",
         f"multimix train: error: run.storage_path: access denied to {b}/runs"),
        # no GPU on this head and no autoscaler: multimix.resources stops before any data work
        (["--set", f"run.storage_path={b}/runs", "--set", "scaling.use_gpu=true",
          "--set", "scaling.gpus_per_worker=1"], "default",
         "multimix train: error: scaling.use_gpu: is true but the cluster has no GPU"),
    ]
    # wrong keys: a runtime env file like the documented one with a wrong secret in env_vars
    wrong = tmp_path / "wrong-keys.yaml"
    wrong.write_text("env_vars:\n  AWS_SECRET_ACCESS_KEY: not-the-secret-000\n"
                     "excludes: [.git, .venv, /runs, /out, /tests]\n")
    # all submitted at once (each fails in its own driver, before any Ray work), then checked
    running = [Submitted(head, "ray_jobs/train.py", *TINY, *data, *sets,
                         runtime_env=str(wrong) if renv == "wrong-keys"
                         else "ray_jobs/runtime_env.yaml", timeout=200)
               for sets, renv, _ in cases]
    for (sets, renv, expect), job in zip(cases, running):
        status, logs, out = job.result()
        assert status == "FAILED", (sets, status, logs[-3000:])
        last = _last_line(logs)
        assert last.startswith(expect), (sets, last, logs[-3000:])
        assert "Traceback" not in logs, (sets, logs[-3000:])
        # (Ray itself echoes the entrypoint, keys on the command line included, into the job's
        # log and metadata: the documentation says never to pass them; multimix repeats none)
        ours = [ln for ln in logs.splitlines() if "Running entrypoint for job" not in ln]
        assert not any("inline-secret-xyz" in ln for ln in ours), logs[-3000:]


def test_predict_ray_job_on_s3(cluster, shared_data, tmp_path):
    """`ray job submit ... ray_jobs/predict.py --ray` over a prepared dataset on S3, with the
    checkpoint and the output on S3: one row per dataset row in predictions.parquet, the
    probabilities of in-process prediction on the same rows."""
    import pyarrow.parquet as pq
    import torch

    from multimix import checkpoint
    from multimix.config import load_config
    from multimix.data.dataset import read_table
    from multimix.data.images import decode_png
    from multimix.model import create_model
    from multimix.predict import predict_array

    head, s3, bucket = cluster
    b = f"s3://{bucket}"
    _tiny_sets_on_s3(s3, bucket, shared_data, tmp_path / "sets")
    torch.manual_seed(0)
    cfg = load_config("cpu-small", [])
    state = checkpoint.build_state(model=create_model(cfg.model), optimizer=None,
                                   scheduler=None, epoch=1, config=cfg, splits={},
                                   classes=["NORMAL", "PNEUMONIA"], history=[])
    checkpoint.save(state, str(tmp_path / "checkpoint.pt"))
    client = s3.client()
    client.upload_file(str(tmp_path / "checkpoint.pt"), bucket, "predckpt/checkpoint.pt")
    status, logs, out = submit(head, "ray_jobs/predict.py", "--ray", "--checkpoint",
                               f"{b}/predckpt", "--out", f"{b}/predray", f"{b}/tiny/cls",
                               "--actors", "1", "--batch-size", "16")
    assert status == "SUCCEEDED", logs[-4000:] + out[-2000:]
    assert f"wrote 80 prediction row(s) to {b}/predray/predictions.parquet" in logs
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="predray/")
            ["Contents"]]
    assert keys and all(k.startswith("predray/predictions.parquet/part-") for k in keys)
    for k in keys:
        client.download_file(bucket, k, str(tmp_path / Path(k).name))
    rows = [r for k in keys for r in pq.read_table(tmp_path / Path(k).name).to_pylist()]
    got = {r["id"]: r for r in rows}
    assert len(rows) == len(got) == 80 and all(r["error"] is None for r in rows)
    model, mcfg, _ = checkpoint.load_model(str(tmp_path / "checkpoint.pt"))
    table = read_table(str(tmp_path / "sets" / "cls"), columns=["id", "image"]).to_pylist()
    for r in table[:20]:
        p = predict_array(model, mcfg, decode_png(r["image"]))["probs"][1]
        assert got[r["id"]]["pneumonia_probability"] == pytest.approx(float(p), abs=0.02)

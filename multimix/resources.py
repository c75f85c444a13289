"""Checks that the cluster can place the configured Train workers before training waits for them.

Ray Train waits silently (Ray only logs that no node type fits ``{'GPU': 1}``) when the workers
ask for more than the cluster has. :func:`check` runs on the driver before the trainer starts:

* no autoscaler that could add nodes (a local Ray, a fixed cluster): a worker that fits on no
  node, or fewer places than ``scaling.num_workers``, raises :class:`ConfigError` at once, one
  line naming the key (``scaling.use_gpu`` / ``scaling.gpus_per_worker`` /
  ``scaling.cpus_per_worker`` / ``scaling.num_workers``) and what the cluster has;
* an autoscaler (the cluster launcher's, KubeRay's; v1 or v2): a background thread prints what
  is waited for every 30 s until the nodes are there.

:func:`shortfall` is the decision (pure: node resources in, message out).

:func:`concurrent_trials` does the same for ``multimix tune --concurrent N``: how many trials
the cluster can run at once, each with its Train workers and one task per Ray Data stream.

:func:`connect_ray` is how every command that uses Ray (``train``, ``tune``, ``prepare --ray``)
joins the cluster in ``RAY_ADDRESS`` or starts a local one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Mapping, Optional, Sequence

from multimix.config import ConfigError
from multimix.data import storage
from multimix.variants import datasets_for

#: "1" / "0" overrides autoscaler detection (tests; clusters whose autoscaler is not seen)
AUTOSCALER_ENV = "MULTIMIX_AUTOSCALER"
#: seconds between two "waiting for ..." lines
REPORT_EVERY_S = 30.0

logger = logging.getLogger("multimix.resources")


def worker_request(scaling) -> dict[str, float]:
    """Resources one Train worker asks for: ``{"CPU": c, "GPU": g}`` (GPU only with use_gpu)."""
    req = {"CPU": float(scaling.cpus_per_worker)}
    if scaling.use_gpu:
        req["GPU"] = float(scaling.gpus_per_worker)
    return req


#: CPUs a Tune trial's own actor holds (``multimix.tune``)
TRIAL_ACTOR_CPU = 0.01


def trial_request(cfg) -> dict[str, float]:
    """The least a training run (a Tune trial) holds while it makes progress: its Train workers,
    one Ray Data task per stream the variant reads (a task reads a whole slot of a pass, so it
    holds its CPUs for long stretches) and the trial actor's 0.01 CPU.

    Returns ``{"CPU": c, "GPU": g}`` (GPU only with ``scaling.use_gpu``)."""
    sc = cfg.scaling
    req = {k: sc.num_workers * v for k, v in worker_request(sc).items()}
    req["CPU"] += (TRIAL_ACTOR_CPU
                   + len(datasets_for(cfg.model.variant)) * float(sc.data_cpus_per_task))
    return req


def trials_that_fit(cfg, nodes: Sequence[Mapping[str, float]]) -> int:
    """How many runs of ``cfg`` the cluster ``nodes`` holds at once: every trial's workers must
    be placed (a worker never spans nodes) and the cluster's CPUs/GPUs must cover
    :func:`trial_request` per trial (data tasks go to any node)."""
    n_workers = max(1, int(cfg.scaling.num_workers))
    fits = places(nodes, worker_request(cfg.scaling)) // n_workers
    for res, need in trial_request(cfg).items():
        if need > 0:
            fits = min(fits, int(sum(n.get(res, 0.0) for n in nodes) / need + 1e-9))
    return fits


def concurrent_trials(cfg, concurrent: int, nodes: Sequence[Mapping[str, float]],
                      can_scale: bool) -> tuple[int, Optional[str]]:
    """``--concurrent N`` checked against the cluster: ``(trials to run at once, message)``.

    On a cluster no autoscaler can grow (a local Ray, a fixed cluster), N trials that do not fit
    would not just queue: each trial's long Ray Data tasks take the CPUs another trial's workers
    or data tasks wait for, and the search can stall for good (seen on 2 CPUs with 2 trials of
    0.5 + 2 × 0.5 CPU). So N is lowered to what fits, with a message; none fitting raises
    :class:`ConfigError`. With an autoscaler, N is kept and the message says what it must add.
    The message is None when N trials fit now.
    """
    fits = trials_that_fit(cfg, nodes)
    if fits >= concurrent:
        return concurrent, None
    need = " + ".join(f"{v:g} {k}" for k, v in trial_request(cfg).items())
    sc = cfg.scaling
    why = (f"a trial holds {need} (scaling.num_workers × cpus_per_worker"
           + (" / gpus_per_worker" if sc.use_gpu else "")
           + " + one scaling.data_cpus_per_task per data stream + 0.01)")
    where = _describe(nodes)
    if can_scale:
        return concurrent, (f"--concurrent {concurrent}: {why}; the cluster now holds {fits} "
                            f"({where}): the autoscaler must add nodes for the rest")
    if fits == 0:
        raise ConfigError(f"scaling: {why}, more than the cluster has ({where}) and no "
                          "autoscaler can add nodes; lower scaling.cpus_per_worker / "
                          "data_cpus_per_task / num_workers")
    return fits, (f"--concurrent {concurrent}: {why}; this cluster ({where}) holds {fits} at "
                  f"once and no autoscaler can add nodes: running {fits} at a time")


def places(nodes: Sequence[Mapping[str, float]], request: Mapping[str, float]) -> int:
    """How many workers asking for ``request`` fit on ``nodes`` (each node's total resources;
    a worker never spans nodes)."""
    total = 0
    for node in nodes:
        fits = [node.get(k, 0.0) / v for k, v in request.items() if v > 0]
        total += int(min(fits) + 1e-9) if fits else sys.maxsize
    return total


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    per = ", ".join(f"{n.get('CPU', 0):g} CPU/{n.get('GPU', 0):g} GPU" for n in nodes[:4])
    more = f", ... ({len(nodes)} nodes)" if len(nodes) > 4 else ""
    return (f"{len(nodes)} node(s), {cpus:g} CPUs and {gpus:g} GPUs in all "
            f"(per node: {per}{more})")


def shortfall(scaling, nodes: Sequence[Mapping[str, float]]) -> Optional[str]:
    """None when ``scaling.num_workers`` workers fit on ``nodes``; else one line naming the key
    to change and what the cluster has."""
    req = worker_request(scaling)
    n = int(scaling.num_workers)
    have = places(nodes, req)
    if have >= n:
        return None
    where = _describe(nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    if scaling.use_gpu and gpus == 0:
        return (f"scaling.use_gpu: is true but the cluster has no GPU ({where}); "
                "set scaling.use_gpu=false or run on a GPU cluster")
    if scaling.use_gpu and not any(node.get("GPU", 0.0) >= req["GPU"] for node in nodes):
        return (f"scaling.gpus_per_worker: {req['GPU']:g} GPUs per worker fit on no node "
                f"({where})")
    if have == 0 or not any(node.get("CPU", 0.0) >= req["CPU"] for node in nodes):
        return (f"scaling.cpus_per_worker: {req['CPU']:g} CPUs per worker"
                + (f" with {req['GPU']:g} GPU" if "GPU" in req else "")
                + f" fit on no node ({where})")
    what = " + ".join(f"{v:g} {k}" for k, v in req.items())
    return (f"scaling.num_workers: {n} workers of {what} need more than the cluster has: "
            f"{have} fit ({where})")


def v1_report_can_scale(raw) -> bool:
    """Whether autoscaler v1's status report (the GCS KV value ``__autoscaling_status``, JSON)
    comes from an autoscaler with configured node types, not the read-only monitor of a plain
    ``ray start`` / ``ray.init`` (whose node types are ``node_<node id>``)."""
    if not raw:
        return False
    report = json.loads(raw).get("autoscaler_report") or {}
    mapping = report.get("node_type_mapping") or {}
    return any(t != f"node_{nid}" for nid, t in mapping.items())


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes serves the connected Ray cluster.

    Autoscaler v1 (cluster launcher, KubeRay) writes its report into the GCS key-value store;
    a plain ``ray start`` / ``ray.init`` runs the same monitor read-only, whose node types are
    named after the nodes (``node_<id>``), so only configured node type names count. Autoscaler
    v2 reports its state to the GCS (a state version above 0). ``$MULTIMIX_AUTOSCALER`` = 1/0
    overrides the detection.
    """
    env = os.environ.get(AUTOSCALER_ENV)
    if env in ("0", "1"):
        return env == "1"
    import ray

    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        if v1_report_can_scale(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)):
            return True
    except Exception as exc:  # noqa: BLE001 - internal API: a failure means "not seen"
        logger.debug("autoscaler v1 status not readable: %s", exc)
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        if int(status.stats.autoscaler_version or 0) > 0:
            return True
    except Exception as exc:  # noqa: BLE001
        logger.debug("autoscaler v2 status not readable: %s", exc)
    return False


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


class _WaitReporter(threading.Thread):
    """Prints what the run waits for every ``every`` seconds until the workers fit."""

    def __init__(self, scaling, every: float = REPORT_EVERY_S, out=None):
        super().__init__(name="multimix-wait-reporter", daemon=True)
        self.scaling, self.every, self.out = scaling, every, out or sys.stdout
        self.stopped = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopped.wait(self.every):
            try:
                msg = shortfall(self.scaling, cluster_nodes())
            except Exception:  # noqa: BLE001 - Ray went away: nothing left to report
                return
            if msg is None:
                print("[multimix] the cluster can now place the Train workers", file=self.out,
                      flush=True)
                return
            print(f"[multimix] waiting {time.monotonic() - t0:.0f} s for the autoscaler: "
                  f"{msg}", file=self.out, flush=True)

    def stop(self) -> None:
        self.stopped.set()


def check(scaling, every: float = REPORT_EVERY_S) -> Optional[_WaitReporter]:
    """Before the trainer starts (Ray connected): raise :class:`ConfigError` when the workers
    cannot be placed and no autoscaler could add nodes; with an autoscaler, print what is
    waited for (now and every ``every`` s, from a daemon thread, returned; ``stop()`` ends it).
    Returns None when the workers fit."""
    msg = shortfall(scaling, cluster_nodes())
    if msg is None:
        return None
    if not autoscaler_running():
        raise ConfigError(f"{msg}; no autoscaler can add nodes to this cluster")
    print(f"[multimix] waiting for the autoscaler: {msg}", flush=True)
    reporter = _WaitReporter(scaling, every)
    reporter.start()
    return reporter


# ---------------------------------------------------------------------------------------------
# connecting to the cluster


def check_cluster_keys(storage_cfg) -> None:
    """S3 keys in the config (``storage_cfg``, a :class:`~multimix.config.StorageConfig` or
    None) are for local runs: refused when connecting to a cluster (``RAY_ADDRESS`` set), where
    the Ray processes take credentials from the AWS chain.

    Raises:
        ConfigError: keys in the config with ``RAY_ADDRESS`` set.
    """
    if os.environ.get("RAY_ADDRESS") and storage.has_keys(storage_cfg):
        raise ConfigError("storage.access_key_id/secret_access_key/session_token are for local "
                          "runs; on a Ray cluster give the Ray processes credentials through "
                          "the AWS chain (instance profile, IRSA, or AWS_* in the environment "
                          "of `ray start`) and drop the keys from the config")


#: printed when the cluster in RAY_ADDRESS runs no dashboard
NO_DASHBOARD = (
    "[multimix] warning: the Ray cluster at {address} runs no dashboard: Ray Train asks its "
    "state API whether a run's controller still lives, so the CPUs/GPUs of a run that dies "
    "(a Tune trial stopped by ASHA, a killed driver) stay reserved until this driver exits, "
    "and a search can wait for them forever; start the head without "
    "--include-dashboard=false")


def connect_ray(storage_cfg=None, quiet: bool = False, log_to_driver: bool = True, *,
                num_cpus: float | None = None, local: bool = False) -> None:
    """Connect to the cluster in ``RAY_ADDRESS``, or start a local Ray (``train``, ``tune``,
    ``prepare --ray``, ``bench train``/``scale``). ``num_cpus``: the local Ray's CPUs (default:
    the machine's); ``local``: start a local Ray even when ``RAY_ADDRESS`` is set.

    S3 keys set in the config (``storage_cfg``) are for local runs: they are exported to this
    process's environment before the local Ray starts, so its processes inherit them (never
    through Ray's runtime env or job metadata). On a cluster they are refused: there the Ray
    processes get credentials from the standard chain (instance profile, IRSA, their
    environment).

    A local Ray is started with its dashboard on a port chosen here and
    ``RAY_API_SERVER_ADDRESS`` pointing at it in every process it starts: Ray Train's helpers
    look their cluster up through the state API, and with no address given they search the
    machine and fail when another Ray runs there ("Found multiple active Ray instances"). Ray
    Train's ``PlacementGroupCleaner`` asks the state API whether a run's controller is still
    alive: without a dashboard it never learns, and the CPUs of every Tune trial stopped by the
    scheduler (ASHA at its last rung, or at ``max_t``) stay reserved until the driver exits.

    ``quiet``: Ray's notices that are not about this run stay out of the console (the token
    authentication notice; Ray Data's INFO and WARNING lines in the local Ray's processes; they
    are still in Ray's session logs). ``log_to_driver``: whether the output of Ray's worker
    processes is echoed here (Ray's ``log_to_driver``; ``train`` shows its progress through
    :mod:`multimix.progress` and echoes them only with ``--verbose``).

    Raises:
        ConfigError: keys in the config while connecting to a cluster.
    """
    import ray

    check_cluster_keys(storage_cfg)
    if ray.is_initialized():
        return
    storage.export_keys(storage_cfg)
    address = None if local else os.environ.get("RAY_ADDRESS")
    if quiet:
        logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if address:
        ctx = ray.init(address=address, configure_logging=False, log_to_driver=log_to_driver)
        info = getattr(ctx, "address_info", None)  # None through the Ray Client (ray://)
        if isinstance(info, dict) and not info.get("webui_url"):
            print(NO_DASHBOARD.format(address=address), file=sys.stderr, flush=True)
        return
    if quiet:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    try:
        for attempt in range(3):
            port = _free_port()
            # inherited by the local Ray's processes only: restored below for this one
            os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
            try:
                # "local": a new local Ray, never one found through /tmp/ray/ray_current_cluster
                ray.init(address="local", configure_logging=False, dashboard_port=port,
                         log_to_driver=log_to_driver, num_cpus=num_cpus)
                return
            except Exception:  # noqa: BLE001 - the port was taken meanwhile: another one
                ray.shutdown()
                if attempt == 2:
                    raise
    finally:
        if before is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before


def _free_port() -> int:
    """A TCP port free on the loopback now (the OS's choice)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

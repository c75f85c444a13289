"""``multimix bench scale``: does a run's memory stay flat as the unlabeled corpus grows?

Writes (or reuses, in ``--work``) an unlabeled corpus of ``--rows`` N rows at ``--size`` S px in
the prepared-dataset format (task ``unlabeled``: the synthetic phantoms, each row made unique by
its index stamped into four pixels, so sha256 and ids are distinct; written by
:class:`multimix.data.prepare.DatasetWriter`, so ``open_dataset`` accepts it) and a 5,000-row
corpus the same way; then trains the real path (``multimix.train.train``: preflight,
contamination guard, Ray Data streams, Train workers, validation, checkpoints) twice with the
same config, each corpus as the extra unlabeled pool (``data.unlabeled_data``) beside the
synthetic demo set (labeled + validation + its own unlabeled rows), ``--epochs`` (2) ×
``--steps`` K steps: first the 5,000-row pool, then the N-row one. Each run gets a fresh local
Ray (when this process starts it) and fresh Train workers.

Reported per run:

* ``driver_peak_mb``: this process's peak RSS (``VmHWM``, reset before the run through
  ``/proc/self/clear_refs``; where that is refused, the largest sampled ``VmRSS``);
* ``train_worker_peak_mb``: peak RSS of each Train worker (``VmHWM`` of the processes whose title
  is Ray's ``RayTrainWorker``, sampled every 0.2 s from /proc while they live);
* ``ray_worker_peak_mb``: the largest peak of the other Ray worker processes (data tasks, the
  split coordinator, the state actor, the Train controller); ``ray_system_peak_mb``: GCS and
  raylet;
* ``largest_peak_mb``: the largest of driver, Train workers and Ray worker processes;
  ``private_peak_mb``: the same processes' largest sampled RSS less the object-store pages
  they mapped (``RssShmem``: Ray Data blocks a process wrote or read count in its RSS);
  ``ray_worker_peak_title``: the process title of the largest Ray worker;
* ``object_store_peak_mb``: the largest object-store use sampled (every 1 s) from the raylet;
* ``steps_per_s``: optimizer steps per second of the last epoch's training (with 2 epochs, the
  first one, which includes the start of the streams, is left out); ``wall_s``: the whole run.

``--json`` adds ``peak_mem_ratio`` (``largest_peak_mb``, N rows ÷ 5,000 rows) and
``steps_per_s_ratio`` (N ÷ 5,000), and ``private_peak_ratio`` (the same as ``peak_mem_ratio``
for the ``private_peak_mb`` figures). The processes sampled are this process's descendants: the
local Ray it started (a Ray it connected to elsewhere is not sampled).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time

from multimix import resources, train as T
from multimix.bench import ratio
from multimix.config import add_config_arguments, load_config
from multimix.data.dataset import read_manifest
from multimix.data.images import encode_png, perceptual_hash
from multimix.data.prepare import DatasetWriter, prepare_demo, row_order_key
from multimix.data.synthetic import phantom
from multimix.errors import DataError, UserError
from multimix.variants import images_per_step

#: the figures ``--json`` always holds (tests check them)
KEYS = ("baseline", "scaled", "peak_mem_ratio", "steps_per_s_ratio", "private_peak_ratio")
#: the figures of each run
RUN_KEYS = ("rows", "driver_peak_mb", "train_worker_peak_mb", "ray_worker_peak_mb",
            "ray_system_peak_mb", "largest_peak_mb", "private_peak_mb", "object_store_peak_mb",
            "steps_per_s", "wall_s")
BASELINE_ROWS = 5000
#: the corpus generator's version: a cached corpus of another version is written again
GENERATOR = "multimix.bench.scale/1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=200_000,
                   help="rows of the unlabeled corpus (default 200000)")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--steps", type=int, default=20, help="steps per epoch (default 20)")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs per run (default 2; steps/s is the last epoch's)")
    p.add_argument("--baseline-rows", type=int, default=BASELINE_ROWS,
                   help=f"rows of the baseline corpus (default {BASELINE_ROWS})")
    add_config_arguments(p, "cpu-small")
    p.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "multimix",
                                                  "bench-scale"),
                   help="folder of the corpora (kept and reused, keyed by rows and size; "
                        "default ~/.cache/multimix/bench-scale)")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: all of this machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------------------------------------
# the corpora


def write_corpus(uri: str, rows: int, size: int, base: int = 256) -> dict:
    """An unlabeled prepared dataset of ``rows`` rows at ``size``² (``base`` synthetic phantoms,
    each row's index stamped into its first four pixels: every row distinct), or the one
    already at ``uri`` when its manifest says the same rows, size and generator. Returns the
    manifest."""
    import numpy as np

    try:
        man = read_manifest(uri)
        p = man.get("parameters", {})
        if (man.get("num_rows") == rows and man.get("image_size") == size
                and p.get("generator") == GENERATOR and p.get("base") == base):
            return man
    except DataError:
        pass
    rng = np.random.default_rng(20260)
    imgs = [phantom(size, np.random.default_rng(rng.integers(1 << 62)), bool(i % 2))[0]
            for i in range(base)]
    phashes = [perceptual_hash(a) for a in imgs]
    ids = sorted((f"scale/{i:07d}" for i in range(rows)), key=row_order_key)
    writer = DatasetWriter(uri, None, overwrite=True)
    for rid in ids:
        i = int(rid[len("scale/"):])
        a = imgs[i % base].copy()
        a[0, :4] = np.frombuffer(i.to_bytes(4, "little"), np.uint8)
        png = encode_png(a)
        writer.add({"id": rid, "source": "bench-scale", "task": "unlabeled", "image": png,
                    "mask": None, "ignore": None, "label": None,
                    "hash": hashlib.sha256(png).hexdigest(), "path": rid + ".png",
                    "orig_height": size, "orig_width": size, "phash": phashes[i % base]})
    return writer.finish(source="bench-scale", task="unlabeled", image_size=size, classes=None,
                         skipped=[], synthetic=True,
                         parameters={"rows": rows, "image_size": size, "base": base,
                                     "generator": GENERATOR})


def _demo(work: str, size: int) -> str:
    """The synthetic demo set (labeled + validation + unlabeled rows) at ``size``, cached."""
    root = os.path.join(work, f"demo-{size}")
    try:
        read_manifest(os.path.join(root, "cls"))
        read_manifest(os.path.join(root, "seg"))
    except DataError:
        prepare_demo(root, n_cls=400, n_seg=100, image_size=size, overwrite=True)
    return root


# ---------------------------------------------------------------------------------------------
# memory sampling


def _status(pid: int | str) -> dict:
    """``{"VmRSS": kB, "VmHWM": kB, "RssShmem": kB}`` of a process (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:", "RssShmem:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _descendants(root: int) -> dict:
    """``{pid: title}`` of the processes below ``root`` (from /proc)."""
    parent, title = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                title[int(d)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
    out = {}
    for pid in parent:
        p, hops = pid, 0
        while p in parent and p != root and hops < 64:
            p, hops = parent[p], hops + 1
        if p == root and pid != root:
            out[pid] = title.get(pid, "")
    return out


def _kind(title: str) -> str:
    if "RayTrainWorker" in title:
        return "train_worker"
    if "gcs_server" in title or "raylet" in title or "dashboard" in title or \
            "log_monitor" in title or "monitor.py" in title:
        return "ray_system"
    return "ray_worker"


class PeakSampler:
    """Samples, in a thread, the peak RSS of this process and of every descendant (by kind:
    ``train_worker``, ``ray_worker``, ``ray_system``) and the object store's use."""

    def __init__(self, interval_s: float = 0.2, store_every: int = 5) -> None:
        self.interval, self.store_every = interval_s, store_every
        self.peaks: dict = {}  # pid → [kind, peak kB, private peak kB, title]
        self.driver_kb = 0
        self.driver_private_kb = 0
        self.store_bytes = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._reset = False
        self._state = None

    def __enter__(self) -> "PeakSampler":
        try:  # reset this process's high-water mark (VmHWM) to its current RSS
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._reset = True
        except OSError:
            self._reset = False
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(final=True)

    def _store_used(self):
        import ray

        if not ray.is_initialized():
            return None
        from ray._private import internal_api

        if self._state is None:
            self._state = internal_api.get_state_from_address(
                ray.get_runtime_context().gcs_address)
        reply = internal_api.get_memory_info_reply(self._state, timeout_seconds=5)
        return int(reply.store_stats.object_store_bytes_used)

    def _sample(self, final: bool = False, tick: int = 0) -> None:
        me = _status("self")
        self.driver_kb = max(self.driver_kb, me.get("VmHWM" if self._reset else "VmRSS", 0))
        self.driver_private_kb = max(self.driver_private_kb,
                                     me.get("VmRSS", 0) - me.get("RssShmem", 0))
        for pid, title in _descendants(os.getpid()).items():
            st = _status(pid)
            if not st:
                continue
            kind = _kind(title)
            old = self.peaks.get(pid, ["ray_worker", 0, 0, title])
            if old[0] == "train_worker":
                kind = "train_worker"  # a Train worker's title changes as it runs
            peak = st.get("VmHWM", st.get("VmRSS", 0))
            private = st.get("VmRSS", 0) - st.get("RssShmem", 0)
            self.peaks[pid] = [kind, max(old[1], peak), max(old[2], private),
                               title if peak > old[1] else old[3]]
        if not final and tick % self.store_every == 0:
            try:
                used = self._store_used()
            except Exception:  # noqa: BLE001 - an internal Ray API: no figure, not a failure
                used = None
            if used is not None:
                self.store_bytes = max(self.store_bytes or 0, used)

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            self._sample(tick=tick)
            tick += 1

    def figures(self) -> dict:
        mb = 1024.0
        by = {k: [p for kk, p, _, _ in self.peaks.values() if kk == k]
              for k in ("train_worker", "ray_worker", "ray_system")}
        private = {k: [q for kk, _, q, _ in self.peaks.values() if kk == k]
                   for k in ("train_worker", "ray_worker")}
        top = max((v for v in self.peaks.values() if v[0] == "ray_worker"),
                  key=lambda v: v[1], default=None)
        out = {
            "driver_peak_mb": round(self.driver_kb / mb, 1),
            "train_worker_peak_mb": [round(p / mb, 1) for p in sorted(by["train_worker"])],
            "ray_worker_peak_mb": round(max(by["ray_worker"], default=0) / mb, 1),
            "ray_system_peak_mb": round(max(by["ray_system"], default=0) / mb, 1),
            "object_store_peak_mb": (round(self.store_bytes / 2**20, 1)
                                     if self.store_bytes is not None else None),
        }
        out["largest_peak_mb"] = max([out["driver_peak_mb"], out["ray_worker_peak_mb"],
                                      *out["train_worker_peak_mb"]])
        # without the object-store pages a process mapped (RssShmem), sampled
        out["private_peak_mb"] = {
            "driver": round(self.driver_private_kb / mb, 1),
            "train_workers": [round(p / mb, 1) for p in sorted(private["train_worker"])],
            "ray_worker": round(max(private["ray_worker"], default=0) / mb, 1)}
        out["ray_worker_peak_title"] = top[3][:80] if top else None
        return out


# ---------------------------------------------------------------------------------------------
# one run


def _config(args, demo: str, corpus: str, runs: str, name: str):
    over = [f"data.image_size={args.size}", f"data.cls_data={demo}/cls",
            f"data.seg_data={demo}/seg", f"data.unlabeled_data=[{corpus}]",
            "data.cls_labeled=100", "data.seg_labeled=10", f"optim.epochs={args.epochs}",
            f"optim.steps_per_epoch={args.steps}", f"run.storage_path={runs}", f"run.name={name}"]
    return load_config(args.config, over + list(args.set))


def run_once(cfg, rows: int, cpus) -> dict:
    """Train ``cfg`` (fresh local Ray when none is running) while sampling memory."""
    import ray

    started = False
    t0 = time.perf_counter()
    with PeakSampler() as sampler:
        if not ray.is_initialized():
            resources.connect_ray(quiet=True, log_to_driver=False, local=True,
                                  num_cpus=cpus or os.cpu_count())
            started = True
        try:
            result = T.train(cfg)
        finally:
            if started:
                ray.shutdown()
    wall = time.perf_counter() - t0
    last = result.history[-1]
    n_img = images_per_step(cfg.model.variant, cfg.data) * cfg.scaling.num_workers
    return {"rows": rows, **sampler.figures(),
            "steps_per_s": round(last["img_per_s"] / n_img, 3), "wall_s": round(wall, 1)}


def measure(args) -> dict:
    if args.rows < 1 or args.baseline_rows < 1:
        raise UserError("--rows and --baseline-rows must be >= 1")
    if args.size % 32 or args.size < 32:
        raise UserError(f"--size {args.size}: must be a positive multiple of 32")
    if args.steps < 1 or args.epochs < 1:
        raise UserError("--steps and --epochs must be >= 1")
    os.makedirs(args.work, exist_ok=True)
    t = time.perf_counter()
    demo = _demo(args.work, args.size)
    corpora = {}
    for rows in (args.baseline_rows, args.rows):
        corpora[rows] = os.path.join(args.work, f"unlabeled-{rows}-{args.size}")
        write_corpus(corpora[rows], rows, args.size)
    t_corpus = time.perf_counter() - t
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="mm-bench-scale-") as runs:
        for key, rows in (("baseline", args.baseline_rows), ("scaled", args.rows)):
            cfg = _config(args, demo, corpora[rows], runs, f"scale-{rows}")
            out[key] = run_once(cfg, rows, args.cpus)
    b, s = out["baseline"], out["scaled"]
    out["peak_mem_ratio"] = ratio(s["largest_peak_mb"], b["largest_peak_mb"])
    out["steps_per_s_ratio"] = ratio(s["steps_per_s"], b["steps_per_s"])

    def private(r):
        p = r["private_peak_mb"]
        return max([p["driver"], p["ray_worker"], *p["train_workers"]])

    out["private_peak_ratio"] = ratio(private(s), private(b))
    out["settings"] = {"config": args.config, "size": args.size, "steps": args.steps,
                       "epochs": args.epochs, "width": cfg.model.width,
                       "num_workers": cfg.scaling.num_workers, "set": list(args.set),
                       "work": args.work, "corpus_s": round(t_corpus, 1),
                       "load_avg": [round(x, 2) for x in os.getloadavg()]}
    return out


def run(args) -> int:
    # with --json, stdout carries the JSON line alone: the run's own lines go to stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        res = measure(args)
    if args.json:
        print(json.dumps(res))
        return 0
    s = res["settings"]
    print(f"bench scale: {s['config']} at {s['size']}², {s['num_workers']} Train worker(s), "
          f"{s['epochs']} epoch(s) × {s['steps']} steps; corpora in {s['work']} "
          f"({s['corpus_s']} s); "
          f"load average {s['load_avg']}")
    for key in ("baseline", "scaled"):
        r = res[key]
        print(f"  {r['rows']:>9,} rows: " + ", ".join(f"{k}={r[k]}" for k in RUN_KEYS[1:]))
    print(f"  peak_mem_ratio {res['peak_mem_ratio']}  steps_per_s_ratio "
          f"{res['steps_per_s_ratio']}  private_peak_ratio {res['private_peak_ratio']}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="multimix bench scale",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

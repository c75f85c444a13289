"""``multimix bench train``: does Ray Data keep the training step fed?

Runs the real training path on one Train worker (``cpu`` or ``cuda``): Ray Data reads the
prepared Parquet shards, decodes and renders the weak/strong views on CPU tasks, the Train
worker cuts its batches (:class:`multimix.data.batches.TrainBatches`, which also augments the
labeled pool in process) and runs :func:`multimix.engine.train_step`; ``--warmup`` untimed
steps, then ``--steps`` timed ones. In the same worker it then times the bare step on the same
device with the last batches already in memory. Data: the synthetic demo set prepared at
``--size`` in a temporary folder (``multimix prepare --demo``), or ``--data ROOT`` holding
prepared ``cls/`` and ``seg/`` sets (real Kermany/V7 prepared at that size, say).

Figures (``--json`` prints them as one object):

* ``train_img_per_s``: images of the streams the variant consumes, per second of the timed loop;
* ``step_img_per_s``: the same for the bare step over batches in memory;
* ``feed_ratio`` = train / step (1.0: the data never holds the step up);
* ``data_wait_fraction``: share of the Train worker's timed wall time spent blocked in
  ``next(batches)`` (waiting for Ray Data plus the labeled pools' in-process augmentation);
* ``data_cpus``: the CPUs Ray Data may use (Ray's CPUs minus the Train worker's, capped by
  ``scaling.data_concurrency`` × ``data_cpus_per_task``); ``data_cpus_busy``: CPU-seconds that
  all Ray processes other than the Train worker (data tasks, split coordinator, raylet, GCS)
  used per second of the timed loop (from /proc; this process started the Ray it measures);
* ``data_img_per_cpu_s``: images (five streams, as above) fed per CPU-second of those
  processes; ``augment_img_per_s_per_core``: bare weak+strong rendering in one process,
  images per CPU-second (a pair is two images);
* ``cpus_per_gpu_needed`` = ``step_img_per_s`` ÷ ``data_img_per_cpu_s``: the data CPUs that
  keep one such device busy (a cluster planner's number; the Train worker's own CPU not
  included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

from multimix import resources, train as T
from multimix.bench import ratio
from multimix.bench.data import _cpu_rate, _cpu_used, _tree_cpu
from multimix.config import add_config_arguments, load_config
from multimix.data.augment import Augmenter, row_keys
from multimix.data.batches import TrainBatches, open_streams
from multimix.data.prepare import prepare_demo
from multimix.errors import UserError
from multimix.testing import synthetic_rows
from multimix.variants import images_per_step

#: the figures ``--json`` always holds (tests check them)
KEYS = ("train_img_per_s", "step_img_per_s", "feed_ratio", "data_wait_fraction", "data_cpus",
        "data_cpus_busy", "data_img_per_cpu_s", "augment_img_per_s_per_core",
        "cpus_per_gpu_needed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "paper")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="prepared cls/ and seg/ sets at --size (default: the synthetic demo "
                        "set, prepared in a temporary folder)")
    p.add_argument("--n-cls", type=int, default=600,
                   help="synthetic classification images (default 600)")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs of the local Ray (default: all of this machine)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# ---------------------------------------------------------------------------------------------
# the Train worker


def bench_loop(loop_cfg: dict) -> None:
    """Train worker: warm-up + timed steps through the pipeline, then the bare step."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from multimix.engine import build_optimizer, prepare_model, train_step
    from multimix.model import create_model

    inputs = loop_cfg["inputs"]  # multimix.train.WorkerInputs
    cfg = load_config(inputs.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.optim.seed + rank)
    model = prepare_model(create_model(cfg.model), cfg, device)
    model = ray.train.torch.prepare_model(model)
    optimizer, _ = build_optimizer(model, cfg)
    pools = ray.get(inputs.pools)
    shards = {name: ray.train.get_dataset_shard(name) for name in inputs.datasets}
    streams = open_streams(cfg, shards, rank, 0, state=inputs.state)
    warm, n = inputs.extra["warmup"], inputs.extra["timed"]
    n_img = images_per_step(cfg.model.variant, cfg.data)  # the streams the variant consumes
    batches = iter(TrainBatches(cfg, streams, pools.get("cls_labeled"),
                                pools.get("seg_labeled"), rank, 0, steps_per_epoch=warm + n))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warm):
        train_step(model, next(batches), optimizer, cfg, device)
    sync()
    me, root = os.getpid(), inputs.extra["driver_pid"]
    kept: list = []
    wait = 0.0
    c0 = _tree_cpu(root)
    t0 = time.perf_counter()
    for _ in range(n):
        tw = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - tw
        train_step(model, batch, optimizer, cfg, device)  # ends with a host sync
        kept = (kept + [batch])[-4:]
    sync()
    wall = time.perf_counter() - t0
    c1 = _tree_cpu(root)
    for c in streams.values():
        c.close()
    # the bare step: the same device, model and optimizer; batches already in memory
    train_step(model, kept[0], optimizer, cfg, device)
    sync()
    ts = time.perf_counter()
    for i in range(n):
        train_step(model, kept[i % len(kept)], optimizer, cfg, device)
    sync()
    step_wall = time.perf_counter() - ts
    cpu_other = None
    if c0 and c1:
        cpu_other = _cpu_used({k: v for k, v in c0.items() if k not in (me, root)},
                              {k: v for k, v in c1.items() if k not in (me, root)})
    metrics = {
        "train_wall_s": wall, "wait_s": wait, "step_wall_s": step_wall, "steps": n,
        "img_per_step": n_img * world, "data_cpu_s": cpu_other,
        "worker_cpu_s": (c1.get(me, 0.0) - c0.get(me, 0.0)) if c0 else None,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "cpu"),
    }
    # Train V2 keeps the metrics of reports with a checkpoint (Result.metrics)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "bench.json"), "w") as f:
            json.dump(metrics, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------------------------------
# the driver


def augment_rate(size: int, n: int = 64, reps: int = 3) -> float:
    """Weak+strong rendering of :class:`~multimix.data.augment.Augmenter` in this process:
    images (two per pair) per CPU-second, best of ``reps``."""
    import numpy as np

    rows = synthetic_rows(n, size)
    imgs = np.stack([r["image"] for r in rows])
    keys = row_keys([r["id"] for r in rows], 0)
    aug = Augmenter(size)

    def pairs():
        for j in range(0, n, 16):
            aug.pair(imgs[j:j + 16], keys[j:j + 16])

    pairs()
    return 2 * _cpu_rate(pairs, n, reps)


def _config(args, root: str, storage: str):
    import math

    base = load_config(args.config, args.set)
    unl_guess = max(1, int(args.n_cls * 0.9) - base.data.cls_labeled if args.data is None
                    else 1000)
    rows = (args.warmup + args.steps + 2) * base.data.unlabeled_batch
    over = [f"data.image_size={args.size}", f"data.cls_data={root}/cls",
            f"data.seg_data={root}/seg", "optim.steps_per_epoch=" + str(args.warmup + args.steps),
            # passes of one execution: enough for every step (the bench runs one "epoch")
            f"optim.epochs={max(1, math.ceil(rows / unl_guess) + 1)}",
            "scaling.num_workers=1", f"scaling.use_gpu={args.device == 'cuda'}",
            f"run.storage_path={storage}", "run.name=bench-train"]
    if args.device == "cuda":
        over.append(f"scaling.gpus_per_worker={base.scaling.gpus_per_worker or 1}")
    else:
        over += _fit_cpu(base, args)
    if args.data is None:
        over += ["data.cls_labeled=100", "data.seg_labeled=10"]
    return load_config(args.config, list(args.set) + over)


def _fit_cpu(base, args) -> list:
    """``--device cpu`` on a machine the preset's worker does not fit (``paper``: 4 CPUs per
    worker): the Train worker gets half of the local Ray's CPUs and each data task at most a
    quarter, so that the data tasks have CPUs too; a line says so. Values given with ``--set``
    are kept."""
    cpus = args.cpus or os.cpu_count() or 1
    given = {item.split("=", 1)[0].strip() for item in args.set}
    s, out = base.scaling, []
    if s.cpus_per_worker > cpus / 2 and "scaling.cpus_per_worker" not in given:
        out.append(f"scaling.cpus_per_worker={max(0.5, cpus / 2):g}")
    if s.data_cpus_per_task > cpus / 4 and "scaling.data_cpus_per_task" not in given:
        out.append(f"scaling.data_cpus_per_task={max(0.25, cpus / 4):g}")
    if out:
        print(f"[bench train] {args.config} on {cpus:g} local CPUs: "
              + ", ".join(f"{o.replace('=', ' ', 1)} (was "
                          f"{getattr(s, o.split('=')[0].split('.')[1]):g})" for o in out)
              + "; --set to choose others", file=sys.stderr, flush=True)
    return out


def measure(args) -> dict:
    import ray

    if args.size % 32:
        raise UserError(f"--size {args.size}: must be a multiple of 32")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device visible to torch")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mm-bench-train-") as tmp:
        root = args.data
        if root is None:
            root = os.path.join(tmp, "data")
            prepare_demo(root, n_cls=args.n_cls, n_seg=100, image_size=args.size)
        t_prep = time.perf_counter() - t_start
        cfg = _config(args, os.path.abspath(root), os.path.join(tmp, "runs"))
        started = False
        if not ray.is_initialized():
            resources.connect_ray(quiet=True, log_to_driver=False, local=True,
                                  num_cpus=args.cpus or os.cpu_count())
            started = True
        try:
            resources.check(cfg.scaling)
            cpus = float(ray.cluster_resources().get("CPU", 0.0))
            inputs = T.prepare_inputs(cfg)
            trainer = T.build_trainer(cfg, inputs, loop=bench_loop, extra={
                "warmup": args.warmup, "timed": args.steps, "driver_pid": os.getpid()})
            t_fit = time.perf_counter()
            m = T.fit_trainer(trainer).metrics  # as train does: no SIGINT handler left behind
            t_fit = time.perf_counter() - t_fit
        finally:
            if started:
                ray.shutdown()
    s = cfg.scaling
    data_cpus = cpus - s.cpus_per_worker * s.num_workers
    if s.data_concurrency:
        data_cpus = min(data_cpus, s.data_concurrency * s.data_cpus_per_task)
    images = m["steps"] * m["img_per_step"]
    train_rate = images / m["train_wall_s"]
    step_rate = images / m["step_wall_s"]
    busy = m["data_cpu_s"] / m["train_wall_s"] if m.get("data_cpu_s") else None
    per_cpu = (images / m["data_cpu_s"]) if m.get("data_cpu_s") else train_rate / data_cpus
    out = {
        "train_img_per_s": round(train_rate, 2),
        "step_img_per_s": round(step_rate, 2),
        "feed_ratio": round(train_rate / step_rate, 3),
        "data_wait_fraction": round(min(1.0, m["wait_s"] / m["train_wall_s"]), 3),
        "data_cpus": round(data_cpus, 2),
        "data_cpus_busy": round(busy, 2) if busy is not None else None,
        "data_img_per_cpu_s": round(per_cpu, 1),
        "augment_img_per_s_per_core": round(augment_rate(args.size), 1),
        "cpus_per_gpu_needed": ratio(step_rate, per_cpu),
        "settings": {
            "config": args.config, "size": args.size, "steps": args.steps,
            "warmup": args.warmup, "device": args.device, "device_name": m["device_name"],
            "data": args.data or "synthetic", "width": cfg.model.width,
            "precision": cfg.optim.precision, "channels_last": cfg.optim.channels_last,
            "compile": cfg.optim.compile, "img_per_step": m["img_per_step"],
            "cpus": cpus, "cpus_per_worker": s.cpus_per_worker,
            "worker_cpu_s": m.get("worker_cpu_s"),
            "seconds": round(time.perf_counter() - t_start, 1),
            "prepare_s": round(t_prep, 1), "fit_s": round(t_fit, 1),
        },
    }
    return out


def run(args) -> int:
    # with --json, stdout carries the JSON line alone: the run's own lines go to stderr
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
        res = measure(args)
    if args.json:
        print(json.dumps(res))
        return 0
    s = res["settings"]
    print(f"bench train: {s['config']} at {s['size']}² on {s['device']} ({s['device_name']}), "
          f"width {s['width']}, precision={s['precision']}, channels_last={s['channels_last']}, "
          f"compile={s['compile']}; {s['steps']} timed steps after {s['warmup']}, "
          f"{s['img_per_step']} img/step, data: {s['data']}, Ray CPUs {s['cpus']:g}")
    for k in KEYS:
        print(f"  {k:28s} {res[k]}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="multimix bench train",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The per-epoch collectives of ``multimix train`` under a real process group (gloo or NCCL).

:func:`check` starts ``world`` processes on this machine that join a process group the way Ray
Train does (``ray/train/torch/config.py``: ``torch.cuda.set_device`` of the rank's GPU under
NCCL, then ``dist.init_process_group(backend, init_method="tcp://ADDR:PORT", rank,
world_size, timeout)``) and run the functions the Train worker runs at the end of every epoch:

* :func:`multimix.train._mean_over_workers` (an all-reduce of the training means);
* :func:`multimix.validate.validate` (validation of both tasks, accumulator states gathered with
  :func:`multimix.metrics.all_gather_state`, i.e. ``all_gather_object``).

Each rank first scores the same validation pools alone (before joining the group, on the same
device): the gathered metrics must equal those on every rank. No Ray is needed (pure torch and
the in-memory labeled pools of :mod:`multimix.data.pools`), so it runs on a GPU node before Ray
is installed; ``tests/core/test_collectives.py`` and ``scripts/gpu_check.py`` call it.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from datetime import timedelta

from multimix import train as T
from multimix.config import load_config
from multimix.data.pools import LabeledPool
from multimix.data.synthetic import phantom
from multimix.testing import free_ports
from multimix.validate import validate

#: metric tolerance between the gathered and the single-process numbers (the shards' batches
#: differ from the full batch, so convolution algorithms and summation orders may too)
RTOL, ATOL = 1e-4, 1e-5


def _setup(size: int):
    """A tiny model, its config, and validation pools of synthetic phantoms:
    ``cls_val`` 7 images (2 classes), ``seg_val`` 5 images with lung masks."""
    import numpy as np
    import torch

    from multimix.model import create_model

    cfg = load_config("cpu-small", {"data": {"image_size": size, "eval_batch": 2},
                                    "model": {"width": 0.25}})
    torch.manual_seed(0)
    model = create_model(cfg.model)
    rng = np.random.default_rng(5)
    imgs, masks, labels = [], [], []
    for i in range(12):
        img, mask = phantom(size, np.random.default_rng(rng.integers(1 << 62)), bool(i % 2))
        imgs.append(img)
        masks.append(mask)
        labels.append(i % 2)
    imgs, masks = np.stack(imgs), np.stack(masks)
    pools = {
        "cls_val": LabeledPool(ids=[f"c{i}" for i in range(7)], images=imgs[:7],
                               labels=np.asarray(labels[:7], np.int64)),
        "seg_val": LabeledPool(ids=[f"s{i}" for i in range(5)], images=imgs[7:],
                               masks=masks[7:], ignore=np.zeros_like(masks[7:])),
    }
    return cfg, model, pools


def train_values(rank: int) -> dict[str, float]:
    """Rank ``rank``'s per-epoch training means in the check (their mean over ranks is known)."""
    return {"train_loss": 1.0 + rank, "train_dice": 0.25 * rank, "train_accept_rate": 0.5}


def _worker(rank: int, world: int, backend: str, port: int, size: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # as Ray Train's TorchConfigContextManager
    cfg, model, pools = _setup(size)
    model = model.to(device)
    classes = ["NORMAL", "PNEUMONIA"]
    def val(rank_: int, world_: int) -> dict:
        return validate(model, device, cls=pools["cls_val"], seg=pools["seg_val"],
                        classes=classes, batch_size=cfg.data.eval_batch, rank=rank_,
                        world_size=world_).flat()

    alone = val(0, 1)  # no process group yet
    dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        t0 = time.perf_counter()
        means = T._mean_over_workers(train_values(rank))
        gathered = val(rank, world)
        seconds = time.perf_counter() - t0
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump({"means": means, "val": gathered, "alone": alone, "seconds": seconds}, f)


def check(backend: str = "gloo", world: int = 2, size: int = 32) -> dict:
    """Run the per-epoch collectives on ``world`` local processes under ``backend``.

    Returns ``{"backend", "world", "ok": bool, "problems": [str], "seconds", "val": rank 0's
    metrics}``; ``ok`` when on every rank the reduced means equal the mean of
    :func:`train_values` and the gathered validation metrics equal the single-process ones.
    A process that fails raises (its traceback included).
    """
    import numpy as np
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mm-coll-") as d:
        mp.spawn(_worker, args=(world, backend, free_ports(1)[0], size, d), nprocs=world, join=True)
        ranks = []
        for r in range(world):
            with open(os.path.join(d, f"rank{r}.pkl"), "rb") as f:
                ranks.append(pickle.load(f))
    want = {k: float(np.mean([train_values(r)[k] for r in range(world)]))
            for k in train_values(0)}
    problems = []
    for r, res in enumerate(ranks):
        for k, v in want.items():
            if abs(res["means"][k] - v) > 1e-12:
                problems.append(f"rank {r}: {k} reduced to {res['means'][k]}, want {v}")
        if set(res["val"]) != set(res["alone"]):
            problems.append(f"rank {r}: metric keys differ from the single-process ones")
            continue
        for k, v in res["alone"].items():
            got = res["val"][k]
            if not (np.isclose(got, v, rtol=RTOL, atol=ATOL) or (np.isnan(got) and np.isnan(v))):
                problems.append(f"rank {r}: {k} = {got} gathered, {v} alone")
    return {"backend": backend, "world": world, "ok": not problems, "problems": problems,
            "seconds": round(time.perf_counter() - t0, 2), "val": ranks[0]["val"]}


if __name__ == "__main__":  # python -m multimix.bench.collectives [backend] [world]
    import json
    import sys

    res = check(sys.argv[1] if len(sys.argv) > 1 else "gloo",
                int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(json.dumps(res, default=float))
    sys.exit(0 if res["ok"] else 1)

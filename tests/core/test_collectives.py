"""The per-epoch collectives of the Train worker (``train._mean_over_workers`` and
``multimix.validate.validate``'s gathering) under a process group set up as Ray Train sets it
up: gloo on CPU (world size 1 and 2), NCCL on a GPU node (world size 1, and 2 with two GPUs)."""

from __future__ import annotations

import pytest
import torch

from multimix.bench.collectives import check


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_gloo_collectives_match_single_process(world):
    res = check("gloo", world)
    assert res["ok"], res["problems"]
    assert res["world"] == world
    assert {"val_cls_auc", "val_seg_dice_mean", "val_score"} <= set(res["val"])


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_collectives_match_single_process(world):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: NCCL runs on a GPU node (scripts/gpu_check.sh)")
    if torch.cuda.device_count() < world:
        pytest.skip(f"NCCL world size {world} needs {world} GPUs, "
                    f"found {torch.cuda.device_count()}")
    res = check("nccl", world)
    assert res["ok"], res["problems"]


def test_collective_device_follows_the_backend(monkeypatch):
    import torch.distributed as dist

    from multimix.metrics import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, want in (("nccl", torch.device("cuda", 3)), ("gloo", torch.device("cpu")),
                          ("cpu:gloo,cuda:nccl", torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collective_device() == want, backend

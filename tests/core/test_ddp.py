"""Under DistributedDataParallel (2 gloo processes), train_step's gradients — saliency pass
included — equal the single-process gradients of the same global batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

VARIANT = "multimix"
SIZE, LOCAL_B, WORLD = 64, 2, 2


def _cfg():
    from multimix.config import Config

    cfg = Config()
    cfg.model.variant = VARIANT
    cfg.model.width = 0.25
    cfg.model.dropout = 0.0  # deterministic
    cfg.objective.threshold = 0.5  # with 2 classes every pseudo-label is accepted
    return cfg


def _global_batch():
    g = torch.Generator().manual_seed(3)
    n = LOCAL_B * WORLD
    b = {k: torch.randint(0, 256, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
         for k in ("cls_img", "weak_img", "strong_img", "seg_img", "useg_img")}
    b["cls_label"] = torch.randint(0, 2, (n,), generator=g)
    b["seg_mask"] = torch.randint(0, 2, (n, 1, SIZE, SIZE), dtype=torch.uint8, generator=g)
    ign = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.uint8)
    ign[:, :, :8] = 1
    b["seg_ignore"] = ign
    return b


def _grads(model, batch):
    from multimix.engine import train_step

    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # keep weights: compare the gradients
    terms = train_step(model, batch, opt, _cfg(), "cpu")
    return terms, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _model():
    from multimix.model import create_model

    torch.manual_seed(0)
    return create_model(_cfg().model)


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        ddp = DDP(_model())
        gb = _global_batch()
        local = {k: v[rank * LOCAL_B:(rank + 1) * LOCAL_B] for k, v in gb.items()}
        terms, grads = _grads(ddp, local)
        grads = {k[len("module."):]: v for k, v in grads.items()}
        torch.save({"terms": terms, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process(tmp_path):
    init_file = tmp_path / "pg_init"
    mp.spawn(_worker, args=(str(init_file), str(tmp_path)), nprocs=WORLD, join=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    terms, ref = _grads(_model(), _global_batch())
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert set(r0["grads"]) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(r0["grads"][name], g, atol=1e-5, rtol=1e-3, msg=name)
        torch.testing.assert_close(r1["grads"][name], g, atol=1e-5, rtol=1e-3, msg=name)
    # the global loss is the mean of the ranks' losses (equal local batch sizes)
    mean_loss = (r0["terms"]["loss"] + r1["terms"]["loss"]) / 2
    assert mean_loss == pytest.approx(terms["loss"], rel=1e-4)
    assert terms["kl"] > 0 and terms["ce_pseudo"] > 0

"""engine: to_input, train_step (terms, precision, channels_last), eval_step, build_optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimix.config import Config, ObjectiveConfig, OptimConfig
from multimix.engine import build_optimizer, eval_step, prepare_model, to_input, train_step
from multimix.model import create_model
from multimix.objective import TERM_KEYS

STREAMS = ("cls_img", "weak_img", "strong_img", "seg_img", "useg_img")


def make_batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = {k: torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=g)
             for k in STREAMS}
    batch["cls_label"] = torch.randint(0, 2, (b,), generator=g)
    batch["seg_mask"] = torch.randint(0, 2, (b, 1, size, size), dtype=torch.uint8, generator=g)
    batch["seg_ignore"] = torch.zeros(b, 1, size, size, dtype=torch.uint8)
    return batch


def small_cfg(variant="multimix", **optim):
    cfg = Config()
    cfg.model.variant = variant
    cfg.model.width = 0.25
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return cfg


def test_to_input_normalisation():
    u8 = torch.tensor([0, 51, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    x = to_input(u8, "cpu")
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, (u8.float() / 255 - 0.5) / 0.5)
    assert x.min() == -1 and x.max() == 1
    assert to_input(u8, "cpu", channels_last=True).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("variant", ["multimix", "unet", "enc-ssl"])
def test_train_step_returns_all_terms(variant):
    cfg = small_cfg(variant)
    torch.manual_seed(0)
    model = create_model(cfg.model)
    opt, sched = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    terms = train_step(model, make_batch(), opt, cfg, "cpu")
    assert set(terms) == set(TERM_KEYS)
    assert all(isinstance(v, float) and np.isfinite(v) for v in terms.values())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_train_step_takes_a_config_and_names_a_missing_key():
    cfg = small_cfg("umtl")
    model = create_model(cfg.model)
    opt, _ = build_optimizer(model, cfg)
    terms = train_step(model, make_batch(), opt, cfg, "cpu")
    assert terms["kl"] == 0.0 and terms["ce_pseudo"] == 0.0
    with pytest.raises(TypeError, match="expected a multimix.config.Config, got tuple"):
        train_step(model, make_batch(), opt, (OptimConfig(), ObjectiveConfig()), "cpu")
    b = make_batch()
    del b["seg_mask"]
    with pytest.raises(KeyError, match="seg_mask"):
        train_step(model, b, opt, cfg, "cpu")


def test_bf16_and_channels_last_on_cpu():
    cfg = small_cfg("multimix", precision="bf16", channels_last=True)
    model = prepare_model(create_model(cfg.model), cfg, "cpu")
    opt, _ = build_optimizer(model, cfg)
    terms = train_step(model, make_batch(size=32), opt, cfg, "cpu")
    assert np.isfinite(terms["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_eval_step_outputs():
    cfg = small_cfg("multimix")
    model = create_model(cfg.model)
    model.train()
    b = make_batch(b=3)
    res = eval_step(model, {"cls_img": b["cls_img"], "seg_img": b["seg_img"]}, "cpu")
    assert res["cls_prob"].shape == (3, 2) and res["cls_prob"].dtype == np.float32
    np.testing.assert_allclose(res["cls_prob"].sum(1), 1, rtol=1e-5)
    assert res["seg_prob"].shape == (3, 1, 64, 64)
    assert ((res["seg_prob"] >= 0) & (res["seg_prob"] <= 1)).all()
    both = eval_step(model, {"img": b["seg_img"]}, "cpu", saliency=True)
    assert set(both) == {"cls_prob", "seg_prob", "saliency"}
    np.testing.assert_allclose(both["seg_prob"], res["seg_prob"], atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # deterministic in eval mode (dropout off)
    again = eval_step(model, {"seg_img": b["seg_img"]}, "cpu")
    np.testing.assert_allclose(again["seg_prob"], res["seg_prob"], atol=1e-6)
    unet = create_model(small_cfg("unet").model)
    assert set(eval_step(unet, {"cls_img": b["cls_img"], "seg_img": b["seg_img"]}, "cpu")) == {
        "seg_prob"}


def test_build_optimizer():
    cfg = small_cfg()
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.step_size, cfg.optim.gamma = 3e-4, 1e-5, 4, 0.5
    model = create_model(cfg.model)
    opt, sched = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.Adam)
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 1e-5
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.5e-4)

"""Device paths of the engine: bf16 autocast + channels_last through the whole step (saliency's
``autograd.grad`` inside forward included) on the CPU, the same on CUDA when there is one, and
``optim.compile`` wrapping the encoder and decoder without touching the state-dict keys."""

from __future__ import annotations

import math

import pytest
import torch

from multimix.config import Config
from multimix.engine import build_optimizer, eval_step, prepare_model, train_step
from multimix.model import create_model
from test_engine import make_batch  # tests/core/test_engine.py (same folder, on sys.path)


def _cfg(precision="bf16", channels_last=True, compile_=False):
    cfg = Config()
    cfg.model.width = 0.25
    cfg.optim.precision = precision
    cfg.optim.channels_last = channels_last
    cfg.optim.compile = compile_
    return cfg


def _batch():
    return make_batch(b=2, size=32, seed=1)


def _step_on(device):
    cfg = _cfg()
    torch.manual_seed(0)
    model = prepare_model(create_model(cfg.model), cfg, device)
    opt, _ = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    terms = train_step(model, _batch(), opt, cfg, device)
    assert all(math.isfinite(v) for v in terms.values()), terms
    assert all(p.device.type == torch.device(device).type for p in model.parameters())
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert changed == len(before)  # every parameter got a gradient step
    out = eval_step(model, {"img": _batch()["seg_img"]}, device, channels_last=True,
                    precision="bf16", saliency=True)
    assert out["saliency"].shape == (2, 1, 32, 32) and out["saliency"].max() > 0
    assert out["seg_prob"].shape == (2, 1, 32, 32) and out["cls_prob"].shape == (2, 2)


def test_bf16_channels_last_step_on_cpu():
    _step_on("cpu")


def test_bf16_channels_last_step_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (scripts/gpu_check.sh runs this path on a GPU node)")
    _step_on("cuda")


def test_compile_wraps_encoder_and_decoder_keeping_keys():
    import torch._dynamo

    cfg = _cfg(compile_=True)
    keys = list(create_model(cfg.model).state_dict())
    model = prepare_model(create_model(cfg.model), cfg, "cpu")
    assert list(model.state_dict()) == keys
    assert model.encoder._compiled_call_impl is not None
    assert model.decoder._compiled_call_impl is not None
    assert torch._dynamo.config.suppress_errors  # a failing part runs eagerly

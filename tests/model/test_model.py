"""MultiMixNet: shapes for every variant, only-used modules, saliency vs a reference, no .grad."""

from __future__ import annotations

import copy

import pytest
import torch

from multimix.config import VARIANTS, ModelConfig
from multimix.model import VARIANT_FLAGS, MultiMixNet, create_model, unwrap


def _net(variant, width=0.25, dropout=0.25, seed=0):
    torch.manual_seed(seed)
    return create_model(ModelConfig(variant=variant, width=width, dropout=dropout))


def _x(b, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g) * 2 - 1


def test_flags_table_covers_config_variants():
    assert set(VARIANT_FLAGS) == set(VARIANTS)
    f = VARIANT_FLAGS
    assert not f["unet"].has_cls and f["unet"].has_seg
    assert f["enc"].has_cls and not f["enc"].has_seg and not f["enc"].ssl
    assert f["enc-ssl"].ssl
    assert f["umtl"].has_cls and f["umtl"].has_seg and not f["umtl"].bridge
    assert f["umtl-s"].bridge and not f["umtl-s"].ssl
    assert f["umtl-ssl"].ssl and not f["umtl-ssl"].bridge
    assert f["umtl-ssl-s"].ssl and f["umtl-ssl-s"].bridge and not f["umtl-ssl-s"].seg_kl
    assert all(vars(f["multimix"]).values())
    with pytest.raises(ValueError, match="unknown model variant"):
        MultiMixNet(variant="nope")


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_every_variant(variant):
    net = _net(variant)
    f = net.flags
    assert (net.cls_head is not None) == f.has_cls
    assert (net.decoder is not None) == f.has_seg
    for size in (64, 96, 128):
        x = _x(2, size)
        out = net(cls=x, weak=x, strong=x, seg=x, useg=x[:1])
        expect = set()
        if f.has_cls:
            expect.add("cls_logits")
            assert out["cls_logits"].shape == (2, 2)
        if f.ssl:
            expect |= {"weak_logits", "strong_logits"}
            assert out["strong_logits"].shape == (2, 2)
            assert not out["weak_logits"].requires_grad
        if f.has_seg:
            expect |= {"seg_logits", "useg_logits"}
            assert out["seg_logits"].shape == (2, 1, size, size)
            assert out["useg_logits"].shape == (1, 1, size, size)
        if f.bridge:
            expect |= {"seg_saliency", "useg_saliency"}
            assert out["seg_saliency"].shape == (2, 1, size, size)
        assert set(out) == expect
        full = net.forward_all(x)
        if f.has_seg:
            assert full["seg_logits"].shape == (2, 1, size, size)
        if f.has_cls:
            assert full["cls_logits"].shape == (2, 2)


def test_widths_and_width_factor():
    assert _net("multimix", width=1.0).widths == [16, 32, 64, 128, 256]
    assert _net("multimix", width=0.5).widths == [8, 16, 32, 64, 128]


def test_streams_batched_equal_separate():
    """One encoder pass over the concatenated streams == each stream alone (per-sample norm)."""
    net = _net("umtl", dropout=0.0).eval()
    a, b = _x(2, 64, 1), _x(3, 64, 2)
    out = net(cls=a, seg=b)
    torch.testing.assert_close(out["cls_logits"], net(cls=a)["cls_logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["seg_logits"], net(seg=b)["seg_logits"], atol=1e-5, rtol=1e-5)


def _reference_saliency(net, x):
    ref = copy.deepcopy(net).eval()
    maps = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = ref.cls_head(ref.encoder(xi)[-1])
        logits.max().backward()
        maps.append(xi.grad.abs())
    return torch.cat(maps)


def test_saliency_equals_reference_and_touches_no_grad():
    net = _net("multimix", dropout=0.25)
    net.train()  # saliency must use eval-mode encoder (dropout off) regardless
    x = _x(3, 64, 5)
    sal = net.saliency(x)
    torch.testing.assert_close(sal, _reference_saliency(net, x), atol=1e-6, rtol=1e-4)
    assert not sal.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert net.training  # mode untouched
    # the forward (train mode) returns the same saliency and leaves .grad alone too
    out = net(seg=x)
    torch.testing.assert_close(out["seg_saliency"], sal, atol=1e-6, rtol=1e-4)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


def test_forward_under_no_grad_still_gives_saliency():
    net = _net("umtl-s").eval()
    x = _x(2, 64)
    with torch.no_grad():
        out = net(seg=x)
    assert out["seg_saliency"].abs().sum() > 0
    assert not out["seg_logits"].requires_grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_gets_a_gradient(variant):
    """A variant builds only what it uses (DDP with find_unused_parameters=False works)."""
    net = _net(variant)
    x = _x(2, 64)
    out = net(cls=x, weak=x, strong=x, seg=x, useg=x)
    loss = sum(v.float().sum() for k, v in out.items() if v.requires_grad)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing


def test_state_dict_roundtrip_and_unwrap():
    net = _net("multimix")
    other = _net("multimix", seed=1)
    other.load_state_dict(unwrap(net).state_dict())
    x = _x(1, 64)
    net.eval(), other.eval()
    torch.testing.assert_close(net(seg=x)["seg_logits"], other(seg=x)["seg_logits"])
    assert not any(k.startswith("module.") for k in net.state_dict())

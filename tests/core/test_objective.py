"""Loss terms against small hand-computed examples; pseudo-label masking; a working seg KL."""

from __future__ import annotations

import math

import pytest
import torch

from multimix.config import ObjectiveConfig
from multimix.objective import (
    TERM_KEYS,
    bernoulli_kl,
    multimix_loss,
    pseudo_label,
    pseudo_label_ce,
    soft_dice_loss,
    supervised_ce,
)


def test_supervised_ce_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    e = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e))]
    assert supervised_ce(logits, labels).item() == pytest.approx(sum(e) / 2, rel=1e-6)


def test_pseudo_label_threshold_masking():
    # softmax([a, 0]) max = sigmoid(|a|): 0.5, 0.731, 0.881, 0.982
    weak = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 0.0]])
    targets, mask = pseudo_label(weak, 0.7)
    assert targets.tolist()[1:] == [0, 1, 0]
    assert mask.tolist() == [0.0, 1.0, 1.0, 1.0]
    _, mask = pseudo_label(weak, 0.9)
    assert mask.tolist() == [0.0, 0.0, 0.0, 1.0]
    _, mask = pseudo_label(weak, 1 / (1 + math.exp(-1.0)))  # >= : exactly at t is accepted
    assert mask.tolist() == [0.0, 1.0, 1.0, 1.0]
    w = weak.clone().requires_grad_(True)
    t, m = pseudo_label(w, 0.7)
    assert not t.requires_grad and not m.requires_grad


def test_pseudo_label_ce_divides_by_unlabeled_batch():
    strong = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]], requires_grad=True)
    targets = torch.tensor([1, 1, 0])
    mask = torch.tensor([1.0, 0.0, 1.0])
    ce0 = -math.log(math.exp(0) / (math.exp(1) + 1))
    ce2 = math.log(2)
    val = pseudo_label_ce(strong, targets, mask)
    assert val.item() == pytest.approx((ce0 + ce2) / 3, rel=1e-6)  # / B_u, not / accepted
    val.backward()
    assert strong.grad[1].abs().sum() == 0  # rejected sample: no gradient


def test_dice_with_ignore_by_hand():
    # image 1: p = [0.5, 0.5, 0.5, 0.5] (logits 0), g = [1, 1, 0, 0], ignore pixel 3
    # w = [1,1,1,0]: inter = 1.0, sum p = 1.5, sum g = 2 → dice = (2+1)/(3.5+1) = 2/3
    # image 2: logits huge positive on g=[1,1,1,1], no ignore → p≈1 → dice = (8+1)/(8+1) = 1
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]], [[[50.0, 50.0], [50.0, 50.0]]]])
    mask = torch.tensor([[[[1, 1], [0, 0]]], [[[1, 1], [1, 1]]]], dtype=torch.uint8)
    ignore = torch.tensor([[[[0, 0], [0, 1]]], [[[0, 0], [0, 0]]]], dtype=torch.uint8)
    val = soft_dice_loss(logits, mask, ignore)
    assert val.item() == pytest.approx(((1 - 2 / 3) + 0.0) / 2, abs=1e-6)
    # ignored pixel gets no gradient; changing its logit changes nothing
    lg = logits.clone().requires_grad_(True)
    soft_dice_loss(lg, mask, ignore).backward()
    assert lg.grad[0, 0, 1, 1] == 0
    logits2 = logits.clone()
    logits2[0, 0, 1, 1] = 30.0
    assert soft_dice_loss(logits2, mask, ignore).item() == pytest.approx(val.item(), abs=1e-7)


def test_bernoulli_kl_by_hand_and_nonzero_gradient():
    a = torch.tensor([[[[0.0, 2.0]]]], requires_grad=True)  # p = 0.5, 0.881
    b = torch.tensor([[[[1.0, -1.0]]]], requires_grad=True)  # q = 0.731, 0.269

    def kl(p, q):
        return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))

    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expect = (kl(s(0), s(1)) + kl(s(2), s(-1))) / 2
    val = bernoulli_kl(a, b)
    assert val.item() == pytest.approx(expect, rel=1e-5)
    assert val.item() > 0.1
    val.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    assert bernoulli_kl(b, b).item() == pytest.approx(0.0, abs=1e-7)
    big = torch.full((1, 1, 2, 2), 80.0)
    assert torch.isfinite(bernoulli_kl(big, -big))


def _out_and_batch(seed=0, bs=2, bus=3, bl=2, bu=4, size=8):
    g = torch.Generator().manual_seed(seed)
    out = {
        "cls_logits": torch.randn(bl, 2, generator=g).requires_grad_(),
        "weak_logits": torch.randn(bu, 2, generator=g) * 3,
        "strong_logits": torch.randn(bu, 2, generator=g).requires_grad_(),
        "seg_logits": torch.randn(bs, 1, size, size, generator=g).requires_grad_(),
        "useg_logits": torch.randn(bus, 1, size, size, generator=g).requires_grad_(),
    }
    batch = {
        "cls_label": torch.randint(0, 2, (bl,), generator=g),
        "seg_mask": torch.randint(0, 2, (bs, 1, size, size), generator=g).to(torch.uint8),
        "seg_ignore": torch.zeros(bs, 1, size, size, dtype=torch.uint8),
    }
    return out, batch


def test_multimix_loss_combines_weighted_terms():
    cfg = ObjectiveConfig(threshold=0.7, lambda_u=0.25, alpha=5.0, beta=0.01)
    out, batch = _out_and_batch()
    loss, terms = multimix_loss(out, batch, cfg, "multimix")
    assert set(terms) == set(TERM_KEYS)
    t, m = pseudo_label(out["weak_logits"], 0.7)
    expect = (supervised_ce(out["cls_logits"], batch["cls_label"])
              + 0.25 * pseudo_label_ce(out["strong_logits"], t, m)
              + 5.0 * soft_dice_loss(out["seg_logits"], batch["seg_mask"], batch["seg_ignore"])
              + 0.01 * bernoulli_kl(out["seg_logits"][:2], out["useg_logits"][:2]))
    torch.testing.assert_close(loss, expect)
    assert terms["accept_rate"].item() == pytest.approx(m.mean().item())
    assert terms["kl"].item() > 0  # the official notebook's KL was always exactly 0
    loss.backward()
    assert out["useg_logits"].grad[:2].abs().sum() > 0
    assert out["useg_logits"].grad[2].abs().sum() == 0  # unpaired image: no KL pair


@pytest.mark.parametrize("variant,zero", [
    ("unet", {"ce_sup", "ce_pseudo", "kl", "accept_rate"}),
    ("enc", {"ce_pseudo", "dice", "kl", "accept_rate"}),
    ("umtl-ssl-s", {"kl"}),
])
def test_unused_terms_are_zero(variant, zero):
    out, batch = _out_and_batch()
    _, terms = multimix_loss(out, batch, ObjectiveConfig(threshold=0.5), variant)
    for k in zero:
        assert terms[k].item() == 0.0
    for k in set(TERM_KEYS) - zero:
        assert terms[k].item() != 0.0

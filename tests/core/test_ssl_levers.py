"""The stable-SSL levers against hand-computed values: distribution alignment, FlexMatch / FreeMatch
thresholds, the stateful pseudo-labeler, the EMA teacher, the engine hooks and the config keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from multimix.config import ConfigError, load_config
from multimix.ema import ModelEMA
from multimix.objective import (
    PseudoLabeler,
    class_rates,
    distribution_align,
    flexmatch_thresholds,
    freematch_thresholds,
    make_labeler,
    multimix_loss,
)


def test_distribution_alignment_by_hand():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]], dtype=torch.float64)
    q = distribution_align(probs, torch.tensor([0.5, 0.5]), torch.tensor([0.7, 0.3]))
    # q ∝ p / p̃: row 0 = (8/7, 2/3) → (24/38, 14/38); row 1 = (6/7, 4/3) → (18/46, 28/46)
    torch.testing.assert_close(q, torch.tensor([[24 / 38, 14 / 38], [18 / 46, 28 / 46]],
                                               dtype=torch.float64))
    torch.testing.assert_close(q.sum(1), torch.ones(2, dtype=torch.float64))
    # the batch marginal (0.7, 0.3) moves toward the prior (0.5, 0.5)
    assert abs(q[:, 0].mean() - 0.5) < abs(probs[:, 0].mean() - 0.5)
    assert q[:, 0].mean() > 0.5  # ... without overshooting


def test_flexmatch_thresholds_by_hand():
    # β = σ / max(max σ, N − Σσ); T = β / (2 − β) · τ
    t = flexmatch_thresholds(torch.tensor([0.6, 0.2]), 0.2, 0.9)
    torch.testing.assert_close(t, torch.tensor([0.9, (1 / 3) / (5 / 3) * 0.9]))
    # warm-up: the unused fraction dominates the normaliser
    t = flexmatch_thresholds(torch.tensor([0.1, 0.05], dtype=torch.float64), 0.85, 0.9)
    torch.testing.assert_close(t, torch.tensor([0.9 / 16, 0.9 / 33], dtype=torch.float64))


def test_freematch_thresholds_by_hand():
    t = freematch_thresholds(torch.tensor(0.8), torch.tensor([0.6, 0.3]))
    torch.testing.assert_close(t, torch.tensor([0.8, 0.4]))


def _logits(p):
    return torch.tensor(p, dtype=torch.float32).log()


def test_labeler_running_stats_and_thresholds_by_hand():
    weak = _logits([[0.9, 0.1], [0.2, 0.8]])
    lab = PseudoLabeler(2, 0.85, mode="freematch", momentum=0.5)
    targets, mask, _, thr = lab(weak)
    # batch: mean p = (0.55, 0.45), mean max = 0.85, above τ=0.85 as class 0: 1 of 2
    torch.testing.assert_close(lab.marginal, torch.tensor([0.525, 0.475], dtype=torch.float64))
    assert lab.tau.item() == pytest.approx(0.675)
    torch.testing.assert_close(lab.sigma, torch.tensor([0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(thr, torch.tensor([0.675, 0.475 / 0.525 * 0.675]))
    assert targets.tolist() == [0, 1] and mask.tolist() == [1.0, 1.0]
    flex = PseudoLabeler(2, 0.85, mode="flexmatch", momentum=0.5)
    flex.load_state_dict(lab.state_dict())
    # σ = (0.25, 0), unused 0.75: β = (1/3, 0) → T = (0.2·0.85, 0)
    torch.testing.assert_close(flex.thresholds(), torch.tensor([0.17, 0.0], dtype=torch.float64))
    assert flex.state_dict()["steps"] == 1


def test_labeler_alignment_uniform_and_labeled_prior():
    weak = _logits([[0.9, 0.1], [0.2, 0.8]])
    lab = PseudoLabeler(2, 0.7, dist_align="uniform", momentum=0.5)
    lab(weak)  # the alignment's p̃ starts at the first batch mean (0.55, 0.45)
    torch.testing.assert_close(lab.da_marginal, torch.tensor([0.55, 0.45], dtype=torch.float64))
    _, mask, probs, _ = lab(weak)  # then EMA: still (0.55, 0.45)
    m = torch.tensor([0.55, 0.45])
    want = torch.tensor([[0.9, 0.1], [0.2, 0.8]]) * (0.5 / m)
    want = want / want.sum(1, keepdim=True)
    torch.testing.assert_close(probs, want)
    assert mask.tolist() == [float(want[0].max() >= 0.7), float(want[1].max() >= 0.7)]
    torch.testing.assert_close(lab.marginal, torch.tensor([0.5375, 0.4625], dtype=torch.float64))
    # labeled prior from counts (+1 smoothing): 1 normal, 3 pneumonia → (2, 4) / 6
    objective = load_config(None, ["objective.dist_align=labeled"]).objective
    lab = make_labeler(objective, 2, [0, 1, 1, 1])
    torch.testing.assert_close(lab.target, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match="labeled"):
        make_labeler(objective, 2, [])


def test_fixed_labeler_equals_fixmatch_and_reports_classes():
    torch.manual_seed(0)
    out = {"cls_logits": torch.randn(4, 2), "weak_logits": torch.randn(6, 2) * 3,
           "strong_logits": torch.randn(6, 2)}
    batch = {"cls_label": torch.tensor([0, 1, 1, 0])}
    cfg = load_config(None).objective
    _, plain = multimix_loss(out, batch, cfg, "enc-ssl")
    lab = PseudoLabeler(2, cfg.threshold)
    _, terms = multimix_loss(out, batch, cfg, "enc-ssl", labeler=lab)
    assert terms["ce_pseudo"].item() == pytest.approx(plain["ce_pseudo"].item())
    assert terms["accept_rate"].item() == pytest.approx(plain["accept_rate"].item())
    assert (terms["pl_accept_c0"] + terms["pl_accept_c1"]).item() == pytest.approx(
        plain["accept_rate"].item())
    assert (terms["pl_argmax_c0"] + terms["pl_argmax_c1"]).item() == pytest.approx(1.0)
    assert terms["pl_threshold_c1"].item() == pytest.approx(0.7)
    assert lab.steps == 0  # the paper's setting keeps no statistics (and no collective)


def test_class_rates():
    means = {"train_pl_argmax_c0": 0.3, "train_pl_argmax_c1": 0.7,
             "train_pl_accept_c0": 0.15, "train_pl_accept_c1": 0.7}
    r = class_rates(means)
    assert r["train_accept_rate_c0"] == pytest.approx(0.5)
    assert r["train_accept_rate_c1"] == pytest.approx(1.0)
    assert r["train_pl_hist_c0"] == pytest.approx(0.15 / 0.85)
    none = class_rates({"train_pl_argmax_c0": 0.0, "train_pl_argmax_c1": 1.0,
                        "train_pl_accept_c0": 0.0, "train_pl_accept_c1": 0.0})
    assert math.isnan(none["train_accept_rate_c0"]) and math.isnan(none["train_pl_hist_c1"])


def test_ema_update_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.9, warmup=False)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()
    model(torch.randn(5, 3))  # moves the BN running stats and num_batches_tracked
    ema.update(model)
    new = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.9 * old[k] + 0.1 * new[k])
        else:
            assert torch.equal(v, new[k])
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        ModelEMA(model, 1.0)


def test_ema_warmup_averages_the_models_so_far_then_uses_the_decay():
    """Mean Teacher's warm-up: update t uses min(d, 1 - 1/(t+1)), so after t+1 updates the copy
    is the plain mean of those models (none of the initial weights) until d takes over."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = ModelEMA(model, decay=0.75)
    assert ema.warmup and ema.current_decay() == 0.0
    seen = []
    for t in range(6):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3))
        seen.append(model.weight.detach().clone())
        d = ema.current_decay()
        assert d == pytest.approx(min(0.75, 1 - 1 / (t + 1)))
        ema.update(model)
        if t <= 3:  # 1 - 1/(t+1) <= 0.75 up to t = 3: the mean of every model so far
            torch.testing.assert_close(ema.module.weight, torch.stack(seen).mean(0))
    assert ema.updates == 6 and ema.current_decay() == 0.75
    # off: the first update already keeps d of the initial weights
    init = nn.Linear(3, 2)
    plain = ModelEMA(init, decay=0.75, warmup=False)
    w0 = init.weight.detach().clone()
    plain.update(model)
    torch.testing.assert_close(plain.module.weight, 0.75 * w0 + 0.25 * model.weight)


def test_train_step_teacher_makes_the_pseudo_labels():
    from multimix.engine import build_optimizer, train_step
    from multimix.model import create_model
    from test_engine import make_batch, small_cfg  # tests/core/test_engine.py (same folder)

    cfg = small_cfg("enc-ssl")
    torch.manual_seed(0)
    model = create_model(cfg.model)
    opt, _ = build_optimizer(model, cfg)
    teacher = ModelEMA(model, 0.5)
    with torch.no_grad():  # a teacher that is sure every image is class 1
        teacher.module.cls_head.fc.bias.copy_(torch.tensor([-50.0, 50.0]))
    lab = PseudoLabeler(2, 0.7)
    terms = train_step(model, make_batch(b=2, size=32), opt, cfg, "cpu", teacher=teacher.module,
                       labeler=lab)
    assert terms["accept_rate"] == 1.0 and terms["pl_accept_c1"] == 1.0
    assert terms["pl_argmax_c0"] == 0.0


def test_config_keys_default_to_the_paper_and_are_checked():
    o = load_config(None).objective  # the dataclass defaults: the paper's behaviour
    assert (o.pl_threshold, o.dist_align, o.ema_decay, o.decision) == \
        ("fixed", "none", 0.0, "argmax")
    assert o.ema_warmup is True
    o = load_config("paper").objective  # the presets: only the measured gains (docs/RESULTS.md)
    assert (o.pl_threshold, o.dist_align, o.ema_decay, o.decision) == \
        ("fixed", "none", 0.0, "balanced_accuracy")
    assert load_config("paper").run.checkpoint_metric == "val_score_balanced"
    assert load_config(None).data.cls_sampling == "uniform"  # the paper's labeled batches
    for preset in ("paper", "cpu-small"):  # the presets: class-balanced (docs/RESULTS.md)
        assert load_config(preset).data.cls_sampling == "balanced"
    for bad in ("objective.ema_decay=1.0", "objective.ssl_momentum=-0.1",
                "objective.pl_threshold=softmatch"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("cpu-small", [bad])
    with pytest.raises(ConfigError, match="objective.decision"):
        load_config("cpu-small", ["objective.decision=youden", "model.num_classes=3"])


def test_checkpoint_keeps_ema_student_labeler_and_threshold(tmp_path):
    from multimix import checkpoint

    cfg = load_config("cpu-small", ["objective.ema_decay=0.5", "objective.decision=youden"])
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, 0.5)
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    lab = PseudoLabeler(2, 0.7, mode="freematch", momentum=0.5)
    lab(_logits([[0.9, 0.1], [0.2, 0.8]]))
    state = checkpoint.build_state(model=model, optimizer=None, scheduler=None, epoch=1,
                                   config=cfg, splits={}, classes=["a", "b"], history=[],
                                   ema=ema, labeler=lab, threshold=0.6)
    checkpoint.save(state, str(tmp_path / checkpoint.FILENAME))
    back = checkpoint.load_bytes((tmp_path / checkpoint.FILENAME).read_bytes())  # weights_only
    torch.testing.assert_close(back["model"]["weight"], ema.module.weight)  # evaluated: EMA
    torch.testing.assert_close(back["student"]["weight"], model.weight)
    assert back["ema_decay"] == 0.5 and checkpoint.decision_threshold(back) == 0.6
    assert back["ema_updates"] == 1  # a resumed run continues the warm-up from here
    again = PseudoLabeler(2, 0.7, mode="freematch", momentum=0.5)
    again.load_state_dict(back["labeler"])
    torch.testing.assert_close(again.thresholds(), lab.thresholds())
    plain = checkpoint.build_state(model=model, optimizer=None, scheduler=None, epoch=1,
                                   config=load_config("cpu-small", ["objective.decision=argmax"]),
                                   splits={}, classes=[],
                                   history=[], threshold=0.6)
    assert "student" not in plain and checkpoint.decision_threshold(plain) is None

"""EMA teacher: an exponential moving average of the model's weights (pure torch, no Ray).

Mean Teacher (Tarvainen & Valpola, NeurIPS 2017, Eq. 1): after every optimizer step
``θ'_t = d · θ'_{t−1} + (1 − d) · θ_t`` for every floating parameter and floating buffer (BatchNorm
running statistics too, as timm's ``ModelEmaV2`` does); integer buffers (``num_batches_tracked``)
are copied. FixMatch (Sohn et al., NeurIPS 2020, §4) evaluates such an average; here it also makes
the pseudo-labels (``objective.ema_decay > 0``) and is the model that validation scores and that
``evaluate`` / ``predict`` load (the checkpoint keeps both: ``model`` = the EMA weights,
``student`` = the trained weights, ``ema_decay``).

Warm-up (``warmup=True``, ``objective.ema_warmup``, the default): the decay of update ``t``
(0-based) is ``min(d, 1 − 1/(t + 1))``, as in Mean Teacher's code (Tarvainen & Valpola,
``update_ema_variables``): the first update copies the model, the ``t``-th averages the last
``t + 1`` models equally, and ``d`` applies from update ``1/(1 − d) − 1`` on (99 for 0.99). Without
it, after ``n`` updates the average still holds ``d**n`` of the initial random weights (0.99 over
40 steps: 67 %), so a short schedule validates, pseudo-labels with and saves a model that is
mostly its initialisation.

Typical use::

    ema = ModelEMA(unwrap(model), decay=0.99)
    for batch in batches:
        train_step(model, batch, optimizer, cfg, device, teacher=ema.module)
        ema.update(unwrap(model))
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """A frozen copy of ``model`` (the bare network, not its DDP wrapper) updated as an EMA.

    Args:
        model: the network to average (deep-copied; the copy never gets gradients).
        decay: d in [0, 1); 0 makes the copy follow the model exactly.
        warmup: use ``min(d, 1 − 1/(t + 1))`` at update ``t`` (see the module docstring).

    ``updates`` (the number of updates so far) drives the warm-up; a resumed run restores it
    (the checkpoint's ``ema_updates``).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.module = copy.deepcopy(model)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses."""
        if self.warmup:
            return min(self.decay, 1.0 - 1.0 / (self.updates + 1))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema ← d·ema + (1 − d)·model`` for floating tensors (d: :meth:`current_decay`);
        integer buffers copied."""
        d = self.current_decay()
        src = model.state_dict()
        for name, t in self.module.state_dict().items():
            s = src[name].detach()
            if t.dtype.is_floating_point:
                t.mul_(d).add_(s.to(t.dtype), alpha=1.0 - d)
            else:
                t.copy_(s)
        self.updates += 1

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

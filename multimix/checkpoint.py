"""Checkpoints: one ``checkpoint.pt`` file, loadable with ``torch.load(weights_only=True)``.

Contents (plain containers of tensors, numbers and strings only):

- ``model``: ``state_dict`` of the unwrapped model (no ``module.`` prefix from DDP)
- ``optimizer``, ``scheduler``: their ``state_dict``
- ``epoch``: the last *finished* epoch (0-based); training resumes at ``epoch + 1``
- ``rng``: torch / numpy / python RNG states, so a resumed run draws the same numbers
- ``config``: ``Config.to_dict()`` (secrets never included)
- ``splits``: ``{"cls": {"labeled": [...], "val": [...], ...}, "seg": {...}}`` id lists
- ``classes``: class names of the classification head (index = label)
- ``history``: list of per-epoch metric dicts, so a resumed run's history has no gap

Issue #20 additions (absent in older checkpoints, which load as before):

- ``student``: with an EMA teacher (``objective.ema_decay > 0``), the trained weights; ``model``
  then holds the EMA weights (the model validated, evaluated and predicted with); ``ema_decay``
- ``labeler``: the running statistics of :class:`multimix.objective.PseudoLabeler`
- ``threshold``: the decision threshold on p(class 1) chosen on the validation split at this
  epoch (None for more than two classes), and ``decision`` (``objective.decision``): evaluate and
  predict use the threshold when ``decision`` is not ``"argmax"``

A checkpoint reference may be the file, a directory holding it (a Ray checkpoint directory), or a
run directory (``<storage>/<name>``: its ``best`` checkpoint is used unless ``which="last"``);
local or ``s3://``.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any

import numpy as np
import torch

from multimix.config import Config, load_config, without_removed_keys
from multimix.errors import UserError
from multimix.model import unwrap

FILENAME = "checkpoint.pt"
FORMAT = "multimix-checkpoint/1"


def rng_state() -> dict:
    """RNG states as weights_only-safe containers."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def build_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    epoch: int,
    config: Config,
    splits: dict,
    classes: list[str],
    history: list[dict],
    ema=None,
    labeler=None,
    threshold: float | None = None,
) -> dict:
    """The checkpoint dict (see the module docstring); ``ema`` is a
    :class:`multimix.ema.ModelEMA` or None, ``labeler`` a
    :class:`multimix.objective.PseudoLabeler` or None."""
    extra: dict = {"threshold": None if threshold is None else float(threshold),
                   "decision": config.objective.decision}
    if ema is not None:
        extra.update(student=unwrap(model).state_dict(), ema_decay=float(ema.decay))
    if labeler is not None:
        extra["labeler"] = labeler.state_dict()
    return {
        "format": FORMAT,
        "model": ema.state_dict() if ema is not None else unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": int(epoch),
        "rng": rng_state(),
        "config": config.to_dict(include_secrets=False),
        "splits": splits,
        "classes": list(classes),
        "history": history,
        **extra,
    }


def decision_threshold(state: dict) -> float | None:
    """The threshold on p(class 1) that evaluate / predict decide with: the stored one when the
    checkpoint's ``decision`` is not ``"argmax"``, else None (argmax)."""
    if state.get("decision", "argmax") == "argmax" or state.get("threshold") is None:
        return None
    return float(state["threshold"])


def save(state: dict, path: str) -> None:
    """Write ``state`` to a local file atomically enough for our use (write then rename)."""
    import os

    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_bytes(data: bytes) -> dict:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError("not a MultiMix checkpoint (missing format marker)")
    return state


def resolve_checkpoint(ref: str, storage_cfg=None, which: str = "best") -> str:
    """Turn a checkpoint reference (file, checkpoint dir, run dir; local or s3://) into the URI
    of a ``checkpoint.pt`` file."""
    from multimix.data import storage

    fs, path = storage.resolve(ref, storage_cfg)
    import pyarrow.fs as pafs

    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return ref
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"checkpoint {ref!r} does not exist")
    direct = fs.get_file_info(f"{path}/{FILENAME}")
    if direct.type == pafs.FileType.File:
        return storage.join(ref, FILENAME)
    pointer = fs.get_file_info(f"{path}/{which}.json")
    if pointer.type == pafs.FileType.File:
        meta = json.loads(storage.read_bytes(storage.join(ref, f"{which}.json"), storage_cfg))
        return storage.join(ref, meta["checkpoint"], FILENAME)
    raise UserError(
        f"{ref!r} holds no {FILENAME} and no {which}.json: give a checkpoint file, a checkpoint "
        "directory or a run directory written by `multimix train`"
    )


def load(ref: str, storage_cfg=None, which: str = "best") -> dict:
    """Load a checkpoint state dict from a reference (see module docstring)."""
    from multimix.data import storage

    uri = resolve_checkpoint(ref, storage_cfg, which)
    try:
        return load_bytes(storage.read_bytes(uri, storage_cfg))
    except UserError as exc:
        raise UserError(f"{uri}: {exc}") from None
    except Exception as exc:  # torch's unpickler errors are many kinds
        raise UserError(f"{uri}: cannot load checkpoint: {exc}") from None


def load_model(ref: str, storage_cfg=None, which: str = "best", device: str = "cpu"):
    """Rebuild the model of a checkpoint in eval mode.

    Returns ``(model, config, state)``; ``config`` is the training :class:`Config`.
    """
    from multimix.model import create_model

    state = load(ref, storage_cfg, which)
    cfg = load_config(without_removed_keys(state["config"]))  # older checkpoints: data.reader
    model = create_model(cfg.model)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, cfg, state

"""Checkpoints: one ``checkpoint.pt`` file, loadable with ``torch.load(weights_only=True)``.

Contents (plain containers of tensors, numbers and strings only):

- ``model``: ``state_dict`` of the unwrapped model (no ``module.`` prefix from DDP)
- ``optimizer``, ``scheduler``: their ``state_dict``
- ``epoch``: the last *finished* epoch (0-based); training resumes at ``epoch + 1``
- ``rng``: torch / numpy / python RNG states, so a resumed run draws the same numbers
- ``config``: ``Config.to_dict()`` (secrets never included)
- ``splits``: ``{"cls": record, "seg": record}``: the split file beside the data and the
  sha256 of its ids (:func:`multimix.data.splits.split_record`; older checkpoints hold
  the id lists themselves, which :func:`multimix.data.splits.recorded_split`
  also reads)
- ``classes``: class names of the classification head (index = label)
- ``history``: list of per-epoch metric dicts, so a resumed run's history has no gap

Added for the stable-SSL levers (absent in older checkpoints, which load as before):

- ``student``: with an EMA teacher (``objective.ema_decay > 0``), the trained weights; ``model``
  then holds the EMA weights (the model validated, evaluated and predicted with); ``ema_decay``
  and ``ema_updates`` (the EMA's update count: a resumed run continues its warm-up)
- ``labeler``: the running statistics of :class:`multimix.objective.PseudoLabeler`
- ``threshold``: the decision threshold on p(class 1) chosen on the validation split at this
  epoch (None for more than two classes), and ``decision`` (``objective.decision``): evaluate and
  predict use the threshold when ``decision`` is not ``"argmax"``

Integrity: :func:`save` records ``state_sha256``, one sha256 per part of the checkpoint
(``{"model": hex, "optimizer": hex, "student": hex, "labeler": hex, ...}``: every tensor's
name, dtype, shape and bytes, and every other value, of every top-level key), and
``weights_sha256`` (the ``model`` and ``student`` tensors, as older versions recorded it), and
writes the file atomically (a temporary name renamed over the target: a full disk or a killed
process never leaves a truncated ``checkpoint.pt``). :func:`load_bytes` recomputes them: flipped
bits anywhere are a :class:`DataError` ``<file>: checksum mismatch (weights corrupted)`` (or
``(optimizer corrupted)``, ... naming the damaged parts); empty, truncated or foreign files are
one-line ``DataError`` messages naming the file too. Checkpoints written before
(``weights_sha256`` only, or no checksum) load as before, checked as far as they record.

A checkpoint reference may be the file, a directory holding it (a Ray checkpoint directory), or a
run directory (``<storage>/<name>``: its ``best`` checkpoint is used unless ``which="last"``);
local or ``s3://``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Any

import numpy as np
import torch

from multimix.config import Config, load_config, without_removed_keys
from multimix.data import storage
from multimix.errors import DataError
from multimix.model import create_model, unwrap

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
        extra.update(student=unwrap(model).state_dict(), ema_decay=float(ema.decay),
                     ema_updates=int(ema.updates))
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


#: the parts of a checkpoint that :func:`weights_digest` covers
CHECKSUM_KEYS = ("model", "student")


def weights_digest(state: dict) -> str:
    """sha256 (hex) of the weights in ``state``: for ``model`` and ``student`` (when present),
    every tensor's name, dtype, shape and raw bytes, in sorted name order. Independent of how
    the file is serialised, so it checks what is loaded, not the container."""
    h = hashlib.sha256()
    for key in CHECKSUM_KEYS:
        sd = state.get(key)
        if sd is None:
            continue
        h.update(f"{key}\0".encode())
        for name in sorted(sd):
            t = sd[name]
            if not isinstance(t, torch.Tensor):
                h.update(f"{name}\0{t!r}\0".encode())
                continue
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            if t.numel():
                h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


#: the keys of a saved checkpoint that hold its checksums (not covered by them)
DIGEST_KEYS = ("weights_sha256", "state_sha256")


def _hash_value(h, v) -> None:
    """Feed ``v`` (nested dicts / lists / tuples of tensors, numbers, strings, None) into
    ``h``: structure, names and tensor bytes. Lists and tuples hash alike, so the digest does
    not depend on how the container round-trips through ``torch.save``/``torch.load``."""
    if isinstance(v, torch.Tensor):
        t = v.detach().to("cpu").contiguous()
        h.update(f"T\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(v, dict):
        h.update(f"D{len(v)}\0".encode())
        for k, x in v.items():
            h.update(f"{k!r}\0".encode())
            _hash_value(h, x)
    elif isinstance(v, (list, tuple)):
        h.update(f"L{len(v)}\0".encode())
        for x in v:
            _hash_value(h, x)
    else:
        h.update(f"V{v!r}\0".encode())


def state_digests(state: dict) -> dict:
    """``{key: sha256 hex}`` for every top-level key of ``state`` but the checksums
    themselves: model, student (EMA runs), optimizer, scheduler, labeler, RNG states, history,
    config, ... — every tensor in the file."""
    out = {}
    for key, v in state.items():
        if key in DIGEST_KEYS:
            continue
        h = hashlib.sha256()
        _hash_value(h, v)
        out[str(key)] = h.hexdigest()
    return out


def save(state: dict, path: str, storage_cfg=None) -> None:
    """Write ``state`` with its checksums (``weights_sha256``, ``state_sha256``) to ``path``
    (local or ``s3://``) atomically: serialised in memory, written to a temporary name,
    renamed over ``path`` (one whole upload on S3). A failure (disk full:
    :class:`StorageError` ``<path>: no space left on device``) leaves the file that was at
    ``path`` as it was."""
    body = {k: v for k, v in state.items() if k not in DIGEST_KEYS}
    buf = io.BytesIO()
    torch.save({**body, "weights_sha256": weights_digest(body),
                "state_sha256": state_digests(body)}, buf)
    storage.write_bytes(path, buf.getbuffer(), storage_cfg)


def damaged_parts(state: dict) -> list:
    """The parts of a loaded checkpoint whose recorded checksum does not match (``"weights"``
    for the model / student tensors, else the key), [] when intact or unrecorded."""
    bad = []
    recorded = state.get("weights_sha256")
    if recorded is not None and recorded != weights_digest(state):
        bad.append("weights")
    parts = state.get("state_sha256")
    if isinstance(parts, dict):
        now = state_digests(state)
        for key in sorted(set(parts) | set(now)):
            if parts.get(key) != now.get(key):
                name = "weights" if key in CHECKSUM_KEYS else key
                if name not in bad:
                    bad.append(name)
    elif parts is not None:
        bad.append("state_sha256")
    return bad


def load_bytes(data: bytes, name: str | None = None) -> dict:
    """Deserialise and check a checkpoint file's bytes (``weights_only``: no code runs).

    Args:
        name: how errors name the file (its URI).

    Raises:
        DataError: empty, truncated, foreign or corrupted file (``<name>: <reason>``).
    """
    where = f"{name}: " if name else ""
    if len(data) == 0:
        raise DataError(f"{where}empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch's unpickler errors are many kinds
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        if bytes(data[:4]) == b"PK\x03\x04":  # a zip archive: torch.save's format
            raise DataError(f"{where}truncated or damaged checkpoint file ({first})") from None
        raise DataError(f"{where}not a checkpoint file (torch.load: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise DataError(f"{where}not a MultiMix checkpoint (missing format marker)")
    bad = damaged_parts(state)
    if bad:
        raise DataError(f"{where}checksum mismatch ({', '.join(bad)} corrupted)")
    return state


def resolve_checkpoint(ref: str, storage_cfg=None, which: str = "best") -> str:
    """Turn a checkpoint reference (file, checkpoint dir, run dir; local or s3://) into the URI
    of a ``checkpoint.pt`` file.

    Raises:
        DataError: nothing there, no checkpoint in the folder, a broken ``best``/``last.json``.
        StorageError: S3 trouble (access denied, missing bucket, unreachable endpoint).
    """
    import pyarrow.fs as pafs

    fs, path = storage.resolve(ref, storage_cfg)

    def kind(p: str):
        with storage.storage_errors(ref, storage_cfg):
            return fs.get_file_info(p).type

    info = kind(path)
    if info == pafs.FileType.File:
        return ref
    if info == pafs.FileType.NotFound:
        if storage.is_s3(ref):
            storage.check_bucket(ref, storage_cfg)
        raise DataError(f"{ref}: no such checkpoint (give a checkpoint file, a checkpoint "
                        "directory or a run directory)")
    if kind(f"{path}/{FILENAME}") == pafs.FileType.File:
        return storage.join(ref, FILENAME)
    pointer = storage.join(ref, f"{which}.json")
    if kind(f"{path}/{which}.json") == pafs.FileType.File:
        try:
            meta = json.loads(storage.read_bytes(pointer, storage_cfg))
            target = storage.join(ref, meta["checkpoint"], FILENAME)
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{pointer}: damaged (expected JSON with a \"checkpoint\" "
                            "name)") from None
        if kind(storage.resolve(target, storage_cfg)[1]) != pafs.FileType.File:
            raise DataError(f"{pointer} names {meta['checkpoint']}, but {target} does not "
                            "exist")
        return target
    raise DataError(
        f"{ref!r} holds no {FILENAME} and no {which}.json: give a checkpoint file, a checkpoint "
        "directory or a run directory written by `multimix train`"
    )


def load(ref: str, storage_cfg=None, which: str = "best") -> dict:
    """Load and check a checkpoint state dict from a reference (see the module docstring).

    Raises:
        DataError: missing, empty, truncated, foreign or corrupted (checksum) checkpoint; the
            message names the file.
        StorageError: S3 trouble while resolving or reading it.
    """
    uri = resolve_checkpoint(ref, storage_cfg, which)
    return load_bytes(storage.read_bytes(uri, storage_cfg), name=uri)


def load_model(ref: str, storage_cfg=None, which: str = "best", device: str = "cpu"):
    """Rebuild the model of a checkpoint in eval mode.

    Returns ``(model, config, state)``; ``config`` is the training :class:`Config`.
    """
    state = load(ref, storage_cfg, which)
    cfg = load_config(without_removed_keys(state["config"]))  # older checkpoints: data.reader
    model = create_model(cfg.model)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, cfg, state


def check_resume(run_dir: str, storage_cfg=None) -> str | None:
    """Before a rerun starts Ray: the checkpoint it would resume from (the one ``last.json``
    of the run directory names), loaded and checked, so that a damaged one (flipped bytes in
    the weights, the optimizer, the EMA teacher or the labeler state; truncated; empty) ends
    the run with one line naming the file instead of failing inside a Train worker. Returns
    its URI, or None for a new run (no ``last.json``).

    Raises:
        DataError: the checkpoint (or ``last.json``) is damaged or missing.
    """
    if not storage.exists(storage.join(run_dir, "last.json"), storage_cfg):
        return None
    uri = resolve_checkpoint(run_dir, storage_cfg, which="last")
    load_bytes(storage.read_bytes(uri, storage_cfg), name=uri)
    return uri

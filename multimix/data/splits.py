"""Seeded, stratified label-budget splits (DESIGN.md §2) and ``multimix split``.

A split assigns every id of a prepared dataset to exactly one of ``val`` (labeled validation),
``labeled`` (the training label budget) and ``unlabeled`` (the rest). It is a pure function of
the *sorted* ids, labels, hashes and the seed, so it is identical on any machine and for any file
listing order; it is stored beside the data as ``splits/L{n}-V{val}-S{seed}.json`` and reused.

Rules:

- Stratified by label (segmentation: one stratum). Validation is taken first,
  ``round(val_fraction · n_c)`` images per class (at least 1 when the class has ≥ 2 images and
  ``val_fraction > 0``); then the label budget from the rest, allocated to classes in proportion
  to their remaining sizes (largest remainder, at least one per class when the budget allows).
- Byte-identical duplicates (same ``hash``) are a unit: always in the same part.
- A budget larger than the pool left after validation is a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from multimix.config import (Budget, ConfigError, StorageConfig, add_config_arguments,
                             load_config)
from multimix.data import storage
from multimix.data.dataset import read_manifest, read_table
from multimix.errors import DataError, UserError

__all__ = ["Split", "make_split", "split_name", "ensure_split", "store_split", "split_record",
           "recorded_split", "add_arguments", "run"]

SPLIT_FORMAT = "multimix-split/1"
#: the columns a split is made from (not the image bytes)
SPLIT_COLUMNS = ["id", "label", "hash"]


@dataclass
class Split:
    """Id lists (sorted) of the three parts, and how they were made."""

    labeled: list[str]
    val: list[str]
    unlabeled: list[str]
    seed: int
    n_labeled: Budget
    val_fraction: float
    #: sha256 of the dataset's sorted ids (detects a split file left over from another dataset)
    fingerprint: str = ""
    #: per-part counts by class name (cls) or {"all": n} (seg), for humans
    counts: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return split_name(self.n_labeled, self.val_fraction, self.seed)

    def to_dict(self) -> dict:
        return {"format": SPLIT_FORMAT, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Split":
        if d.get("format") != SPLIT_FORMAT:
            raise DataError(f"not a split file (format {d.get('format')!r}, "
                            f"expected {SPLIT_FORMAT!r})")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> "Split":
        try:
            return cls.from_dict(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise DataError(f"not a valid split file ({exc})") from None


def ids_sha256(split: "Split") -> str:
    """sha256 of the three id lists (what a checkpoint records instead of the ids)."""
    h = hashlib.sha256()
    for part in ("labeled", "val", "unlabeled"):
        h.update(f"[{part}]\n".encode("utf-8"))
        for i in getattr(split, part):
            h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def split_record(split: "Split") -> dict:
    """What a checkpoint stores of a split: the file beside the data (relative to the dataset),
    the sha256 of its ids and the part sizes — not the ids, which at 10⁵–10⁶ unlabeled rows
    would be copied into every checkpoint."""
    return {"file": f"splits/{split.name}.json", "ids_sha256": ids_sha256(split),
            "counts": {p: len(getattr(split, p)) for p in ("labeled", "val", "unlabeled")}}


def recorded_split(dataset_uri: str, record: dict,
                   storage_cfg: Optional[StorageConfig] = None) -> "Split":
    """The split a checkpoint recorded (:func:`split_record`), read from ``dataset_uri`` and
    checked against the recorded sha256. A record holding the id lists (checkpoints written
    before) is returned as is.

    Raises:
        DataError: the split file is gone (the dataset was prepared again) or its ids changed.
    """
    if "file" not in record:  # an older checkpoint: the ids themselves
        return Split(labeled=list(record.get("labeled", [])), val=list(record.get("val", [])),
                     unlabeled=list(record.get("unlabeled", [])), seed=-1, n_labeled="all",
                     val_fraction=0.0)
    uri = storage.join(dataset_uri, record["file"])
    if not storage.exists(uri, storage_cfg):
        raise DataError(f"{uri}: the split this checkpoint was trained with is gone (the dataset "
                        "was prepared again?); evaluate with --subset all")
    try:
        split = Split.from_json(storage.read_text(uri, storage_cfg))
    except DataError as exc:
        raise DataError(f"{uri}: {exc}") from None
    if ids_sha256(split) != record["ids_sha256"]:
        raise DataError(f"{uri}: its ids differ from the split this checkpoint was trained with "
                        "(sha256 mismatch); evaluate with --subset all")
    return split


def split_name(n_labeled: Budget, val_fraction: float, seed: int) -> str:
    """``L100-V0.1-S0`` (file stem under ``splits/``)."""
    return f"L{n_labeled}-V{val_fraction:g}-S{seed}"


def fingerprint(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in sorted(ids):
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def _largest_remainder(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over strata proportionally to ``sizes`` (≥ 1 each when total allows),
    never exceeding a stratum's size."""
    k = len(sizes)
    pool = sum(sizes)
    if total >= pool:
        return list(sizes)
    quota = [total * s / pool for s in sizes]
    alloc = [min(s, math.floor(q)) for s, q in zip(sizes, quota)]
    if total >= k:  # every class represented
        alloc = [max(a, 1 if s > 0 else 0) for a, s in zip(alloc, sizes)]
    order = sorted(range(k), key=lambda i: (-(quota[i] - math.floor(quota[i])), i))
    while sum(alloc) < total:
        for i in order:
            if sum(alloc) < total and alloc[i] < sizes[i]:
                alloc[i] += 1
    while sum(alloc) > total:  # the ≥ 1 rule overshot: take from the largest
        i = max(range(k), key=lambda j: (alloc[j], -j))
        alloc[i] -= 1
    return alloc


def _take(units: list[list[str]], target: int) -> tuple[list[list[str]], list[list[str]]]:
    """Take units (in the given order) until ``target`` images; groups that would overshoot are
    passed over for later smaller units. Returns (taken, rest)."""
    taken, rest, n = [], [], 0
    for u in units:
        if n < target and n + len(u) <= target:
            taken.append(u)
            n += len(u)
        else:
            rest.append(u)
    return taken, rest


def make_split(ids: Sequence[str], labels: Optional[Sequence[Optional[int]]],
               hashes: Optional[Sequence[str]], n_labeled: Union[int, str], val_fraction: float,
               seed: int, *, budget_key: str = "data.cls_labeled",
               class_names: Optional[Sequence[str]] = None) -> Split:
    """Split a dataset's ids into val / labeled / unlabeled (see the module doc).

    Args:
        ids: unique row ids (any order).
        labels: class index per id, or None (segmentation: unstratified).
        hashes: sha256 per id, or None (no duplicate grouping).
        n_labeled: the label budget (images), or ``"all"``.
        val_fraction: in [0, 1).
        seed: the only source of randomness (``numpy.random.default_rng(seed)``).
        budget_key: config key named when the budget is too large.
        class_names: for the human-readable counts only.

    Raises:
        ConfigError: budget < 1 or larger than the pool left after validation.
    """
    ids = list(ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise DataError("make_split: ids are not unique")
    if labels is not None and len(labels) != n or hashes is not None and len(hashes) != n:
        raise ValueError("make_split: ids, labels and hashes must have the same length")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {val_fraction!r}")
    if n_labeled != "all" and (isinstance(n_labeled, bool)
                               or not isinstance(n_labeled, (int, np.integer))
                               or n_labeled < 1):
        raise ConfigError(f"{budget_key}: must be a positive number or 'all', got {n_labeled!r}")

    order = sorted(range(n), key=lambda i: ids[i])
    label_of = {ids[i]: (labels[i] if labels is not None else 0) for i in range(n)}
    # units: duplicate groups (by hash) or single ids, each sorted, listed by first id
    groups: dict[str, list[str]] = defaultdict(list)
    for i in order:
        groups[hashes[i] if hashes is not None else f"\0{ids[i]}"].append(ids[i])
    units = sorted(groups.values(), key=lambda u: u[0])
    # a unit's stratum: its members' most common label (ties → smaller label)
    strata: dict[int, list[list[str]]] = defaultdict(list)
    for u in units:
        labs = [label_of[i] for i in u]
        strata[min(set(labs), key=lambda c: (-labs.count(c), c))].append(u)

    rng = np.random.default_rng(seed)
    classes = sorted(strata)
    shuffled = {}
    for c in classes:  # fixed consumption order of the generator
        perm = rng.permutation(len(strata[c]))
        shuffled[c] = [strata[c][j] for j in perm]

    val, rest = {}, {}
    for c in classes:
        size = sum(len(u) for u in shuffled[c])
        k = int(round(val_fraction * size))
        if val_fraction > 0 and size >= 2:
            k = max(k, 1)
        val[c], rest[c] = _take(shuffled[c], k)
    pool = sum(len(u) for c in classes for u in rest[c])
    n_val = n - pool
    if n_labeled == "all":
        labeled = {c: rest[c] for c in classes}
        unl = {c: [] for c in classes}
    else:
        if n_labeled > pool:
            raise ConfigError(
                f"{budget_key}: asked for {n_labeled} labeled images but the pool holds only "
                f"{pool} ({n} images minus {n_val} held out for validation at "
                f"val_fraction={val_fraction:g}); use a smaller budget or 'all'")
        sizes = [sum(len(u) for u in rest[c]) for c in classes]
        alloc = _largest_remainder(n_labeled, sizes)
        labeled, unl = {}, {}
        for c, a in zip(classes, alloc):
            labeled[c], unl[c] = _take(rest[c], a)
        short = n_labeled - sum(len(u) for c in classes for u in labeled[c])
        if short > 0:  # duplicate groups got in the way: fill with any units that fit
            for c in classes:
                more, unl[c] = _take(unl[c], short)
                labeled[c] += more
                short -= sum(len(u) for u in more)

    def flat(parts: dict) -> list[str]:
        return sorted(i for c in classes for u in parts[c] for i in u)

    def counts(parts: dict) -> dict:
        if labels is None:
            return {"all": sum(len(u) for c in classes for u in parts[c])}
        out = {}
        for c in classes:
            name = class_names[c] if class_names and c < len(class_names) else str(c)
            out[name] = sum(len(u) for u in parts[c])
        return out

    return Split(labeled=flat(labeled), val=flat(val), unlabeled=flat(unl), seed=int(seed),
                 n_labeled=n_labeled, val_fraction=float(val_fraction), fingerprint=fingerprint(ids),
                 counts={"labeled": counts(labeled), "val": counts(val),
                         "unlabeled": counts(unl)})


def ensure_split(dataset_uri: str, n_labeled: Union[int, str], val_fraction: float, seed: int,
                 storage_cfg: Optional[StorageConfig] = None,
                 budget_key: str = "data.cls_labeled", write: bool = True, *,
                 manifest: Optional[dict] = None, table=None) -> Split:
    """The split ``splits/L{n}-V{val}-S{seed}.json`` of a prepared dataset: read it when it exists
    (and belongs to this dataset's ids), otherwise make and write it (``write=False``: only make
    it, e.g. to check inputs before a run).

    Reads only the ``id``, ``label`` and ``hash`` columns (``table``: those columns, already
    read, e.g. by ``multimix.preflight.Reads`` for every budget of a search; ``manifest``: the
    dataset's, already read). Labels are used for cls datasets only.

    Raises:
        DataError: not a prepared dataset. ConfigError: budget too large (names ``budget_key``).
    """
    if manifest is None:
        manifest = read_manifest(dataset_uri, storage_cfg)
    if manifest.get("task") == "unlabeled":
        raise DataError(f"{dataset_uri} is an unlabeled dataset (prepare --layout images): it has "
                        "no labels to split; use it as an unlabeled pool")
    uri = split_uri(dataset_uri, split_name(n_labeled, val_fraction, seed))
    if table is None:
        table = read_table(dataset_uri, SPLIT_COLUMNS, storage_cfg, manifest=manifest)
    ids = table.column("id").to_pylist()
    if storage.exists(uri, storage_cfg):
        try:
            existing = Split.from_json(storage.read_text(uri, storage_cfg))
        except DataError as exc:
            raise DataError(f"{uri}: {exc}") from None
        if existing.fingerprint == fingerprint(ids):
            return existing
        # the dataset was prepared again with other rows: the old split is stale
    labels = table.column("label").to_pylist() if manifest.get("task") == "cls" else None
    split = make_split(ids, labels, table.column("hash").to_pylist(), n_labeled, val_fraction,
                       seed, budget_key=budget_key, class_names=manifest.get("classes"))
    if write:
        storage.write_text(uri, split.to_json(), storage_cfg)
    return split


def split_uri(dataset_uri: str, name: str) -> str:
    """Where the split ``name`` (``L{n}-V{val}-S{seed}``) of a dataset is stored."""
    return storage.join(dataset_uri, "splits", f"{name}.json")


def store_split(dataset_uri: str, split: Split,
                storage_cfg: Optional[StorageConfig] = None) -> None:
    """Write ``split`` (made by ``ensure_split(..., write=False)``) beside the data, unless the
    file there already holds the same ids: the run's checks made the split once, so this reads
    no shard again (nothing is written into a dataset before the checks passed)."""
    uri = split_uri(dataset_uri, split.name)
    if storage.exists(uri, storage_cfg):
        try:
            if ids_sha256(Split.from_json(storage.read_text(uri, storage_cfg))) == \
                    ids_sha256(split):
                return
        except DataError:
            pass  # unreadable: replaced below
    storage.write_text(uri, split.to_json(), storage_cfg)


# ---------------------------------------------------------------------------------------------
# CLI


def _budget(text: str) -> Union[int, str]:
    if text == "all":
        return "all"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA_URI", help="prepared dataset (folder or s3://…)")
    p.add_argument("--labeled", type=_budget, required=True, metavar="N|all",
                   help="label budget in images, or 'all'")
    p.add_argument("--val", type=float, default=0.1, help="validation fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    add_config_arguments(p, what="storage settings")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if not 0.0 <= args.val < 1.0:
        raise UserError(f"--val must be in [0, 1), got {args.val}")
    manifest = read_manifest(args.data, cfg.storage)
    key = "data.seg_labeled" if manifest.get("task") == "seg" else "data.cls_labeled"
    split = ensure_split(args.data, args.labeled, args.val, args.seed, cfg.storage, key)
    path = split_uri(args.data, split.name)

    def fmt(part: str) -> str:
        c = split.counts.get(part, {})
        total = sum(c.values())
        detail = "" if list(c) == ["all"] else " (" + ", ".join(f"{k} {v}" for k, v in
                                                                 c.items()) + ")"
        return f"{part} {total}{detail}"

    print(f"{path}: " + "; ".join(fmt(p) for p in ("labeled", "val", "unlabeled")))
    return 0

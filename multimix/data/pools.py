"""The labeled pools (no Ray): the small training pools decoded once and held in memory
(sampled by the Train workers), the validation / evaluation pools streamed from their shards
(scored by :func:`multimix.validate.validate`: their memory does not grow with them).

- :class:`LabeledPool`: decoded labeled rows (images + labels, or images + masks + ignore);
- :func:`load_labeled_pool`: read chosen rows of a prepared dataset with pyarrow and decode them;
- :class:`StreamedPool`: chosen rows of a prepared dataset, read and decoded one chunk at a time
  whenever they are scored (holds ids and row positions only);
- :func:`eval_batches`: a pool's evaluation batches (decode only, no augmentation), split across
  ranks by stride;
- :func:`decoded_mb`: the decoded size of a pool, checked before a labeled pool is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from multimix.data import storage
from multimix.data.decode import binary_cells, decode_rows, to_tensor
from multimix.data.dataset import open_dataset
from multimix.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["LabeledPool", "StreamedPool", "decoded_mb", "eval_batches", "load_labeled_pool"]


@dataclass
class LabeledPool:
    """Decoded labeled rows: ``images`` ``uint8 (N, H, W)``; ``labels`` ``int64 (N,)`` (cls) or
    ``masks``/``ignore`` ``uint8 (N, H, W)`` in {0, 1} (seg). ``skipped``: undecodable rows;
    ``skipped_examples``: ``[(id, reason), ...]`` of the first few."""

    ids: list
    images: np.ndarray
    labels: Optional[np.ndarray] = None
    masks: Optional[np.ndarray] = None
    ignore: Optional[np.ndarray] = None
    skipped: int = 0
    skipped_examples: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def load_labeled_pool(uri: str, ids: Sequence[str], cfg) -> LabeledPool:
    """Read and decode the rows ``ids`` of a prepared dataset (pyarrow only; no Ray tasks), in
    the order of ``ids``, at ``cfg.data.image_size`` (storage settings from ``cfg.storage``).

    Undecodable rows are skipped, counted in ``skipped`` and logged.

    Raises:
        DataError: no row could be loaded, or an id is missing from the dataset.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    size = cfg.data.image_size
    data = open_dataset(uri, cfg.storage)  # shards checked against the manifest
    fs, paths, manifest = data.fs, data.paths, data.manifest
    seg = manifest.get("task") == "seg"
    cols = ["id", "image"] + (["mask", "ignore"] if seg else ["label"])
    ids = list(ids)
    with storage.storage_errors(uri, cfg.storage):
        try:
            table = pq.ParquetDataset(
                paths, filesystem=fs, filters=pc.field("id").isin(pa.array(ids, pa.string()))
            ).read(columns=cols)
        except pa.ArrowInvalid as exc:
            raise DataError(f"cannot read the Parquet shards of {uri}: {exc}") from None
    order = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in order]
    if missing:
        raise DataError(f"{uri}: {len(missing)} id(s) not in the dataset, e.g. {missing[:3]}")
    table = table.take(pa.array([order[i] for i in ids], pa.int64()))
    batch = {c: table.column(c).to_pylist() for c in cols}
    good, arrays, skipped = decode_rows(batch, size, ("image", "mask", "ignore") if seg
                                        else ("image",))
    if skipped:  # counted in ``skipped``: the callers report it (train, evaluate)
        logger.info("multimix: skipped %d undecodable labeled row(s) of %s, e.g. %s",
                    len(skipped), uri, skipped[:3])
    if not good:
        raise DataError(f"{uri}: none of the {len(ids)} labeled rows could be decoded")
    labels = None
    if not seg:
        pos = {v: i for i, v in enumerate(batch["id"])}
        labels = np.asarray([batch["label"][pos[i]] for i in good], dtype=np.int64)
    return LabeledPool(ids=good, images=arrays["image"], labels=labels,
                       masks=arrays.get("mask") if seg else None,
                       ignore=arrays.get("ignore") if seg else None, skipped=len(skipped),
                       skipped_examples=list(skipped[:5]))


def decoded_mb(rows: int, size: int, seg: bool) -> float:
    """Decoded size of a pool in MB (2²⁰ bytes): ``rows`` × ``size``² × planes (1 for
    classification images; 3 for segmentation: image, mask, ignore map), ``uint8``."""
    return rows * size * size * (3 if seg else 1) / float(1 << 20)


class StreamedPool:
    """Rows ``ids`` of a prepared dataset, scored without holding their images: each
    pass reads this rank's rows with pyarrow one row group at a time (only the row groups that
    hold them), decodes them and yields evaluation batches, so a validation or evaluation set
    costs its ids and row positions in memory, not ``N × size²`` bytes.

    ``ids``: the rows, in storage order (shard, row group, row; the order they are read and
    scored in; undecodable rows found so far are left out); ``task``: ``"cls"`` or ``"seg"``;
    ``skipped`` / ``skipped_examples``: rows found undecodable (by :meth:`scan`, or while
    scored), as :class:`LabeledPool`. Picklable (Ray sends it to every Train worker); each
    process opens the dataset itself (:func:`~multimix.data.dataset.open_dataset`).

    Scoring ``StreamedPool(uri, ids, cfg)`` gives what scoring
    ``load_labeled_pool(uri, pool.ids, cfg)`` gives: the same batches in the same order.

    Raises:
        DataError: an id is missing from the dataset (as :func:`load_labeled_pool`).
    """

    def __init__(self, uri: str, ids: Sequence[str], cfg) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        # absolute: the pool is scored in Train workers, whose working directory differs
        self.uri, self.cfg = storage.absolute_uri(uri), cfg
        data = open_dataset(uri, cfg.storage)
        self.task = "seg" if data.manifest.get("task") == "seg" else "cls"
        want = pa.array([str(i) for i in ids], pa.string())
        found, shard, group, row = [], [], [], []
        with storage.storage_errors(uri, cfg.storage):
            for si, facts in enumerate(data.shards):
                with data.fs.open_input_file(facts.path) as f:
                    col = pq.ParquetFile(f).read(columns=["id"]).column("id")
                pos = np.flatnonzero(pc.is_in(col, value_set=want).to_numpy(
                    zero_copy_only=False))
                if not len(pos):
                    continue
                starts = np.cumsum([0] + list(facts.groups))
                g = np.searchsorted(starts, pos, side="right") - 1
                found += col.take(pa.array(pos)).to_pylist()
                shard.append(np.full(len(pos), si, np.int32))
                group.append(g.astype(np.int32))
                row.append((pos - starts[g]).astype(np.int32))
        if len(found) < len(want):
            have = set(found)
            missing = [i for i in want.to_pylist() if i not in have]
            raise DataError(f"{uri}: {len(missing)} id(s) not in the dataset, e.g. {missing[:3]}")
        self.ids: list = found
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int32))
        self._shard, self._group, self._row = cat(shard), cat(group), cat(row)
        self.skipped = 0
        self.skipped_examples: list = []
        self._bad: set = set()  # found undecodable during a pass; dropped from ids after it

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"StreamedPool({self.uri!r}, {len(self)} {self.task} rows)"

    def _groups(self, sel: np.ndarray) -> Iterator[tuple[list, dict, Optional[np.ndarray]]]:
        """The rows ``sel`` (indices into ``ids``, increasing) decoded, one row group at a time:
        ``(ids, {column: uint8 (n, S, S)}, labels int64 (n,) or None)``; undecodable rows are
        recorded (``skipped``) and left out."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        seg = self.task == "seg"
        pngs = ("image", "mask", "ignore") if seg else ("image",)
        cols = ["id", *pngs] + ([] if seg else ["label"])
        size = self.cfg.data.image_size
        data = open_dataset(self.uri, self.cfg.storage)
        sh, gr, rw = self._shard[sel], self._group[sel], self._row[sel]
        key = sh.astype(np.int64) << 32 | gr
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(sel) else []
        ends = np.r_[starts[1:], len(sel)] if len(sel) else []
        f, cur = None, -1
        try:
            with storage.storage_errors(self.uri, self.cfg.storage):
                for a, b in zip(starts, ends):
                    if sh[a] != cur:
                        if f is not None:
                            f.close()
                        cur = int(sh[a])
                        f = data.fs.open_input_file(data.shards[cur].path)
                        pf = pq.ParquetFile(f)
                    t = pf.read_row_group(int(gr[a]), columns=cols).take(pa.array(rw[a:b]))
                    batch = {"id": t.column("id").to_pylist(),
                             **{c: binary_cells(t.column(c)) for c in pngs}}
                    good, arrays, bad = decode_rows(batch, size, pngs)
                    if bad:
                        self._record(bad)
                    labels = None
                    if not seg:
                        lab = t.column("label").to_numpy(zero_copy_only=False)
                        keep = set(good)
                        labels = np.asarray([v for i, v in zip(batch["id"], lab) if i in keep],
                                            np.int64)
                    yield good, arrays, labels
        finally:
            if f is not None:
                f.close()

    def _record(self, bad: list) -> None:
        """Count the undecodable rows ``[(id, reason), ...]`` and drop them from ``ids``."""
        logger.info("multimix: skipped %d undecodable row(s) of %s, e.g. %s", len(bad),
                    self.uri, bad[:3])
        self.skipped += len(bad)
        self.skipped_examples = (self.skipped_examples + list(bad))[:5]
        self._bad |= {i for i, _ in bad}

    def _drop_pending(self) -> None:
        """Drop the rows found undecodable in the last pass from ``ids``.

        Raises:
            DataError: no row is left (as :func:`load_labeled_pool`)."""
        if not self._bad:
            return
        keep = np.asarray([i not in self._bad for i in self.ids], bool)
        self.ids = [i for i, k in zip(self.ids, keep) if k]
        self._shard, self._group, self._row = (self._shard[keep], self._group[keep],
                                               self._row[keep])
        self._bad = set()
        if not self.ids:
            raise DataError(f"{self.uri}: none of the {self.skipped} rows asked could be decoded")

    def scan(self) -> "StreamedPool":
        """Decode every row once, keeping none: count the undecodable ones (``skipped``,
        ``skipped_examples``) and leave them out of ``ids`` (the driver's preflight does this,
        so every rank strides over the same decodable rows). Returns ``self``."""
        for _ in self._groups(np.arange(len(self.ids))):
            pass
        self._drop_pending()
        return self

    def head(self, n: int) -> LabeledPool:
        """The first (up to) ``n`` decodable rows, decoded in memory (for plots)."""
        parts = list(self._groups(np.arange(min(n, len(self.ids)))))
        self._drop_pending()
        ids = [i for p in parts for i in p[0]]
        cat = {c: np.concatenate([p[1][c] for p in parts]) for c in (parts[0][1] if parts
                                                                      else {})}
        size = self.cfg.data.image_size
        images = cat.get("image", np.zeros((0, size, size), np.uint8))
        labels = (np.concatenate([p[2] for p in parts]) if parts and self.task == "cls"
                  else None)
        return LabeledPool(ids=ids, images=images, labels=labels, masks=cat.get("mask"),
                           ignore=cat.get("ignore"))

    def eval_batches(self, batch_size: int, rank: int = 0,
                     world_size: int = 1) -> Iterator[dict]:
        """As :func:`eval_batches` of a :class:`LabeledPool` holding the same rows: rank
        ``rank`` scores ``ids[rank::world_size]`` in batches of ``batch_size`` (the last one
        shorter); at most one row group plus one batch of decoded rows is held."""
        seg = self.task == "seg"
        buf_ids: list = []
        buf: dict = {}
        n = 0

        def take(k: int) -> dict:
            nonlocal buf_ids, n
            cat = {c: np.concatenate(v) if len(v) > 1 else v[0] for c, v in buf.items()}
            out = {"ids": buf_ids[:k]}
            if seg:
                out["seg_img"] = to_tensor(cat["image"][:k])
                out["seg_mask"] = to_tensor(cat["mask"][:k])
                out["seg_ignore"] = to_tensor(cat["ignore"][:k])
            else:
                import torch

                out["cls_img"] = to_tensor(cat["image"][:k])
                out["cls_label"] = torch.from_numpy(np.ascontiguousarray(cat["label"][:k]))
            for c, v in cat.items():
                buf[c] = [v[k:]]
            buf_ids, n = buf_ids[k:], n - k
            return out

        for good, arrays, labels in self._groups(np.arange(rank, len(self.ids), world_size)):
            if not good:
                continue
            if labels is not None:
                arrays = {**arrays, "label": labels}
            for c, v in arrays.items():
                buf.setdefault(c, []).append(v)
            buf_ids += good
            n += len(good)
            while n >= batch_size:
                yield take(batch_size)
        if n:
            yield take(n)
        self._drop_pending()


def eval_batches(pool, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict]:
    """Validation/evaluation batches of a labeled pool: decode only, no augmentation.

    Rows are split across ranks by stride (``rank::world_size``); yields ``cls_img`` +
    ``cls_label`` (classification pool) or ``seg_img`` + ``seg_mask`` + ``seg_ignore``, plus
    ``ids`` (list of row ids). ``pool``: a :class:`LabeledPool`, or a :class:`StreamedPool`
    (read per row group: :meth:`StreamedPool.eval_batches`).
    """
    import torch

    if isinstance(pool, StreamedPool):
        yield from pool.eval_batches(batch_size, rank, world_size)
        return
    idx = np.arange(rank, len(pool), world_size)
    for s in range(0, len(idx), batch_size):
        sel = idx[s:s + batch_size]
        out: dict = {"ids": [pool.ids[i] for i in sel]}
        if pool.masks is not None:
            out["seg_img"] = to_tensor(pool.images[sel])
            out["seg_mask"] = to_tensor(pool.masks[sel])
            out["seg_ignore"] = to_tensor(pool.ignore[sel])
        else:
            out["cls_img"] = to_tensor(pool.images[sel])
            out["cls_label"] = torch.from_numpy(pool.labels[sel])
        yield out

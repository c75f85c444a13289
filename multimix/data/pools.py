"""The small labeled pools, in memory (no Ray): decoded once, sampled by the Train workers,
scored by :func:`multimix.validate.validate`.

- :class:`LabeledPool`: decoded labeled rows (images + labels, or images + masks + ignore);
- :func:`load_labeled_pool`: read chosen rows of a prepared dataset with pyarrow and decode them;
- :func:`eval_batches`: a pool's evaluation batches (decode only, no augmentation), split across
  ranks by stride.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from multimix.data import storage
from multimix.data.decode import decode_rows, to_tensor
from multimix.data.verify import open_dataset
from multimix.errors import DataError

logger = logging.getLogger(__name__)

__all__ = ["LabeledPool", "load_labeled_pool", "eval_batches"]


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


def eval_batches(pool: LabeledPool, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[dict]:
    """Validation/evaluation batches of a labeled pool: decode only, no augmentation.

    Rows are split across ranks by stride (``rank::world_size``); yields ``cls_img`` +
    ``cls_label`` (classification pool) or ``seg_img`` + ``seg_mask`` + ``seg_ignore``, plus
    ``ids`` (list of row ids).
    """
    import torch

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

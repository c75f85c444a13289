"""The Train worker's side of the data: one cursor per unlabeled stream, and each epoch's
training batches (DESIGN §3 format, torch ``uint8``).

Inside the train loop::

    streams = open_streams(cfg, shards, rank, start_epoch, state)   # once per run (or resume)
    for epoch in range(start_epoch, cfg.optim.epochs):
        for batch in TrainBatches(cfg, streams, cls_pool, seg_pool, rank, epoch, steps):
            engine.train_step(model, batch, ...)

- each :class:`StreamCursor` cuts fixed-size batches from whole Ray Data blocks (their rows
  already shuffled by the task); ``data.shuffle_buffer_rows > 0`` puts Ray Data's local shuffle
  buffer in front of it. A stream that runs out starts a new execution, all workers at the same
  step (``streaming_split(equal=True)`` shards have the same size), so DDP never waits on a
  missing batch and every worker yields exactly ``steps_per_epoch`` batches.
- labeled pools (:class:`multimix.data.pools.LabeledPool`) are sampled with replacement, seeded
  by ``(seed, rank, epoch, step)``; their weak view (a flip + crop slice) is rendered here.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator, Mapping, Optional

import numpy as np

from multimix.data.augment import Augmenter, mix_keys
from multimix.data.decode import to_tensor
from multimix.data.pools import LabeledPool
from multimix.data.readers import passes_per_execution
from multimix.errors import DataError
from multimix.variants import DATASETS, batch_sizes, streams_for

__all__ = ["PASS_STRIDE", "StreamCursor", "open_streams", "TrainBatches"]

#: a run (or resume) starting at epoch ``e`` numbers its augmentation passes from ``e * 1000``
PASS_STRIDE = 1000


class StreamCursor:
    """Fixed-size batches from one unlabeled stream (anything with ``iter_batches``: a
    ``ray.train.get_dataset_shard`` iterator, a Dataset), starting a new execution when one
    runs out.

    With ``shuffle_rows=0`` (``data.shuffle_buffer_rows``, the default) it takes whole blocks
    from Ray Data and cuts its batches from them itself, copying each batch's rows once (out
    of the read-only object store memory: torch tensors must be writable). With
    ``shuffle_rows > 0`` Ray Data's local shuffle buffer of that many rows also mixes the
    blocks of concurrent tasks (one more copy of every row, in this process).

    Execution ``e`` (counted from 0 on this object) renders augmentation passes
    ``epoch * 1000 + e * passes + k`` for its ``k < passes`` passes: the base is set on the
    state actor under the stream's name before the execution starts (every worker sets the
    same value: they share the execution).
    """

    def __init__(self, shard, batch_size: int, stream: str, state=None, epoch: int = 0,
                 seed: int = 0, rank: int = 0, passes: int = 1, shuffle_rows: int = 0):
        self.shard, self.b, self.stream = shard, batch_size, stream
        self.state, self.epoch, self.seed, self.rank = state, epoch, seed, rank
        self.passes = max(1, int(passes))
        self.shuffle_rows = max(0, int(shuffle_rows or 0))
        self.restart = 0
        self.parts: deque = deque()  # blocks (or batches) received, not yet handed out
        self.off = 0  # rows of parts[0] already handed out
        self.have = 0  # rows available: sum of the parts' rows - off
        self.it = None

    def _start_pass(self):
        if self.state is not None:
            import ray

            ray.get(self.state.set_pass.remote(
                self.stream, self.epoch * PASS_STRIDE + self.restart * self.passes))
        if self.shuffle_rows:
            it = self.shard.iter_batches(
                batch_size=self.b, batch_format="numpy", prefetch_batches=4,
                local_shuffle_buffer_size=max(self.shuffle_rows, self.b),
                local_shuffle_seed=mix_keys(self.seed, self.epoch, self.restart,
                                            self.rank) % (2**31))
        else:
            # whole blocks: each task already shuffled the rows it read (row groups that a
            # seeded permutation scatters over the pool, stored in a hashed order)
            it = self.shard.iter_batches(batch_size=None, batch_format="numpy",
                                         prefetch_batches=2)
        self.it = iter(it)
        self.restart += 1

    def next(self) -> dict:
        empty_passes = 0
        got = True
        while self.have < self.b:
            if self.it is None:
                self._start_pass()
                got = False
            try:
                part = next(self.it)
            except StopIteration:
                self.it = None
                if not got:
                    empty_passes += 1
                    if empty_passes >= 2:
                        raise DataError(
                            f"stream {self.stream}: this worker's shard is empty (pool smaller "
                            "than the number of workers?)") from None
                continue
            got = True
            part = {k: np.asarray(v) for k, v in part.items()}
            n = len(next(iter(part.values()))) if part else 0
            if n:
                self.parts.append(part)
                self.have += n
        pieces = []
        need = self.b
        while need:
            head = self.parts[0]
            n = len(next(iter(head.values())))
            take = min(need, n - self.off)
            pieces.append({k: v[self.off:self.off + take] for k, v in head.items()})
            self.off += take
            need -= take
            if self.off == n:
                self.parts.popleft()
                self.off = 0
        self.have -= self.b
        if len(pieces) == 1:  # a view of one block: read-only when it lies in the object store
            return {k: v if v.flags.writeable else v.copy() for k, v in pieces[0].items()}
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def close(self):
        self.it = None


def open_streams(cfg, shards: Mapping[str, Any], rank: int, start_epoch: int,
                 state=None) -> dict:
    """One :class:`StreamCursor` per unlabeled stream for one Train worker, made once per run
    (or resume) and handed to every epoch's :class:`TrainBatches`, so a stream's execution
    spans epochs (Ray Data starts each execution slowly; DESIGN §3).

    Args:
        shards: ``{"unl_cls": ..., "unl_seg": ...}``: this worker's ``streaming_split`` shards
            (``ray.train.get_dataset_shard``).
        start_epoch: the first epoch of this run (a resume starts a fresh numbering of
            passes at ``start_epoch * 1000``).
        state: the pipeline's state actor (:func:`multimix.data.state.create_state`), or None.
    """
    sizes = batch_sizes(cfg.data)
    passes = passes_per_execution(cfg)
    return {name: StreamCursor(sh, sizes[DATASETS[name][0]], name, state, start_epoch,
                               cfg.optim.seed, rank, passes=passes,
                               shuffle_rows=cfg.data.shuffle_buffer_rows)
            for name, sh in shards.items() if name in DATASETS}


class TrainBatches:
    """One epoch of training batches on one Train worker (DESIGN §3 format, torch uint8).

    Args:
        cfg: the run's :class:`~multimix.config.Config`.
        streams: ``{"unl_cls": StreamCursor, "unl_seg": StreamCursor}`` (those the variant
            uses) from :func:`open_streams`, kept across epochs.
        labeled_cls_pool, labeled_seg_pool: :class:`LabeledPool` (or None when unused).
        rank, epoch: this worker's rank and the epoch.
        steps_per_epoch: global steps per epoch
            (:func:`multimix.data.pipeline.steps_per_epoch`).

    Iterating yields exactly ``steps_per_epoch`` dicts on every worker: ``cls_img`` +
    ``cls_label``, ``weak_img`` + ``strong_img``, ``seg_img`` + ``seg_mask`` + ``seg_ignore``,
    ``useg_img`` (those the variant consumes), and ``unl_id`` when the stream carries ids.
    """

    def __init__(self, cfg, streams: Mapping[str, StreamCursor],
                 labeled_cls_pool: Optional[LabeledPool], labeled_seg_pool: Optional[LabeledPool],
                 rank: int, epoch: int, steps_per_epoch: int):
        self.cfg, self.streams = cfg, dict(streams or {})
        self.cls_pool, self.seg_pool = labeled_cls_pool, labeled_seg_pool
        self.rank, self.epoch = rank, epoch
        self.steps = int(steps_per_epoch)
        self.need = set(streams_for(cfg.model.variant))
        self.aug = Augmenter.from_config(cfg.augment, cfg.data.image_size)
        for s, pool in (("cls", self.cls_pool), ("seg", self.seg_pool)):
            if s in self.need and (pool is None or len(pool) == 0):
                raise DataError(f"variant {cfg.model.variant} needs a labeled {s} pool")
        for name, carried in DATASETS.items():
            if self.need & set(carried) and name not in self.streams:
                raise DataError(f"variant {cfg.model.variant} needs the dataset shard {name!r}")
        #: data.cls_sampling=balanced: the labeled pool's indices of each class present
        self._cls_members = None
        if "cls" in self.need and cfg.data.cls_sampling == "balanced":
            classes, inverse = np.unique(self.cls_pool.labels, return_inverse=True)
            self._cls_members = [np.flatnonzero(inverse == c) for c in range(len(classes))]

    def __len__(self) -> int:
        return self.steps

    def _labeled(self, pool: LabeledPool, n: int, step: int, stream: str):
        seed = self.cfg.optim.seed
        tag = 1 if stream == "cls" else 2
        rng = np.random.default_rng([seed, self.rank, self.epoch, step, tag])
        if stream == "cls" and self._cls_members is not None:
            # a class uniformly among those present, then an image of it (with replacement)
            members = self._cls_members
            pick = rng.integers(0, len(members), size=n)
            idx = np.array([members[c][rng.integers(0, len(members[c]))] for c in pick],
                           dtype=np.int64)
        else:
            idx = rng.integers(0, len(pool), size=n)
        keys = np.array([mix_keys(seed, self.rank, self.epoch, step, j, tag)
                         for j in range(n)], dtype=np.uint64)
        return idx, keys

    def __iter__(self) -> Iterator[dict]:
        import torch

        d = self.cfg.data
        unl = self.streams.get("unl_cls") if "weak" in self.need else None
        useg = self.streams.get("unl_seg") if "useg" in self.need else None
        for step in range(self.steps):
            batch: dict = {}
            if "cls" in self.need:
                idx, keys = self._labeled(self.cls_pool, d.cls_batch, step, "cls")
                batch["cls_img"] = to_tensor(self.aug.weak(self.cls_pool.images[idx], keys))
                batch["cls_label"] = torch.from_numpy(self.cls_pool.labels[idx].astype(np.int64))
            if "seg" in self.need:
                idx, keys = self._labeled(self.seg_pool, d.seg_batch, step, "seg")
                img, m, ig = (self.seg_pool.images[idx], self.seg_pool.masks[idx],
                              self.seg_pool.ignore[idx])
                if self.cfg.augment.seg_augment:
                    img, m, ig = self.aug.geometric(keys, img, m, ig)
                batch["seg_img"], batch["seg_mask"], batch["seg_ignore"] = (
                    to_tensor(img), to_tensor(m), to_tensor(ig))
            if unl is not None:
                u = unl.next()
                batch["weak_img"] = to_tensor(u["weak_img"])
                batch["strong_img"] = to_tensor(u["strong_img"])
                if "id" in u:
                    batch["unl_id"] = list(u["id"])
            if useg is not None:
                batch["useg_img"] = to_tensor(useg.next()["useg_img"])
            yield batch

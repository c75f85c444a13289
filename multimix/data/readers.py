"""The one reader of the unlabeled pools: prepared Parquet shards → a Ray Dataset of decoded,
augmented ``uint8`` views (runs in Ray Data tasks).

:func:`stream_dataset` builds one stream's dataset (``unl_cls``: the weak and the strong view of
each image; ``unl_seg``: the unlabeled segmentation image); what the map tasks need travels as
one :class:`StreamSpec`. How it reads (DESIGN §3 has the measurements behind each choice):

- ``ray.data.from_items`` items ``(pass k, slot)`` → one generator ``map_batches`` per item:
  the task reads the row groups of its slot (a seeded permutation of all row groups, new every
  pass, cut into runs of ~:data:`TASK_ROWS` rows), shuffles their rows together, decodes the
  PNGs in place (:func:`multimix.data.decode.binary_cells`) and renders the views, yielding
  blocks of :func:`block_rows` rows. Footers are read once, on the driver
  (:func:`multimix.data.dataset.open_dataset`, which checks the shards against the manifest
  with them); nothing is listed again per pass.
- one execution spans ``passes`` passes (the run's epochs, :func:`passes_per_execution`), so
  Ray Data's per-execution start-up is paid once per run; pass ``k`` of an execution renders
  augmentation pass ``base + k``, ``base`` being the state actor's value for the stream when
  the task starts (:mod:`multimix.data.state`). Augmentation parameters are a pure function of
  ``(seed, pass, stream, row id)`` (:func:`multimix.data.augment.row_keys`).
- each dataset is built with Ray Data's target block size at 3/4 of one yielded block
  (:func:`block_target`), so every yield leaves its task whole as soon as it is rendered.
- undecodable rows are dropped in the task, logged and counted on the state actor.
- several pools make one stream (``data.unlabeled_data``): the row groups of every
  :class:`Source` form one list, and a :class:`ReadPlan` says which of them each pass reads
  (:func:`pass_groups`): all once (no weights: proportional to rows), or ``m_i`` row groups of
  source ``i`` per pass, drawn from a seeded cycle of permutations of its row groups (without
  replacement until the pool is used up, so a large pool continues where the last pass
  stopped and a small one is repeated), ``m_i`` giving source ``i`` a share ``w_i / sum(w)``
  of the pass's rows (:func:`plan_reads`).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from multimix.data.allocator import keep_freed_memory
from multimix.data.augment import Augmenter, row_keys
from multimix.data.dataset import open_dataset
from multimix.data.decode import binary_cells, decode_rows
from multimix.data.state import current_pass
from multimix.errors import DataError
from multimix.variants import DATASETS

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_ROWS",
    "ReadPlan",
    "Source",
    "StreamSpec",
    "block_bytes",
    "block_rows",
    "block_target",
    "configure_data_context",
    "pass_groups",
    "passes_per_execution",
    "plan_reads",
    "source_rows",
    "stream_dataset",
]

#: rows one pipeline task reads, decodes and augments (several row groups)
TASK_ROWS = 1024

#: most passes over a pool in one execution, and most task items
MAX_PASSES = 500
_MAX_ITEMS = 4096


@dataclass(frozen=True)
class Source:
    """One pool of a stream: the rows ``ids`` of the prepared dataset ``uri`` (None: all of
    them) less the rows ``exclude`` (the contamination guard's)."""

    uri: str
    ids: Optional[frozenset] = None
    exclude: frozenset = frozenset()

    def accepts(self, ids: Sequence[str]) -> list:
        """Indices of ``ids`` this source reads."""
        keep, drop = self.ids, self.exclude
        return [i for i, v in enumerate(ids)
                if (keep is None or v in keep) and v not in drop]


def source_rows(source: "Source", data) -> int:
    """Rows ``source`` contributes to one unweighted pass (``data``: its
    :class:`~multimix.data.dataset.VerifiedDataset`)."""
    if source.ids is not None:
        return len(source.ids - source.exclude)
    return max(0, sum(g[2] for g in data.row_groups()) - len(source.exclude))


@dataclass(frozen=True)
class ReadPlan:
    """Which row groups each pass reads (picklable, a few ints per source).

    ``starts``/``counts``: each source's row groups are ``starts[i] .. starts[i] + counts[i]``
    of the stream's flat row-group list; ``per_pass``: row groups of source ``i`` read per pass
    (None: every row group once, i.e. rows in proportion to the pools); ``seed``/``stream``
    seed the permutations."""

    starts: tuple
    counts: tuple
    per_pass: Optional[tuple]
    seed: int
    stream: str

    @property
    def groups_per_pass(self) -> int:
        return sum(self.per_pass) if self.per_pass is not None else sum(self.counts)


def plan_reads(counts: Sequence[int], rows: Sequence[int], weights: Optional[Sequence[float]],
               seed: int, stream: str) -> ReadPlan:
    """The :class:`ReadPlan` for sources of ``counts[i]`` row groups holding ``rows[i]`` rows
    that the stream reads (after id filters).

    With ``weights``, a pass holds as many rows as the pools (``R = sum(rows)``) and source
    ``i`` gets ``m_i = round(w_i / sum(w) * R / (rows[i] / counts[i]))`` row groups of it (at
    least 1 when ``w_i > 0`` and it has rows; 0 when ``w_i = 0``), i.e. a share ``w_i / sum(w)``
    of the pass's rows to within one row group (:data:`multimix.data.prepare.ROW_GROUP_ROWS`
    rows) per source (``sum(w)`` over the sources that have rows)."""
    starts = tuple(int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]]))
    counts = tuple(int(c) for c in counts)
    if weights is None:
        return ReadPlan(starts, counts, None, int(seed), stream)
    if len(weights) != len(counts):
        raise ValueError(f"{len(weights)} weights for {len(counts)} sources")
    # a source with no rows left (e.g. cls_data all labeled) gives its share to the others
    total_w = float(sum(w for w, r, c in zip(weights, rows, counts) if r > 0 and c > 0))
    total_r = float(sum(rows))
    if total_w <= 0:
        return ReadPlan(starts, counts, tuple(0 for _ in counts), int(seed), stream)
    per = []
    for c, r, w in zip(counts, rows, weights):
        if w <= 0 or r <= 0 or c <= 0:
            per.append(0)
            continue
        per.append(max(1, int(round(w / total_w * total_r * c / r))))
    return ReadPlan(starts, counts, tuple(per), int(seed), stream)


def pass_groups(plan: ReadPlan, pass_no: int) -> np.ndarray:
    """Indices (into the flat row-group list) of the row groups pass ``pass_no`` reads, in the
    pass's seeded order (``int64 (plan.groups_per_pass,)``). Without weights: a permutation
    of all row groups (the order :func:`task_groups` cuts); with weights: source ``i``'s
    ``per_pass[i]`` row groups at positions ``pass_no * m_i ..`` of the endless sequence of
    its permutations (cycle ``c`` is permutation ``c`` of its row groups), then shuffled."""
    tag = zlib.crc32(plan.stream.encode())
    order_rng = np.random.default_rng([plan.seed, pass_no, tag, 7])
    if plan.per_pass is None:
        return order_rng.permutation(sum(plan.counts))
    picked = []
    for i, (start, n, m) in enumerate(zip(plan.starts, plan.counts, plan.per_pass)):
        if not m:
            continue
        pos = np.arange(pass_no * m, (pass_no + 1) * m, dtype=np.int64)
        cycles = pos // n
        out = np.empty(m, np.int64)
        for c in np.unique(cycles):
            perm = np.random.default_rng([plan.seed, int(c), tag, 13, i]).permutation(n)
            sel = cycles == c
            out[sel] = perm[pos[sel] % n]
        picked.append(start + out)
    return order_rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


@dataclass(frozen=True)
class StreamSpec:
    """What the map tasks of one stream need (picklable; one object, not a kwargs bag).

    ``stream``: the dataset name (``unl_cls`` / ``unl_seg``, :data:`multimix.variants.DATASETS`),
    which also seeds the augmentation; ``size``: image side; ``seed``: ``optim.seed``;
    ``augmenter``: renders the views (``pair`` for ``unl_cls``, ``weak`` for ``unl_seg``);
    ``augment``: False leaves ``unl_seg`` images as decoded; ``rows``: rows per yielded block;
    ``state``: the state actor (None: base pass ``epoch``, skipped rows only logged);
    ``debug``: add an ``id`` column.
    """

    stream: str
    size: int
    seed: int
    augmenter: Any
    augment: bool = True
    rows: int = 256
    state: Any = None
    epoch: int = 0
    debug: bool = False


def configure_data_context(progress_bars: bool = False):
    """Ray Data settings for this pipeline (call on the driver before building datasets; a
    Dataset keeps a copy of the context it was built under). Each dataset's block size is set
    by :func:`stream_dataset` (see :func:`block_target`)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress_bars
    ctx.execution_options.verbose_progress = False
    try:
        ctx.print_on_execution_start = False
    except Exception:  # pragma: no cover - attribute missing in other versions
        pass
    return ctx


def block_rows(size: int) -> int:
    """Rows per block a task yields: ~16 MB of pixels per view (256 rows at 256²), so blocks
    are few (little per-block overhead) but a task still streams several of them."""
    return max(16, min(1024, (16 << 20) // max(1, size * size)))


def block_bytes(size: int) -> int:
    """Pixel bytes of one view of one block a task yields (:func:`block_rows` rows of
    ``size``² ``uint8``)."""
    return block_rows(size) * size * size


def block_target(size: int, stream: str) -> int:
    """Ray Data's ``target_max_block_size`` for ``stream``: 3/4 of one yielded block (all its
    views).

    Ray Data's output buffer merges a task's yields until they pass the target (128 MiB by
    default), which held every augmented block back until its task ended; blocks of 1.5
    targets or more it slices, and the slices left over are copied into the next block.
    At 3/4 each yield leaves the task whole as soon as it is rendered."""
    return max(1 << 20, block_bytes(size) * len(DATASETS[stream]) * 3 // 4)


class _block_size:
    """Build a dataset under ``target_max_block_size = target`` (a Dataset copies the current
    DataContext when it is created), never raising a smaller value the user set."""

    def __init__(self, target: int):
        self.target = target

    def __enter__(self):
        import ray.data

        self.ctx = ray.data.DataContext.get_current()
        self.saved = self.ctx.target_max_block_size
        if self.saved is None or self.saved > self.target:
            self.ctx.target_max_block_size = self.target

    def __exit__(self, *exc):
        self.ctx.target_max_block_size = self.saved


def passes_per_execution(cfg) -> int:
    """Passes over an unlabeled pool in one Ray Data execution: ``optim.epochs`` (each epoch
    is about one pass: one execution serves the run), at most :data:`MAX_PASSES` (and at most
    4,096 task items)."""
    return max(1, min(int(cfg.optim.epochs), MAX_PASSES))


def stream_dataset(uri, ids: Optional[Sequence[str]], cfg, *, stream: str,
                   augment: bool = True, state=None, epoch: int = 0, debug: bool = False,
                   rows: Optional[int] = None, passes: int = 1,
                   augmenter: Optional[Augmenter] = None,
                   weights: Optional[Sequence[float]] = None):
    """A Ray Dataset of the decoded, augmented rows ``ids`` of ``uri`` (all rows: None), or of
    several pools mixed into one stream.

    Args:
        uri: a prepared dataset's URI, or a sequence of :class:`Source` (then ``ids`` is None),
            read as one stream (:class:`ReadPlan`).
        stream: ``"unl_cls"`` → columns ``weak_img``, ``strong_img`` (weak and strong view of
            the same image); ``"unl_seg"`` → ``useg_img`` (weak view when ``augment``). All
            ``uint8 (N, H, W)``; plus ``id`` (str) and ``source`` (index of the source) with
            ``debug``.
        state: :func:`multimix.data.state.create_state` handle (augmentation pass, skipped
            counts) or None (base pass = ``epoch``; skipped rows only logged).
        rows: rows per yielded block (default :func:`block_rows`).
        passes: passes over the pool in one execution: pass ``k`` renders augmentation pass
            ``base + k`` (see :func:`passes_per_execution`).
        augmenter: what renders the views in the map tasks (default
            ``Augmenter.from_config(cfg.augment, image_size)``); any picklable object with the
            same ``pair`` / ``weak`` methods (``multimix bench data`` passes one that renders
            nothing, to measure the pipeline's own cost).
        weights: one per source, the share of each pass's rows it gets (:func:`plan_reads`);
            None: every row once per pass.
    """
    if stream not in DATASETS:
        raise ValueError(f"unknown stream dataset {stream!r} (one of {', '.join(DATASETS)})")
    if isinstance(uri, str):
        sources = [Source(uri, frozenset(ids) if ids is not None else None)]
    else:
        sources = list(uri)
    size = cfg.data.image_size
    spec = StreamSpec(stream=stream, size=size, seed=int(cfg.optim.seed),
                      augmenter=augmenter or Augmenter.from_config(cfg.augment, size),
                      augment=augment, rows=rows or block_rows(size), state=state,
                      epoch=epoch, debug=debug)
    datas = [open_dataset(src.uri, cfg.storage) for src in sources]  # checked vs the manifest
    with _block_size(block_target(size, stream)):
        return _row_group_dataset(sources, datas, cfg, spec, weights, passes)


def _row_group_dataset(sources: list, datas: list, cfg, spec: StreamSpec,
                       weights: Optional[Sequence[float]], passes: int):
    """``from_items`` slots → a generator ``map_batches`` that reads row groups with pyarrow,
    picked by a seeded per-pass :class:`ReadPlan` (see the module docstring): ``passes``
    consecutive passes make one execution, the items being ``(pass k, slot)`` in pass order.
    ``datas``: each source's :class:`~multimix.data.dataset.VerifiedDataset` (its footers give
    the row groups)."""
    import ray.data

    groups, counts = [], []
    for k, (src, data) in enumerate(zip(sources, datas)):
        g = data.row_groups()
        if not g:
            raise DataError(f"{src.uri}: the Parquet shards hold no rows")
        groups += [(k, path, group, n) for path, group, n in g]
        counts.append(len(g))
    rows = [source_rows(src, data) for src, data in zip(sources, datas)]
    plan = plan_reads(counts, rows, weights, spec.seed, spec.stream)
    n = plan.groups_per_pass
    if not n or not sum(rows):
        raise DataError(f"{', '.join(s.uri for s in sources)}: no rows left to stream "
                        f"{spec.stream} (after the split's labeled/validation ids and the contamination "
                        "guard's exclusions: see contamination.json)")
    # Few, large tasks: one per ~TASK_ROWS rows (at least min(row groups, 4) so the CPUs stay
    # busy), each reading several row groups that a seeded per-pass permutation scatters over
    # the pools, and shuffling their rows together.
    n_tasks = min(n, _MAX_ITEMS, max(min(n, 4), -(-int(sum(rows)) // TASK_ROWS)))
    per_task = -(-n // n_tasks)
    n_tasks = -(-n // per_task)
    fn = partial(_read_map_fn, fss=tuple(d.fs for d in datas), groups=tuple(groups),
                 per_task=per_task, plan=plan, sources=tuple(sources), spec=spec)
    passes = max(1, min(int(passes), MAX_PASSES, _MAX_ITEMS // n_tasks))
    items = [{"pass": p, "slot": k} for p in range(passes) for k in range(n_tasks)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    kwargs: dict = {"num_cpus": cfg.scaling.data_cpus_per_task}
    if cfg.scaling.data_concurrency is not None:
        kwargs["compute"] = ray.data.TaskPoolStrategy(size=int(cfg.scaling.data_concurrency))
    return ds.map_batches(fn, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                          **kwargs)


def task_groups(slot: int, n_groups: int, per_task: int, seed: int, pass_no: int,
                stream: str) -> list:
    """Row groups of task ``slot`` in pass ``pass_no`` of one unweighted source: a seeded
    permutation of all row groups, new every pass, cut into consecutive runs of
    ``per_task``."""
    plan = ReadPlan((0,), (int(n_groups),), None, int(seed), stream)
    return _slot_groups(plan, slot, per_task, pass_no)


def _slot_groups(plan: ReadPlan, slot: int, per_task: int, pass_no: int) -> list:
    """The row groups (flat indices, sorted) task ``slot`` reads in pass ``pass_no``."""
    order = pass_groups(plan, pass_no)
    return sorted(int(g) for g in order[slot * per_task:(slot + 1) * per_task])


def _read_map_fn(items, *, fss, groups, per_task, plan: ReadPlan, sources, spec: StreamSpec):
    """Read a task's row groups, shuffle their rows together and yield decoded/augmented
    blocks of ``spec.rows`` rows (generator UDF)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keep_freed_memory()  # once per worker process: reuse freed block memory (see allocator.py)
    # once per task: a task belongs to one execution
    base = current_pass(spec.state, spec.stream, spec.epoch)
    for k, slot in zip(np.asarray(items["pass"]).tolist(), np.asarray(items["slot"]).tolist()):
        pass_no = base + int(k)
        tables, origin = [], []
        for g in _slot_groups(plan, int(slot), per_task, pass_no):
            src_no, path, group, _ = groups[g]
            src = sources[src_no]
            with fss[src_no].open_input_file(path) as f:
                t = pq.ParquetFile(f).read_row_group(group, columns=["id", "image"])
            if src.ids is not None or src.exclude:
                sel = src.accepts(t.column("id").to_pylist())
                if len(sel) != t.num_rows:
                    t = t.take(pa.array(sel, pa.int64()))
            if t.num_rows:
                tables.append(t.select(["id", "image"]))
                origin += [src_no] * t.num_rows
        if not tables:
            continue
        # shards may differ in nullability only (verify checks names and types)
        table = pa.concat_tables(tables, promote_options="default")
        order = np.random.default_rng([spec.seed, pass_no, int(slot), 11]
                                      ).permutation(table.num_rows).tolist()
        yield from _render_rows(table, order, spec, pass_no, origin)


def _render_rows(table, order: list, spec: StreamSpec, pass_no: int,
                 origin: Optional[list] = None):
    """Rows ``order`` (indices into the ``pyarrow.Table`` ``table``) → decoded, augmented
    blocks of ``spec.rows`` rows; the PNGs are read in place (:func:`binary_cells`).
    ``origin``: each row's source index (the ``source`` column with ``spec.debug``)."""
    ids = table.column("id").to_pylist()
    cells = binary_cells(table.column("image"))
    for s in range(0, len(order), spec.rows):
        idx = order[s:s + spec.rows]
        batch = {"id": [ids[i] for i in idx], "image": [cells[i] for i in idx]}
        if spec.debug and origin is not None:
            batch["source"] = [origin[i] for i in idx]
        yield render(spec, batch, pass_no)


def render(spec: StreamSpec, batch: Mapping[str, Any], pass_no: int) -> dict:
    """One block of rows (``{"id": [...], "image": [PNG bytes, ...]}``) → the stream's views
    for augmentation pass ``pass_no`` (``{view: uint8 (N, H, W)}``, + ``id`` with ``debug``).
    Undecodable rows are dropped, logged and counted on the state actor."""
    ids, arrays, skipped = decode_rows(batch, spec.size, ("image",))
    if skipped:
        logger.warning("multimix pipeline: skipped %d undecodable row(s) in stream %s, e.g. %s",
                       len(skipped), spec.stream, skipped[:3])
        if spec.state is not None:
            spec.state.add_skipped.remote(spec.stream, len(skipped), skipped[:10])
    keys = row_keys(ids, spec.seed, pass_no, spec.stream)
    img = arrays["image"]
    if spec.stream == "unl_cls":
        weak, strong = spec.augmenter.pair(img, keys)
        out = {"weak_img": weak, "strong_img": strong}
    else:
        out = {"useg_img": spec.augmenter.weak(img, keys) if spec.augment else img}
    if spec.debug:
        out["id"] = np.array(ids, dtype=object)
        if "source" in batch:
            keep = set(ids)  # undecodable rows were dropped: keep the others' sources
            out["source"] = np.array([s for i, s in zip(batch["id"], batch["source"])
                                      if i in keep], dtype=np.int64)
    return out

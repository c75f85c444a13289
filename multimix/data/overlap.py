"""The contamination guard and ``multimix overlap``: which rows of one prepared dataset are the
same picture as rows of another (DESIGN.md §3b). Ray-free; reads only the ``id``, ``hash`` and
``phash`` columns (a few dozen bytes a row: 10⁶ rows ≈ 100 MB in memory, no image bytes).

Two kinds of match (DESIGN.md §1b):

``exact``  the same ``hash`` (sha256 of the source file's bytes): a byte-identical file.
``near``   ``phash`` (256-bit perceptual hash, :func:`multimix.data.images.perceptual_hash`)
           within Hamming distance ``threshold`` (default :data:`NEAR_THRESHOLD`): a resized,
           re-encoded or re-contrasted copy of the same picture.

Exact matches are found with a dict (O(n)); near ones by *multi-index hashing*: the 256 bits are
cut into 16 bands of 16 bits; two hashes within ``threshold`` bits have, by pigeonhole, a band
with at most ``r = threshold // 16`` differing bits, so each band of one side is looked up in
the sorted bands of the other with every key within ``r`` bits (1 + 16 lookups per band at the
default ``r = 1``), and only those candidate pairs are compared on all 256 bits: sorts and
``searchsorted`` in numpy, chunked (at most :data:`_MAX_PAIRS` candidate pairs in memory at
once), never all pairs. Datasets prepared before the ``phash`` column existed get exact matching
only (the report says so).

The API the run side uses (``data.unlabeled_data`` with the guard applied at run time)::

    protected = [load_hashes(uri, ids=val_ids) for ...]     # labeled, validation, evaluation
    pool = load_hashes(unlabeled_uri)
    excluded = find_contamination(protected, pool)          # {pool id: Match}, one per id
    keep = [i for i in pool.ids if i not in excluded]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from multimix.config import (MAX_THRESHOLD, StorageConfig, add_config_arguments,
                             load_config)
from multimix.data import storage
from multimix.data.dataset import open_dataset, shard_paths
from multimix.errors import DataError, UserError

__all__ = [
    "NEAR_THRESHOLD",
    "HashTable",
    "Match",
    "load_hashes",
    "iter_hashes",
    "concat",
    "GUARD_CHUNK_ROWS",
    "hamming",
    "near_pairs",
    "exact_pairs",
    "find_contamination",
    "overlap_report",
    "GuardResult",
    "guard_pools",
    "add_arguments",
    "run",
]

#: default Hamming distance (of 256 bits) at or below which two perceptual hashes are taken
#: for the same picture. Measured on the shared data (docs/BENCHMARKS.md, "Near duplicates").
NEAR_THRESHOLD = 31

_BAND_BITS = 16

#: candidate pairs compared at once (memory bound of :func:`near_pairs`: ~24 bytes each)
_MAX_PAIRS = 2_000_000



@dataclass
class HashTable:
    """The hashes of (some rows of) one dataset.

    Attributes:
        name: the dataset's name in reports (its URI by default).
        ids: row ids, ``(n,)`` object array of str.
        sha: sha256 hex digests, ``(n,)`` object array of str.
        phash: perceptual hashes as ``uint64 (n, 4)`` (the 32 bytes of each), or None when the
            dataset has no ``phash`` column (prepared before the column existed).
        has_phash: ``bool (n,)``: rows whose ``phash`` is set (all False when ``phash`` is None).
    """

    name: str
    ids: np.ndarray
    sha: np.ndarray
    phash: Optional[np.ndarray]
    has_phash: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, name: str, ids: Sequence[str], sha: Sequence[str],
                  phash: Optional[Sequence[Optional[bytes]]] = None) -> "HashTable":
        """Build one from Python lists (``phash``: 32 bytes or None per row)."""
        ids_a = np.asarray(list(ids), dtype=object)
        sha_a = np.asarray(list(sha), dtype=object)
        if len(ids_a) != len(sha_a) or (phash is not None and len(phash) != len(ids_a)):
            raise ValueError("ids, sha and phash must have the same length")
        if phash is None:
            return cls(name, ids_a, sha_a, None, np.zeros(len(ids_a), bool))
        has = np.asarray([p is not None for p in phash], dtype=bool)
        raw = b"".join(p if p is not None else bytes(32) for p in phash)
        return cls(name, ids_a, sha_a, _words(raw, len(ids_a)), has)


@dataclass(frozen=True)
class Match:
    """``id`` of one dataset matches ``other_id`` of ``other`` (a dataset name).

    ``kind``: ``exact`` (same sha256) or ``near`` (``distance`` = Hamming distance of the
    perceptual hashes, ``<=`` the threshold; for ``exact`` the phash distance when known, else
    0)."""

    id: str
    kind: str
    other: str
    other_id: str
    distance: int


def load_hashes(uri: str, ids: Optional[Iterable[str]] = None,
                storage_cfg: Optional[StorageConfig] = None,
                name: Optional[str] = None) -> HashTable:
    """Read the ``id``/``hash``/``phash`` columns of a prepared dataset (no image bytes).

    Args:
        ids: keep only these rows (e.g. a split's validation ids); default all.

    Raises:
        DataError: not a prepared dataset; an id of ``ids`` is not in it.
    """
    want = list(ids) if ids is not None else None
    table = concat(name or uri, list(iter_hashes(uri, storage_cfg, name=name, ids=want,
                                                 chunk_rows=None)))
    if want is not None and len(table) != len(set(want)):
        have = set(table.ids.tolist())
        missing = [i for i in want if i not in have]
        raise DataError(f"{uri}: {len(missing)} id(s) not in the dataset, e.g. "
                        f"{missing[:3]}")
    return table


#: rows of hashes the run-time guard holds at once per pool (whole shards are read until this
#: many rows are buffered): the driver's memory for the guard does not grow with the pool
GUARD_CHUNK_ROWS = 1 << 16


def iter_hashes(uri: str, storage_cfg: Optional[StorageConfig] = None,
                name: Optional[str] = None, ids: Optional[Iterable[str]] = None,
                chunk_rows: Optional[int] = GUARD_CHUNK_ROWS) -> Iterator[HashTable]:
    """The ``id``/``hash``/``phash`` columns of a prepared dataset as :class:`HashTable`
    chunks of whole shards, each of at least ``chunk_rows`` rows (None: one chunk), the last
    one possibly smaller; at least one (maybe empty) chunk. ``ids``: only these rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fs, paths, manifest = shard_paths(uri, storage_cfg)
    paths = open_dataset(uri, storage_cfg, manifest=manifest).paths  # shards checked
    with storage.storage_errors(uri, storage_cfg):
        names = pq.read_schema(paths[0], filesystem=fs).names
    cols = ["id", "hash"] + (["phash"] if "phash" in names else [])
    keep = _str_array(list(ids)) if ids is not None else None
    buf: list = []
    rows, sent = 0, False
    for k, path in enumerate(paths):
        with storage.storage_errors(uri, storage_cfg):
            t = pq.read_table(path, columns=cols, filesystem=fs)
        if keep is not None:
            t = t.filter(pc.is_in(t.column("id"), value_set=keep))
        buf.append(t)
        rows += t.num_rows
        last = k == len(paths) - 1
        if last or (chunk_rows is not None and rows >= chunk_rows):
            if rows or last and not sent:
                yield _table(name or uri, pa.concat_tables(buf, promote_options="default"),
                             "phash" in cols)
                sent = True
            buf, rows = [], 0


def _table(name: str, table, has_phash_column: bool) -> HashTable:
    """A :class:`HashTable` from an Arrow table of ``id``, ``hash`` (and ``phash``)."""
    import pyarrow as pa

    ids_a = np.asarray(table.column("id").to_pylist(), dtype=object)
    sha_a = np.asarray(table.column("hash").to_pylist(), dtype=object)
    if not has_phash_column:
        return HashTable(name, ids_a, sha_a, None, np.zeros(len(ids_a), bool))
    col = table.column("phash").combine_chunks()
    has = ~np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    filled = col.fill_null(pa.scalar(bytes(32), col.type))
    raw = np.frombuffer(filled.buffers()[1], np.uint8)[filled.offset * 32:
                                                      (filled.offset + len(filled)) * 32]
    return HashTable(name, ids_a, sha_a, _words(raw.tobytes(), len(ids_a)), has)


def concat(name: str, tables: Sequence[HashTable]) -> HashTable:
    """One :class:`HashTable` of ``tables`` (chunks of one dataset) under ``name``."""
    if len(tables) == 1:
        t = tables[0]
        return HashTable(name, t.ids, t.sha, t.phash, t.has_phash)
    phash = None if any(t.phash is None for t in tables) else \
        np.concatenate([t.phash for t in tables]).reshape(-1, 4)
    return HashTable(name, np.concatenate([t.ids for t in tables]),
                     np.concatenate([t.sha for t in tables]), phash,
                     np.concatenate([t.has_phash for t in tables]) if phash is not None
                     else np.zeros(sum(len(t) for t in tables), bool))


def _words(raw: bytes, n: int) -> np.ndarray:
    """32 bytes a row → ``uint64 (n, 4)`` (native byte order: only XOR and popcount use it)."""
    return np.frombuffer(raw, dtype=np.uint64).reshape(n, 4).copy()


def _str_array(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance of 256-bit hashes ``uint64 (..., 4)`` (broadcast), as ``int16 (...)``."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(-1, dtype=np.int16)


def _probes(radius: int) -> np.ndarray:
    """Every 16-bit XOR mask with at most ``radius`` bits set, ``uint16``."""
    from itertools import combinations

    masks = [sum(1 << b for b in bits) for r in range(radius + 1)
             for bits in combinations(range(_BAND_BITS), r)]
    return np.asarray(masks, dtype=np.uint16)


def _check_threshold(threshold: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or \
            not 0 <= threshold <= MAX_THRESHOLD:
        raise UserError(f"--threshold must be an integer from 0 to {MAX_THRESHOLD} bits (of "
                        f"256), got {threshold!r}")


def near_pairs(a: np.ndarray, b: np.ndarray, threshold: int = NEAR_THRESHOLD,
               same: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs ``(i, j)`` with ``hamming(a[i], b[j]) <= threshold`` (multi-index hashing).

    Args:
        a: ``uint64 (n, 4)``; b: ``uint64 (m, 4)`` (256-bit hashes).
        threshold: 0..:data:`MAX_THRESHOLD`.
        same: ``a`` and ``b`` are the same array: return each unordered pair once (``i < j``).

    Returns:
        ``(i int64 (k,), j int64 (k,), distance int16 (k,))``, sorted by ``(i, j)``.
    """
    _check_threshold(threshold)
    a = np.ascontiguousarray(a, dtype=np.uint64).reshape(-1, 4)
    b = np.ascontiguousarray(b, dtype=np.uint64).reshape(-1, 4)
    if len(a) > len(b) and not same:  # look the smaller side up in the sorted larger one
        j, i, d = near_pairs(b, a, threshold)
        order = np.lexsort((j, i))
        return i[order], j[order], d[order]
    found: list[np.ndarray] = []
    probes = _probes(threshold // _BAND_BITS)
    if len(a) and len(b):
        a16, b16 = a.view(np.uint16), b.view(np.uint16)  # (n, 16) bands
        for band in range(a16.shape[1]):
            order = np.argsort(b16[:, band], kind="stable")
            kb_sorted = b16[order, band]
            for probe in probes:
                ka = a16[:, band] ^ probe
                lo = np.searchsorted(kb_sorted, ka, "left")
                counts = np.searchsorted(kb_sorted, ka, "right") - lo
                found += _verify(a, b, order, lo, counts, threshold, same)
    if not found:
        e = np.zeros(0, np.int64)
        return e, e, np.zeros(0, np.int16)
    key = np.unique(np.concatenate(found))  # a pair sharing several bands is found once
    i, j = key // len(b), key % len(b)
    return i, j, hamming(a[i], b[j])


def _verify(a, b, order, lo, counts, threshold, same) -> list[np.ndarray]:
    """Compare the candidate pairs ``(i, order[lo[i] + k])``, ``k < counts[i]``, on all bits,
    at most :data:`_MAX_PAIRS` at a time; return the keys ``i * len(b) + j`` of the matches."""
    out = []
    ends = np.cumsum(counts)
    start, n = 0, len(counts)
    while start < n:
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _MAX_PAIRS, "right")))
        c = counts[start:stop]
        total = int(c.sum())
        if total:
            ii = np.repeat(np.arange(start, stop), c)
            offs = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
            jj = order[np.repeat(lo[start:stop], c) + offs]
            keep = hamming(a[ii], b[jj]) <= threshold
            if same:
                keep &= ii < jj
            if keep.any():
                out.append(ii[keep].astype(np.int64) * len(b) + jj[keep])
        start = stop
    return out


def exact_pairs(a: Sequence[str], b: Sequence[str],
                same: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)`` with ``a[i] == b[j]`` (content hashes; a dict, O(n + m + pairs)).
    ``same``: ``a`` is ``b``; each unordered pair once (``i < j``)."""
    index: dict[str, list[int]] = {}
    for j, h in enumerate(b):
        index.setdefault(h, []).append(j)
    ii, jj = [], []
    for i, h in enumerate(a):
        for j in index.get(h, ()):
            if not same or i < j:
                ii.append(i)
                jj.append(j)
    return np.asarray(ii, np.int64), np.asarray(jj, np.int64)


def find_contamination(protected: Sequence[HashTable], pool: HashTable,
                       threshold: Optional[int] = NEAR_THRESHOLD) -> dict[str, Match]:
    """The rows of ``pool`` to exclude because they are (near) copies of a protected row.

    Args:
        protected: hashes of every labeled, validation and evaluation set given to a run.
        pool: an unlabeled pool.
        threshold: near-duplicate Hamming distance; None: exact matches only.

    Returns:
        ``{pool id: Match}``, one entry per excluded pool id: an exact match when there is one,
        else the nearest near match (ties: the first protected set, then the smallest id).
    """
    best: dict[str, Match] = {}

    def offer(m: Match) -> None:
        old = best.get(m.id)
        rank = (m.kind != "exact", m.distance)
        if old is None or rank < (old.kind != "exact", old.distance):
            best[m.id] = m

    for prot in protected:
        for i, j in zip(*exact_pairs(pool.sha, prot.sha)):
            both = pool.has_phash[i] and prot.has_phash[j]
            d = int(hamming(pool.phash[i], prot.phash[j])) if both else 0
            offer(Match(str(pool.ids[i]), "exact", prot.name, str(prot.ids[j]), d))
        if threshold is None or pool.phash is None or prot.phash is None:
            continue
        pi, pj = np.flatnonzero(pool.has_phash), np.flatnonzero(prot.has_phash)
        i, j, d = near_pairs(pool.phash[pi], prot.phash[pj], threshold)
        for a, b, dist in zip(pi[i], pj[j], d):
            offer(Match(str(pool.ids[a]), "near", prot.name, str(prot.ids[b]), int(dist)))
    return best


def overlap_report(a: HashTable, b: Optional[HashTable] = None,
                   threshold: int = NEAR_THRESHOLD, examples: int = 5) -> dict:
    """Exact and near overlap between two datasets (or within one when ``b`` is None).

    Returns:
        ``{"a", "b", "rows_a", "rows_b", "threshold", "exact": {"pairs", "rows_a", "rows_b",
        "examples"}, "near": {...} | None}``. ``near`` counts pairs within ``threshold`` that
        are not exact matches; None when a dataset has no ``phash`` column. ``rows_*`` count
        distinct rows of each side in a pair; ``examples``: the first pairs
        ``[id_a, id_b, distance]``.
    """
    same = b is None
    b = a if same else b
    ei, ej = exact_pairs(a.sha, b.sha, same=same)
    exact_keys = set(zip(ei.tolist(), ej.tolist()))

    def part(ii, jj, dd) -> dict:
        return {"pairs": int(len(ii)), "rows_a": int(len(set(ii.tolist()))),
                "rows_b": int(len(set(jj.tolist()))),
                "examples": [[str(a.ids[i]), str(b.ids[j]), int(d)]
                             for i, j, d in list(zip(ii, jj, dd))[:examples]]}

    def dist(ii, jj):
        if a.phash is None or b.phash is None:
            return np.zeros(len(ii), np.uint8)
        return hamming(a.phash[ii], b.phash[jj])

    out = {"a": a.name, "b": b.name, "rows_a": len(a), "rows_b": len(b), "threshold": threshold,
           "exact": part(ei, ej, dist(ei, ej)), "near": None}
    if a.phash is not None and b.phash is not None:
        pa_, pb_ = np.flatnonzero(a.has_phash), np.flatnonzero(b.has_phash)
        i, j, d = near_pairs(a.phash[pa_], b.phash[pb_], threshold, same=same)
        i, j = pa_[i], pb_[j]  # with same=True pa_ == pb_ (increasing): i < j still holds
        keep = np.asarray([(x, y) not in exact_keys for x, y in zip(i.tolist(), j.tolist())],
                          dtype=bool)
        out["near"] = part(i[keep], j[keep], d[keep])
    return out


# ---------------------------------------------------------------------------------------------
# the guard at run time (data.contamination_guard; DESIGN.md §3b)


@dataclass
class GuardResult:
    """What :func:`guard_pools` removed: ``excluded`` ``{pool name: frozenset of ids}``,
    ``report`` (the run's ``contamination.json``) and ``line`` (one line for the log)."""

    excluded: dict
    report: dict
    line: str


def guard_pools(protected: Sequence[HashTable],
                pools: Sequence[Union[HashTable, tuple[str, Iterable[HashTable]]]],
                threshold: Optional[int] = NEAR_THRESHOLD, examples: int = 5) -> GuardResult:
    """Remove from every unlabeled pool the rows that are copies of a protected row.

    Args:
        protected: hashes of the labeled, validation and evaluation sets given to a run.
        pools: the unlabeled pools: each a :class:`HashTable` (its ``name`` names it in the
            report) or ``(name, chunks)`` (e.g. :func:`iter_hashes`: one chunk in memory at a
            time; the chunks of a pool hold distinct ids).
        threshold: near-duplicate distance (bits of 256); None: exact matches only.
        examples: example matches per pool in the report.

    Returns:
        a :class:`GuardResult`; ``report``: ``{"enabled", "threshold", "protected": [{"name",
        "rows", "phash"}], "pools": [{"name", "rows", "phash", "removed": {"exact", "near"},
        "kept", "examples": [[pool id, kind, protected set, protected id, distance]]}],
        "removed", "exact_only"}`` (``exact_only``: sets without a ``phash`` column, matched by
        sha256 alone).
    """
    if threshold is not None:
        _check_threshold(threshold)
    excluded, rows, exact_only = {}, [], [t.name for t in protected if t.phash is None]
    for pool in pools:
        name, chunks = (pool.name, [pool]) if isinstance(pool, HashTable) else pool
        found: dict = {}
        n, phash = 0, True
        for chunk in chunks:
            found.update(find_contamination(protected, chunk, threshold))
            n += len(chunk)
            phash = phash and chunk.phash is not None
        if not phash:
            exact_only.append(name)
        kinds = [m.kind for m in found.values()]
        excluded[name] = frozenset(found)
        ex = sorted(found.values(), key=lambda m: (m.kind != "exact", m.distance, m.id))
        rows.append({"name": name, "rows": n, "phash": phash,
                     "removed": {"exact": kinds.count("exact"), "near": kinds.count("near")},
                     "kept": n - len(found),
                     "examples": [[m.id, m.kind, m.other, m.other_id, m.distance]
                                  for m in ex[:examples]]})
    removed = {k: sum(r["removed"][k] for r in rows) for k in ("exact", "near")}
    report = {"enabled": True, "threshold": threshold,
              "protected": [{"name": t.name, "rows": len(t), "phash": t.phash is not None}
                            for t in protected],
              "pools": rows, "removed": removed, "exact_only": exact_only}
    per = ", ".join(f"{r['name']} {r['removed']['exact']}+{r['removed']['near']}"
                    for r in rows)
    near = f"phash within {threshold} bits" if threshold is not None else "near: off"
    line = (f"contamination guard: removed {removed['exact']} exact (sha256) + "
            f"{removed['near']} near ({near}) copies of {sum(len(t) for t in protected)} "
            f"labeled/validation/evaluation images from the unlabeled pools ({per})")
    if exact_only:
        line += f"; exact only for {', '.join(exact_only)} (no phash column: prepare again)"
    return GuardResult(excluded, report, line)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATA_URI",
                   help="prepared datasets (folders or s3://...); every pair is compared, and "
                        "a single dataset with itself")
    p.add_argument("--threshold", type=int, default=NEAR_THRESHOLD, metavar="BITS",
                   help=f"near duplicate: perceptual hashes at most this many of 256 bits apart "
                        f"(default {NEAR_THRESHOLD}, measured: docs/BENCHMARKS.md, Near duplicates)")
    p.add_argument("--examples", type=int, default=5, help="example pairs per kind (default 5)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    add_config_arguments(p, what="storage settings")


def _text(r: dict) -> str:
    head = f"{r['a']} x {r['b']}" if r["a"] != r["b"] else f"{r['a']} (within)"
    lines = [f"{head}: {r['rows_a']} x {r['rows_b']} rows"]
    for kind in ("exact", "near"):
        part = r[kind]
        if part is None:
            lines.append(f"  {kind}: not available (a dataset has no phash column; prepare it "
                         "again)")
            continue
        what = "same sha256" if kind == "exact" else f"phash within {r['threshold']} bits"
        lines.append(f"  {kind} ({what}): {part['pairs']} pair(s), {part['rows_a']} row(s) of "
                     f"A, {part['rows_b']} of B")
        lines += [f"    {x} ~ {y} ({d} bits)" for x, y, d in part["examples"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    _check_threshold(args.threshold)
    tables = [load_hashes(u, storage_cfg=cfg.storage) for u in args.datasets]
    if len(tables) == 1:
        reports = [overlap_report(tables[0], None, args.threshold, args.examples)]
    else:
        reports = [overlap_report(tables[x], tables[y], args.threshold, args.examples)
                   for x in range(len(tables)) for y in range(x + 1, len(tables))]
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    else:
        print("\n".join(_text(r) for r in reports))
    return 0


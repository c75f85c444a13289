"""``multimix prepare``: a public dataset layout → sharded Parquet + manifest + report.

Output (DESIGN.md §1), in a local folder or under ``s3://bucket/prefix``::

    manifest.json            what the dataset is (written last: its presence marks a complete set)
    report.json              every file that did not become a row, with the reason; duplicates
    data/part-00000.parquet  rows in row order (below), ~``shard_rows`` rows per shard

Row order is a fixed hash of the id (:func:`row_order_key`): reproducible, the same on every
machine, and pseudo-random, so every shard and row group mixes the classes (source folders are
class-sorted) and a streaming reader that shuffles only whole files or row groups still gets
mixed batches. Each chunk of ``shard_rows`` records in that order becomes one shard
(:func:`write_chunk`). Decoding and resizing run in a process pool (one process per core by
default; the driver writes the shards) or, with ``ray=True`` (``--ray``, or ``RAY_ADDRESS``
set), in Ray Data tasks on the cluster that also write their chunk's shard (the same
:func:`process_record` and :func:`write_chunk`: byte-identical output), so the output is the
same for any number of workers. Unreadable or truncated images and masks
whose size differs from their image are skipped and listed in ``report.json`` (``strict=True``
turns the first one into a :class:`DataError`); byte-identical files (same sha256) are all kept
and listed as duplicate groups. Nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import secrets
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timezone
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from multimix import __version__
from multimix import resources
from multimix.config import StorageConfig, add_config_arguments, load_config
from multimix.data import dicom, storage, synthetic
from multimix.data.dataset import FORMAT, SCHEMA, read_manifest
from multimix.data.images import (IMAGE_PNG_LEVEL, MASK_PNG_LEVEL, MASK_THRESHOLD, encode_png,
                                   load_grey, mask_levels, perceptual_hash, resize_image,
                                   resize_mask)
from multimix.data.sources import LAYOUTS, Record, discover
from multimix.errors import DataError, UserError

__all__ = [
    "prepare",
    "prepare_demo",
    "DatasetWriter",
    "add_arguments",
    "run",
]

#: Parquet compression per column. The PNG columns are stored as they are: compressed PNGs do
#: not shrink further, and on uncompressed ones (``png_level`` 0) Snappy saves 11 % but costs
#: 3x the read time (0.11 against 0.036 ms per 256² image, measured here).
COMPRESSION = {n: ("NONE" if n in ("image", "mask", "ignore") else "SNAPPY") for n in SCHEMA.names}

#: columns with Parquet min/max statistics: not the PNG columns, whose min and max would be
#: whole images wherever they are under Parquet's 4 KB statistics limit (small or very
#: compressible images: 24 KB of the 33 KB footer of a 64² synthetic shard, parsed by every
#: reader of every shard; nothing filters on them)
STATISTICS = [n for n in SCHEMA.names if n not in ("image", "mask", "ignore")]

_CHUNK = 32  # records per pool task


# ---------------------------------------------------------------------------------------------
# writing


#: rows per Parquet row group: the streaming pipeline's read unit. Modest, so one pipeline task
#: reads several row groups from all over the dataset and shuffles them together, and
#: ``ray.data.read_parquet`` can split a shard into many read tasks (see multimix.data.pipeline).
ROW_GROUP_ROWS = 256

#: the ``row_order`` the manifest records (see :func:`row_order_key`)
ROW_ORDER = "blake2b-64(id)"


def row_order_key(row_id: str) -> bytes:
    """Sort key of the stored row order: the 8-byte BLAKE2b digest of the id (a fixed,
    pseudo-random order: classes mixed in every shard and row group, same on every machine)."""
    return hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()


def _row_bytes(row: dict) -> int:
    return len(row["image"]) + len(row.get("mask") or b"") + len(row.get("ignore") or b"")


def row_meta(row: dict) -> dict:
    """What the driver keeps of a written row (manifest, duplicates, report): a few hundred
    bytes, never the images. ``view``: a DICOM's ``ViewPosition`` (None: not a DICOM)."""
    return {"id": row["id"], "hash": row["hash"], "path": row["path"],
            "label": row.get("label"), "ignore": row.get("ignore") is not None,
            "view": row.get("_view")}


def write_shard(fs: pafs.FileSystem, root: str, out_uri: str, rel: str, rows: list[dict],
                storage_cfg: Optional[StorageConfig] = None) -> dict:
    """Write ``rows`` (:data:`SCHEMA` dicts, in order) as the Parquet file ``root/rel``:
    serialised in memory, then written whole (:func:`storage.write_file`: atomic rename
    locally, one upload on S3). Returns its ``shard_info`` entry: ``{"path", "rows", "bytes",
    "sha256"}`` of exactly those bytes."""
    cols = {name: [r.get(name) for r in rows] for name in SCHEMA.names}
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, compression=COMPRESSION,
                   use_dictionary=["source", "task"], write_statistics=STATISTICS)
    data = memoryview(sink.getvalue())
    storage.write_file(fs, f"{root}/{rel}", data, uri=storage.join(out_uri, rel),
                       storage_cfg=storage_cfg)
    return {"path": rel, "rows": table.num_rows, "bytes": data.nbytes,
            "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class ShardTarget:
    """Where the shards of record chunks go (:meth:`DatasetWriter.shard_target`): the dataset
    URI, this write's shard-name prefix, the byte cap of one shard and the storage settings
    a Ray task resolves the URI with."""

    out_uri: str
    prefix: str
    shard_bytes: int
    storage_cfg: Optional[StorageConfig] = None


def write_chunk(target: ShardTarget, k: int, rows: list[dict],
                where: Optional[tuple[pafs.FileSystem, str]] = None) -> list[dict]:
    """Write the rows made from record chunk ``k`` (``shard_rows`` records of the final order;
    fewer rows when files were skipped) as ``data/<prefix><k:05d>.parquet``, split into
    ``…-1``, ``…-2`` … when the rows pass ``target.shard_bytes``. The same function runs in
    ``multimix prepare``'s process and in its Ray tasks, so both write the same bytes under the
    same names. ``where``: ``(filesystem, root path)`` of ``target.out_uri`` when the caller
    has them (default: resolved here, as a Ray task does). Returns the ``shard_info`` entries
    (none for a chunk without rows)."""
    fs, root = where or storage.resolve(target.out_uri, target.storage_cfg)
    parts: list[list[dict]] = [[]]
    size = 0
    for r in rows:
        if parts[-1] and size + _row_bytes(r) > target.shard_bytes:
            parts.append([])
            size = 0
        parts[-1].append(r)
        size += _row_bytes(r)
    out = []
    for j, part in enumerate(p for p in parts if p):
        rel = f"data/{target.prefix}{k:05d}{f'-{j}' if j else ''}.parquet"
        out.append(write_shard(fs, root, target.out_uri, rel, part, target.storage_cfg))
    return out


class DatasetWriter:
    """Write rows (dicts with the :data:`SCHEMA` columns) as Parquet shards under ``out_uri``.

    Rows must be added in the final order (:func:`row_order_key`). A shard is flushed every
    ``shard_rows`` rows or when its buffered bytes pass ``shard_bytes``. :meth:`finish` writes
    ``report.json`` and then ``manifest.json``.
    """

    def __init__(self, out_uri: str, storage_cfg: Optional[StorageConfig], *,
                 shard_rows: int = 1000, shard_bytes: int = 128 << 20,
                 overwrite: bool = False) -> None:
        if shard_rows < 1:
            raise UserError(f"shard_rows must be >= 1, got {shard_rows}")
        self.out_uri = out_uri.rstrip("/") if "://" in out_uri else out_uri
        self.st = storage_cfg
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        storage.check_writable(out_uri, storage_cfg)
        self.fs, self.root = storage.resolve(out_uri, storage_cfg)
        self._clear_previous(overwrite)
        self.shards: list[str] = []
        self.shard_info: list[dict] = []
        self._buf: list[dict] = []
        self._buf_bytes = 0
        self.num_rows = 0
        self.ids: list[str] = []
        self.hashes: list[str] = []
        self.paths: list[str] = []
        self.labels: list[Optional[int]] = []
        self.with_ignore = 0

    def _clear_previous(self, overwrite: bool) -> None:
        """Refuse an existing dataset unless ``overwrite``; remove leftovers of killed runs.

        The previous dataset stays valid until :meth:`finish` has written the new manifest: new
        shards get names the old manifest does not use, and the old shards are deleted only
        after the new manifest is in place (:meth:`_drop_old`)."""
        m = storage.join(self.out_uri, "manifest.json")
        self._old: Optional[dict] = None
        if storage.exists(m, self.st):
            if not overwrite:
                raise DataError(f"{self.out_uri} already holds a prepared dataset; choose another "
                                "--out or pass --overwrite")
            try:
                self._old = read_manifest(self.out_uri, self.st)
            except DataError:  # a damaged manifest: nothing of it is worth keeping
                self._old = {"shards": []}
        keep = set(self._old.get("shards") or []) if self._old else set()
        # shards of an interrupted run (named by no manifest): ours by name, so safe to remove
        for rel in storage.list_files(storage.join(self.out_uri, "data"), self.st,
                                      recursive=False):
            stale = rel.startswith("part-") and rel.endswith(".parquet") and \
                f"data/{rel}" not in keep
            if stale or (rel.startswith(".part-") and rel.endswith(".tmp")):  # or a killed write
                with storage.storage_errors(self.out_uri, self.st):
                    self.fs.delete_file(f"{self.root}/data/{rel}")
        # new shard names never collide with the old dataset's
        self._prefix = "part-" if not keep else f"part-{secrets.token_hex(4)}-"

    def _drop_old(self) -> None:
        """After the new manifest is written: delete the old dataset's shards and its splits
        (made for other rows)."""
        if self._old is None:
            return
        for rel in set(self._old.get("shards") or []) - set(self.shards):
            if rel.startswith("data/part-") and "/" not in rel[len("data/"):]:
                with storage.storage_errors(self.out_uri, self.st):
                    try:
                        self.fs.delete_file(f"{self.root}/{rel}")
                    except FileNotFoundError:
                        pass
        storage.delete_dir(storage.join(self.out_uri, "splits"), self.st)
        self._old = None

    def add(self, row: dict) -> None:
        """Buffer one row; a shard is written every ``shard_rows`` rows or ``shard_bytes``
        bytes (:meth:`add_chunk` writes whole record chunks instead: ``multimix prepare``)."""
        self._buf.append(row)
        self._buf_bytes += _row_bytes(row)
        if len(self._buf) >= self.shard_rows or self._buf_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered rows as the next shard (:func:`write_shard`)."""
        if not self._buf:
            return
        rel = f"data/{self._prefix}{len(self.shards):05d}.parquet"
        info = write_shard(self.fs, self.root, self.out_uri, rel, self._buf, self.st)
        self.record([info], [row_meta(r) for r in self._buf])
        self._buf, self._buf_bytes = [], 0

    def shard_target(self) -> "ShardTarget":
        """Where :func:`write_chunk` puts the shards of a record chunk (picklable: what Ray
        tasks get)."""
        return ShardTarget(self.out_uri, self._prefix, self.shard_bytes, self.st)

    def add_chunk(self, k: int, rows: list[dict]) -> None:
        """Write the rows made from record chunk ``k`` (:func:`write_chunk`, in this process)
        and record them; rows must come in the final order."""
        self.record(write_chunk(self.shard_target(), k, rows, where=(self.fs, self.root)),
                    [row_meta(r) for r in rows])

    def record(self, infos: list[dict], metas: list[dict]) -> None:
        """Record shards written elsewhere (a Ray task: :func:`write_chunk`) and their rows'
        :func:`row_meta`, in the final order."""
        for info in infos:
            self.shards.append(info["path"])
            self.shard_info.append(dict(info))
        for m in metas:
            self.ids.append(m["id"])
            self.hashes.append(m["hash"])
            self.paths.append(m["path"])
            self.labels.append(m["label"])
            self.with_ignore += bool(m["ignore"])
        self.num_rows += len(metas)

    def abort(self, settle_s: float = 0.0) -> None:
        """Remove the shards written so far (no manifest was written: the set is incomplete;
        a previous dataset at ``out_uri`` is left as it was), also those Ray tasks wrote that
        were not recorded yet and their temporary files (this writer's shard names).
        ``settle_s``: keep looking for up to that long, until a listing finds none for a
        second (tasks being cancelled may still finish a write)."""
        keep = set(self._old.get("shards") or []) if self._old else set()
        ours = (self._prefix, f".{self._prefix}")
        deadline, quiet_since = time.monotonic() + settle_s, None
        while True:
            found = 0
            with storage.storage_errors(self.out_uri, self.st):
                for rel in storage.list_files(storage.join(self.out_uri, "data"), self.st,
                                              recursive=False):
                    if rel.startswith(ours) and f"data/{rel}" not in keep:
                        found += 1
                        try:
                            self.fs.delete_file(f"{self.root}/data/{rel}")
                        except FileNotFoundError:
                            pass
            now = time.monotonic()
            quiet_since = (quiet_since or now) if not found else None
            if now >= deadline or (quiet_since is not None and now - quiet_since >= 1.0):
                break
            time.sleep(0.2)
        self.shards, self.shard_info, self._buf = [], [], []

    def duplicate_groups(self) -> list[list[int]]:
        """Row indices of byte-identical files, groups of ≥ 2, sorted by first id."""
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, h in enumerate(self.hashes):
            by_hash[h].append(i)
        groups = [sorted(g, key=lambda i: self.ids[i]) for g in by_hash.values() if len(g) > 1]
        return sorted(groups, key=lambda g: self.ids[g[0]])

    def finish(self, *, source: str, task: str, image_size: int,
               classes: Optional[list[str]], skipped: list[dict], parameters: dict,
               ignored_files: Iterable[str] = (), synthetic: bool = False,
               non_binary: Iterable[dict] = (), views: Optional[dict] = None) -> dict:
        """Flush the last shard, write ``report.json`` and ``manifest.json`` (the commit point),
        then delete a replaced dataset's shards; return the manifest.

        ``non_binary``: masks with more than two grey levels (``{"path", "kind", "levels",
        "mid_fraction"}``), listed in the report and counted in the manifest (seg only).
        ``views``: the DICOM views kept and left out (:func:`prepare`), in the report; the
        manifest counts the rows left out (``views_left_out``)."""
        self._flush()
        if self.num_rows == 0:
            raise DataError(f"no rows to write to {self.out_uri}: every file was skipped "
                            f"({len(skipped)}; first: {skipped[0] if skipped else 'none'})")
        groups = self.duplicate_groups()
        dup_report = []
        for g in groups:
            entry = {"hash": self.hashes[g[0]], "ids": [self.ids[i] for i in g],
                     "paths": [self.paths[i] for i in g]}
            if task == "cls":
                labs = sorted({self.labels[i] for i in g})
                entry["labels"] = [classes[x] for x in labs] if classes else labs
                entry["conflicting_labels"] = len(labs) > 1
            dup_report.append(entry)
        if task == "cls":
            counts_by_label = Counter(self.labels)
            counts = {"cls": {c: int(counts_by_label.get(i, 0)) for i, c in enumerate(classes)}}
        elif task == "unlabeled":
            counts = {"unlabeled": self.num_rows}
        else:
            counts = {"seg": self.num_rows, "with_ignore": int(self.with_ignore)}
        non_binary = list(non_binary)
        report = {"source": source, "num_rows": self.num_rows, "skipped": skipped,
                  "duplicates": dup_report, "ignored_files": sorted(ignored_files),
                  **({"non_binary_masks": non_binary} if task == "seg" else {}),
                  **({"views": views} if views else {})}
        storage.write_text(storage.join(self.out_uri, "report.json"),
                           json.dumps(report, indent=1) + "\n", self.st)
        manifest = {
            "format": FORMAT,
            "num_rows": self.num_rows,
            "image_size": int(image_size),
            "source": source,
            "task": task,
            **({"classes": list(classes)} if task == "cls" else {}),
            "counts": counts,
            "shards": list(self.shards),
            "shard_info": [dict(i) for i in self.shard_info],
            "row_order": ROW_ORDER,
            "duplicate_groups": [[self.ids[i] for i in g] for g in groups],
            "skipped": len(skipped),
            **({"non_binary_masks": len(non_binary)} if task == "seg" else {}),
            **({"views_left_out": sum(views["left_out"].values())} if views else {}),
            "report": "report.json",
            "synthetic": bool(synthetic),
            "parameters": parameters,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "multimix_version": __version__,
        }
        # the commit point: until this rename/upload, readers see the previous dataset (if any)
        storage.write_text(storage.join(self.out_uri, "manifest.json"),
                           json.dumps(manifest, indent=1) + "\n", self.st)
        self._drop_old()
        return manifest


# ---------------------------------------------------------------------------------------------
# per-record work (runs in pool processes)

_WORKER_FS: Optional[pafs.FileSystem] = None


def _init_worker(fs: pafs.FileSystem) -> None:
    global _WORKER_FS
    _WORKER_FS = fs
    # leave the parent's threads alone: one thread per process is what we want
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _read_file(fs: pafs.FileSystem, path: str) -> bytes:
    if isinstance(fs, pafs.LocalFileSystem):
        with open(path, "rb") as f:
            return f.read()
    with fs.open_input_stream(path) as f:
        return f.read()


def _load(fs, path: str, rel: str, what: str,
          views: Optional[frozenset] = None) -> tuple[Optional[bytes], Optional[np.ndarray],
                                                      Optional[str], Optional[str]]:
    """``(bytes, grey array, None, view)`` or ``(None, None, reason, None)``; ``view`` is a
    DICOM's :func:`~multimix.data.dicom.view_position` (None for other images). With ``views``,
    a DICOM of another view is not decoded: ``(bytes, None, None, view)``."""
    try:
        data = _read_file(fs, path)
    except FileNotFoundError:
        return None, None, f"{what} file not found", None
    except OSError as exc:
        return None, None, f"{what} file cannot be read ({exc})", None
    try:
        if dicom.is_dicom(data, rel):
            got = dicom.read_dicom(data, name=rel, views=views)
            # pixels None: another view, left out before its pixels are decoded
            return data, got.pixels, None, got.view
        return data, load_grey(data, name=rel), None, None
    except DataError as exc:
        msg = str(exc)
        return None, None, ((f"{what}: " + msg.split(": ", 1)[1]) if ": " in msg
                            else msg), None


def process_record(rec: Record, image_size: int, source: str, task: str,
                   fs: pafs.FileSystem, png_level: int = IMAGE_PNG_LEVEL,
                   mask_threshold: int = MASK_THRESHOLD,
                   views: Optional[frozenset] = None) -> tuple[str, dict]:
    """Decode, check, resize and encode one record (the image at zlib level ``png_level``,
    masks at :data:`~multimix.data.images.MASK_PNG_LEVEL`, binarised with ``> mask_threshold``
    unless they are 0/1 masks).

    Returns ``("row", row_dict)``, ``("skip", {"path", "reason", "file"})`` or, for a DICOM
    whose view is not in ``views`` (``prepare --views``), ``("view", {"path", "view"})``; a row
    whose mask or ignore mask is not binary (:func:`~multimix.data.images.mask_levels`) carries
    ``row["_non_binary"]``: ``[{"path", "kind", "levels", "mid_fraction"}]``, a DICOM row
    ``row["_view"]`` (not columns). Of a DICOM header nothing but the pixel tags and the view is
    used: ids and paths come from the file names.
    """
    data, img, why, view = _load(fs, rec.image_file, rec.path, "image", views)
    if why:
        return "skip", {"path": rec.path, "reason": why, "file": rec.image_file}
    if img is None:
        return "view", {"path": rec.path, "view": view}
    h, w = img.shape
    row = {
        "id": rec.id, "source": source, "task": task,
        "image": encode_png(resize_image(img, image_size), png_level), "mask": None, "ignore": None,
        "label": rec.label, "hash": hashlib.sha256(data).hexdigest(), "path": rec.path,
        "orig_height": h, "orig_width": w, "phash": perceptual_hash(img),
    }
    if view is not None:
        row["_view"] = view
    for kind, file, rel in (("mask", rec.mask_file, rec.mask_path),
                            ("ignore", rec.ignore_file, rec.ignore_path)):
        if file is None:
            continue
        _, m, why, _ = _load(fs, file, rel, kind)
        if why:
            return "skip", {"path": rec.path, "reason": f"{why} ({rel})", "file": file}
        if m.shape != (h, w):
            return "skip", {"path": rec.path,
                            "reason": f"{kind} {rel} is {m.shape[1]}x{m.shape[0]} but the image "
                                      f"is {w}x{h} (width x height)", "file": file}
        levels = mask_levels(m)
        if levels is not None:
            row.setdefault("_non_binary", []).append({"path": rel, "kind": kind, **levels})
        row[kind] = encode_png(resize_mask(m, image_size, mask_threshold) * np.uint8(255),
                               MASK_PNG_LEVEL)
    return "row", row


def _process_chunk(recs: list[Record], image_size: int, source: str, task: str, png_level: int,
                   mask_threshold: int, views: Optional[frozenset]) -> list[tuple[str, dict]]:
    return [process_record(r, image_size, source, task, _WORKER_FS, png_level, mask_threshold,
                           views) for r in recs]


def default_workers() -> int:
    """Processes for decoding: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _results(records: list[Record], image_size: int, source: str, task: str,
             fs: pafs.FileSystem, workers: int, png_level: int = IMAGE_PNG_LEVEL,
             mask_threshold: int = MASK_THRESHOLD,
             views: Optional[frozenset] = None) -> Iterator[tuple[str, dict]]:
    """Process all records; yield results in record order. At most ``4 × workers`` chunks are in
    flight, so memory stays bounded on large sets."""
    chunks = [records[i:i + _CHUNK] for i in range(0, len(records), _CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        for rec in records:
            yield process_record(rec, image_size, source, task, fs, png_level, mask_threshold,
                                 views)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may run Ray/S3 threads
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx,
                             initializer=_init_worker, initargs=(fs,)) as ex:
        pending: list[Future] = []
        it = iter(chunks)
        try:
            for chunk in it:
                pending.append(ex.submit(_process_chunk, chunk, image_size, source, task,
                                         png_level, mask_threshold, views))
                if len(pending) >= 4 * workers:
                    yield from pending.pop(0).result()
            while pending:
                yield from pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


def _ray_chunks(chunks: list[list[Record]], image_size: int, source: str, task: str,
                fs: pafs.FileSystem, target: ShardTarget, png_level: int = IMAGE_PNG_LEVEL,
                mask_threshold: int = MASK_THRESHOLD, strict: bool = False,
                views: Optional[frozenset] = None
                ) -> Iterator[tuple[list, list, list[dict], list[dict]]]:
    """Prepare on the Ray cluster: one Ray Data map task per record chunk (``shard_rows``
    records, one CPU, on any node) reads its files through ``fs``, runs the same
    :func:`process_record` as the process pool and writes the chunk's shard(s) itself
    (:func:`write_chunk`, through ``target``), so no image passes through the driver. Yields
    per chunk, in chunk order (``preserve_order``): ``(results, non_binary, shard_infos,
    metas)`` where ``results`` are the skips (``("skip", item)``) and the views left out
    (``("view", item)``) in record order and
    ``metas`` the written rows' :func:`row_meta`. ``strict``: a chunk with a skip writes
    nothing. The driver holds the metadata of every row (~200 bytes each) and a bounded window
    of chunk results (the streaming executor's backpressure)."""
    import pickle

    import ray

    def work(batch: dict) -> dict:
        out = []
        for k, blob in zip(batch["k"], batch["recs"]):
            results = [process_record(Record(**d), image_size, source, task, fs, png_level,
                                      mask_threshold, views) for d in pickle.loads(blob)]
            skips = [r for r in results if r[0] != "row"]
            failed = strict and any(kind == "skip" for kind, _ in skips)
            rows = [item for kind, item in results if kind == "row"]
            non_binary = [nb for r in rows for nb in r.pop("_non_binary", ())]
            infos = [] if failed else write_chunk(target, int(k), rows)
            metas = [] if failed else [row_meta(r) for r in rows]
            out.append(pickle.dumps((skips, non_binary, infos, metas), protocol=5))
        return {"result": out}

    items = [{"k": k, "recs": pickle.dumps([r.__dict__ for r in c], protocol=5)}
             for k, c in enumerate(chunks)]
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the new dataset keeps a copy of the context
    try:
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    finally:
        ctx.execution_options.preserve_order = before  # other Ray Data users keep theirs
    assert ds.context.execution_options.preserve_order
    ds = ds.map_batches(work, batch_size=1, num_cpus=1, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        for blob in batch["result"]:
            yield pickle.loads(blob)


def use_ray(flag: Optional[bool]) -> bool:
    """Run on Ray: ``--ray`` given, or (flag None) ``RAY_ADDRESS`` set in the environment."""
    return bool(os.environ.get("RAY_ADDRESS")) if flag is None else bool(flag)


class _Progress:
    """One stderr line every ``every`` seconds: done/total, rate, skipped."""

    def __init__(self, total: int, enabled: bool, label: str, every: float = 5.0) -> None:
        self.total, self.enabled, self.label, self.every = total, enabled, label, every
        self.t0 = self.last = time.monotonic()

    def update(self, done: int, skipped: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(f"{self.label}: {done}/{self.total} images ({rate:.0f}/s), {skipped} skipped"
              + (f", {now - self.t0:.1f}s" if final else ""), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the entry points


def _check_png_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise UserError(f"--png-level must be an integer from 0 to 9, got {level!r}")


def _check_views(views: Optional[list[str]]) -> Optional[frozenset]:
    """``--views PA,AP`` → ``frozenset({"PA", "AP"})`` (upper-cased; None: no filter)."""
    if views is None:
        return None
    vs = [v.strip().upper() for v in views]
    if not vs or any(not v for v in vs):
        raise UserError(f"--views {','.join(views)!r}: give View Position values separated by "
                        f"commas, e.g. --views PA,AP ({dicom.NO_VIEW}: also DICOM files "
                        "without the tag)")
    return frozenset(vs)


def _check_mask_threshold(t) -> None:
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 254:
        raise UserError(f"--mask-threshold must be an integer from 0 to 254, got {t!r}")


def _file_uri(src, item: dict) -> str:
    """The URI of the file a skip ``item`` is about (for ``--strict`` messages)."""
    f = item.get("file")
    if f is None:
        return src.file_uri(item["path"])
    return f"s3://{f}" if storage.is_s3(src.uri) else f


def prepare(source_uri: str, out_uri: str, *, layout: str = "auto", image_size: int = 256,
            source_name: Optional[str] = None, storage_cfg: Optional[StorageConfig] = None,
            strict: bool = False, split: Optional[str] = None, shard_rows: int = 1000,
            workers: Optional[int] = None, progress: bool = True,
            overwrite: bool = False, png_level: int = IMAGE_PNG_LEVEL,
            classes: Optional[list[str]] = None,
            mask_threshold: int = MASK_THRESHOLD, ray: Optional[bool] = False,
            views: Optional[list[str]] = None) -> dict:
    """Prepare the dataset at ``source_uri`` (folder or CSV, local or ``s3://``) into ``out_uri``.

    Args:
        layout: ``auto`` | ``folders`` | ``pairs`` | ``csv`` | ``images`` (unlabeled, task
            ``unlabeled``; see :mod:`multimix.data.sources`).
        image_size: side of the stored square images/masks (area filter when shrinking).
        source_name: the ``source`` column and manifest field (default: the folder's name).
        strict: raise :class:`DataError` at the first file that would be skipped (unreadable
            file, unknown label, mask of the wrong size).
        split: for class folders with a split level (``train/``…): which one.
        shard_rows: records per Parquet shard (each chunk of ``shard_rows`` records in the
            row order is one shard; fewer rows where files were skipped, split further past
            128 MB).
        workers: decoding processes (default: one per available CPU; 1 = in this process).
        progress: print a progress line to stderr every few seconds.
        overwrite: replace an existing prepared dataset at ``out_uri`` (it stays readable until
            the new manifest is written).
        png_level: zlib level of the stored images, 0 (default: uncompressed deflate blocks,
            ~1.4x the bytes of level 1, decoded 3-7x faster every epoch) to 9. Masks are
            always stored at level 1 (they compress ~30x).
        classes: the class set in label order (``--classes NORMAL,PNEUMONIA``); rows with any
            other label are skipped as unknown labels. Default: inferred
            (:mod:`multimix.data.sources`).
        mask_threshold: masks other than 0/1 masks: a pixel ``> mask_threshold`` is lung.
            Masks with more than two grey levels are counted and listed in ``report.json``
            (``non_binary_masks``).
        ray: decode/resize/encode on Ray (Ray Data tasks on the cluster in ``RAY_ADDRESS``, or a
            local Ray; the tasks write the shards, the driver the manifest and report); None:
            on Ray when ``RAY_ADDRESS`` is set.
            The output is byte-identical to the process-pool path's (same per-file function,
            same order, same writer); only ``created`` in the manifest differs.
        views: keep only DICOM files whose ``ViewPosition`` is one of these (``--views PA,AP``;
            ``NONE`` also keeps DICOM files without the tag, which are otherwise left out);
            images that are not DICOM carry no view and are kept. The files left out are
            listed in ``report.json`` (``views.left_out``: counts per view;
            ``views.left_out_files``) and counted in the manifest (``views_left_out``), not
            as skipped. ``report.json`` also counts the rows kept per view (any DICOM input).

    Returns:
        The manifest (also written to ``out_uri/manifest.json``).
    """
    if image_size < 8:
        raise UserError(f"--size must be >= 8, got {image_size}")
    _check_png_level(png_level)
    _check_mask_threshold(mask_threshold)
    view_set = _check_views(views)
    src = discover(source_uri, layout, split=split, name=source_name, classes=classes,
                   storage_cfg=storage_cfg)
    if strict and src.problems:
        p = src.problems[0]
        raise DataError(f"{src.file_uri(p['path'])}: {p['reason']} (--strict; "
                        f"{len(src.problems)} such problem(s) in the layout)")
    writer = DatasetWriter(out_uri, storage_cfg, shard_rows=shard_rows, overwrite=overwrite)
    workers = default_workers() if workers is None else max(1, int(workers))
    skipped = list(src.problems)
    non_binary: list[dict] = []
    left_out: list[dict] = []
    kept_views: Counter = Counter()
    prog = _Progress(len(src.records), progress, f"prepare {src.name}")
    done = 0
    records = sorted(src.records, key=lambda r: row_order_key(r.id))
    # chunk k of shard_rows records becomes shard k (fewer rows where files were skipped),
    # written by whichever executor processed it: the same bytes under the same names
    chunks = [records[i:i + shard_rows] for i in range(0, len(records), shard_rows)]

    def fail(item: dict, settle_s: float = 0.0) -> DataError:
        writer.abort(settle_s)
        return DataError(f"{_file_uri(src, item)}: {item['reason']} (--strict)")

    if use_ray(ray):
        resources.connect_ray(storage_cfg)  # as train does: keys local-only
        prog.label += " (Ray)"
        prog.t0 = prog.last = time.monotonic()  # the rate leaves Ray's start-up out
        # the tasks get the filesystems pickled: keys in the config reach only a local Ray
        # (connect_ray refuses them on a cluster, whose processes use the AWS chain)
        out = _ray_chunks(chunks, image_size, src.name, src.task, src.fs,
                          writer.shard_target(), png_level, mask_threshold, strict, view_set)
        for chunk, (skips, nb, infos, metas) in zip(chunks, out):
            done += len(chunk)
            fails = [item for kind, item in skips if kind == "skip"]
            if strict and fails:
                out.close()  # stops the execution: the tasks still running are cancelled
                raise fail(fails[0], settle_s=10.0)
            skipped.extend({k: v for k, v in item.items() if k != "file"} for item in fails)
            left_out.extend(item for kind, item in skips if kind == "view")
            non_binary.extend(nb)
            kept_views.update(m["view"] for m in metas if m.get("view") is not None)
            writer.record(infos, metas)
            prog.update(done, len(skipped))
    else:
        results = _results(records, image_size, src.name, src.task, src.fs, workers, png_level,
                           mask_threshold, view_set)
        for k, chunk in enumerate(chunks):
            rows = []
            for _ in chunk:
                kind, item = next(results)
                done += 1
                if kind == "skip":
                    if strict:
                        raise fail(item)
                    item.pop("file", None)
                    skipped.append(item)
                elif kind == "view":
                    left_out.append(item)
                else:
                    non_binary.extend(item.pop("_non_binary", ()))
                    if item.get("_view") is not None:
                        kept_views[item["_view"]] += 1
                    rows.append(item)
                prog.update(done, len(skipped))
            writer.add_chunk(k, rows)
    prog.update(done, len(skipped), final=True)
    parameters = {"source_uri": source_uri, "layout": src.layout, "split": src.split,
                  "image_size": image_size, "strict": strict, "shard_rows": shard_rows,
                  "png_level": png_level}
    if src.task == "seg":
        parameters["mask_threshold"] = mask_threshold
    if classes is not None:
        parameters["classes"] = list(src.classes or [])
    view_report = None
    if view_set is not None or kept_views:
        parameters["views"] = sorted(view_set) if view_set is not None else None
        view_report = {"filter": parameters["views"], "kept": dict(sorted(kept_views.items())),
                       "left_out": dict(sorted(Counter(i["view"] for i in left_out).items())),
                       "left_out_files": left_out}
        if left_out:
            print(f"prepare {src.name}: {len(left_out)} DICOM file(s) of other views left out "
                  f"(--views {','.join(sorted(view_set))}): "
                  + ", ".join(f"{v} {n}" for v, n in view_report["left_out"].items()),
                  file=sys.stderr)
    return writer.finish(source=src.name, task=src.task, image_size=image_size,
                         classes=src.classes, skipped=skipped, parameters=parameters,
                         ignored_files=src.other_files, non_binary=non_binary,
                         views=view_report)


def prepare_demo(out_uri: str, *, n_cls: int = 400, n_seg: int = 100, image_size: int = 64,
                 seed: int = 0, storage_cfg: Optional[StorageConfig] = None,
                 shard_rows: int = 1000, overwrite: bool = False,
                 png_level: int = IMAGE_PNG_LEVEL) -> dict:
    """Write the synthetic demo set: ``<out>/cls`` (NORMAL/PNEUMONIA phantoms) and ``<out>/seg``
    (phantoms with lung masks). Marked ``"synthetic": true``, source ``synthetic-demo``.

    Returns:
        ``{"cls": manifest, "seg": manifest}``.
    """
    _check_png_level(png_level)
    cls_recs, seg_recs = synthetic.make_demo(n_cls, n_seg, image_size, seed)
    params = {"n_cls": n_cls, "n_seg": n_seg, "image_size": image_size, "seed": seed,
              "generator": "multimix.data.synthetic.make_demo", "png_level": png_level}
    out = {}
    for task, recs in (("cls", cls_recs), ("seg", seg_recs)):
        writer = DatasetWriter(storage.join(out_uri, task), storage_cfg, shard_rows=shard_rows,
                               overwrite=overwrite)
        for r in sorted(recs, key=lambda r: row_order_key(r["id"])):
            png = encode_png(r["image"], png_level)
            writer.add({
                "id": r["id"], "source": synthetic.SOURCE_NAME, "task": task, "image": png,
                "mask": (encode_png(r["mask"] * np.uint8(255), MASK_PNG_LEVEL)
                         if task == "seg" else None),
                "ignore": None, "label": r.get("label"), "hash": hashlib.sha256(png).hexdigest(),
                "path": r["id"] + ".png", "orig_height": image_size, "orig_width": image_size,
                "phash": perceptual_hash(r["image"]),
            })
        out[task] = writer.finish(source=synthetic.SOURCE_NAME, task=task, image_size=image_size,
                                  classes=list(synthetic.CLASSES) if task == "cls" else None,
                                  skipped=[], parameters=params, synthetic=True)
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", help="dataset folder or CSV manifest (local or s3://)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="folders: ROOT/[SPLIT/]CLASS/*.png; pairs: images/ + masks/ (+ ignore/); "
                        "csv: path,label or path,mask_path[,ignore_path]; images: ROOT/**/*.png "
                        "with no labels (an extra unlabeled pool; never chosen by auto) "
                        "(default: auto)")
    p.add_argument("--size", type=int, default=None,
                   help="stored image side in pixels (default: data.image_size of the config, "
                        "256)")
    p.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    p.add_argument("--split", default=None,
                   help="split folder to use when the class folders sit below train/, test/ …")
    p.add_argument("--strict", action="store_true",
                   help="fail at the first unreadable file or unknown label instead of skipping "
                        "and reporting it")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: one per CPU; not used on Ray)")
    p.add_argument("--ray", action="store_true", default=None,
                   help="decode and resize on Ray (the cluster in RAY_ADDRESS, else a local Ray); "
                        "the default when RAY_ADDRESS is set. Same output as without")
    p.add_argument("--no-ray", dest="ray", action="store_false",
                   help="use local processes even when RAY_ADDRESS is set")
    p.add_argument("--shard-rows", type=int, default=1000,
                   help="files per Parquet shard (fewer rows where files are skipped; on Ray, "
                        "one task per shard)")
    p.add_argument("--png-level", type=int, default=IMAGE_PNG_LEVEL, metavar="0-9",
                   help="zlib level of the stored images (default 0: uncompressed, ~1.4x the "
                        "bytes of 1, decoded 3-7x faster on every epoch; 1-9: smaller shards)")
    p.add_argument("--classes", default=None, metavar="A,B",
                   help="class names in label order (e.g. NORMAL,PNEUMONIA); rows with any other "
                        "label (a CSV typo, an integer >= the count, another class folder) are "
                        "skipped as unknown labels and listed in report.json (fatal with "
                        "--strict). Default: the class folders; for a CSV, the labels found")
    p.add_argument("--mask-threshold", type=int, default=MASK_THRESHOLD, metavar="0-254",
                   help="masks that are not 0/1: a pixel > this value is lung (default 127). "
                        "Masks with more than two grey levels are counted, printed and listed "
                        "in report.json (non_binary_masks)")
    p.add_argument("--views", default=None, metavar="PA,AP",
                   help="keep only DICOM files whose View Position (0018,5101) is one of these "
                        f"({dicom.NO_VIEW}: also those without the tag, otherwise left out); "
                        "non-DICOM images are kept. The files left out are counted per view "
                        "in report.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset at --out (the old one stays readable until "
                        "the new one is complete)")
    p.add_argument("--demo", action="store_true",
                   help="write the built-in synthetic demo set (<out>/cls and <out>/seg) instead")
    p.add_argument("--demo-count", type=int, default=400,
                   help="--demo: classification phantoms (segmentation: a quarter, at least 16)")
    p.add_argument("--seed", type=int, default=0, help="--demo: generator seed")
    add_config_arguments(p, what="storage settings")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _summary(m: dict, out_uri: str) -> str:
    if m["task"] == "cls":
        counts = ", ".join(f"{c} {n}" for c, n in m["counts"]["cls"].items())
    elif m["task"] == "unlabeled":
        counts = "unlabeled images"
    else:
        counts = f"{m['counts']['seg']} image-mask pairs, {m['counts']['with_ignore']} with ignore"
    dups = len(m["duplicate_groups"])
    nb = m.get("non_binary_masks")
    thr = m.get("parameters", {}).get("mask_threshold", MASK_THRESHOLD)
    nb_text = (f"; {nb} non-binary mask(s) (more than two grey levels; binarised at > {thr}, "
               "--mask-threshold)" if nb else "")
    return (f"{out_uri}: {m['num_rows']} rows ({counts}) at {m['image_size']}px, "
            f"{len(m['shards'])} shard(s); {dups} duplicate group(s); {m['skipped']} skipped"
            f"{nb_text}; report: {storage.join(out_uri, m['report'])}")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    size = args.size if args.size is not None else cfg.data.image_size
    if args.demo:
        if args.source:
            raise UserError("give either SOURCE or --demo, not both")
        if args.demo_count < 4:
            raise UserError(f"--demo-count must be >= 4, got {args.demo_count}")
        ms = prepare_demo(args.out, n_cls=args.demo_count, n_seg=max(16, args.demo_count // 4),
                          image_size=size if args.size is not None else 64, seed=args.seed,
                          storage_cfg=cfg.storage, shard_rows=args.shard_rows,
                          overwrite=args.overwrite, png_level=args.png_level)
        for task, m in ms.items():
            print("synthetic " + _summary(m, storage.join(args.out, task)))
        return 0
    if not args.source:
        raise UserError("missing SOURCE (a dataset folder or CSV), or pass --demo")
    m = prepare(args.source, args.out, layout=args.layout, image_size=size,
                source_name=args.name, storage_cfg=cfg.storage, strict=args.strict,
                split=args.split, shard_rows=args.shard_rows, workers=args.workers,
                progress=not args.quiet, overwrite=args.overwrite, png_level=args.png_level,
                classes=args.classes.split(",") if args.classes else None,
                mask_threshold=args.mask_threshold, ray=args.ray,
                views=args.views.split(",") if args.views is not None else None)
    print(_summary(m, args.out))
    return 0

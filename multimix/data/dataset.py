"""The prepared-dataset format's read side: the manifest, the shards checked against it, and
the tables read from them (no Ray). :mod:`multimix.data.prepare` is the write side.

A prepared dataset (DESIGN.md §1) is ``manifest.json`` + ``report.json`` + ``data/part-*.parquet``
in a local folder or under ``s3://bucket/prefix``. ``manifest.json`` lists the shards
(``"shards"``: relative paths) and one ``"shard_info"`` entry per shard, in the same order::

    {"path": "data/part-00000.parquet", "rows": 1000, "bytes": 53421337, "sha256": "9f…"}

Every reader of a prepared dataset (:mod:`multimix.data.readers`, :mod:`multimix.data.pools`,
:func:`read_table`) goes through :func:`open_dataset`, which checks, before any row is used:

- every listed shard exists (one ``get_file_info`` call for all of them);
- its byte size is the one ``shard_info`` records;
- its Parquet footer can be read (a truncated shard fails here, named) and its row count is the
  one ``shard_info`` records; it has the ``id`` and ``image`` columns, and every shard has the
  first one's column types;
- the rows add up to the manifest's ``num_rows``.

A mismatch is one :class:`~multimix.errors.DataError` naming the shard, e.g.
``/data/kermany/data/part-00003.parquet: 412 rows, manifest says 1000``. The sha256 of every
shard is checked by ``multimix verify DATASET`` (:func:`check`, ``checksums=True``) and, on
read, only where it is cheap: a local dataset of at most :data:`READ_CHECKSUM_BYTES` (DESIGN
§11 has the measurements). Datasets written before ``shard_info`` existed get the shard-list
and row-count checks only.

Footers are read once per process and dataset state (:func:`open_dataset` keeps what it read,
keyed by the manifest and the shards' sizes and modification times), so the several readers of
one run pay for them once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from multimix.config import StorageConfig
from multimix.data import storage
from multimix.errors import DataError

__all__ = ["FORMAT", "SCHEMA", "OPTIONAL_COLUMNS", "ShardFacts", "VerifiedDataset", "check",
           "checksum_on_read", "open_dataset", "read_manifest", "read_table", "shard_entry",
           "shard_paths", "shard_uris"]

FORMAT = "multimix-prepared/1"

#: Parquet schema of a prepared dataset (DESIGN.md §1)
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("mask", pa.binary()),
    pa.field("ignore", pa.binary()),
    pa.field("label", pa.int32()),
    pa.field("hash", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("orig_height", pa.int32(), nullable=False),
    pa.field("orig_width", pa.int32(), nullable=False),
    pa.field("phash", pa.binary(32)),
])

#: columns added after the first release: a dataset prepared before lacks them (readers that
#: need one check ``schema.names``; see :mod:`multimix.data.overlap`)
OPTIONAL_COLUMNS = ("phash",)


# ---------------------------------------------------------------------------------------------
# the manifest and the tables


def read_manifest(uri: str, storage_cfg: Optional[StorageConfig] = None) -> dict:
    """The ``manifest.json`` of a prepared dataset.

    Raises:
        DataError: ``not a prepared dataset: <uri>/manifest.json missing``, invalid JSON or an
            unknown format.
        StorageError: S3 trouble (credentials, bucket, endpoint).
    """
    m_uri = storage.join(uri, "manifest.json")
    try:
        text = storage.read_text(m_uri, storage_cfg)
    except DataError:
        raise DataError(f"not a prepared dataset: {m_uri} missing "
                        "(write one with `multimix prepare`)") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{m_uri}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{m_uri}: unknown format {got!r} (expected {FORMAT!r})")
    return manifest


def shard_uris(uri: str, manifest: dict) -> list[str]:
    """Full URIs of the dataset's Parquet shards (for ``ray.data.read_parquet`` & co.)."""
    return [storage.join(uri, rel) for rel in manifest["shards"]]


def shard_paths(uri: str, storage_cfg: Optional[StorageConfig] = None):
    """``(pyarrow filesystem, [shard paths], manifest)`` of a prepared dataset.

    Raises:
        DataError: the manifest lists no shards.
    """
    manifest = read_manifest(uri, storage_cfg)
    fs, root = storage.resolve(uri, storage_cfg)
    shards = manifest.get("shards") or []
    if not shards:
        raise DataError(f"{uri}: the manifest lists no shards")
    return fs, [f"{root.rstrip('/')}/{s}" for s in shards], manifest


def read_table(uri: str, columns: Optional[list[str]] = None,
               storage_cfg: Optional[StorageConfig] = None, *, manifest: Optional[dict] = None,
               data=None) -> pa.Table:
    """Read (some columns of) a prepared dataset into one Arrow table, in shard order.

    ``columns=["id", "label", "hash"]`` reads only those column chunks, not the image bytes.
    ``manifest`` / ``data`` (a :class:`multimix.data.verify.VerifiedDataset` of ``uri``): what
    the caller already read and checked, not read or checked again.
    """
    if manifest is None:
        manifest = read_manifest(uri, storage_cfg)
    if not manifest.get("shards"):
        return SCHEMA.empty_table().select(columns) if columns else SCHEMA.empty_table()
    if data is None:
        data = open_dataset(uri, storage_cfg, manifest=manifest)  # shards checked
    fs, paths = data.fs, data.paths
    with storage.storage_errors(uri, storage_cfg):
        tables = [pq.read_table(p, columns=columns, filesystem=fs) for p in paths]
    return pa.concat_tables(tables, promote_options="default")  # nullability may differ


# ---------------------------------------------------------------------------------------------
# the shards checked against the manifest

#: a local dataset up to this many bytes has its checksums verified when a process first reads
#: it (measured, DESIGN §11: Kermany at 256 px, 328 MiB in 6 shards, hashes in 0.4 s on this
#: 2-core machine; the footer checks alone take 4 ms); larger or ``s3://`` ones (a second
#: download) by ``multimix verify``
READ_CHECKSUM_BYTES = 1 << 30

_CHUNK = 8 << 20


@dataclass
class ShardFacts:
    """One shard as found: ``rel`` (path relative to the dataset, as in the manifest), ``path``
    (on ``fs``), ``bytes``, ``rows`` and rows per row group (``groups``)."""

    rel: str
    path: str
    bytes: int
    rows: int
    groups: list = field(default_factory=list)
    #: ``{column: Arrow type as text}`` from the footer (nullability left out)
    types: dict = field(default_factory=dict)


@dataclass
class VerifiedDataset:
    """A prepared dataset whose shards matched its manifest: ``fs`` (pyarrow filesystem),
    ``manifest`` (dict), ``shards`` (:class:`ShardFacts`, manifest order)."""

    uri: str
    fs: object
    manifest: dict
    shards: list

    @property
    def paths(self) -> list:
        """Shard paths on ``fs``, manifest order."""
        return [s.path for s in self.shards]

    def row_groups(self) -> list:
        """``[(path, row group, rows), ...]`` of the non-empty row groups, from the footers."""
        return [(s.path, g, n) for s in self.shards for g, n in enumerate(s.groups) if n]


def shard_entry(fs, path: str, rel: str) -> dict:
    """The ``shard_info`` entry of one written shard: ``{"path", "rows", "bytes", "sha256"}``
    (what ``multimix prepare`` records; also used by tests to build manifests)."""
    facts = _footer(fs, path, rel, _size(fs, path))
    return {"path": rel, "rows": facts.rows, "bytes": facts.bytes,
            "sha256": _sha256(fs, path)}


def checksum_on_read(uri: str, manifest: dict) -> bool:
    """Whether readers verify checksums: a local dataset of at most :data:`READ_CHECKSUM_BYTES`
    with ``shard_info`` (an ``s3://`` one would be downloaded twice)."""
    info = manifest.get("shard_info")
    if not info or "://" in uri and not uri.startswith("file://"):
        return False
    return sum(int(e.get("bytes", 0)) for e in info) <= READ_CHECKSUM_BYTES


# ---------------------------------------------------------------------------------------------
# checks


def _size(fs, path: str) -> int:
    return int(fs.get_file_info(path).size)


def _footer(fs, path: str, rel: str, size: int) -> ShardFacts:
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    types = {f.name: str(f.type) for f in meta.schema.to_arrow_schema()}
    return ShardFacts(rel=rel, path=path, bytes=size, rows=int(meta.num_rows), groups=groups,
                      types=types)


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def _shard_list(uri: str, manifest: dict, where: str) -> tuple[list, list, list]:
    """``(rels, info or None per shard, problems)`` from the manifest."""
    rels = manifest.get("shards") or []
    if not isinstance(rels, list) or not all(isinstance(r, str) for r in rels):
        return [], [], [f"{where}: \"shards\" must be a list of relative paths"]
    if not rels:
        return [], [], [f"{uri}: the manifest lists no shards"]
    info = manifest.get("shard_info")
    if info is None:
        return rels, [None] * len(rels), []
    if (not isinstance(info, list) or len(info) != len(rels)
            or any(not isinstance(e, dict) or e.get("path") != r for e, r in zip(info, rels))):
        return rels, [None] * len(rels), [
            f"{where}: \"shard_info\" does not list the same shards as \"shards\""]
    return rels, info, []


def check(uri: str, storage_cfg=None, *, checksums: bool = False,
          manifest: Optional[dict] = None, extra_files: bool = False):
    """Check a prepared dataset against its manifest.

    Args:
        checksums: also hash every shard (reads all its bytes) and compare with ``shard_info``.
        manifest: the manifest, when already read.
        extra_files: also report ``data/part-*.parquet`` files the manifest does not list.

    Returns ``(VerifiedDataset or None, problems)``: one line per problem, each naming the
    shard (``<uri>/<rel>: …``) or the manifest; ``VerifiedDataset`` when there are none.

    Raises:
        DataError: no manifest (``not a prepared dataset``). StorageError: storage trouble.
    """
    manifest = manifest if manifest is not None else read_manifest(uri, storage_cfg)
    where = storage.join(uri, "manifest.json")
    rels, info, problems = _shard_list(uri, manifest, where)
    if not rels:
        return None, problems
    fs, root = storage.resolve(uri, storage_cfg)
    root = root.rstrip("/")
    paths = [f"{root}/{r}" for r in rels]
    name = {p: storage.join(uri, r) for p, r in zip(paths, rels)}
    with storage.storage_errors(uri, storage_cfg):
        infos = fs.get_file_info(paths)
    todo = []
    for p, r, fi, e in zip(paths, rels, infos, info):
        if fi.type != pafs.FileType.File:
            problems.append(f"{name[p]}: missing (listed in {where})")
        elif e is not None and int(e.get("bytes", -1)) != int(fi.size):
            problems.append(f"{name[p]}: {fi.size} bytes, manifest says {e.get('bytes')} "
                            "(truncated or replaced)")
        else:
            todo.append((p, r, int(fi.size), e))

    def one(job):
        p, r, size, e = job
        try:
            facts = _footer(fs, p, r, size)
        except (pa.ArrowInvalid, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowInvalid) \
                    and "://" in uri and not uri.startswith("file://"):
                raise
            return None, (f"{name[p]}: not a readable Parquet file (truncated or damaged: "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
        if e is not None and int(e.get("rows", -1)) != facts.rows:
            return None, f"{name[p]}: {facts.rows} rows, manifest says {e.get('rows')}"
        if checksums and e is not None and e.get("sha256"):
            digest = _sha256(fs, p)
            if digest != e["sha256"]:
                return None, (f"{name[p]}: sha256 {digest[:12]}…, manifest says "
                              f"{str(e['sha256'])[:12]}… (damaged)")
        return facts, None

    with storage.storage_errors(uri, storage_cfg):
        with ThreadPoolExecutor(max_workers=max(1, min(16, len(todo)))) as pool:
            results = list(pool.map(one, todo))
    shards = [f for f, _ in results if f is not None]
    problems += [p for _, p in results if p is not None]
    problems += _schema_problems(uri, shards, name)
    if not problems:
        total = sum(s.rows for s in shards)
        want = manifest.get("num_rows")
        if want is not None and int(want) != total:
            problems.append(f"{uri}: the {len(shards)} listed shard(s) hold {total} rows, "
                            f"manifest says num_rows={want}")
    if extra_files:
        listed = set(rels)
        for rel in storage.list_files(storage.join(uri, "data"), storage_cfg, recursive=False):
            if rel.endswith(".parquet") and f"data/{rel}" not in listed:
                problems.append(f"{storage.join(uri, 'data/' + rel)}: a shard file the "
                                "manifest does not list")
    if problems:
        return None, problems
    return VerifiedDataset(uri=uri, fs=fs, manifest=manifest, shards=shards), []


#: columns every reader needs, with their Arrow types
REQUIRED = {"id": "string", "image": "binary"}


def _schema_problems(uri: str, shards: list, name: dict) -> list:
    """A shard without the columns readers need, or whose column types differ from the first
    shard's (nullability may differ)."""
    out = []
    for s in shards:
        for col, typ in REQUIRED.items():
            if s.types.get(col) != typ:
                got = s.types.get(col)
                out.append(f"{name[s.path]}: column {col!r} is "
                           f"{'missing' if got is None else got}, expected {typ}")
    if not out and shards:
        first = shards[0]
        for s in shards[1:]:
            diff = sorted(set(s.types.items()) ^ set(first.types.items()))
            if diff:
                col = diff[0][0]
                out.append(f"{name[s.path]}: column {col!r} is {s.types.get(col, 'missing')}, "
                           f"but {first.types.get(col, 'missing')} in {name[first.path]}")
    return out


_MEMO: dict = {}
_MEMO_LOCK = threading.Lock()


def open_dataset(uri: str, storage_cfg=None, *, checksums: Optional[bool] = None,
                 manifest: Optional[dict] = None) -> VerifiedDataset:
    """A prepared dataset, verified (:func:`check`) before use; what every reader calls.

    ``checksums``: None (default) → :func:`checksum_on_read`. A dataset already verified in
    this process with the same manifest and the same shard sizes and modification times is not
    read again.

    Raises:
        DataError: the first problem, naming the shard (``… and N more problem(s): multimix
            verify <uri>`` when there are several).
    """
    manifest = manifest if manifest is not None else read_manifest(uri, storage_cfg)
    if checksums is None:
        checksums = checksum_on_read(uri, manifest)
    key = _memo_key(uri, manifest, storage_cfg)
    with _MEMO_LOCK:
        hit = _MEMO.get(key) if key is not None else None
    if hit is not None and (hit[1] or not checksums):
        return hit[0]
    ds, problems = check(uri, storage_cfg, checksums=checksums, manifest=manifest)
    if problems:
        more = (f" (and {len(problems) - 1} more problem(s): `multimix verify {uri}` lists "
                "them)") if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    if key is not None:
        with _MEMO_LOCK:
            _MEMO[key] = (ds, checksums)
    return ds


def _memo_key(uri: str, manifest: dict, storage_cfg):
    """``(uri, manifest, (size, mtime) per shard)`` or None when the shards cannot be listed
    (the check then runs and reports why)."""
    rels = manifest.get("shards")
    if not isinstance(rels, list) or not rels or not all(isinstance(r, str) for r in rels):
        return None
    try:
        fs, root = storage.resolve(uri, storage_cfg)
        infos = fs.get_file_info([f"{root.rstrip('/')}/{r}" for r in rels])
    except Exception:  # noqa: BLE001 - no memo; check() reports the trouble
        return None
    stamp = tuple((fi.size, fi.mtime_ns) for fi in infos)
    if any(s is None for s, _ in stamp):
        return None
    return uri, json.dumps(manifest, sort_keys=True), stamp

"""Discover the records of a public dataset layout (no decoding here: that is :mod:`prepare`).

Three layouts (``layout="auto"`` picks one, see :func:`detect_layout`):

``folders``  class-per-folder (ImageFolder), ``ROOT/[SPLIT/]CLASS/**/*.{png,jpg,jpeg,...}``.
             Class names sorted → label index (Kermany: NORMAL=0, PNEUMONIA=1). With a split
             level (Kermany's ``train/``), a single split is used automatically; several need
             ``split=``. Ids are paths below the class root without extension
             (``NORMAL/IM-0115-0001``); task ``cls``.
``pairs``    ``ROOT/images/ID.ext`` + ``ROOT/masks/ID.ext`` (+ optional ``ROOT/ignore/ID.ext``),
             matched by ID (the path without extension); task ``seg``. An image without a mask,
             or a mask/ignore file without an image, is reported as a problem, never dropped
             silently.
``csv``      a manifest file with header ``path,label`` (task ``cls``) or ``path,mask_path[,
             ignore_path]`` (task ``seg``); paths relative to the CSV's folder. Labels are class
             names (sorted → index) or integers 0..C-1.

Works on local paths and ``s3://`` URIs alike (listing through the pyarrow filesystem).
"""

from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass, field
from typing import Optional

import pyarrow.fs as pafs

from multimix.config import StorageConfig
from multimix.data import storage
from multimix.data.images import IMAGE_EXTENSIONS
from multimix.errors import DataError

__all__ = ["LAYOUTS", "Record", "Source", "discover", "detect_layout"]

LAYOUTS = ("auto", "folders", "pairs", "csv")
_SPLIT_NAMES = ("train", "test", "val", "valid", "validation")


@dataclass(frozen=True)
class Record:
    """One example to prepare. ``*_file`` are full paths in the source filesystem; ``path``,
    ``mask_path``, ``ignore_path`` are relative to the source root (``/``-separated)."""

    id: str
    path: str
    image_file: str
    label: Optional[int] = None
    mask_path: Optional[str] = None
    mask_file: Optional[str] = None
    ignore_path: Optional[str] = None
    ignore_file: Optional[str] = None


@dataclass
class Source:
    """What :func:`discover` found. ``problems`` are files that will not become rows
    (``{"path", "reason"}``); ``other_files`` are non-image files that were ignored."""

    uri: str
    layout: str
    task: str  # "cls" | "seg"
    name: str
    records: list[Record]
    classes: Optional[list[str]] = None
    split: Optional[str] = None
    problems: list[dict] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    fs: Optional[pafs.FileSystem] = field(default=None, repr=False, compare=False)


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p.startswith("__") for p in rel.split("/"))


def _strip_ext(rel: str) -> str:
    return posixpath.splitext(rel)[0]


def _listing(fs: pafs.FileSystem, root: str, uri: str,
             st: Optional[StorageConfig]) -> tuple[list[str], list[str]]:
    """(files, dirs) under ``root``, relative, ``/``-separated, sorted, hidden ones left out."""
    with storage.storage_errors(uri, st):
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    base = root.rstrip("/") + "/"
    files, dirs = [], []
    for info in infos:
        p = info.path.replace("\\", "/")
        rel = p[len(base):] if p.startswith(base) else p
        if not rel or _hidden(rel):
            continue
        if info.type == pafs.FileType.File:
            files.append(rel)
        elif info.type == pafs.FileType.Directory:
            dirs.append(rel)
    return sorted(files), sorted(dirs)


def detect_layout(uri: str, storage_cfg: Optional[StorageConfig] = None) -> str:
    """``csv`` for a ``.csv`` file, ``pairs`` for a folder with ``images/`` and ``masks/``,
    ``folders`` for any other folder."""
    fs, root = storage.resolve(uri, storage_cfg)
    with storage.storage_errors(uri, storage_cfg):
        info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        if storage.is_s3(uri):
            storage.check_bucket(uri, storage_cfg)
        raise DataError(f"{uri}: no such file or directory")
    if info.type == pafs.FileType.File:
        if root.lower().endswith(".csv"):
            return "csv"
        raise DataError(f"{uri}: a file, but not a .csv manifest; give a folder or a CSV")
    with storage.storage_errors(uri, storage_cfg):
        kids = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = {posixpath.basename(k.path.replace("\\", "/")) for k in kids
             if k.type == pafs.FileType.Directory}
    if "images" in names and "masks" in names:
        return "pairs"
    return "folders"


def discover(uri: str, layout: str = "auto", *, split: Optional[str] = None,
             name: Optional[str] = None,
             storage_cfg: Optional[StorageConfig] = None) -> Source:
    """List the records of the dataset at ``uri`` (folder or CSV; local or ``s3://``).

    Args:
        layout: ``auto``, ``folders``, ``pairs`` or ``csv``.
        split: for ``folders`` with a split level (``ROOT/train/CLASS/...``): which split.
        name: dataset name (default: the root folder's name, or its parent's when the root is
            itself a split folder such as ``train``).

    Raises:
        DataError: unknown layout, missing root, no classes / pairs found, ambiguous splits,
            bad CSV header or rows, two files mapping to the same id.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")
    if layout == "auto":
        layout = detect_layout(uri, storage_cfg)
    if split is not None and layout != "folders":
        raise DataError(f"--split {split!r} applies to the class-per-folder layout only")
    fs, root = storage.resolve(uri, storage_cfg)
    with storage.storage_errors(uri, storage_cfg):
        info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    if layout == "csv":
        if info.type != pafs.FileType.File:
            raise DataError(f"{uri}: layout 'csv' needs a .csv file, got a folder")
        src = _discover_csv(fs, root, uri, storage_cfg)
    else:
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri}: layout {layout!r} needs a folder, got a file")
        if layout == "pairs":
            src = _discover_pairs(fs, root, uri, storage_cfg)
        else:
            src = _discover_folders(fs, root, uri, split, storage_cfg)
    src.fs = fs
    src.name = name or src.name
    return src


def _default_name(root: str) -> str:
    parts = [p for p in root.replace("\\", "/").rstrip("/").split("/") if p]
    if not parts:
        return "dataset"
    if parts[-1].lower() in _SPLIT_NAMES and len(parts) > 1:
        return parts[-2]
    return parts[-1]


def _unique_ids(records: list[Record], where: str) -> None:
    seen: dict[str, str] = {}
    for r in records:
        if r.id in seen:
            raise DataError(
                f"{where}: {seen[r.id]} and {r.path} map to the same id {r.id!r} "
                "(ids are paths without extension); rename one of them"
            )
        seen[r.id] = r.path


# ---------------------------------------------------------------------------------------------
# class-per-folder


def _discover_folders(fs, root, uri, split, st) -> Source:
    files, dirs = _listing(fs, root, uri, st)
    images = [f for f in files if _is_image(f)]
    other = [f for f in files if not _is_image(f)]
    if not images:
        raise DataError(f"{uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found; expected "
                        "ROOT/CLASS/*.png (or ROOT/SPLIT/CLASS/*.png)")
    has_split_level = not any(f.count("/") == 1 for f in images) and any(
        f.count("/") >= 2 for f in images)
    if has_split_level:
        splits = sorted({f.split("/", 1)[0] for f in images})
        if split is None:
            if len(splits) > 1:
                raise DataError(f"{uri}: holds the splits {', '.join(splits)}; choose one with "
                                "--split")
            split = splits[0]
        elif split not in splits:
            raise DataError(f"{uri}: no split {split!r} (found: {', '.join(splits)})")
        prefix = split + "/"
        images = [f for f in images if f.startswith(prefix)]
        other = [f for f in other if f.startswith(prefix)]
        dirs = [d for d in dirs if d.startswith(prefix)]
    elif split is not None:
        raise DataError(f"{uri}: --split {split!r} given, but the folder has no split level "
                        "(expected ROOT/SPLIT/CLASS/*.png)")
    else:
        prefix = ""
    problems = []
    class_dirs = sorted(d[len(prefix):] for d in dirs
                        if d.startswith(prefix) and "/" not in d[len(prefix):])
    by_class: dict[str, list[str]] = {c: [] for c in class_dirs}
    for f in images:
        rel = f[len(prefix):]
        if "/" not in rel:
            problems.append({"path": f, "reason": "image not inside a class folder"})
            continue
        by_class.setdefault(rel.split("/", 1)[0], []).append(f)
    where = posixpath.join(uri, split) if split else uri
    classes = sorted(by_class)
    if not classes:
        raise DataError(f"{where}: no class folders found (expected {where}/CLASS/*.png)")
    empty = [c for c in classes if not by_class[c]]
    if empty:
        raise DataError(f"{where}: class folder{'s' if len(empty) > 1 else ''} "
                        f"{', '.join(empty)} hold{'' if len(empty) > 1 else 's'} no images "
                        "(remove it or add images: class indices follow the sorted folder names)")
    if len(classes) < 2:
        raise DataError(f"{where}: only one class folder ({classes[0]}) found; "
                        "classification needs at least two")
    records = []
    for label, cls in enumerate(classes):
        for f in by_class[cls]:
            records.append(Record(id=_strip_ext(f[len(prefix):]), path=f,
                                  image_file=posixpath.join(root, f) if root != "/" else "/" + f,
                                  label=label))
    records.sort(key=lambda r: r.id)
    _unique_ids(records, where)
    return Source(uri=uri, layout="folders", task="cls", name=_default_name(root),
                  records=records, classes=classes, split=split, problems=problems,
                  other_files=other)


# ---------------------------------------------------------------------------------------------
# image + mask folders


def _keyed(files: list[str], sub: str, uri: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in files:
        if not f.startswith(sub + "/") or not _is_image(f):
            continue
        key = _strip_ext(f[len(sub) + 1:])
        if key in out:
            raise DataError(f"{uri}: {out[key]} and {f} map to the same id {key!r}; "
                            "rename one of them")
        out[key] = f
    return out


def _discover_pairs(fs, root, uri, st) -> Source:
    files, _ = _listing(fs, root, uri, st)
    imgs, masks, ign = (_keyed(files, s, uri) for s in ("images", "masks", "ignore"))
    other = [f for f in files if not (_is_image(f) and f.split("/", 1)[0] in
                                       ("images", "masks", "ignore"))]
    problems = []
    for key in sorted(set(imgs) - set(masks)):
        problems.append({"path": imgs[key],
                         "reason": f"image without mask (no masks/{key}.*)"})
    for key in sorted(set(masks) - set(imgs)):
        problems.append({"path": masks[key], "reason": f"mask without image (no images/{key}.*)"})
    for key in sorted(set(ign) - set(imgs)):
        problems.append({"path": ign[key],
                         "reason": f"ignore mask without image (no images/{key}.*)"})
    keys = sorted(set(imgs) & set(masks))
    if not keys:
        raise DataError(f"{uri}: no image-mask pairs found (expected images/ID.png with "
                        "masks/ID.png of the same ID)")

    def full(rel):
        return posixpath.join(root, rel)

    records = [
        Record(id=k, path=imgs[k], image_file=full(imgs[k]), mask_path=masks[k],
               mask_file=full(masks[k]), ignore_path=ign.get(k),
               ignore_file=full(ign[k]) if k in ign else None)
        for k in keys
    ]
    return Source(uri=uri, layout="pairs", task="seg", name=_default_name(root), records=records,
                  problems=problems, other_files=other)


# ---------------------------------------------------------------------------------------------
# CSV manifest

_CSV_COLUMNS = {"path", "label", "mask_path", "ignore_path"}


def _discover_csv(fs, csv_path, uri, st) -> Source:
    with storage.storage_errors(uri, st):
        with fs.open_input_stream(csv_path) as f:
            raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{uri}: not a UTF-8 text file") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise DataError(f"{uri}: empty CSV (expected a header path,label or path,mask_path)")
    reader.fieldnames = header
    unknown = [h for h in header if h not in _CSV_COLUMNS]
    if unknown:
        raise DataError(f"{uri}: unknown column{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(u) for u in unknown)} (allowed: path, label | "
                        "mask_path[, ignore_path])")
    if "path" not in header:
        raise DataError(f"{uri}: no 'path' column (header: {','.join(header)})")
    has_label, has_mask = "label" in header, "mask_path" in header
    if has_label == has_mask:
        raise DataError(f"{uri}: needs exactly one of the columns 'label' (classification) or "
                        f"'mask_path' (segmentation); header: {','.join(header)}")
    if "ignore_path" in header and not has_mask:
        raise DataError(f"{uri}: 'ignore_path' needs a 'mask_path' column")
    base = posixpath.dirname(csv_path.replace("\\", "/"))

    def rel_and_full(cell: str, line: int, col: str) -> tuple[str, str]:
        cell = cell.strip().replace("\\", "/")
        if not cell:
            raise DataError(f"{uri}, line {line}: empty {col}")
        if cell.startswith("/"):
            return cell.lstrip("/"), cell
        rel = posixpath.normpath(cell)
        return rel, posixpath.normpath(posixpath.join(base, rel))

    rows = list(reader)
    if not rows:
        raise DataError(f"{uri}: no rows below the header")
    problems: list[dict] = []
    records: list[Record] = []
    classes: Optional[list[str]] = None
    if has_label:
        raw_labels = [(r.get("label") or "").strip() for r in rows]
        for i, lab in enumerate(raw_labels):
            if not lab:
                raise DataError(f"{uri}, line {i + 2}: empty label")
        if all(_is_int(v) for v in raw_labels):
            ints = [int(v) for v in raw_labels]
            if min(ints) < 0:
                raise DataError(f"{uri}: integer labels must be >= 0, got {min(ints)}")
            classes = [str(i) for i in range(max(ints) + 1)]
            labels = ints
        else:
            classes = sorted(set(raw_labels))
            labels = [classes.index(v) for v in raw_labels]
        if len(classes) < 2:
            raise DataError(f"{uri}: only one class ({classes[0]}); classification needs two")
        for i, (r, lab) in enumerate(zip(rows, labels)):
            rel, full = rel_and_full(r.get("path") or "", i + 2, "path")
            records.append(Record(id=_strip_ext(rel), path=rel, image_file=full, label=lab))
    else:
        for i, r in enumerate(rows):
            rel, full = rel_and_full(r.get("path") or "", i + 2, "path")
            mcell = (r.get("mask_path") or "").strip()
            if not mcell:
                problems.append({"path": rel, "reason": "image without mask (empty mask_path)"})
                continue
            mrel, mfull = rel_and_full(mcell, i + 2, "mask_path")
            icell = (r.get("ignore_path") or "").strip()
            irel, ifull = rel_and_full(icell, i + 2, "ignore_path") if icell else (None, None)
            records.append(Record(id=_strip_ext(rel), path=rel, image_file=full, mask_path=mrel,
                                  mask_file=mfull, ignore_path=irel, ignore_file=ifull))
    records.sort(key=lambda r: r.id)
    _unique_ids(records, uri)
    return Source(uri=uri, layout="csv", task="cls" if has_label else "seg",
                  name=_default_name(base), records=records, classes=classes, problems=problems)


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False

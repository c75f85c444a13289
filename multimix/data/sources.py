"""Discover the records of a public dataset layout (no decoding here: that is :mod:`prepare`).

Four layouts (``layout="auto"`` picks one of the first three, see :func:`detect_layout`;
``images`` is never guessed: a class-per-folder tree is also a tree of images):

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

Labels are checked: with ``classes=`` (``prepare --classes NORMAL,PNEUMONIA``) that
is the class set, in that order (index = position); a CSV label outside it (a name, or an
integer ≥ C) and a class folder not in it are *unknown labels*: problems (bad rows in
``report.json``, fatal under ``--strict``), never a new class. Without ``classes=`` the folders
define the classes; for a CSV, integer labels define ``0..k`` for the longest gap-free run from
0 (``0, 1, 7`` → classes 0 and 1; the 7s are unknown), and a name label that is a close spelling
(``difflib`` ratio ≥ 0.8) of a name with at least 10x its rows is taken for a typo
(``PNEUMONA`` beside ``PNEUMONIA``) and is unknown too.

Works on local paths and ``s3://`` URIs alike (listing through the pyarrow filesystem).
"""

from __future__ import annotations

import csv
import difflib
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

LAYOUTS = ("auto", "folders", "pairs", "csv", "images")
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
    task: str  # "cls" | "seg" | "unlabeled"
    name: str
    records: list[Record]
    classes: Optional[list[str]] = None
    split: Optional[str] = None
    problems: list[dict] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    fs: Optional[pafs.FileSystem] = field(default=None, repr=False, compare=False)
    #: the folder that record paths are relative to (the CSV's folder for the ``csv`` layout)
    root_uri: str = ""

    def file_uri(self, path: str) -> str:
        """The URI of a file named by a record/problem ``path`` (for messages)."""
        return storage.join(self.root_uri or self.uri, path)


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
             name: Optional[str] = None, classes: Optional[list[str]] = None,
             storage_cfg: Optional[StorageConfig] = None) -> Source:
    """List the records of the dataset at ``uri`` (folder or CSV; local or ``s3://``).

    Args:
        layout: ``auto``, ``folders``, ``pairs``, ``csv`` or ``images``.
        split: for ``folders`` with a split level (``ROOT/train/CLASS/...``): which split.
        name: dataset name (default: the root folder's name, or its parent's when the root is
            itself a split folder such as ``train``).
        classes: the class set, index = position (``cls`` layouts only); labels outside it
            become problems. Default: inferred (see the module docstring).

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
    if classes is not None:
        classes = [c.strip() for c in classes]
        if len(classes) < 2 or any(not c for c in classes) or len(set(classes)) != len(classes):
            raise DataError(f"--classes {','.join(classes)!r}: give two or more distinct, "
                            "non-empty class names (e.g. --classes NORMAL,PNEUMONIA)")
        if layout in ("pairs", "images"):
            raise DataError("--classes applies to classification layouts (folders, csv with a "
                            "label column), not to image-mask pairs")
    fs, root = storage.resolve(uri, storage_cfg)
    with storage.storage_errors(uri, storage_cfg):
        info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{uri}: no such file or directory")
    if layout == "csv":
        if info.type != pafs.FileType.File:
            raise DataError(f"{uri}: layout 'csv' needs a .csv file, got a folder")
        src = _discover_csv(fs, root, uri, storage_cfg, classes)
        src.root_uri = _parent_uri(uri)
    else:
        if info.type != pafs.FileType.Directory:
            raise DataError(f"{uri}: layout {layout!r} needs a folder, got a file")
        if layout == "pairs":
            src = _discover_pairs(fs, root, uri, storage_cfg)
        elif layout == "images":
            src = _discover_images(fs, root, uri, storage_cfg)
        else:
            src = _discover_folders(fs, root, uri, split, storage_cfg, classes)
        src.root_uri = uri
    src.fs = fs
    src.name = name or src.name
    return src


def _parent_uri(uri: str) -> str:
    """``s3://b/x/f.csv`` → ``s3://b/x``; ``src/bad.csv`` → ``src``; ``f.csv`` → ``.``."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return posixpath.dirname(uri.replace("\\", "/").rstrip("/")) or "."


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


def _discover_folders(fs, root, uri, split, st, given: Optional[list[str]] = None) -> Source:
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
    if given is not None:
        for cls in sorted(set(by_class) - set(given)):
            for f in by_class.pop(cls):
                problems.append({"path": f, "reason": f"unknown label {cls!r} (folder {cls}/ is "
                                                      f"not in --classes {','.join(given)})"})
        missing = [c for c in given if not by_class.get(c)]
        if missing:
            raise DataError(f"{where}: no images for class{'es' if len(missing) > 1 else ''} "
                            f"{', '.join(missing)} of --classes (expected {where}/"
                            f"{missing[0]}/*.png)")
        classes = list(given)
    else:
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
# unlabeled image trees


def _discover_images(fs, root, uri, st) -> Source:
    files, _ = _listing(fs, root, uri, st)
    images = [f for f in files if _is_image(f)]
    if not images:
        raise DataError(f"{uri}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found at any "
                        "depth below it")
    records = [Record(id=_strip_ext(f), path=f,
                      image_file=posixpath.join(root, f) if root != "/" else "/" + f)
               for f in images]
    _unique_ids(records, uri)
    return Source(uri=uri, layout="images", task="unlabeled", name=_default_name(root),
                  records=records, other_files=[f for f in files if not _is_image(f)])


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


def _discover_csv(fs, csv_path, uri, st, given: Optional[list[str]] = None) -> Source:
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
        classes, index = _label_index(raw_labels, given, uri)
        for i, (r, lab) in enumerate(zip(rows, raw_labels)):
            rel, full = rel_and_full(r.get("path") or "", i + 2, "path")
            if lab not in index:
                problems.append({"path": rel, "reason": f"unknown label {lab!r} (line {i + 2}; "
                                                        f"{_known(lab, classes, given)})"})
                continue
            records.append(Record(id=_strip_ext(rel), path=rel, image_file=full,
                                  label=index[lab]))
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


#: a name label with a close spelling (ratio >= this) of a name with >= _TYPO_RATIO x its rows
#: is taken for a typo when no --classes are given
_TYPO_CUTOFF, _TYPO_RATIO = 0.8, 10


def _label_index(raw: list[str], given: Optional[list[str]],
                 uri: str) -> tuple[list[str], dict[str, int]]:
    """``(classes, {label cell: index})`` for the known labels (see the module docstring);
    cells missing from the dict are unknown labels."""
    if given is not None:
        index = {c: i for i, c in enumerate(given)}
        for v in set(raw):
            if v not in index and _is_int(v) and 0 <= int(v) < len(given):
                index[v] = int(v)
        return list(given), index
    counts: dict[str, int] = {}
    for v in raw:
        counts[v] = counts.get(v, 0) + 1
    if all(_is_int(v) for v in counts):
        present = {int(v) for v in counts}
        if min(present) < 0:
            raise DataError(f"{uri}: integer labels must be >= 0, got {min(present)}")
        k = 0
        while k in present:
            k += 1
        classes = [str(i) for i in range(k)]
        index = {v: int(v) for v in counts if int(v) < k}
        if k < 2:
            raise DataError(f"{uri}: integer labels {', '.join(map(str, sorted(present)))} do "
                            "not start with 0, 1 (integer labels are classes 0..C-1 without "
                            "gaps; or give --classes)")
    else:
        names = sorted(counts)
        typos = {v for v in names
                 if any(counts[m] >= _TYPO_RATIO * counts[v]
                        for m in difflib.get_close_matches(v, [n for n in names if n != v],
                                                           n=3, cutoff=_TYPO_CUTOFF))}
        classes = [v for v in names if v not in typos]
        index = {c: i for i, c in enumerate(classes)}
    if len(classes) < 2:
        raise DataError(f"{uri}: only one class ({', '.join(classes)}); classification needs "
                        "two (or give --classes)")
    return classes, index


def _known(label: str, classes: list[str], given: Optional[list[str]]) -> str:
    """The end of an unknown-label reason: the known classes, or the likely intended one."""
    if given is not None:
        return f"--classes {','.join(given)}"
    close = difflib.get_close_matches(label, classes, n=1, cutoff=_TYPO_CUTOFF)
    if close:
        return f"a typo of {close[0]!r}? give --classes to set the class set"
    return f"classes {','.join(classes)}; give --classes to set the class set"


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False

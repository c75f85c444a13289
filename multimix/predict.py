"""``multimix predict --checkpoint CKPT IMAGE...``: pneumonia probability, lung mask, saliency.

Any image Pillow reads: any size from 32 pixels a side, grey or RGB(A), 8- or 16-bit; an
``IMAGE`` may be a directory (its images, recursively, sorted; the count is printed). Each image
is converted to 8-bit grey, resized to the model's input size (the same preprocessing as
training), and the outputs are resized back to the original size — for images over
:data:`MAX_SIDE` pixels a side, to the size they were decoded at: they are decoded reduced by an
integer factor (JPEG: by the decoder, ``Image.draft``; others: ``Image.reduce``), so memory stays
bounded (an 8000x8000 image is never held at full size as floats). For ``IMAGE`` named ``x.png``
it writes into ``--out``:

- ``x_mask.png``      lung mask (0/255) at the original size
- ``x_saliency.png``  |∂ max class score / ∂ input|, scaled to 0..255, at the original size
- ``x_overlay.png``   the image with the lung boundary and the saliency overlaid (RGB)

and ``predictions.json`` with one entry per image: the class probabilities, the ``predicted``
class (argmax, or — for a checkpoint trained with ``objective.decision`` other than argmax — the
threshold on p(class 1) chosen on its validation split, given as ``threshold``, with the argmax
class beside it as ``predicted_argmax``). A file that is not an image (or is truncated)
gets a clear error line and the others are still processed; the exit code is then 1. So does an
image smaller than :data:`MIN_SIDE` pixels on a side. DICOM files (``.dcm``, ``.dicom`` or the
``DICM`` marker) are read as ``prepare`` reads them (:mod:`multimix.data.dicom`).

``--ray`` (batch inference on Ray Data, :func:`run_ray`): ``IMAGE`` may also be a prepared
dataset (local or ``s3://``) or an ``s3://`` folder. The inputs are cut into *parts* (a prepared
dataset: one per shard; files: ``--part-rows`` each, in sorted order); CPU tasks read and
preprocess a part (the same decoding and resizing as above), an actor pool runs the model
(``map_batches`` with a class: one model per actor, ``--num-gpus`` per actor, ``--batch-size``
images per forward pass), CPU tasks write the part as ``--out/predictions.parquet/part-<k>-<key>
.parquet`` (one row per input image, :func:`prediction_table`). ``key`` hashes the part's
inputs, the checkpoint's weights and the options, so a rerun writes only the parts that are
missing (resume) and removes parts of other inputs or checkpoints. A bad image is a row with an
``error``; the exit code is then 1.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import posixpath
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from multimix import resources
from multimix.config import add_config_arguments, load_config, without_removed_keys
from multimix.data import storage
from multimix.data.dataset import open_dataset, read_manifest
from multimix.data.images import (MASK_PNG_LEVEL, IMAGE_EXTENSIONS, decode_png, encode_png,
                                   load_grey_bounded, resize_image)
from multimix.errors import DataError, UserError

#: images with a side below this are refused (nothing meaningful to segment)
MIN_SIDE = 32
#: images with a longer side above this are decoded reduced to at most this (outputs too)
MAX_SIDE = 2048


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (png, jpeg, tiff, dcm, ...) or directories (their images, "
                        "recursively); with --ray also prepared datasets and s3:// folders")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, a checkpoint directory, or a run directory (uses best)")
    p.add_argument("--out", default="predictions",
                   help="output directory or s3://bucket/prefix (default: predictions)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability threshold of the lung mask (default 0.5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g = p.add_argument_group("batch inference on Ray (--ray)")
    g.add_argument("--ray", action="store_true",
                   help="Ray Data: read/preprocess on CPU tasks, the model in an actor pool, "
                        "write OUT/predictions.parquet (one row per image; rerun = resume)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="images per forward pass in an actor (default 32)")
    g.add_argument("--actors", type=int, default=None,
                   help="model actors (default: the cluster's GPUs / --num-gpus with a GPU "
                        "device, else half its CPUs)")
    g.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per actor (default 1 with --device cuda, else 0)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0,
                   help="CPUs per model actor (default 1)")
    g.add_argument("--part-rows", type=int, default=1000,
                   help="images per output part when the inputs are files (a prepared "
                        "dataset: one part per shard; default 1000)")
    g.add_argument("--masks", action="store_true",
                   help="store the lung mask (0/255 PNG at the model's input size) per row")
    g.add_argument("--saliency", action="store_true",
                   help="store the saliency map (8-bit PNG at the model's input size) per row")
    add_config_arguments(p, what="storage settings when the checkpoint or data is on s3://")


def _resize_float(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a float map (H, W) to (h, w)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((w, h),
                                                                             Image.BILINEAR))


def predict_array(model, cfg, grey: np.ndarray, device: str = "cpu",
                  threshold: float = 0.5) -> dict:
    """Run the model on one 8-bit grey image of any size.

    Args:
        grey: (H, W) uint8.
    Returns:
        dict with ``probs`` (C,) class probabilities or None, ``mask`` (H, W) bool or None,
        ``lung_prob`` (H, W) float32 or None, ``saliency`` (H, W) float32 in [0, 1] or None.
    """
    import torch

    from multimix.engine import eval_step

    size = cfg.data.image_size
    h, w = grey.shape
    x = torch.from_numpy(resize_image(grey, size)[None, None].copy())
    res = eval_step(model, {"img": x}, device, saliency=True)
    out = {"probs": None, "mask": None, "lung_prob": None, "saliency": None}
    if "cls_prob" in res:
        out["probs"] = res["cls_prob"][0]
    if "seg_prob" in res:
        prob = _resize_float(res["seg_prob"][0, 0], h, w)
        out["lung_prob"] = prob
        out["mask"] = prob >= threshold
    sal = res.get("saliency")
    if sal is not None:
        s = sal[0, 0]
        s = s / s.max() if s.max() > 0 else s
        out["saliency"] = np.clip(_resize_float(s, h, w), 0, 1)
    return out


def expand_inputs(paths: list[str]) -> tuple[list[str], list[str]]:
    """``IMAGE`` arguments → ``(image files, error lines)``: a directory gives its image files
    (extensions of :data:`multimix.data.images.IMAGE_EXTENSIONS`, recursively, sorted, hidden
    ones left out) and prints their count; a missing path or an image-less directory is an error
    line naming it."""
    files, errors = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".")
                                       for part in f.relative_to(path).parts))
            if not found:
                errors.append(f"{p}: directory holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            else:
                print(f"{p}: {len(found)} image(s)")
            files.extend(found)
        elif path.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or directory")
    return files, errors


def run(args) -> int:
    from multimix import checkpoint

    storage_cfg = load_config(args.config, args.set).storage
    if args.ray:
        return run_ray(args, storage_cfg)
    for p in args.images:
        if Path(p).is_dir() and (Path(p) / "manifest.json").is_file():
            raise UserError(f"{p}: a prepared dataset; predict it with --ray")
    images, errors = expand_inputs(args.images)
    if not images:
        raise DataError(errors[0] if len(errors) == 1
                        else "no images to predict: " + "; ".join(errors))
    for line in errors:
        print(f"multimix predict: error: {line}", file=sys.stderr)
    args.images = images
    model, cfg, state = checkpoint.load_model(args.checkpoint, storage_cfg, device=args.device)
    classes = state.get("classes") or [f"class{i}" for i in range(cfg.model.num_classes)]
    threshold = checkpoint.decision_threshold(state)
    with storage.staged_output(args.out, storage_cfg) as out_dir:
        results, failed = _predict_all(args, model, cfg, classes, out_dir,
                                       lambda p: storage.output_uri(args.out, out_dir, p),
                                       threshold)
    ok, failed = len(results) - failed, failed + len(errors)
    print(f"wrote {ok} prediction(s) to {args.out}"
          + (f"; {failed} file(s) failed" if failed else ""))
    return 1 if failed else 0


def _predict_all(args, model, cfg, classes: list, out_dir: Path, dest,
                 threshold: float | None = None) -> tuple[list, int]:
    """Predict every image into the local folder ``out_dir``; ``dest`` maps a written file to
    its final place (a path under ``--out``, also ``s3://``). ``threshold``: the decision on
    p(class 1) (None: argmax)."""
    from PIL import Image

    from multimix.plots import overlay_png

    results, failed = [], 0
    stems: set[str] = set()
    for path in args.images:
        try:
            grey, (h0, w0) = load_grey_bounded(path, max(MAX_SIDE, cfg.data.image_size),
                                               MIN_SIDE)
        except (UserError, OSError) as exc:
            failed += 1
            msg = str(exc) if path in str(exc) else f"{path}: {exc}"
            print(f"multimix predict: error: {msg}", file=sys.stderr)
            results.append({"image": path, "error": msg})
            continue
        pred = predict_array(model, cfg, grey, args.device, args.threshold)
        stem, n = Path(path).stem, 1
        while stem in stems:  # same name in two folders: x, x-2, x-3 ...
            n += 1
            stem = f"{Path(path).stem}-{n}"
        stems.add(stem)
        entry: dict = {"image": path, "height": h0, "width": w0}
        if grey.shape != (h0, w0):
            entry["output_height"], entry["output_width"] = map(int, grey.shape)
        if pred["probs"] is not None:
            entry["probabilities"] = {c: float(p) for c, p in zip(classes, pred["probs"])}
            if "PNEUMONIA" in classes:
                entry["pneumonia_probability"] = float(pred["probs"][classes.index("PNEUMONIA")])
            arg = int(np.argmax(pred["probs"]))
            if threshold is None:
                entry["predicted"] = classes[arg]
            else:
                entry["predicted"] = classes[int(pred["probs"][1] >= threshold)]
                entry["predicted_argmax"] = classes[arg]
                entry["threshold"] = threshold
        if pred["mask"] is not None:
            Image.fromarray((pred["mask"] * 255).astype(np.uint8)).save(out_dir / f"{stem}_mask.png")
            entry["mask"] = dest(out_dir / f"{stem}_mask.png")
            entry["lung_fraction"] = float(pred["mask"].mean())
        if pred["saliency"] is not None:
            Image.fromarray((pred["saliency"] * 255).round().astype(np.uint8)).save(
                out_dir / f"{stem}_saliency.png")
            entry["saliency"] = dest(out_dir / f"{stem}_saliency.png")
        Image.fromarray(overlay_png(grey, pred["mask"], pred["saliency"])).save(
            out_dir / f"{stem}_overlay.png")
        entry["overlay"] = dest(out_dir / f"{stem}_overlay.png")
        results.append(entry)
        summary = [f"{path}:"]
        if "pneumonia_probability" in entry:
            summary.append(f"P(pneumonia)={entry['pneumonia_probability']:.3f}")
        elif "probabilities" in entry:
            summary.append(" ".join(f"P({c})={p:.3f}" for c, p in entry["probabilities"].items()))
        if "predicted" in entry:
            summary.append(f"-> {entry['predicted']}")
        if "lung_fraction" in entry:
            summary.append(f"lung area={100 * entry['lung_fraction']:.1f}%")
        print(" ".join(summary))
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    return results, failed


# ---------------------------------------------------------------------------------------------
# batch inference on Ray Data (--ray)

#: the folder of the output parts under ``--out``
PARQUET_DIR = "predictions.parquet"


def _collect(inputs: list[str], st, part_rows: int) -> tuple[list[dict], list[str]]:
    """``IMAGE`` arguments → ``(parts, error lines)``. A part is ``{"kind": "dataset", "uri",
    "shard", "rows", "digest"}`` (one per shard of a prepared dataset) or ``{"kind": "files",
    "files": [uri, ...], "digest"}`` (``part_rows`` image files of the folders and files
    given, in sorted order; ids: the path below the folder given, or the file's name, without
    extension), ``"ids": [...]``; ``digest`` identifies its inputs (shard sha256 or size,
    file names and sizes)."""
    parts: list[dict] = []
    files: list[tuple[str, int, str]] = []
    errors: list[str] = []
    for p in inputs:
        uri = p.rstrip("/") if "://" in p else p
        fs, path = storage.resolve(uri, st)
        with storage.storage_errors(uri, st):
            info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            if storage.is_s3(uri):
                storage.check_bucket(uri, st)
            errors.append(f"{p}: no such file or directory")
        elif info.type == pafs.FileType.File:
            files.append((uri, info.size or 0, posixpath.splitext(posixpath.basename(path))[0]))
        elif storage.exists(storage.join(uri, "manifest.json"), st):
            manifest = read_manifest(uri, st)
            data = open_dataset(uri, st, manifest=manifest, checksums=False)  # shards checked
            infos = manifest.get("shard_info") or [{} for _ in manifest["shards"]]
            for facts, sinfo in zip(data.shards, infos):
                rel = facts.rel
                parts.append({"kind": "dataset", "uri": uri, "shard": rel,
                              "rows": int(facts.rows),
                              "digest": sinfo.get("sha256") or f"{rel}:{sinfo.get('bytes')}"})
        else:
            with storage.storage_errors(uri, st):
                found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            base = path.rstrip("/") + "/"
            got = sorted((storage.join(uri, f.path[len(base):]), f.size or 0,
                          posixpath.splitext(f.path[len(base):])[0]) for f in found
                         if f.type == pafs.FileType.File and f.path.startswith(base)
                         and posixpath.splitext(f.path)[1].lower() in IMAGE_EXTENSIONS
                         and not any(x.startswith(".") for x in f.path[len(base):].split("/")))
            if not got:
                errors.append(f"{p}: directory holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(got)
    for i in range(0, len(files), part_rows):
        chunk = files[i:i + part_rows]
        parts.append({"kind": "files", "files": [f for f, _, _ in chunk],
                      "ids": [i for _, _, i in chunk],
                      "digest": hashlib.sha256(json.dumps(chunk).encode()).hexdigest()})
    return parts, errors


def _load_part(part: dict, size: int, st) -> dict:
    """Read and preprocess one part (a Ray CPU task): ``{"ids", "paths", "heights", "widths",
    "errors", "x" (N, size, size) uint8}``; a row that fails has its ``errors`` entry set and
    zeros in ``x``."""
    ids, paths, hs, ws, errs, xs = [], [], [], [], [], []
    if part["kind"] == "dataset":
        fs, root = storage.resolve(part["uri"], st)
        with storage.storage_errors(part["uri"], st):
            t = pq.read_table(f"{root.rstrip('/')}/{part['shard']}", filesystem=fs,
                              columns=["id", "path", "image", "orig_height", "orig_width"])
        for r in t.to_pylist():
            ids.append(r["id"])
            paths.append(r["path"])
            hs.append(r["orig_height"])
            ws.append(r["orig_width"])
            try:
                xs.append(resize_image(decode_png(r["image"], name=r["id"]), size))
                errs.append(None)
            except (DataError, ValueError) as exc:
                xs.append(np.zeros((size, size), np.uint8))
                errs.append(str(exc))
    else:
        for uri, rid in zip(part["files"], part["ids"]):
            ids.append(rid)
            paths.append(uri)
            try:
                fs, path = storage.resolve(uri, st)
                with storage.storage_errors(uri, st):
                    with fs.open_input_stream(path) as f:
                        data = f.read()
                grey, (h, w) = load_grey_bounded(data, max(MAX_SIDE, size), MIN_SIDE, name=uri)
                xs.append(resize_image(grey, size))
                hs.append(h)
                ws.append(w)
                errs.append(None)
            except (UserError, OSError) as exc:
                msg = str(exc)
                xs.append(np.zeros((size, size), np.uint8))
                hs.append(None)
                ws.append(None)
                errs.append(msg if uri in msg else f"{uri}: {msg}")
    x = np.stack(xs) if xs else np.zeros((0, size, size), np.uint8)
    return {"ids": ids, "paths": paths, "heights": hs, "widths": ws, "errors": errs, "x": x}


class _Predictor:
    """One model per actor (``map_batches`` with a class): a part's images in forward passes
    of ``batch_size``; returns per image the class probabilities, the lung fraction and,
    when asked, the mask and saliency PNGs (at the model's input size)."""

    def __init__(self, ref: str, st, device: str, batch_size: int, mask_threshold: float,
                 masks: bool, saliency: bool):
        from multimix import checkpoint, engine

        self.eval_step = engine.eval_step
        self.model, self.cfg, _ = checkpoint.load_model(ref, st, device=device)
        self.device, self.batch_size = device, batch_size
        self.mask_threshold, self.masks, self.saliency = mask_threshold, masks, saliency

    def __call__(self, batch: dict) -> dict:
        import torch

        out = []
        for blob in batch["part"]:
            d = pickle.loads(blob)
            x, n = d.pop("x"), len(d["ids"])
            probs, fractions, masks, sals = [], [], [], []
            for i in range(0, n, self.batch_size):
                res = self.eval_step(self.model, {"img": torch.from_numpy(
                    np.ascontiguousarray(x[i:i + self.batch_size, None]))}, self.device,
                    saliency=self.saliency)
                if "cls_prob" in res:
                    probs.extend(res["cls_prob"])
                if "seg_prob" in res:
                    m = res["seg_prob"][:, 0] >= self.mask_threshold
                    fractions.extend(m.reshape(len(m), -1).mean(1))
                    if self.masks:
                        masks.extend(encode_png(mi.astype(np.uint8) * np.uint8(255),
                                                MASK_PNG_LEVEL) for mi in m)
                if self.saliency and res.get("saliency") is not None:
                    for s in res["saliency"][:, 0]:
                        s = s / s.max() if s.max() > 0 else s
                        sals.append(encode_png(np.clip(np.rint(s * 255), 0, 255)
                                               .astype(np.uint8)))
            d.update(probs=np.asarray(probs, np.float32) if probs else None,
                     lung_fraction=np.asarray(fractions, np.float64) if fractions else None,
                     masks=masks or None, saliency=sals or None)
            out.append(pickle.dumps(d, protocol=5))
        return {"part": out, "k": batch["k"]}


def prediction_table(d: dict, classes: list[str], threshold: Optional[float]) -> pa.Table:
    """The rows of one part: ``id``, ``path``, ``height``/``width`` (the original image's),
    ``p_<class>`` per class, ``pneumonia_probability`` (when a class is PNEUMONIA),
    ``predicted`` (at ``threshold`` on p(class 1), else the argmax), ``predicted_argmax``,
    ``threshold``, ``lung_fraction`` (share of the model-size mask), ``mask`` / ``saliency``
    (PNG bytes, or null) and ``error`` (null, or why the image has no prediction)."""
    n = len(d["ids"])
    ok = [e is None for e in d["errors"]]
    cols: dict = {"id": pa.array(d["ids"], pa.string()),
                  "path": pa.array(d["paths"], pa.string()),
                  "height": pa.array(d["heights"], pa.int32()),
                  "width": pa.array(d["widths"], pa.int32())}
    probs = d.get("probs")
    if probs is not None:
        for j, c in enumerate(classes):
            cols[f"p_{c}"] = pa.array([float(probs[i, j]) if ok[i] else None for i in range(n)],
                                      pa.float32())
        if "PNEUMONIA" in classes:
            cols["pneumonia_probability"] = cols["p_PNEUMONIA"]
        arg = probs.argmax(1) if len(probs) else np.zeros(0, int)
        dec = arg if threshold is None else (probs[:, 1] >= threshold).astype(int)
        cols["predicted"] = pa.array([classes[dec[i]] if ok[i] else None for i in range(n)],
                                     pa.string())
        cols["predicted_argmax"] = pa.array([classes[arg[i]] if ok[i] else None
                                             for i in range(n)], pa.string())
        cols["threshold"] = pa.array([threshold if ok[i] else None for i in range(n)],
                                     pa.float32())
    if d.get("lung_fraction") is not None:
        cols["lung_fraction"] = pa.array([float(d["lung_fraction"][i]) if ok[i] else None
                                          for i in range(n)], pa.float32())
    for key in ("mask", "saliency"):
        vals = d.get("masks" if key == "mask" else "saliency")
        cols[key] = pa.array([vals[i] if vals is not None and ok[i] else None
                              for i in range(n)], pa.binary())
    cols["error"] = pa.array(d["errors"], pa.string())
    return pa.table(cols)


def _part_name(k: int, key: str) -> str:
    return f"part-{k:05d}-{key[:16]}.parquet"


def run_ray(args, st) -> int:
    """``multimix predict --ray`` (module docstring): returns 1 when any image failed."""
    import ray

    from multimix import checkpoint

    if args.batch_size < 1 or args.part_rows < 1:
        raise UserError("--batch-size and --part-rows must be >= 1")
    if args.actors is not None and args.actors < 1:
        raise UserError(f"--actors must be >= 1, got {args.actors}")
    parts, errors = _collect(args.images, st, args.part_rows)
    for line in errors:
        print(f"multimix predict: error: {line}", file=sys.stderr)
    if not parts:
        raise DataError(errors[0] if len(errors) == 1
                        else "no images to predict: " + "; ".join(errors))
    ref = checkpoint.resolve_checkpoint(args.checkpoint, st)
    raw = storage.read_bytes(ref, st)
    state = checkpoint.load_bytes(raw, name=ref)
    cfg = load_config(without_removed_keys(state["config"]))
    size = cfg.data.image_size
    classes = state.get("classes") or [f"class{i}" for i in range(cfg.model.num_classes)]
    threshold = checkpoint.decision_threshold(state)
    del state
    storage.check_writable(args.out, st)
    opts = json.dumps([hashlib.sha256(raw).hexdigest(), size, args.threshold, args.masks,
                       args.saliency, MAX_SIDE])
    for k, part in enumerate(parts):
        part["k"] = k
        part["name"] = _part_name(k, hashlib.sha256(
            (opts + part["digest"]).encode()).hexdigest())
    out_dir = storage.join(args.out, PARQUET_DIR)
    have = set(storage.list_files(out_dir, st, recursive=False))
    todo = [p for p in parts if p["name"] not in have]
    if len(todo) < len(parts):
        print(f"predict: {len(parts) - len(todo)} of {len(parts)} part(s) already in {out_dir} "
              "(resumed)", file=sys.stderr)
    resources.connect_ray(st)
    gpus = args.num_gpus if args.num_gpus is not None else (
        1.0 if args.device.startswith("cuda") else 0.0)
    if args.actors is not None:
        actors = args.actors
    else:
        total = ray.cluster_resources()
        actors = (max(1, int(total.get("GPU", 0) // gpus)) if gpus > 0
                  else max(1, int(total.get("CPU", 1) // 2)))
    actors = max(1, min(actors, len(todo) or 1))
    total_rows = sum(p.get("rows", len(p.get("files", ()))) for p in todo)
    print(f"predict: {len(todo)} part(s), {total_rows} image(s) on Ray: {actors} model "
          f"actor(s) x ({args.cpus_per_actor:g} CPU, {gpus:g} GPU), batch {args.batch_size}",
          file=sys.stderr, flush=True)
    done_rows = failed = 0
    if todo:
        for res in _ray_parts(todo, args, st, ref, size, classes, threshold, out_dir, actors,
                              gpus):
            done_rows += res["rows"]
            failed += res["failed"]
            print(f"predict: part {res['k']} done ({res['rows']} rows, {res['failed']} failed); "
                  f"{done_rows}/{total_rows} image(s)", file=sys.stderr, flush=True)
    # parts of other inputs, checkpoints or options under the same --out: not this result
    keep = {p["name"] for p in parts}
    fs, root = storage.resolve(out_dir, st)
    for rel in storage.list_files(out_dir, st, recursive=False):
        if rel.startswith("part-") and rel.endswith(".parquet") and rel not in keep:
            with storage.storage_errors(out_dir, st):
                fs.delete_file(f"{root.rstrip('/')}/{rel}")
    if len(todo) < len(parts):  # count the failures of the parts written before
        failed = _count_failed(out_dir, st)
    rows = sum(p.get("rows", len(p.get("files", ()))) for p in parts)
    failed_all = failed + len(errors)
    print(f"wrote {rows} prediction row(s) to {out_dir} ({len(parts)} part(s))"
          + (f"; {failed_all} image(s) failed (rows with an error)" if failed_all else ""))
    return 1 if failed_all else 0


def _count_failed(out_dir: str, st) -> int:
    fs, root = storage.resolve(out_dir, st)
    with storage.storage_errors(out_dir, st):
        t = pq.read_table(root, filesystem=fs, columns=["error"])
    return int(t.num_rows - t.column("error").null_count)


def _ray_parts(todo: list[dict], args, st, ref: str, size: int, classes: list[str],
               threshold: Optional[float], out_dir: str, actors: int, gpus: float):
    """The Ray Data execution: read (CPU tasks) → model (actor pool) → write (CPU tasks);
    yields ``{"k", "rows", "failed"}`` per part as it is written."""
    import ray

    def load(batch: dict) -> dict:
        return {"k": batch["k"], "part": [pickle.dumps(_load_part(pickle.loads(b), size, st),
                                                       protocol=5) for b in batch["part"]]}

    def write(batch: dict) -> dict:
        fs, root = storage.resolve(out_dir, st)
        rows, failed = [], []
        for k, blob in zip(batch["k"], batch["part"]):
            d = pickle.loads(blob)
            t = prediction_table(d, classes, threshold)
            sink = pa.BufferOutputStream()
            pq.write_table(t, sink, compression="zstd")
            name = names[int(k)]
            storage.write_file(fs, f"{root.rstrip('/')}/{name}", sink.getvalue(),
                               uri=storage.join(out_dir, name), storage_cfg=st)
            rows.append(t.num_rows)
            failed.append(t.num_rows - t.column("error").null_count)
        return {"k": batch["k"], "rows": np.asarray(rows), "failed": np.asarray(failed)}

    names = {p["k"]: p["name"] for p in todo}
    items = [{"k": p["k"], "part": pickle.dumps(p, protocol=5)} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # a read task holds a part's images (N x size² bytes) and one decoded original (up to
    # 2048² floats in Pillow's resize): it reserves that memory, which also keeps Ray Data from
    # fusing the reads into the model actors (fusion needs equal resource requests), so
    # decoding stays on CPU tasks and the actors only run the model
    mem = max(p.get("rows", len(p.get("files", ()))) for p in todo) * size * size + (64 << 20)
    ds = ds.map_batches(load, batch_size=1, num_cpus=1, batch_format="numpy", memory=mem)
    ds = ds.map_batches(_Predictor, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        num_cpus=args.cpus_per_actor, num_gpus=gpus,
                        fn_constructor_kwargs=dict(ref=ref, st=st, device=args.device,
                                                   batch_size=args.batch_size,
                                                   mask_threshold=args.threshold,
                                                   masks=args.masks, saliency=args.saliency))
    ds = ds.map_batches(write, batch_size=1, num_cpus=0.5, batch_format="numpy")
    for row in ds.iter_rows():
        yield {"k": int(row["k"]), "rows": int(row["rows"]), "failed": int(row["failed"])}

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
image smaller than :data:`MIN_SIDE` pixels on a side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from multimix.config import add_config_arguments, load_config
from multimix.data import storage
from multimix.data.images import IMAGE_EXTENSIONS, load_grey_bounded, resize_image
from multimix.errors import DataError, UserError

#: images with a side below this are refused (nothing meaningful to segment)
MIN_SIDE = 32
#: images with a longer side above this are decoded reduced to at most this (outputs too)
MAX_SIDE = 2048


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files (png, jpeg, tiff, ...) or directories (their images, "
                        "recursively)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, a checkpoint directory, or a run directory (uses best)")
    p.add_argument("--out", default="predictions",
                   help="output directory or s3://bucket/prefix (default: predictions)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability threshold of the lung mask (default 0.5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_config_arguments(p, what="storage settings when the checkpoint is on s3://")


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

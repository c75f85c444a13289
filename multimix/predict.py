"""``multimix predict --checkpoint CKPT IMAGE...``: pneumonia probability, lung mask, saliency.

Any image Pillow reads: any size, grey or RGB(A), 8- or 16-bit. Each image is converted to 8-bit
grey, resized to the model's input size (the same preprocessing as training), and the outputs are
resized back to the original size. For ``IMAGE`` named ``x.png`` it writes into ``--out``:

- ``x_mask.png``      lung mask (0/255) at the original size
- ``x_saliency.png``  |∂ max class score / ∂ input|, scaled to 0..255, at the original size
- ``x_overlay.png``   the image with the lung boundary and the saliency overlaid (RGB)

and ``predictions.json`` with one entry per image: the class probabilities, the ``predicted``
class (argmax, or — for a checkpoint trained with ``objective.decision`` other than argmax — the
threshold on p(class 1) chosen on its validation split, given as ``threshold``, with the argmax
class beside it as ``predicted_argmax``). A file that is not an image (or is truncated)
gets a clear error line and the others are still processed; the exit code is then 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpeg, tiff, ...)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt, a checkpoint directory, or a run directory (uses best)")
    p.add_argument("--out", default="predictions",
                   help="output directory or s3://bucket/prefix (default: predictions)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability threshold of the lung mask (default 0.5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--config", default=None,
                   help="YAML/preset for storage settings when the checkpoint is on s3://")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")


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

    from multimix.data.images import resize_image
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


def run(args) -> int:
    from multimix import checkpoint
    from multimix.config import load_config
    from multimix.data import storage

    storage_cfg = load_config(args.config, args.set).storage
    model, cfg, state = checkpoint.load_model(args.checkpoint, storage_cfg, device=args.device)
    classes = state.get("classes") or [f"class{i}" for i in range(cfg.model.num_classes)]
    threshold = checkpoint.decision_threshold(state)
    with storage.staged_output(args.out, storage_cfg) as out_dir:
        results, failed = _predict_all(args, model, cfg, classes, out_dir,
                                       lambda p: storage.output_uri(args.out, out_dir, p),
                                       threshold)
    print(f"wrote {len(results) - failed} prediction(s) to {args.out}"
          + (f"; {failed} file(s) failed" if failed else ""))
    return 1 if failed else 0


def _predict_all(args, model, cfg, classes: list, out_dir: Path, dest,
                 threshold: float | None = None) -> tuple[list, int]:
    """Predict every image into the local folder ``out_dir``; ``dest`` maps a written file to
    its final place (a path under ``--out``, also ``s3://``). ``threshold``: the decision on
    p(class 1) (None: argmax)."""
    from PIL import Image

    from multimix.data.images import load_grey
    from multimix.errors import UserError
    from multimix.plots import overlay_png

    results, failed = [], 0
    for path in args.images:
        try:
            grey = load_grey(path)
        except (UserError, OSError) as exc:
            failed += 1
            print(f"multimix predict: error: {path}: {exc}", file=sys.stderr)
            results.append({"image": path, "error": str(exc)})
            continue
        pred = predict_array(model, cfg, grey, args.device, args.threshold)
        stem = Path(path).stem
        entry: dict = {"image": path, "height": int(grey.shape[0]), "width": int(grey.shape[1])}
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

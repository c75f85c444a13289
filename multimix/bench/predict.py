"""``multimix bench predict``: what DICOM costs against JPEG, and in-process ``predict`` against
``predict --ray``, on the same real radiographs.

1. **Decoding** (one process, one thread): the same ``--images`` Kermany JPEGs decoded to 8-bit
   grey with :func:`multimix.data.images.load_grey`, and written (in a temporary folder) as
   12-bit windowed DICOM uncompressed, RLE Lossless and JPEG 2000 Lossless, decoded by the same
   function (:mod:`multimix.data.dicom`). Images/s per CPU.
2. **Prediction**: ``multimix predict`` (in-process: one image at a time, writing the mask,
   saliency and overlay PNGs) against ``multimix predict --ray`` (Ray Data: read tasks, one
   model actor per ``--actors``, parquet parts) on the same files, with a model of ``--size``
   (random weights: the cost does not depend on them). Wall time includes loading the model;
   ``--ray`` includes Ray Data's start-up of the actors, not Ray's own start.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from multimix.bench import ratio
from multimix.cli import main
from multimix.config import load_config
from multimix.data.images import load_grey


def add_arguments(p) -> None:
    p.add_argument("--data", default=os.environ.get("MULTIMIX_DATA", "../shared/data"),
                   help="the shared data folder (kermany-cxr/ below it)")
    p.add_argument("--images", type=int, default=200, help="Kermany images (default 200)")
    p.add_argument("--size", type=int, default=64, help="model input size (default 64)")
    p.add_argument("--actors", type=int, default=1, help="--ray model actors (default 1)")
    p.add_argument("--skip-predict", action="store_true", help="decoding only")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _dicoms(files: list[Path], folder: Path) -> dict[str, list[Path]]:
    """The files as 12-bit windowed MONOCHROME2 DICOM: uncompressed, RLE, JPEG 2000."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
                             generate_uid)

    out: dict[str, list[Path]] = {"dicom": [], "dicom-rle": [], "dicom-j2k": []}
    for f in files:
        g = load_grey(f).astype(np.uint16) * 16
        for kind, syntax in (("dicom", None), ("dicom-rle", RLELossless),
                             ("dicom-j2k", JPEG2000Lossless)):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
            ds.Rows, ds.Columns = g.shape
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.WindowCenter, ds.WindowWidth = 2040.5, 4081
            ds.PixelData = g.tobytes()
            if syntax is not None:
                ds.compress(syntax, encoding_plugin="pylibjpeg" if syntax == JPEG2000Lossless
                            else "")
            p = folder / kind / f"{f.parent.name}-{f.stem}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(p, enforce_file_format=True)
            out[kind].append(p)
    return out


def _rate(paths: list[Path]) -> float:
    datas = [p.read_bytes() for p in paths]  # the reads are not what is measured
    t = time.perf_counter()
    for d, p in zip(datas, paths):
        load_grey(d, name=p.name)
    return len(paths) / (time.perf_counter() - t)


def run(args) -> int:
    import torch

    from multimix import checkpoint

    torch.set_num_threads(1)
    root = Path(args.data) / "kermany-cxr" / "train"
    files = [p for c in ("NORMAL", "PNEUMONIA") for p in sorted((root / c).glob("*.jpeg"))
             [:args.images // 2]]
    res: dict = {"images": len(files), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dcm = _dicoms(files, tmp)
        res["decode_img_s"] = {"jpeg": round(_rate(files), 1)}
        for kind, paths in dcm.items():
            res["decode_img_s"][kind] = round(_rate(paths), 1)
        res["decode_vs_jpeg"] = {k: ratio(v, res["decode_img_s"]["jpeg"])
                                 for k, v in res["decode_img_s"].items()}
        res["bytes_per_image"] = {"jpeg": int(np.mean([f.stat().st_size for f in files])),
                                  **{k: int(np.mean([p.stat().st_size for p in v]))
                                     for k, v in dcm.items()}}
        if not args.skip_predict:
            cfg = load_config("cpu-small" if args.size <= 64 else "paper",
                              [f"data.image_size={args.size}"])
            torch.manual_seed(0)
            state = checkpoint.build_state(model=checkpoint.create_model(cfg.model), optimizer=None,
                                           scheduler=None, epoch=1, config=cfg, splits={},
                                           classes=["NORMAL", "PNEUMONIA"], history=[])
            checkpoint.save(state, str(tmp / "checkpoint.pt"))
            imgs = tmp / "imgs"
            imgs.mkdir()
            for f in files:
                (imgs / f"{f.parent.name}-{f.name}").write_bytes(f.read_bytes())
            quiet = io.StringIO()
            t = time.perf_counter()
            with contextlib.redirect_stdout(quiet):
                main(["predict", "--checkpoint", str(tmp / "checkpoint.pt"), str(imgs),
                      "--out", str(tmp / "in")])
            res["predict_in_process_img_s"] = round(len(files) / (time.perf_counter() - t), 1)
            import ray

            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
            try:
                t = time.perf_counter()
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    main(["predict", "--ray", "--checkpoint", str(tmp / "checkpoint.pt"),
                          str(imgs), "--out", str(tmp / "ray"), "--actors", str(args.actors),
                          "--part-rows", str(max(1, len(files) // 4))])
                res["predict_ray_img_s"] = round(len(files) / (time.perf_counter() - t), 1)
            finally:
                ray.shutdown()
            res["model_size"] = args.size
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"decoding {res['images']} Kermany radiographs (img/s, one CPU): "
          + ", ".join(f"{k} {v} ({res['decode_vs_jpeg'][k]}x, {res['bytes_per_image'][k]} B)"
                      for k, v in res["decode_img_s"].items()))
    if "predict_ray_img_s" in res:
        print(f"predict at {res['model_size']} px on {res['cpus']} CPUs (img/s): in-process "
              f"{res['predict_in_process_img_s']}, --ray {res['predict_ray_img_s']} "
              f"({args.actors} actor(s))")
    return 0

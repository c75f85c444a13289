"""``multimix predict --ray`` (Ray Data batch inference) against the in-process ``predict`` on
the same real radiographs: one row per input, the same probabilities, decisions and lung
fractions; a prepared dataset (prepared on Ray, DICOMs among its files) gives the same
probabilities; a bad file is a row with an error; a rerun writes nothing (resume) and a lost part
is rewritten alone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from multimix import checkpoint
from multimix.cli import main
from multimix.config import load_config
from multimix.data.images import decode_png, load_grey
from multimix.data.prepare import prepare
from multimix.model import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from test_dicom import write_dicom  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

N = 10


def random_checkpoint(path: Path, threshold: float) -> Path:
    """A cpu-small (64 px) MultiMix with seeded random weights, deciding at ``threshold``."""
    torch.manual_seed(0)
    cfg = load_config("cpu-small", ["objective.decision=balanced_accuracy"])
    state = checkpoint.build_state(model=create_model(cfg.model), optimizer=None,
                                   scheduler=None, epoch=1, config=cfg, splits={},
                                   classes=["NORMAL", "PNEUMONIA"], history=[],
                                   threshold=threshold)
    path.mkdir(parents=True)
    checkpoint.save(state, str(path / checkpoint.FILENAME))
    return path


def test_predict_ray_matches_in_process(ray_local, shared_data, tmp_path, capsys):
    root = shared_data / "kermany-cxr" / "train"
    files = [p for c in ("NORMAL", "PNEUMONIA") for p in sorted((root / c).glob("*.jpeg"))[:N // 2]]
    imgs = tmp_path / "imgs"
    for p in files:
        (imgs / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, imgs / p.parent.name / p.name)
    # the same radiograph as a windowed 12-bit MONOCHROME1 DICOM, and a file that is no image
    g = load_grey(files[0]).astype(np.int64)
    write_dicom(imgs / "NORMAL" / "dcm-mono1.dcm", 16 * (255 - g), photometric="MONOCHROME1",
                bits=12, window=(2040.5, 4081))
    (imgs / "NORMAL" / "broken.png").write_bytes(b"not an image")
    # in process first: its probabilities decide the threshold (between two of them)
    ckpt0 = random_checkpoint(tmp_path / "ck0", 0.5)
    assert main(["predict", "--checkpoint", str(ckpt0), str(imgs), "--out",
                 str(tmp_path / "in0")]) == 1  # the broken file
    p0 = sorted(e["pneumonia_probability"] for e in
                json.loads((tmp_path / "in0" / "predictions.json").read_text()) if "error" not in e)
    thr = float(np.median(p0))
    ckpt = random_checkpoint(tmp_path / "ck", thr)
    assert main(["predict", "--checkpoint", str(ckpt), str(imgs), "--out",
                 str(tmp_path / "in")]) == 1
    ref = {Path(e["image"]).relative_to(imgs).with_suffix("").as_posix(): e for e in
           json.loads((tmp_path / "in" / "predictions.json").read_text())}

    out = tmp_path / "ray"
    args = ["predict", "--ray", "--checkpoint", str(ckpt), str(imgs), "--out", str(out),
            "--part-rows", "5", "--batch-size", "4", "--masks", "--actors", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "predict: part 2 done" in err and "3 part(s), 12 image(s) on Ray" in err
    parts = sorted((out / "predictions.parquet").iterdir())
    assert len(parts) == 3
    t = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(t) == N + 2 and {r["id"] for r in t} == set(ref)
    decided = set()
    for r in t:
        e = ref[r["id"]]
        if "error" in e:
            assert r["error"] == e["error"] and r["pneumonia_probability"] is None
            continue
        assert r["error"] is None
        assert r["pneumonia_probability"] == pytest.approx(e["pneumonia_probability"], abs=1e-4)
        assert r["p_NORMAL"] == pytest.approx(e["probabilities"]["NORMAL"], abs=1e-4)
        assert (r["predicted"], r["predicted_argmax"]) == (e["predicted"], e["predicted_argmax"])
        assert r["threshold"] == pytest.approx(thr)
        decided.add(r["predicted"])
        assert r["lung_fraction"] == pytest.approx(e["lung_fraction"], abs=0.02)
        assert (r["height"], r["width"]) == (e["height"], e["width"])
        m = decode_png(r["mask"])
        assert m.shape == (64, 64) and set(np.unique(m)) <= {0, 255}
        assert m.mean() / 255 == pytest.approx(r["lung_fraction"])
    assert decided == {"NORMAL", "PNEUMONIA"}  # the threshold decides, not the argmax
    dcm = next(r for r in t if r["id"] == "NORMAL/dcm-mono1")
    jpg = next(r for r in t if r["id"] == f"NORMAL/{files[0].stem}")
    assert dcm["pneumonia_probability"] == pytest.approx(jpg["pneumonia_probability"], abs=0.01)

    # resume: nothing to do; a lost part is written again, alone
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 of 3 part(s) already in" in err and "part 0 done" not in err
    parts[1].unlink()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "2 of 3 part(s) already in" in err and "part 1 done" in err and "part 0 done" not in err
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "predictions.parquet")
                                                         .iterdir())}.keys() == stamps.keys()
    assert (out / "predictions.parquet" / parts[0].name).stat().st_mtime_ns == stamps[parts[0].name]

    # a prepared dataset (prepared on Ray, at the model's size; --views keeps the PA DICOM) gives
    # one row per dataset row, the probabilities of in-process predict on the original files
    ds = tmp_path / "ds"
    m = prepare(str(imgs), str(ds), image_size=64, progress=False, ray=True, shard_rows=6,
                views=["PA"])
    assert m["num_rows"] == N + 1 and m["skipped"] == 1 and len(m["shards"]) == 2
    assert main(["predict", "--ray", "--checkpoint", str(ckpt), str(ds), "--out",
                 str(tmp_path / "rayds")]) == 0
    rows = pq.read_table(tmp_path / "rayds" / "predictions.parquet").to_pylist()
    assert len(rows) == N + 1 and all(r["error"] is None for r in rows)
    for r in rows:
        assert r["pneumonia_probability"] == pytest.approx(
            ref[r["id"]]["pneumonia_probability"], abs=0.02)

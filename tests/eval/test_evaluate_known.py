"""``multimix evaluate`` against known answers: a network whose outputs are known in closed form
(:mod:`known_model`), tiny prepared datasets, and every expected number computed here
independently of :mod:`multimix.metrics` (pairwise AUC, counted confusion and F1, Hausdorff from
scikit-image and brute-force point distances, SSIM from scikit-image)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import hausdorff_distance, structural_similarity
from skimage.segmentation import find_boundaries

import known_model as km
from multimix.config import load_config

SIZE = 32
CLASSES = ("NORMAL", "PNEUMONIA")
# id: (label index, grey level v): the known network gives P(PNEUMONIA) = v / 255
OWN_CLS = {"c00": (1, 230), "c01": (1, 200), "c02": (1, 160), "c03": (1, 100), "c04": (1, 140),
           "c05": (0, 20), "c06": (0, 60), "c07": (0, 180), "c08": (0, 90), "c09": (1, 210),
           "c10": (0, 110), "c11": (1, 50)}
CLS_VAL = ["c01", "c03", "c05", "c07", "c08", "c10", "c11"]
OTHER_CLS = {"k0": (0, 10), "k1": (0, 200), "k2": (1, 120), "k3": (1, 250), "k4": (0, 170)}
SEG_VAL = ["s0", "s2", "s4"]
BG, LUNG = 40, 200  # grey levels: the known network predicts lung exactly where u8 >= 128


def _rect(*boxes) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.uint8)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = 1
    return m


def _seg_rows() -> list[dict]:
    """id, image (predicted lung drawn at LUNG), reference mask, ignore."""
    spec = {
        "s0": (_rect((8, 20, 6, 14)), _rect((10, 22, 8, 24)), None),  # shifted, asymmetric HD
        "s1": (_rect((5, 25, 5, 12), (5, 25, 18, 27)),) * 2 + (None,),  # exact
        "s2": (_rect(), _rect((10, 20, 10, 20)), None),  # nothing predicted
        "s3": (_rect(), _rect(), None),  # nothing there, nothing predicted
        "s4": (_rect((6, 26, 6, 20)), _rect((6, 26, 10, 24)), _rect((6, 26, 16, 24))),
    }
    return [{"id": k, "image": np.where(pred, LUNG, BG).astype(np.uint8), "mask": ref,
             "ignore": ig, "pred": pred.astype(bool)} for k, (pred, ref, ig) in spec.items()]


def _cls_rows(spec: dict) -> list[dict]:
    return [{"id": k, "image": np.full((SIZE, SIZE), v, np.uint8), "label": y}
            for k, (y, v) in spec.items()]


def _expected_cls(spec: dict, ids) -> dict:
    y = np.array([spec[i][0] for i in ids])
    p = np.array([spec[i][1] / 255 for i in ids])
    pred = (p > 0.5).astype(int)
    conf = [[int(np.sum((y == t) & (pred == q))) for q in (0, 1)] for t in (0, 1)]
    out = {"accuracy": float(np.mean(pred == y)), "confusion": conf, "n": len(ids)}
    for k, name in enumerate(CLASSES):
        tp = np.sum((pred == k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        fn = np.sum((pred != k) & (y == k))
        out[f"f1_{name.lower()}"] = 2 * tp / (2 * tp + fp + fn)
    pos, neg = p[y == 1], p[y == 0]
    out["auc"] = float(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))
    return out


def _points(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(find_boundaries(mask, mode="inner", connectivity=1) & mask)


def _expected_seg(row: dict) -> dict:
    valid = np.ones((SIZE, SIZE), bool) if row["ignore"] is None else row["ignore"] == 0
    pred, ref = row["pred"] & valid, (row["mask"] > 0) & valid
    tp, fp, fn = np.sum(pred & ref), np.sum(pred & ~ref), np.sum(~pred & ref)
    diag = math.hypot(SIZE - 1, SIZE - 1)
    if not pred.any() and not ref.any():
        e = dict(dice=1.0, jaccard=1.0, precision=1.0, recall=1.0, hausdorff=0.0, hd95=0.0)
    elif not pred.any() or not ref.any():
        e = dict(dice=0.0, jaccard=0.0, precision=0.0, recall=0.0, hausdorff=diag, hd95=diag)
    else:
        a, b = _points(pred), _points(ref)
        d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # all boundary pairs
        e = dict(dice=2 * tp / (2 * tp + fp + fn), jaccard=tp / (tp + fp + fn),
                 precision=tp / (tp + fp), recall=tp / (tp + fn),
                 hausdorff=max(d.min(1).max(), d.min(0).max()),
                 hd95=max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))
        assert e["hausdorff"] == pytest.approx(hausdorff_distance(
            find_boundaries(pred, mode="inner", connectivity=1) & pred,
            find_boundaries(ref, mode="inner", connectivity=1) & ref))
    x = row["image"].astype(np.float64) / 127.5 - 1
    prob = np.where(valid, 1 / (1 + np.exp(-40 * x)), 0.0)
    _, smap = structural_similarity(prob, ref.astype(np.float64), data_range=1.0, win_size=7,
                                    full=True)
    e["ssim"] = float(smap[3:-3, 3:-3][valid[3:-3, 3:-3]].mean())
    return {k: float(v) for k, v in e.items()}


@pytest.fixture
def known(tmp_path, monkeypatch):
    """Prepared sets, a config trained "on" the own sets, a real checkpoint of KnownNet."""
    own_cls = km.write_prepared(tmp_path / "own_cls", "cls", _cls_rows(OWN_CLS), SIZE,
                                source="own-cls")
    other_cls = km.write_prepared(tmp_path / "other_cls", "cls", _cls_rows(OTHER_CLS), SIZE,
                                  source="other-cls")
    seg_rows = _seg_rows()
    own_seg = km.write_prepared(tmp_path / "own_seg", "seg", seg_rows, SIZE, source="own-seg")
    cfg = load_config("cpu-small", [f"data.image_size={SIZE}", f"data.cls_data={own_cls}",
                                    f"data.seg_data={own_seg}"])
    splits = {"cls": {"labeled": sorted(set(OWN_CLS) - set(CLS_VAL)), "val": CLS_VAL,
                      "unlabeled": []},
              "seg": {"labeled": ["s1", "s3"], "val": SEG_VAL, "unlabeled": []}}
    ckpt = km.save_checkpoint(tmp_path / "ckpt", cfg, splits)
    km.install(monkeypatch)
    return {"own_cls": own_cls, "other_cls": other_cls, "own_seg": own_seg, "ckpt": str(ckpt),
            "seg_rows": {r["id"]: r for r in seg_rows}}


def _csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_scores_known_outputs_exactly(known, tmp_path):
    from multimix.evaluate import evaluate_checkpoint

    out = tmp_path / "eval"
    res = evaluate_checkpoint(known["ckpt"], cls_data=[known["own_cls"], known["other_cls"]],
                              seg_data=[known["own_seg"]], out_dir=str(out))
    report = json.loads(Path(res["json"]).read_text())
    assert report["epoch"] == 3 and report["image_size"] == SIZE

    # classification: in-domain = the checkpoint's held-out ids, cross-domain = every row
    rows = _csv(report["per_image"]["cls"])
    for name, spec, ids, what in (("own-cls", OWN_CLS, CLS_VAL, "held-out validation ids"),
                                  ("other-cls", OTHER_CLS, list(OTHER_CLS),
                                   "all rows (not seen in training)")):
        m = report["cls"][name]
        assert m["rows"] == what and m["n"] == len(ids)
        scored = [r for r in rows if r["set"] == name]
        assert sorted(r["id"] for r in scored) == sorted(ids)
        exp = _expected_cls(spec, ids)
        assert m["confusion"] == exp["confusion"]
        for k in ("accuracy", "f1_normal", "f1_pneumonia", "auc"):
            assert m[k] == pytest.approx(exp[k], abs=1e-9), (name, k)
        assert m["macro_f1"] == pytest.approx((exp["f1_normal"] + exp["f1_pneumonia"]) / 2)
        # class name <-> index, both ways: the stored label index k is named CLASSES[k], and
        # prob_<name> is the probability of that index
        for r in scored:
            y, v = spec[r["id"]]
            assert r["label"] == CLASSES[y]
            assert float(r["prob_PNEUMONIA"]) == pytest.approx(v / 255, abs=1e-5)
            assert float(r["prob_NORMAL"]) == pytest.approx(1 - v / 255, abs=1e-5)
            assert r["predicted"] == CLASSES[int(v > 127.5)]
    own = _expected_cls(OWN_CLS, CLS_VAL)
    assert own["f1_normal"] != own["f1_pneumonia"] and own["auc"] not in (0.5, 1.0)
    assert own["confusion"][0][1] != own["confusion"][1][0]  # a transposed matrix would differ

    # segmentation: held-out ids of the own set, each image's scores as computed here
    s = report["seg"]["own-seg"]
    assert s["rows"] == "held-out validation ids" and s["n"] == len(SEG_VAL)
    seg_rows = _csv(report["per_image"]["seg"])
    assert sorted(r["id"] for r in seg_rows) == sorted(SEG_VAL)
    expected = {i: _expected_seg(known["seg_rows"][i]) for i in SEG_VAL}
    for r in seg_rows:
        for k, v in expected[r["id"]].items():
            assert float(r[k]) == pytest.approx(v, abs=1e-6), (r["id"], k)
    for k in ("dice", "jaccard", "hausdorff", "hd95", "ssim", "precision", "recall"):
        vals = [expected[i][k] for i in SEG_VAL]
        assert s[f"{k}_mean"] == pytest.approx(np.mean(vals), abs=1e-6), k
        assert s[f"{k}_std"] == pytest.approx(np.std(vals), abs=1e-6), k
    assert 0 < expected["s0"]["dice"] < 1 and expected["s0"]["hausdorff"] > 0
    a, b = _points(known["seg_rows"]["s0"]["pred"]), _points(known["seg_rows"]["s0"]["mask"] > 0)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    assert d.min(1).max() != d.min(0).max()  # the two directed distances differ

    md = Path(res["markdown"]).read_text()
    dice_mean = np.mean([expected[i]["dice"] for i in SEG_VAL])
    assert f"{own['accuracy']:.4f}" in md and f"{dice_mean:.4f}" in md
    assert {"roc", "dice_box"} <= set(report["plots"])


def test_evaluate_subset_all_and_val(known, tmp_path):
    from multimix.errors import UserError
    from multimix.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(known["ckpt"], cls_data=[known["own_cls"]],
                              seg_data=[known["own_seg"]], out_dir=str(tmp_path / "all"),
                              subset="all")
    report = json.loads(Path(res["json"]).read_text())
    assert sorted(r["id"] for r in _csv(report["per_image"]["cls"])) == sorted(OWN_CLS)
    assert sorted(r["id"] for r in _csv(report["per_image"]["seg"])) == ["s0", "s1", "s2", "s3",
                                                                        "s4"]
    exp = _expected_cls(OWN_CLS, list(OWN_CLS))
    m = report["cls"]["own-cls"]
    assert m["rows"] == "all rows" and m["confusion"] == exp["confusion"]
    assert m["auc"] == pytest.approx(exp["auc"])
    with pytest.raises(UserError, match="not the cls dataset the checkpoint was trained on"):
        evaluate_checkpoint(known["ckpt"], cls_data=[known["other_cls"]],
                            out_dir=str(tmp_path / "val"), subset="val")


def test_evaluate_cli_on_known_model(known, tmp_path, capsys):
    from multimix.cli import main

    out = tmp_path / "cli"
    assert main(["evaluate", "--checkpoint", known["ckpt"], "--cls-data", known["other_cls"],
                 "--out", str(out)]) == 0
    exp = _expected_cls(OTHER_CLS, list(OTHER_CLS))
    report = json.loads((out / "report.json").read_text())
    assert report["cls"]["other-cls"]["accuracy"] == pytest.approx(exp["accuracy"])
    assert f"{exp['auc']:.4f}" in capsys.readouterr().out


def test_evaluate_refuses_a_dataset_whose_class_order_differs(known, tmp_path):
    """Label index k must mean the checkpoint's class k: a set whose manifest lists the classes
    in another order would be scored with swapped labels."""
    from multimix.errors import UserError
    from multimix.evaluate import evaluate_checkpoint

    swapped = km.write_prepared(tmp_path / "swapped", "cls", _cls_rows(OTHER_CLS), SIZE,
                                classes=("PNEUMONIA", "NORMAL"), source="swapped")
    with pytest.raises(UserError, match="PNEUMONIA.*NORMAL"):
        evaluate_checkpoint(known["ckpt"], cls_data=[swapped], out_dir=str(tmp_path / "sw"))


def test_training_validation_and_evaluate_are_one_path(known, tmp_path):
    """What the training loop records each epoch (``validate(...).flat()`` on the held-out
    pools) equals what ``multimix evaluate`` reports for the same ids, and both equal the
    numbers computed here; the model's mode is restored; a rank scores its stride only."""
    from multimix.checkpoint import load_model
    from multimix.data.pools import load_labeled_pool
    from multimix.evaluate import evaluate_checkpoint
    from multimix.metrics import val_score
    from multimix.validate import validate

    model, cfg, _ = load_model(known["ckpt"])
    cls_pool = load_labeled_pool(known["own_cls"], CLS_VAL, cfg)
    seg_pool = load_labeled_pool(known["own_seg"], SEG_VAL, cfg)
    model.train()
    res = validate(model, "cpu", cls=cls_pool, seg=seg_pool, classes=CLASSES, batch_size=3)
    assert model.training  # restored
    flat = res.flat()
    report = json.loads(Path(evaluate_checkpoint(
        known["ckpt"], cls_data=[known["own_cls"]], seg_data=[known["own_seg"]],
        out_dir=str(tmp_path / "eval"))["json"]).read_text())
    exp = _expected_cls(OWN_CLS, CLS_VAL)
    for k in ("accuracy", "auc", "f1_pneumonia"):
        assert flat[f"val_cls_{k}"] == pytest.approx(exp[k], abs=1e-9)
        assert flat[f"val_cls_{k}"] == report["cls"]["own-cls"][k]
    for k in ("dice_mean", "hausdorff_mean", "ssim_mean"):
        assert flat[f"val_seg_{k}"] == report["seg"]["own-seg"][k]
    assert flat["val_score"] == pytest.approx(val_score(res.cls.metrics, res.seg.metrics))
    assert flat["val_score"] == pytest.approx(
        (exp["auc"] + np.mean([_expected_seg(known["seg_rows"][i])["dice"]
                               for i in SEG_VAL])) / 2, abs=1e-6)
    assert res.cls.ids == CLS_VAL and res.seg.ids == SEG_VAL
    np.testing.assert_allclose(res.cls.probs[:, 1], [OWN_CLS[i][1] / 255 for i in CLS_VAL],
                               atol=1e-5)
    assert res.cls.labels.tolist() == [OWN_CLS[i][0] for i in CLS_VAL]
    # without a process group a rank scores its own stride (the gather is a no-op)
    part = validate(model, "cpu", cls=cls_pool, classes=CLASSES, rank=1, world_size=2)
    assert part.cls.ids == CLS_VAL[1::2] and part.seg is None
    assert "val_seg_dice_mean" not in part.flat()


def test_evaluate_and_predict_use_the_stored_threshold(known, tmp_path, capsys):
    """A checkpoint trained with objective.decision=balanced_accuracy decides at its stored
    threshold; the argmax scores are reported beside it."""
    from multimix import checkpoint
    from multimix.cli import main
    from multimix.evaluate import evaluate_checkpoint

    state = checkpoint.load(known["ckpt"])
    state["decision"], state["threshold"] = "balanced_accuracy", 0.45
    ckpt = tmp_path / "thr" / checkpoint.FILENAME
    ckpt.parent.mkdir()
    checkpoint.save(state, str(ckpt))
    assert checkpoint.decision_threshold(state) == 0.45
    assert checkpoint.decision_threshold({**state, "decision": "argmax"}) is None
    # P(PNEUMONIA) = v/255: k0 .04, k1 .78, k2 .47, k3 .98, k4 .67; labels 0 0 1 1 0
    res = evaluate_checkpoint(str(ckpt), cls_data=[known["other_cls"]],
                              out_dir=str(tmp_path / "ev"))
    report = json.loads(Path(res["json"]).read_text())
    m = report["cls"]["other-cls"]
    assert m["threshold"] == 0.45 and report["decision_threshold"] == 0.45
    assert m["confusion"] == [[1, 2], [0, 2]]  # k2 (.47) is pneumonia at 0.45
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["argmax_accuracy"] == pytest.approx(2 / 5)
    assert m["argmax_balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    rows = {r["id"]: r for r in _csv(report["per_image"]["cls"])}
    assert (rows["k2"]["predicted"], rows["k2"]["predicted_argmax"]) == ("PNEUMONIA", "NORMAL")
    # predict: the same decision, argmax beside it
    img = tmp_path / "k2.png"
    from PIL import Image

    Image.fromarray(np.full((SIZE, SIZE), 120, np.uint8)).save(img)
    assert main(["predict", str(img), "--checkpoint", str(ckpt), "--out",
                 str(tmp_path / "pred")]) == 0
    entry = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    assert (entry["predicted"], entry["predicted_argmax"], entry["threshold"]) == \
        ("PNEUMONIA", "NORMAL", 0.45)


def test_checkpoint_records_split_files_not_ids_and_evaluate_reads_them(known, tmp_path):
    """A checkpoint stores each split as the file beside the data + the sha256 of its ids
    (no id lists copied into every checkpoint); evaluate reads the held-out ids from
    that file, and a changed or missing split file is one line naming it."""
    import torch

    from multimix import checkpoint
    from multimix.data import splits as S
    from multimix.errors import DataError
    from multimix.evaluate import evaluate_checkpoint

    cls_split = S.Split(labeled=sorted(set(OWN_CLS) - set(CLS_VAL)), val=sorted(CLS_VAL),
                        unlabeled=[], seed=0, n_labeled=4, val_fraction=0.3)
    seg_split = S.Split(labeled=["s1", "s3"], val=sorted(SEG_VAL), unlabeled=[], seed=0,
                        n_labeled=2, val_fraction=0.3)
    for uri, sp in ((known["own_cls"], cls_split), (known["own_seg"], seg_split)):
        (Path(uri) / "splits").mkdir(exist_ok=True)
        (Path(uri) / "splits" / f"{sp.name}.json").write_text(sp.to_json())
    records = {"cls": S.split_record(cls_split), "seg": S.split_record(seg_split)}
    assert records["cls"]["counts"] == {"labeled": len(cls_split.labeled),
                                        "val": len(CLS_VAL), "unlabeled": 0}
    cfg = load_config("cpu-small", [f"data.image_size={SIZE}",
                                    f"data.cls_data={known['own_cls']}",
                                    f"data.seg_data={known['own_seg']}"])
    ckpt = km.save_checkpoint(tmp_path / "rec", cfg, records)
    state = torch.load(ckpt / checkpoint.FILENAME, weights_only=True)
    assert "val" not in state["splits"]["cls"] and state["splits"]["cls"]["file"].startswith(
        "splits/")
    res = evaluate_checkpoint(str(ckpt), cls_data=[known["own_cls"]],
                              seg_data=[known["own_seg"]], out_dir=str(tmp_path / "ev"))
    report = json.loads(Path(res["json"]).read_text())
    assert report["cls"]["own-cls"]["rows"] == "held-out validation ids"
    assert report["cls"]["own-cls"]["n"] == len(CLS_VAL)
    assert report["seg"]["own-seg"]["n"] == len(SEG_VAL)

    f = Path(known["own_cls"]) / records["cls"]["file"]
    changed = S.Split.from_json(f.read_text())
    changed.val = changed.val[:-1]
    f.write_text(changed.to_json())
    with pytest.raises(DataError, match="ids differ from the split this checkpoint"):
        S.recorded_split(known["own_cls"], records["cls"])
    f.unlink()
    with pytest.raises(DataError, match=r"L4-V0.3-S0.json: the split this checkpoint was "):
        evaluate_checkpoint(str(ckpt), cls_data=[known["own_cls"]], out_dir=str(tmp_path / "e2"))

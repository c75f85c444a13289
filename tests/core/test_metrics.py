"""multimix.metrics against hand-computed examples, brute force, and every edge-case rule."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from skimage.metrics import hausdorff_distance, structural_similarity

from multimix import metrics as M

# ---------------------------------------------------------------------------------------------
# classification

# labels and p(PNEUMONIA) of a 7-image example worked out by hand below
Y7 = np.array([0, 0, 0, 1, 1, 1, 1])
P7 = np.array([0.1, 0.6, 0.3, 0.8, 0.4, 0.9, 0.6])


def _probs(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=1)


def test_classification_by_hand():
    m = M.classification_metrics(_probs(P7), Y7, ["NORMAL", "PNEUMONIA"])
    # predictions (p1 > 0.5): 0 1 0 | 1 0 1 1
    np.testing.assert_array_equal(m["confusion"], [[2, 1], [1, 3]])
    assert m["accuracy"] == pytest.approx(5 / 7)
    # PNEUMONIA: TP 3, FP 1, FN 1 -> 6/8 ; NORMAL: TP 2, FP 1, FN 1 -> 4/6
    assert m["f1_pneumonia"] == pytest.approx(0.75)
    assert m["f1_normal"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.75 + 2 / 3) / 2)
    # pairs (pos, neg): 0.8 -> 3 ; 0.4 -> 2 ; 0.9 -> 3 ; 0.6 -> 2 + ½ (tie with 0.6) = 10.5 / 12
    assert m["auc"] == pytest.approx(10.5 / 12)
    assert m["auc_defined"] is True
    assert m["n"] == 7
    assert set(m) == {"accuracy", "f1_normal", "f1_pneumonia", "macro_f1", "auc", "auc_defined",
                      "confusion", "n", "balanced_accuracy", "recall_normal", "recall_pneumonia"}


def _brute_auc(scores, labels):
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_pairwise_count_with_many_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = rng.integers(0, 5, size=40) / 4.0  # heavy ties
        y = rng.integers(0, 2, size=40)
        assert M.roc_auc(s, y) == pytest.approx(_brute_auc(s, y), abs=1e-12)


def test_average_ranks_are_scipys_and_metrics_do_not_import_scipy_stats():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for n, k in [(0, 2), (1, 2), (7, 1), (100, 3), (500, 50), (300, 10**9)]:
        x = rng.integers(0, k, n).astype(np.float64)  # few distinct values: many ties
        assert np.array_equal(M._average_ranks(x), rankdata(x, method="average")), (n, k)
    x = np.array([0.5, np.inf, -np.inf, 0.5])
    assert np.array_equal(M._average_ranks(x), rankdata(x, method="average"))
    assert np.isnan(M._average_ranks(np.array([0.1, np.nan]))).all()
    code = "import sys, multimix.metrics; assert 'scipy.stats' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_auc_all_tied_is_half_and_perfect_is_one():
    assert M.roc_auc([0.3, 0.3, 0.3], [0, 1, 1]) == 0.5
    assert M.roc_auc([0.1, 0.2, 0.9], [0, 1, 1]) == 1.0
    assert M.roc_auc([0.9, 0.2, 0.1], [0, 1, 1]) == 0.0


def test_auc_undefined_with_one_class_is_nan_and_reported():
    m = M.classification_metrics(_probs([0.9, 0.7, 0.2]), [1, 1, 1])
    assert math.isnan(m["auc"]) and m["auc_defined"] is False
    assert m["accuracy"] == pytest.approx(2 / 3)
    # NORMAL never true; predicted once -> TP 0, FP 1, FN 0 -> F1 0
    assert m["f1_normal"] == 0.0
    # only class 1 present and always predicted -> F1(NORMAL) has denominator 0 -> 1.0 by rule
    m = M.classification_metrics(_probs([0.9, 0.7]), [1, 1])
    assert m["f1_normal"] == 1.0 and m["f1_pneumonia"] == 1.0 and m["accuracy"] == 1.0
    assert math.isnan(M.roc_auc([0.1, 0.2], [0, 0]))


def test_classification_empty_and_argmax_tie():
    m = M.classification_metrics(np.zeros((0, 2)), np.zeros(0, dtype=int))
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["auc"])
    assert math.isnan(m["f1_normal"]) and not m["auc_defined"]
    # p = (0.5, 0.5): argmax takes the lower index -> NORMAL
    m = M.classification_metrics(np.array([[0.5, 0.5]]), [0])
    assert m["accuracy"] == 1.0


def test_classification_accepts_torch_and_checks_inputs():
    torch = pytest.importorskip("torch")
    m = M.classification_metrics(torch.tensor(_probs(P7)), torch.tensor(Y7))
    assert m["auc"] == pytest.approx(10.5 / 12)
    with pytest.raises(ValueError, match="class_names"):
        M.classification_metrics(_probs(P7), Y7, ["A", "B", "C"])
    with pytest.raises(ValueError, match="labels"):
        M.classification_metrics(_probs(P7), Y7 + 1)
    with pytest.raises(ValueError, match="labels"):
        M.classification_metrics(_probs(P7), Y7[:3])


def test_three_classes_one_vs_rest():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    m = M.classification_metrics(probs, [0, 1, 2, 0], ["a", "b", "c"])
    np.testing.assert_array_equal(m["confusion"], [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert m["f1_a"] == pytest.approx(2 / 3) and m["f1_b"] == pytest.approx(2 / 3)
    assert m["f1_c"] == 1.0
    # positives (label 1): score 0.8 ; negatives 0.2, 0.3, 0.4 -> AUC 1
    assert m["auc"] == 1.0


def test_roc_curve_by_hand_and_area_equals_auc():
    fpr, tpr, thr = M.roc_curve([0.2, 0.8], [0, 1])
    np.testing.assert_array_equal(fpr, [0, 0, 1])
    np.testing.assert_array_equal(tpr, [0, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.2])
    fpr, tpr, thr = M.roc_curve(P7, Y7)
    assert np.all(np.diff(thr) < 0) and fpr[-1] == tpr[-1] == 1.0
    assert np.trapezoid(tpr, fpr) == pytest.approx(10.5 / 12)
    rng = np.random.default_rng(2)
    s, y = rng.integers(0, 6, 50) / 5.0, rng.integers(0, 2, 50)
    fpr, tpr, _ = M.roc_curve(s, y)
    assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(s, y))
    fpr, tpr, _ = M.roc_curve([0.1, 0.4], [0, 0])
    assert np.all(np.isnan(tpr)) and fpr[-1] == 1.0


# ---------------------------------------------------------------------------------------------
# segmentation

REF4 = np.array([[1, 1, 0, 0],
                 [1, 1, 0, 0],
                 [0, 0, 0, 0],
                 [0, 0, 0, 0]])
PROB4 = np.array([[0.9, 0.6, 0.7, 0.0],
                  [0.2, 0.49, 0.0, 0.0],
                  [0.0, 0.0, 0.1, 0.0],
                  [0.0, 0.0, 0.0, 0.3]])


def test_segmentation_4x4_by_hand():
    m = M.segmentation_metrics(PROB4[None, None], REF4[None, None])
    assert set(m) == set(M.SEG_KEYS)
    assert all(v.shape == (1,) and v.dtype == np.float64 for v in m.values())
    # prediction {(0,0), (0,1), (0,2)}: TP 2, FP 1, FN 2
    assert m["dice"][0] == pytest.approx(4 / 7)
    assert m["jaccard"][0] == pytest.approx(2 / 5)
    assert m["precision"][0] == pytest.approx(2 / 3)
    assert m["recall"][0] == pytest.approx(1 / 2)
    # every pixel of both masks is a boundary pixel; farthest: (0,2)->(0,1)=1, (1,1)->(0,1)=1
    assert m["hausdorff"][0] == pytest.approx(1.0)


def test_threshold_is_inclusive_at_half():
    prob = np.full((1, 8, 8), 0.5)
    m = M.segmentation_metrics(prob, np.ones((1, 8, 8)))
    assert m["dice"][0] == 1.0 and m["hausdorff"][0] == 0.0


def test_hausdorff_two_points():
    a = np.zeros((5, 6))
    b = np.zeros((5, 6))
    a[0, 0] = 1
    b[3, 4] = 1
    m = M.segmentation_metrics(a[None], b[None], with_ssim=False)
    assert m["hausdorff"][0] == pytest.approx(5.0) and m["hd95"][0] == pytest.approx(5.0)
    assert "ssim" not in m


def test_hausdorff_matches_skimage_on_isolated_points():
    # isolated pixels (even coordinates only) are all boundary pixels, so the boundary HD equals
    # skimage's HD over all foreground points
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = np.zeros((32, 32))
        b = np.zeros((32, 32))
        a[::2, ::2] = rng.random((16, 16)) < 0.1
        b[::2, ::2] = rng.random((16, 16)) < 0.1
        a[0, 0] = b[2, 2] = 1
        m = M.segmentation_metrics(a[None], b[None], with_ssim=False)
        assert m["hausdorff"][0] == pytest.approx(hausdorff_distance(a > 0, b > 0))


def _brute_boundary(mask):
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i, j in itertools.product(range(h), range(w)):
        if mask[i, j]:
            nb = [(i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)]
            out[i, j] = any(not (0 <= y < h and 0 <= x < w) or not mask[y, x] for y, x in nb)
    return out


def test_hausdorff_and_hd95_match_brute_force_on_blobs():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:24, :24]
    for _ in range(4):
        cy, cx, r = rng.uniform(6, 18, 2).tolist() + [rng.uniform(3, 8)]
        ref = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        pred = ((yy - cy - rng.integers(-3, 4)) ** 2 / 1.5 + (xx - cx) ** 2 < r ** 2) | (
            (yy > 20) & (xx < 3))
        pa = np.argwhere(_brute_boundary(pred))
        ra = np.argwhere(_brute_boundary(ref))
        d = cdist(pa, ra)
        d_pr, d_rp = d.min(axis=1), d.min(axis=0)
        m = M.segmentation_metrics(pred[None].astype(float), ref[None], with_ssim=False)
        assert m["hausdorff"][0] == pytest.approx(max(d_pr.max(), d_rp.max()))
        assert m["hd95"][0] == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
        assert m["hd95"][0] <= m["hausdorff"][0]


def test_edge_case_both_empty():
    m = M.segmentation_metrics(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
    for k in ("dice", "jaccard", "precision", "recall"):
        assert m[k][0] == 1.0
    assert m["hausdorff"][0] == 0.0 and m["hd95"][0] == 0.0
    assert m["ssim"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("which", ["pred", "ref"])
def test_edge_case_exactly_one_empty(which):
    full = np.zeros((1, 8, 10))
    full[0, 2:5, 3:7] = 1
    empty = np.zeros((1, 8, 10))
    prob, ref = (empty, full) if which == "pred" else (full, empty)
    m = M.segmentation_metrics(prob, ref)
    for k in ("dice", "jaccard", "precision", "recall"):
        assert m[k][0] == 0.0, k
    diag = math.sqrt(7 ** 2 + 9 ** 2)
    assert m["hausdorff"][0] == pytest.approx(diag) and m["hd95"][0] == pytest.approx(diag)
    assert all(np.isfinite(v).all() for v in m.values())


def test_ignore_pixels_are_left_out():
    ref = np.zeros((16, 16))
    ref[4:12, 4:12] = 1
    prob = ref.copy()
    prob[0:3, 0:3] = 0.9  # false positives, but under the ignore mask
    ignore = np.zeros((16, 16))
    ignore[0:3, 0:3] = 1
    m = M.segmentation_metrics(prob[None], ref[None], ignore[None])
    for k in ("dice", "jaccard", "precision", "recall"):
        assert m[k][0] == 1.0
    assert m["hausdorff"][0] == 0.0
    # without the ignore mask they count
    m2 = M.segmentation_metrics(prob[None], ref[None])
    assert m2["dice"][0] < 1.0 and m2["hausdorff"][0] > 0.0 and m2["precision"][0] < 1.0
    # reference pixels under the ignore mask are not missed either
    ref2 = ref.copy()
    ref2[13:16, 13:16] = 1
    ignore2 = np.zeros((16, 16))
    ignore2[13:16, 13:16] = 1
    m3 = M.segmentation_metrics(ref[None], ref2[None], ignore2[None])
    assert m3["recall"][0] == 1.0 and m3["dice"][0] == 1.0


def test_ignore_everything_counts_as_both_empty():
    m = M.segmentation_metrics(np.ones((1, 8, 8)), np.ones((1, 8, 8)) * 0,
                               ignore=np.ones((1, 8, 8)))
    assert m["dice"][0] == 1.0 and m["hausdorff"][0] == 0.0 and np.isfinite(m["ssim"][0])


def test_only_reference_under_ignore_and_empty_prediction_is_both_empty():
    ref = np.zeros((1, 8, 8))
    ref[0, 0:2, 0:2] = 1
    ig = ref.copy()
    m = M.segmentation_metrics(np.zeros((1, 8, 8)), ref, ig)
    assert m["dice"][0] == 1.0 and m["hausdorff"][0] == 0.0


def test_ssim_is_probability_vs_reference_and_ignores_masked_pixels():
    rng = np.random.default_rng(5)
    ref = np.zeros((32, 32))
    ref[8:24, 6:26] = 1
    prob = np.clip(ref * 0.8 + rng.normal(0, 0.1, ref.shape), 0, 1)
    m = M.segmentation_metrics(prob[None, None], ref[None, None])
    assert m["ssim"][0] == pytest.approx(structural_similarity(prob, ref, data_range=1.0))
    assert M.segmentation_metrics(ref[None], ref[None])["ssim"][0] == pytest.approx(1.0)
    # under ignore, whatever the prediction and reference hold there does not matter
    ig = np.zeros_like(ref)
    ig[0:10, 0:10] = 1
    garbage = prob.copy()
    garbage[0:10, 0:10] = rng.random((10, 10))
    ref_g = ref.copy()
    ref_g[0:10, 0:10] = 1 - ref_g[0:10, 0:10]
    a = M.segmentation_metrics(prob[None], ref[None], ig[None])["ssim"][0]
    b = M.segmentation_metrics(garbage[None], ref_g[None], ig[None])["ssim"][0]
    c = M.segmentation_metrics(garbage[None], ref_g[None])["ssim"][0]
    assert a == pytest.approx(b) and abs(a - c) > 1e-3


def test_segmentation_shapes_and_reference_encodings():
    ref = np.zeros((3, 1, 12, 12), dtype=np.uint8)
    ref[:, :, 3:9, 3:9] = 255  # 0/255 PNG-style mask
    prob = np.zeros((3, 1, 12, 12), dtype=np.float32)
    prob[0, :, 3:9, 3:9] = 0.8
    prob[1, :, 3:9, 3:7] = 0.8
    m = M.segmentation_metrics(prob, ref)
    np.testing.assert_allclose(m["dice"], [1.0, 2 * 24 / (24 + 36), 0.0])
    m2 = M.segmentation_metrics(prob[:, 0], ref[:, 0] > 0)  # (B, H, W) + bool
    for k in M.SEG_KEYS:
        np.testing.assert_allclose(m[k], m2[k])
    with pytest.raises(ValueError, match="ref"):
        M.segmentation_metrics(prob, ref[:, :, :10])
    with pytest.raises(ValueError, match="prob"):
        M.segmentation_metrics(np.zeros((2, 3, 8, 8)), np.zeros((2, 3, 8, 8)))


def test_summarize():
    s = M.summarize({"dice": np.array([0.5, 1.0, 0.0, 0.9]), "hausdorff": [1.0, 2.0, 3.0, 10.0]})
    assert s["dice_mean"] == pytest.approx(0.6) and s["dice_median"] == pytest.approx(0.7)
    assert s["dice_std"] == pytest.approx(np.std([0.5, 1.0, 0.0, 0.9]))
    assert s["hausdorff_median"] == 2.5 and s["n"] == 4
    # bit-identical under any order of the images (exactly rounded sums)
    v = np.random.default_rng(8).random(1001) * np.geomspace(1e-8, 1e8, 1001)
    a, b = M.summarize({"x": v}), M.summarize({"x": v[::-1]})
    assert a == b and a["x_mean"] == pytest.approx(v.mean())
    e = M.summarize({"dice": np.zeros(0)})
    assert e["n"] == 0 and math.isnan(e["dice_mean"])
    with pytest.raises(ValueError, match="length"):
        M.summarize({"dice": [1.0], "jaccard": [1.0, 0.5]})


# ---------------------------------------------------------------------------------------------
# accumulators, gathering, val_score


def _seg_batch(rng, b, hw=16):
    yy, xx = np.mgrid[:hw, :hw]
    refs, probs = [], []
    for _ in range(b):
        c = rng.uniform(4, hw - 4, 2)
        r = rng.uniform(2, 6)
        ref = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r ** 2).astype(np.uint8)
        prob = np.clip(ref * 0.7 + rng.normal(0.1, 0.2, ref.shape), 0, 1)
        refs.append(ref)
        probs.append(prob)
    return np.stack(probs)[:, None], np.stack(refs)[:, None]


def test_accumulators_merge_equals_single_pass():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet([1, 1], size=23)
    labels = rng.integers(0, 2, 23)
    parts = [M.ClsAccumulator().update(probs[a:b], labels[a:b]) for a, b in [(0, 5), (5, 6), (6, 23)]]
    parts.insert(1, M.ClsAccumulator())  # an empty rank
    merged = M.ClsAccumulator.merge([p.state() for p in parts], class_names=M.KERMANY_CLASSES)
    assert len(merged) == 23
    ref = M.classification_metrics(probs, labels)
    got = merged.compute()
    for k in ref:
        np.testing.assert_equal(got[k], ref[k])
    # class names travel in the state when not given
    assert M.ClsAccumulator.merge([p.state() for p in parts]).class_names == M.KERMANY_CLASSES

    sp, sr = _seg_batch(rng, 9)
    seg = M.SegAccumulator().update(sp, sr)
    segs = [M.SegAccumulator().update(sp[:4], sr[:4]), M.SegAccumulator(),
            M.SegAccumulator().update(sp[4:], sr[4:])]
    merged = M.SegAccumulator.merge([s.state() for s in segs])
    assert merged.compute() == seg.compute() == M.summarize(M.segmentation_metrics(sp, sr))
    assert set(seg.state()) == set(M.SEG_KEYS) and len(seg) == 9
    # without SSIM (cheaper validation)
    fast = M.SegAccumulator(with_ssim=False).update(sp, sr)
    assert "ssim" not in fast.state() and "ssim_mean" not in fast.compute()
    assert M.SegAccumulator.merge([fast.state()]).compute() == fast.compute()


def test_accumulator_class_names_inferred_and_empty():
    acc = M.ClsAccumulator(class_names=None)
    empty = acc.compute()
    assert empty["n"] == 0 and math.isnan(empty["auc"]) and "f1_pneumonia" in empty
    acc.update(_probs(P7), Y7)
    assert acc.class_names == M.KERMANY_CLASSES
    assert acc.compute()["f1_pneumonia"] == pytest.approx(0.75)
    three = M.ClsAccumulator([]).update(np.full((2, 3), 1 / 3), [0, 2])
    assert three.class_names == ("class0", "class1", "class2") and "f1_class2" in three.compute()
    with pytest.raises(ValueError, match="classes"):
        M.ClsAccumulator().update(np.zeros((2, 3)), [0, 1])
    m = M.classification_metrics(_probs(P7), Y7, class_names=[])
    assert m["f1_normal"] == pytest.approx(2 / 3)


def test_all_gather_state_is_noop_without_process_group():
    state = M.ClsAccumulator().update(_probs(P7), Y7).state()
    out = M.all_gather_state(state)
    assert len(out) == 1 and out[0] is state
    acc = M.ClsAccumulator().update(_probs(P7), Y7)
    assert acc.gather().compute()["auc"] == pytest.approx(10.5 / 12)


def test_val_score():
    cls = {"auc": 0.8, "accuracy": 0.6, "n": 10}
    seg = {"dice_mean": 0.9, "n": 5}
    assert M.val_score(cls, seg) == pytest.approx(0.85)
    assert M.val_score(cls) == pytest.approx(0.8)
    assert M.val_score(None, seg) == pytest.approx(0.9)
    assert M.val_score({"auc": float("nan"), "accuracy": 0.6, "n": 3}, seg) == pytest.approx(0.75)
    assert M.val_score({"auc": float("nan"), "accuracy": float("nan"), "n": 0}, seg) == 0.9
    assert math.isnan(M.val_score())
    # flat dicts, as the training loop reports them
    flat = {"val_cls_auc": 0.8, "val_cls_accuracy": 0.6, "val_cls_n": 10,
            "val_cls_auc_defined": True, "val_seg_dice_mean": 0.9, "val_seg_n": 5}
    assert M.val_score(flat) == pytest.approx(0.85)
    flat.update(val_cls_auc=float("nan"), val_cls_auc_defined=False)
    assert M.val_score(flat) == pytest.approx(0.75)
    assert M.val_score({"val_seg_dice_mean": 0.4, "val_seg_n": 2}) == pytest.approx(0.4)
    assert M.val_score({"val_seg_dice_mean": 0.4, "val_seg_n": 0}) != M.val_score(
        {"val_seg_dice_mean": 0.4, "val_seg_n": 2})
    # the real outputs
    c = M.classification_metrics(_probs(P7), Y7)
    s = M.summarize({"dice": [0.5, 0.7]})
    assert M.val_score(c, s) == pytest.approx((10.5 / 12 + 0.6) / 2)


def test_metrics_imports_no_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import multimix.metrics\n"
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules "
            "if sys.modules[m] is not None)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------
# operating point, balanced accuracy, balanced resample

DRIFT_P1 = np.array([0.55, 0.6, 0.62, 0.7, 0.8, 0.9, 0.95])  # every image "pneumonia" by argmax
DRIFT_Y = np.array([0, 0, 0, 1, 1, 1, 1])


def _two(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], axis=1)


def test_balanced_accuracy_recall_and_threshold_decision():
    probs, y = _two([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    m = M.classification_metrics(probs, y)  # argmax: predictions 0 0 0 1
    assert (m["recall_normal"], m["recall_pneumonia"]) == (1.0, 0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    t = M.classification_metrics(probs, y, threshold=0.3)  # predictions 0 1 1 1
    assert (t["recall_normal"], t["recall_pneumonia"]) == (0.5, 1.0)
    assert t["accuracy"] == pytest.approx(0.75) and t["balanced_accuracy"] == pytest.approx(0.75)
    assert t["confusion"].tolist() == [[1, 1], [0, 2]]
    # a class absent from the labels: its recall is undefined, BA averages the others
    one = M.classification_metrics(_two([0.9, 0.2]), np.array([1, 1]))
    assert math.isnan(one["recall_normal"]) and one["balanced_accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two classes"):
        M.classification_metrics(np.full((2, 3), 1 / 3), np.array([0, 1]), None, threshold=0.5)


def test_choose_threshold_by_hand():
    # ROC points (score >= cut): 0.8 → J=.5; 0.4 → 0; 0.35 → .5; 0.1 → 0. Two maxima: cuts
    # (0.8+0.4)/2 = 0.6 and (0.35+0.1)/2 = 0.225; the one nearer 0.5 wins
    s, y = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert M.choose_threshold(s, y) == (pytest.approx(0.6), pytest.approx(0.75))
    assert M.choose_threshold(s, y, "youden") == (pytest.approx(0.6), pytest.approx(0.5))
    # majority drift: argmax calls all pneumonia (BA 0.5); the ranking is perfect
    cut, ba = M.choose_threshold(DRIFT_P1, DRIFT_Y)
    assert cut == pytest.approx(0.66) and ba == 1.0
    assert M.classification_metrics(_two(DRIFT_P1), DRIFT_Y, threshold=cut)["accuracy"] == 1.0
    # ends: all-positive best → below the lowest score; one class only → (0.5, nan)
    assert M.choose_threshold(np.array([0.3, 0.2]), np.array([1, 1]))[0] == 0.5
    assert math.isnan(M.choose_threshold(np.array([0.3, 0.2]), np.array([1, 1]))[1])
    cut, _ = M.choose_threshold(np.array([0.2, 0.3, 0.1]), np.array([1, 1, 0]))
    assert cut == pytest.approx(0.15)


def test_balanced_resample_is_deterministic_and_balanced():
    y = np.array([1, 0, 1, 1, 1, 0, 1, 1, 0, 1])
    a, b = M.balanced_resample(y, seed=3), M.balanced_resample(y, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert np.bincount(y[a]).tolist() == [3, 3]
    assert set(np.nonzero(y == 0)[0]) <= set(a)  # the minority class is kept whole
    assert any(not np.array_equal(M.balanced_resample(y, s), a) for s in range(4, 12))
    assert M.balanced_resample(np.zeros(0, dtype=int)).size == 0


def test_validation_cls_metrics_sees_the_collapse():
    v = M.validation_cls_metrics(_two(DRIFT_P1), DRIFT_Y)
    assert v["pred_classes"] == 1 and v["accuracy"] == pytest.approx(4 / 7)
    assert v["balanced_accuracy"] == 0.5 and v["res_balanced_accuracy"] == 0.5
    assert v["res_n"] == 6 and v["auc"] == 1.0
    assert v["threshold"] == pytest.approx(0.66) and v["thr_balanced_accuracy"] == 1.0
    assert v["thr_res_accuracy"] == 1.0
    assert v["decision_balanced_accuracy"] == 0.5  # argmax is the decision in force
    d = M.validation_cls_metrics(_two(DRIFT_P1), DRIFT_Y, decision="youden")
    assert d["decision_balanced_accuracy"] == 1.0
    assert all(isinstance(x, float) for x in v.values())


def test_val_score_balanced():
    flat = {"val_cls_decision_balanced_accuracy": 0.5, "val_cls_balanced_accuracy": 0.9,
            "val_cls_n": 7, "val_seg_dice_mean": 0.9, "val_seg_n": 3}
    assert M.val_score_balanced(flat) == pytest.approx(0.7)
    assert M.val_score_balanced({"val_cls_balanced_accuracy": 0.8, "val_cls_n": 5}) == 0.8
    assert M.val_score_balanced({"val_seg_dice_mean": 0.4, "val_seg_n": 2}) == 0.4
    assert math.isnan(M.val_score_balanced({}))

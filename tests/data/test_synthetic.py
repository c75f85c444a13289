"""multimix.data.synthetic: deterministic phantoms with a real, learnable signal."""

from __future__ import annotations

import numpy as np

from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data import synthetic
from multimix.data.images import decode_mask_png, decode_png


def test_shapes_ids_labels_and_binary_masks():
    cls, seg = synthetic.make_demo(10, 4, 48, seed=0)
    assert [r["id"] for r in cls] == sorted(r["id"] for r in cls)
    assert sum(r["label"] for r in cls) == 5
    for r in cls:
        assert r["id"].split("/")[0] == synthetic.CLASSES[r["label"]]
        assert r["image"].shape == (48, 48) and r["image"].dtype == np.uint8
        assert r["image"].std() > 10  # not blank
    for r in seg:
        assert r["mask"].dtype == np.uint8 and set(np.unique(r["mask"])) == {0, 1}
        assert 0.08 < r["mask"].mean() < 0.45  # two lungs, a plausible share of the image
    assert synthetic.CLASSES == ("NORMAL", "PNEUMONIA")  # Kermany's order


def test_deterministic_and_independent_of_count():
    a_cls, a_seg = synthetic.make_demo(6, 3, 32, seed=5)
    b_cls, b_seg = synthetic.make_demo(6, 3, 32, seed=5)
    c_cls, _ = synthetic.make_demo(12, 0, 32, seed=5)
    d_cls, _ = synthetic.make_demo(6, 0, 32, seed=6)
    for x, y in zip(a_cls + a_seg, b_cls + b_seg):
        np.testing.assert_array_equal(x["image"], y["image"])
    c = {r["id"]: r["image"] for r in c_cls}
    for r in a_cls:
        np.testing.assert_array_equal(r["image"], c[r["id"]])
    assert any(not np.array_equal(x["image"], y["image"]) for x, y in zip(a_cls, d_cls))


def test_opacity_is_a_learnable_signal():
    """A one-feature threshold (grey-level spread inside the lungs), fitted on half of the
    phantoms, separates NORMAL from PNEUMONIA on the other half well above chance."""
    feats, labels = [], []
    for i in range(160):
        label = i % 2
        img, lungs = synthetic.phantom(64, np.random.default_rng([1, 1, i]), opacity=bool(label))
        feats.append(img[lungs.astype(bool)].std())
        labels.append(label)
    f, y = np.array(feats), np.array(labels)
    train, test = slice(0, 80), slice(80, 160)
    best = max(np.unique(f[train]), key=lambda t: ((f[train] > t) == y[train]).mean())
    acc = ((f[test] > best) == y[test]).mean()
    assert acc >= 0.85, acc


def test_prepare_demo_stores_what_was_generated(tmp_path):
    ms = prep.prepare_demo(str(tmp_path), n_cls=8, n_seg=6, image_size=32, seed=3)
    assert set(ms) == {"cls", "seg"}
    assert ms["cls"]["classes"] == ["NORMAL", "PNEUMONIA"] and ms["seg"]["task"] == "seg"
    assert ms["cls"]["synthetic"] is True and ms["seg"]["source"] == "synthetic-demo"
    _, seg = synthetic.make_demo(0, 6, 32, seed=3)
    rows = dataset.read_table(str(tmp_path / "seg")).to_pylist()
    seg = sorted(seg, key=lambda r: prep.row_order_key(r["id"]))  # prepare's stored order
    assert [r["id"] for r in rows] == [r["id"] for r in seg]
    for row, rec in zip(rows, seg):
        np.testing.assert_array_equal(decode_png(row["image"]), rec["image"])
        np.testing.assert_array_equal(decode_mask_png(row["mask"]), rec["mask"])

"""Fast augmentation vs the sequential Pillow (paper) pipeline: exactness, reproducibility."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from multimix.data import augment as A


def _images(n=8, size=64, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        base = 40 + 120 * np.exp(-((x - rng.uniform(10, 54)) ** 2 + (y - 32) ** 2) / 300.0)
        out.append(np.clip(base + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8))
    return np.stack(out)


def test_no_ray_import():
    import sys

    src = open(A.__file__).read()
    assert "import ray" not in src and "from ray" not in src
    assert sys.modules.get("multimix.data.augment") is A


@pytest.mark.parametrize("a", A.OPS)
def test_every_op_pair_matches_paper(a):
    """For fixed params, the fast result equals the sequential Pillow result exactly whenever at
    most one geometric op is in the chain; two composed warps differ only by NN rounding."""
    imgs = _images(len(A.OPS), 64)
    aug = A.Augmenter(64)
    for j, b in enumerate(A.OPS):
        for v, neg in ((3, False), (9, True)):
            ops = tuple((n, A.op_value(n, v, neg, 64)) for n in (a, b))
            prm = A.ViewParams(bool(j % 2), j % (2 * aug.pad + 1), (3 * j) % (2 * aug.pad + 1), ops)
            ref = A.paper_apply(imgs[j], prm, aug.pad)
            out = aug.apply(imgs[j:j + 1], [prm])[0]
            assert out.dtype == np.uint8 and out.shape == (64, 64)
            if sum(n in A.GEOMETRIC_OPS for n in (a, b)) < 2:
                assert np.array_equal(out, ref), ops
            else:
                diff = np.abs(out.astype(int) - ref.astype(int))
                assert diff.mean() < 12, (ops, diff.mean())


def test_lut_chain_exact_for_three_point_ops():
    img = _images(1)[0]
    ops = (("equalize", None), ("contrast", 0.3), ("autocontrast", None), ("solarize", 100),
           ("posterize", 5), ("brightness", 0.7))
    prm = A.ViewParams(False, 8, 8, ops)
    assert np.array_equal(A.Augmenter(64).apply(img[None], [prm])[0], A.paper_apply(img, prm, 8))


def test_smooth_equals_pillow():
    for img in _images(3, 64, seed=3):
        ref = np.asarray(Image.fromarray(img).filter(ImageFilter.SMOOTH))
        assert np.array_equal(A._smooth(img), ref)


def test_reflect_pad_and_cutout():
    imgs = _images(2, 64)
    assert np.array_equal(A.reflect_pad(imgs, 8), np.pad(imgs, ((0, 0), (8, 8), (8, 8)), "reflect"))
    small = imgs[:, :16, :16].copy()
    for p in (0, 1, 14, 15, 16, 20):  # up to and beyond side - 1, with and without out=
        want = np.pad(small, ((0, 0), (p, p), (p, p)), "reflect")
        assert np.array_equal(A.reflect_pad(small, p), want)
        out = np.empty_like(want)
        assert A.reflect_pad(small, p, out=out) is out and np.array_equal(out, want)
    prm = A.ViewParams(True, 3, 11, (), A._cutout_box(10.0, 50.0, 64))
    assert np.array_equal(A.Augmenter(64, cutout=True).apply(imgs[:1], [prm])[0],
                          A.paper_apply(imgs[0], prm, 8))


def test_per_sample_reproducible_and_batch_independent():
    imgs = _images(8)
    aug = A.Augmenter(64)
    keys = A.row_keys([f"r{i}" for i in range(8)], seed=1, epoch=2, stream="unl")
    w1, s1 = aug.pair(imgs, keys)
    w2, s2 = aug.pair(imgs[::-1].copy(), keys[::-1].copy())  # other batch order
    assert np.array_equal(w1, w2[::-1]) and np.array_equal(s1, s2[::-1])
    w3, s3 = aug.pair(imgs[3:4], keys[3:4])  # alone in its batch
    assert np.array_equal(w3[0], w1[3]) and np.array_equal(s3[0], s1[3])
    other = A.row_keys([f"r{i}" for i in range(8)], seed=1, epoch=3, stream="unl")
    assert not np.array_equal(aug.pair(imgs, other)[1], s1)  # next epoch: new views


def test_distribution_matches_paper_sampler():
    """Op frequencies and magnitudes of the vectorised sampler match FixMatch's draw."""
    aug = A.Augmenter(64)
    keys = A.row_keys(range(4000), seed=0)
    ours = [n for p in aug.strong_params(keys) for n, _ in p.ops]
    rng = random.Random(0)
    ref = [n for _ in range(4000) for n, _ in A.paper_sample(64, 8, rng, True).ops]
    assert abs(len(ours) - len(ref)) < 0.06 * len(ref)  # ~1 applied op per view
    for name in A.OPS:
        f1, f2 = ours.count(name) / len(ours), ref.count(name) / len(ref)
        assert abs(f1 - f2) < 0.025, name
    weak = aug.sample(keys, strong=False)
    assert 0.45 < np.mean([p.flip for p in weak]) < 0.55
    assert {p.dy for p in weak} == set(range(17))


def test_views_keep_range_dtype_shape():
    imgs = _images(16, 96)
    aug = A.Augmenter(96, cutout=True)
    w, s = aug.pair(imgs, A.row_keys(range(16), 0))
    for v in (w, s):
        assert v.dtype == np.uint8 and v.shape == imgs.shape
    # the weak view is a flipped crop: its pixels come from the image
    assert set(np.unique(w[0])) <= set(np.unique(imgs[0]))


def test_geometric_keeps_masks_binary_and_aligned():
    imgs = _images(4)
    masks = (imgs > 100).astype(np.uint8)
    ign = np.zeros_like(masks)
    ign[:, :5] = 1
    aug = A.Augmenter(64)
    i2, m2, g2 = aug.geometric(A.row_keys(range(4), 0), imgs, masks, ign)
    assert set(np.unique(m2)) <= {0, 1} and set(np.unique(g2)) <= {0, 1}
    assert np.array_equal(m2, (i2 > 100).astype(np.uint8))  # same transform on image and mask

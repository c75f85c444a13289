"""Distributed (2 gloo processes) metrics equal single-process metrics on the same data.

Each rank scores its share of the data (even halves, uneven shares, and one rank with nothing),
gathers the accumulator states with ``all_gather_state`` and computes; the result must be
*identical* (not just close) to one process scoring everything, on every rank.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from multimix import metrics as M

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

N_CLS = 21
N_SEG = 7
# (rank-0 share, rank-1 share): contiguous shares, rank 0 first; "strided" = rank r takes items
# r, r + 2, ... (the training loop's sharding), so the gathered order differs from the original
SPLITS_CLS = [(10, 11), (16, 5), (N_CLS, 0), "strided"]
SPLITS_SEG = [(4, 3), (6, 1), (0, N_SEG), "strided"]


def _data():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet([1.0, 1.0], size=N_CLS)
    probs[3] = probs[4]  # a tie across the split boundary region
    labels = rng.integers(0, 2, N_CLS)
    hw = 24
    yy, xx = np.mgrid[:hw, :hw]
    refs, sprobs, ignore = [], [], []
    for i in range(N_SEG):
        c = rng.uniform(6, hw - 6, 2)
        r = rng.uniform(3, 7)
        ref = ((yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r ** 2).astype(np.uint8)
        if i == 2:
            ref[:] = 0  # an empty reference
        sprobs.append(np.clip(ref * 0.7 + rng.normal(0.1, 0.25, ref.shape), 0, 1))
        refs.append(ref)
        ig = np.zeros_like(ref)
        if i % 3 == 0:
            ig[:5, :5] = 1
        ignore.append(ig)
    return (probs, labels,
            np.stack(sprobs)[:, None], np.stack(refs)[:, None], np.stack(ignore)[:, None])


def _share(split, rank, n_total):
    """Indices of ``rank``: the first ``split[0]`` items for rank 0, the next ``split[1]`` for
    rank 1; or every other item when ``split == "strided"``."""
    if split == "strided":
        return np.arange(rank, n_total, 2)
    start = sum(split[:rank])
    return np.arange(start, start + split[rank])


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        probs, labels, sprobs, refs, ignore = _data()
        results = []
        for sc, ss in zip(SPLITS_CLS, SPLITS_SEG):
            cls = M.ClsAccumulator(M.KERMANY_CLASSES)
            idx = _share(sc, rank, N_CLS)
            # feed the share in batches of 4, as an evaluation loop would
            for i in range(0, len(idx), 4):
                j = idx[i:i + 4]
                cls.update(probs[j], labels[j])
            seg = M.SegAccumulator()
            idx = _share(ss, rank, N_SEG)
            for i in range(0, len(idx), 3):
                j = idx[i:i + 3]
                seg.update(sprobs[j], refs[j], ignore[j])
            c_m = cls.gather().compute()
            # the spelled-out form the training loop uses
            s_m = M.SegAccumulator.merge(M.all_gather_state(seg.state())).compute()
            results.append((c_m, s_m, M.val_score(c_m, s_m)))
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as f:
            pickle.dump(results, f)
    finally:
        dist.destroy_process_group()
    # success: skip the interpreter teardown (about a second per torch process on a busy
    # 2-core machine); failures raise above and reach mp.spawn with their traceback
    os._exit(0)


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_equal(a[k], b[k], err_msg=k)  # exact; NaN == NaN


@pytest.mark.slow
def test_gathered_metrics_equal_single_process(tmp_path):
    import torch.multiprocessing as mp

    assert all(s == "strided" or sum(s) == N_CLS for s in SPLITS_CLS)
    assert all(s == "strided" or sum(s) == N_SEG for s in SPLITS_SEG)

    mp.spawn(_worker, args=(2, str(tmp_path / "pg-init"), str(tmp_path)), nprocs=2, join=True)

    probs, labels, sprobs, refs, ignore = _data()
    want_c = M.classification_metrics(probs, labels, M.KERMANY_CLASSES)
    want_s = M.summarize(M.segmentation_metrics(sprobs, refs, ignore))
    want_v = M.val_score(want_c, want_s)
    assert want_s["n"] == N_SEG and want_c["n"] == N_CLS
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as f:
            results = pickle.load(f)
        assert len(results) == len(SPLITS_CLS)
        for c_m, s_m, v in results:
            _assert_same(c_m, want_c)
            _assert_same(s_m, want_s)
            assert v == want_v

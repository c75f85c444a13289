"""The contamination guard (multimix.data.overlap): exact and near duplicates between
prepared datasets, multi-index hashing against brute force, `multimix overlap`. Ray-free."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multimix.data import overlap as ov
from multimix.data import dataset
from multimix.data import prepare as prep
from multimix.data.images import load_grey, resize_image
from multimix.errors import UserError
from multimix.testing import write_dataset



def run_cli(module, argv: list[str]) -> int:
    """One subcommand the way ``multimix.cli.main`` runs it (UserError → 2, message printed)."""
    import argparse

    p = argparse.ArgumentParser(prog="multimix overlap")
    module.add_arguments(p)
    try:
        return int(module.run(p.parse_args(argv)) or 0)
    except UserError as exc:
        print(f"error: {exc}")
        return 2


def _flip(h: np.ndarray, bits, rng) -> np.ndarray:
    """Copies of 256-bit hashes ``uint64 (n, 4)`` with ``bits[i]`` distinct random bits flipped."""
    out = h.copy()
    u8 = out.view(np.uint8)
    for r, k in enumerate(bits):
        for b in rng.choice(256, int(k), replace=False):
            u8[r, b // 8] ^= np.uint8(1 << (b % 8))
    return out


@pytest.mark.parametrize("threshold", [0, 9, 31, 40])
def test_near_pairs_equals_brute_force(threshold):
    rng = np.random.default_rng(threshold)
    a = rng.integers(0, 2 ** 63, (300, 4), dtype=np.int64).view(np.uint64)
    # copies of a's rows at distances 0..60 bits (both sides of every threshold), plus strangers
    near = _flip(a[:120], np.arange(120) % 61, rng)
    b = np.concatenate([near, rng.integers(0, 2 ** 63, (200, 4), dtype=np.int64).view(np.uint64)])
    full = ov.hamming(a[:, None], b[None])
    want = sorted(zip(*np.nonzero(full <= threshold)))
    for x, y in ((a, b), (b, a)):  # the smaller side is looked up in the larger: both orders
        i, j, d = ov.near_pairs(x, y, threshold)
        got = sorted(zip(i.tolist(), j.tolist()))
        assert got == (want if x is a else sorted((q, p) for p, q in want))
        assert (d == ov.hamming(x[i], y[j])).all() and len(got) >= 1
    # within one set: each unordered pair once
    both = np.concatenate([a, near])
    i, j, _ = ov.near_pairs(both, both, threshold, same=True)
    fullw = ov.hamming(both[:, None], both[None])
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(
        (p, q) for p, q in zip(*np.nonzero(fullw <= threshold)) if p < q)
    with pytest.raises(UserError, match="--threshold must be an integer from 0 to 63"):
        ov.near_pairs(a, b, 64)


def test_find_contamination_prefers_exact_then_nearest():
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2 ** 63, (4, 4), dtype=np.int64).view(np.uint64)
    raw = [bytes(x.tobytes()) for x in h]
    val = ov.HashTable.from_rows("val", ["v0", "v1", "v2"], ["s0", "s1", "s2"], raw[:3])
    lab = ov.HashTable.from_rows("lab", ["l0"], ["s9"], [_flip(h[1:2], [3], rng)[0].tobytes()])
    pool = ov.HashTable.from_rows(
        "pool", ["u_exact", "u_near", "u_far", "u_nophash", "u_exact_nophash"],
        ["s0", "x1", "x2", "x3", "s2"],
        [raw[0], _flip(h[1:2], [10], rng)[0].tobytes(), raw[3], None, None])
    got = ov.find_contamination([val, lab], pool)
    assert set(got) == {"u_exact", "u_near", "u_exact_nophash"}
    assert got["u_exact"] == ov.Match("u_exact", "exact", "val", "v0", 0)
    # v1 is 10 bits away, l0 (v1 with 3 bits flipped) 7..13: the nearest one is named
    m = got["u_near"]
    assert m.kind == "near" and m.distance == min(
        int(ov.hamming(pool.phash[1], t.phash[k])) for t, k in ((val, 1), (lab, 0)))
    assert got["u_exact_nophash"].kind == "exact"
    assert set(ov.find_contamination([val, lab], pool, threshold=None)) == {"u_exact",
                                                                           "u_exact_nophash"}


def _tree(root: Path, files: dict[str, Path | np.ndarray]) -> Path:
    for rel, src in files.items():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, Path):
            shutil.copy(src, dst)
        else:
            Image.fromarray(src).save(dst, quality=60) if rel.endswith(".jpg") else \
                Image.fromarray(src).save(dst)
    return root


@pytest.mark.realdata
def test_planted_copies_of_validation_images_are_found_and_nothing_else(shared_data, tmp_path,
                                                                        capsys):
    ker = sorted((shared_data / "kermany-cxr" / "train" / "PNEUMONIA").glob("*.jpeg"))
    v7 = sorted((shared_data / "v7-covid-lungs" / "images").glob("*.png"))
    val_files = ker[:12]
    unl: dict[str, Path | np.ndarray] = {f"k/{p.name}": p for p in ker[100:140]}
    unl.update({f"v7/{p.name}": p for p in v7[:10]})
    unl["copy/exact0.jpeg"] = val_files[0]  # byte-identical
    unl["copy/exact1.jpeg"] = val_files[1]
    g2, g3, g4 = (load_grey(p) for p in val_files[2:5])
    unl["copy/small2.jpg"] = resize_image(g2, 120)  # resized, re-encoded as JPEG q60
    unl["copy/big3.png"] = resize_image(g3, 300)  # enlarged, PNG
    unl["copy/gamma4.png"] = (255 * (g4 / 255.0) ** 0.8).astype(np.uint8)  # re-contrasted
    val = prep.prepare(str(_tree(tmp_path / "val", {p.name: p for p in val_files})),
                       str(tmp_path / "val_ds"), layout="images", image_size=16, workers=1,
                       progress=False)
    pool = prep.prepare(str(_tree(tmp_path / "unl", unl)), str(tmp_path / "unl_ds"),
                        layout="images", image_size=16, workers=1, progress=False)
    assert val["num_rows"] == 12 and pool["num_rows"] == len(unl)
    excluded = ov.find_contamination([ov.load_hashes(str(tmp_path / "val_ds"))],
                                     ov.load_hashes(str(tmp_path / "unl_ds")))
    assert {k: (m.kind, m.other_id) for k, m in excluded.items()} == {
        "copy/exact0": ("exact", val_files[0].stem), "copy/exact1": ("exact", val_files[1].stem),
        "copy/small2": ("near", val_files[2].stem), "copy/big3": ("near", val_files[3].stem),
        "copy/gamma4": ("near", val_files[4].stem)}
    assert all(m.distance <= ov.NEAR_THRESHOLD for m in excluded.values())
    # ids= restricts the protected rows (e.g. a split's validation ids)
    only = ov.load_hashes(str(tmp_path / "val_ds"), ids=[val_files[0].stem])
    assert set(ov.find_contamination([only], ov.load_hashes(str(tmp_path / "unl_ds")))) == {
        "copy/exact0"}
    # the CLI reports the same overlap
    assert run_cli(ov, [str(tmp_path / "val_ds"), str(tmp_path / "unl_ds"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["exact"]["pairs"] == 2 and rep["near"]["pairs"] == 3
    assert rep["rows_a"] == 12 and rep["rows_b"] == len(unl)
    assert run_cli(ov, [str(tmp_path / "val_ds"), str(tmp_path / "unl_ds")]) == 0
    text = capsys.readouterr().out
    assert "exact (same sha256): 2 pair(s)" in text and "near (phash within 31 bits): 3" in text


@pytest.mark.realdata
def test_no_near_pair_among_distinct_kermany_images(kermany_prepared):
    """All 5,216 Kermany images with themselves: only the byte-identical groups match."""
    k = ov.load_hashes(str(kermany_prepared))
    rep = ov.overlap_report(k, None)
    groups = dataset.read_manifest(str(kermany_prepared))["duplicate_groups"]
    assert rep["exact"]["pairs"] == sum(len(g) * (len(g) - 1) // 2 for g in groups) > 0
    assert rep["near"]["pairs"] == 0


def test_datasets_without_phash_get_exact_matching_only(tmp_path, capsys):
    rows = [{"id": f"r{i}", "image": np.full((8, 8), i, np.uint8), "label": 0} for i in range(4)]
    write_dataset(str(tmp_path / "old"), rows, "cls", 8)  # no phash column (an older dataset)
    t = ov.load_hashes(str(tmp_path / "old"))
    assert t.phash is None and not t.has_phash.any() and list(t.sha) == ["r0", "r1", "r2", "r3"]
    assert run_cli(ov, [str(tmp_path / "old"), str(tmp_path / "old")]) == 0
    out = capsys.readouterr().out
    assert "exact (same sha256): 4 pair(s)" in out and "near: not available" in out
    assert run_cli(ov, [str(tmp_path / "old"), "--threshold", "99"]) == 2
    assert "--threshold must be an integer from 0 to 63" in capsys.readouterr().out

"""Extra unlabeled pools on real data: Kermany as the labeled classification set,
V7 (a segmentation set) and the GB images (prepared with ``--layout images``) as extra
unlabeled pools; one short run on the local Ray writes ``contamination.json``, and the stream
yields rows of every pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multimix.config import load_config

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def gb_images(shared_data, tmp_path_factory) -> Path:
    """The 38 GB radiographs as an unlabeled pool (``--layout images``, 64 px)."""
    from multimix.data.prepare import prepare

    src = shared_data / "gb-covid-lungs" / "images"
    if not src.is_dir():
        pytest.skip(f"{src} is missing (see ../shared/data/README.md)")
    out = tmp_path_factory.mktemp("gb64") / "ds"
    man = prepare(str(src), str(out), layout="images", image_size=64, workers=1, progress=False)
    assert man["task"] == "unlabeled" and man["num_rows"] == 38
    return out


def test_run_with_extra_pools_streams_every_pool_and_reports_the_guard(
        ray_local, kermany_prepared, v7_prepared, gb_images, tmp_path):
    from multimix.data import pipeline as P
    from multimix.preflight import check_inputs
    from multimix.train import CONTAMINATION, train

    cfg = load_config("cpu-small", [
        f"data.cls_data={kermany_prepared}", "model.variant=enc-ssl", "data.cls_labeled=100",
        "data.val_fraction=0.02", f"data.unlabeled_data=[{v7_prepared}, {gb_images}]",
        "data.unlabeled_weights=[1, 1, 1]", "data.cls_batch=4", "data.unlabeled_batch=4",
        "optim.epochs=1", "optim.steps_per_epoch=2", "scaling.data_concurrency=1",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=extra"])
    result = train(cfg)
    assert result.epochs == 1 and result.history[0]["epoch"] == 0
    report = json.loads((Path(result.run_dir) / CONTAMINATION).read_text())
    pools = {p["name"]: p for p in report["pools"]}
    assert report["enabled"] and set(pools) == {str(kermany_prepared), str(v7_prepared),
                                                str(gb_images)}
    assert pools[str(v7_prepared)]["rows"] == 418 and pools[str(gb_images)]["rows"] == 38
    checked = check_inputs(cfg, storage=False)
    split = checked.splits["cls"]
    assert pools[str(kermany_prepared)]["rows"] == len(split.unlabeled)
    assert report["protected"][0]["rows"] == len(split.labeled) + len(split.val)
    # the same streams, with ids and sources: every pool shows up, nothing the guard removed
    excluded, _ = P.contamination_guard(cfg, checked.splits)
    ds = P.build_datasets(cfg, checked.splits, excluded=excluded, debug=True)["unl_cls"]
    seen: dict = {0: set(), 1: set(), 2: set()}
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for rid, src in zip(block["id"], block["source"]):
            seen[int(src)].add(str(rid))
        if all(seen.values()):
            break
    assert all(seen.values()), {k: len(v) for k, v in seen.items()}
    assert seen[0] <= set(split.unlabeled) - excluded.get(str(kermany_prepared), set())
    assert all(not i.startswith(("NORMAL/", "PNEUMONIA/")) for i in seen[1] | seen[2])
    assert block["weak_img"].shape[1:] == (64, 64) and block["strong_img"].dtype.name == "uint8"

"""Inside Ray: undecodable unlabeled rows are counted per epoch into
history.json, and a failure inside the Train workers comes out as one line with the full
traceback in ``<run dir>/error.log`` (damaged copies of a tiny real dataset, 32 px)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multimix.cli import main
from multimix.config import load_config
from multimix.data import splits as splits_mod
from multimix.testing import kermany_rows, write_dataset

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

SIZE = 32
BAD = b"\x89PNG\r\n\x1a\n not an image"


@pytest.fixture(scope="module")
def sets(shared_data, tmp_path_factory) -> dict:
    """40 Kermany images: ``few_bad`` has 3 undecodable unlabeled rows, ``all_bad`` has
    every unlabeled row undecodable (the labeled and validation rows are intact in both)."""
    root = tmp_path_factory.mktemp("faults_ray")
    rows = kermany_rows(shared_data, 40, SIZE)
    write_dataset(str(root / "clean"), rows, "cls", SIZE, shards=2, row_group_rows=8)
    split = splits_mod.ensure_split(str(root / "clean"), 10, 0.2, 0, write=False)
    unl = sorted(split.unlabeled)
    for name, bad_ids in (("few_bad", set(unl[:3])), ("all_bad", set(unl))):
        write_dataset(str(root / name), [{**r, "image_bytes": BAD} if r["id"] in bad_ids
                                         else r for r in rows], "cls", SIZE, shards=2,
                      row_group_rows=8)
    return {"root": root, "unlabeled": len(unl)}


def _sets(data: Path, runs: Path, name: str) -> list[str]:
    return [f"data.cls_data={data}", "model.variant=enc-ssl", f"data.image_size={SIZE}",
            "data.cls_labeled=10", "data.val_fraction=0.2", "data.cls_batch=4",
            "data.unlabeled_batch=4", "optim.epochs=2", "optim.steps_per_epoch=2",
            "objective.decision=argmax", f"run.storage_path={runs}", f"run.name={name}",
            "scaling.num_workers=1", "scaling.cpus_per_worker=0.5",
            "scaling.data_cpus_per_task=0.5", "scaling.data_concurrency=1"]


def test_skipped_unlabeled_rows_counted_per_epoch(ray_local, sets, tmp_path):
    from multimix.train import train

    cfg = load_config("cpu-small", _sets(sets["root"] / "few_bad", tmp_path, "few"))
    result = train(cfg)
    history = json.loads((Path(result.run_dir) / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        assert h["skipped_cls_labeled"] == 0 and h["skipped_cls_val"] == 0
        assert h["skipped_rows"] == h["skipped_unl_cls"] >= 0
    # each pass over the unlabeled pool drops the same 3 rows (2 epochs: at most 2 passes)
    total = sum(h["skipped_unl_cls"] for h in history)
    assert total in (3, 6), history


def test_worker_failure_is_one_line_and_a_log(ray_local, sets, tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["train", "-c", "cpu-small"]
    for s in _sets(sets["root"] / "all_bad", runs, "broken"):
        argv += ["--set", s]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    log = runs / "broken" / "error.log"
    assert rc == 2, err[-5:]
    assert err[-1] == ("multimix train: error: training failed: stream unl_cls: this worker's "
                       "shard is empty (pool smaller than the number of workers?) (full "
                       f"traceback: {log})")
    assert not any(line.startswith("Traceback") for line in err)
    text = log.read_text()
    assert text.startswith("multimix training failed: stream unl_cls: ")
    assert "WorkerGroupError" in text and "DataError" in text and "--- worker rank 0 ---" in text

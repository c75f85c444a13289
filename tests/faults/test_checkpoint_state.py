"""Checkpoint integrity covers every tensor in the file: model, EMA student, optimizer, labeler
state; a flip in any of them is one line naming the file and the part, also for a rerun that
would resume from it (refused before Ray starts); older checkpoints (a hash over the weights
only, or none) still load. Ray-free."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from multimix import checkpoint
from multimix.cli import main
from multimix.config import load_config
from multimix.ema import ModelEMA
from multimix.errors import DataError
from multimix.objective import make_labeler


def _state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 48)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 8)
    ema = ModelEMA(model, 0.9)
    ema.update(model)
    opt.step()  # the student moves on from the teacher
    cfg = load_config("cpu-small", ["objective.pl_threshold=flexmatch"])
    labeler = make_labeler(cfg.objective, 2)
    labeler.tau = torch.tensor([0.6125, 0.8375], dtype=torch.float64)
    return checkpoint.build_state(model=model, optimizer=opt, scheduler=sched, epoch=1,
                                  config=cfg, splits={}, classes=["NORMAL", "PNEUMONIA"],
                                  history=[{"epoch": 0, "val_score": 0.5}], ema=ema,
                                  labeler=labeler, threshold=0.4)


def _flip(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit of ``tensor``'s bytes where torch.save stored them (its zip entry)."""
    raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    data = bytearray(path.read_bytes())

    def start(info) -> int:  # stored, not compressed: the entry's bytes follow its header
        n, extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        return info.header_offset + 30 + n + extra

    with zipfile.ZipFile(path) as z:
        hits = [start(i) for i in z.infolist()
                if data[start(i):start(i) + i.file_size] == raw]
    assert len(hits) == 1, "the tensor's bytes are not one entry of the file"
    data[hits[0] + len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    state = _state()
    path = tmp_path / "runs" / "r" / "checkpoint_epoch-0001" / checkpoint.FILENAME
    checkpoint.save(state, str(path))
    (tmp_path / "runs" / "r" / "last.json").write_text(json.dumps(
        {"checkpoint": "checkpoint_epoch-0001", "epoch": 1}))
    return path, state


def test_every_part_is_recorded_and_a_clean_checkpoint_loads(saved):
    path, state = saved
    loaded = checkpoint.load(str(path))
    assert set(loaded["state_sha256"]) == set(state)  # every top-level part, optimizer included
    assert loaded["state_sha256"] == checkpoint.state_digests(state)
    assert checkpoint.damaged_parts(loaded) == []


@pytest.mark.parametrize("part,pick", [
    ("optimizer", lambda s: next(iter(s["optimizer"]["state"].values()))["exp_avg"]),
    ("weights", lambda s: s["student"]["0.weight"]),
    ("labeler", lambda s: s["labeler"]["tau"]),
])
def test_flipped_bytes_in_any_part_are_a_checksum_mismatch_naming_it(saved, part, pick):
    path, state = saved
    _flip(path, pick(state))
    with pytest.raises(DataError) as e:
        checkpoint.load(str(path))
    assert str(e.value) == f"{path}: checksum mismatch ({part} corrupted)"


def test_a_rerun_from_a_damaged_checkpoint_stops_in_one_line_before_ray(saved, tmp_path,
                                                                         capsys):
    path, state = saved
    _flip(path, next(iter(state["optimizer"]["state"].values()))["exp_avg_sq"])
    code = main(["train", "--config", "cpu-small", "--set",
                 f"run.storage_path={tmp_path / 'runs'}", "--set", "run.name=r",
                 "--set", f"data.cls_data={tmp_path / 'none'}",
                 "--set", f"data.seg_data={tmp_path / 'none'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1, "\n".join(err)
    assert err[0] == (f"multimix train: error: {path}: checksum mismatch (optimizer "
                      "corrupted)")


def test_older_checkpoints_load(tmp_path):
    state = _state()
    old = tmp_path / "old.pt"  # the weights' hash only: damage elsewhere goes unnoticed, as before
    torch.save({**state, "weights_sha256": checkpoint.weights_digest(state)}, old)
    _flip(old, next(iter(state["optimizer"]["state"].values()))["exp_avg"])
    assert checkpoint.load(str(old))["epoch"] == 1
    _flip(old, state["model"]["1.weight"])
    with pytest.raises(DataError, match="weights corrupted"):
        checkpoint.load(str(old))
    none = tmp_path / "none.pt"
    torch.save(state, none)
    assert "state_sha256" not in checkpoint.load(str(none))

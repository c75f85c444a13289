"""checkpoints: a sha256 of the weights recorded and verified; empty, garbage,
truncated, bit-flipped checkpoints and storage errors are one line naming the file; a full disk
while saving leaves the previous checkpoint intact; old checkpoints (no checksum) still load.
Ray-free: a tiny state dict (the CLI fails while loading, before a model is built)."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimix import checkpoint
from multimix.cli import main
from multimix.config import StorageConfig
from multimix.errors import DataError, StorageError


def _state(epoch: int = 0) -> dict:
    g = torch.Generator().manual_seed(epoch)
    return {"format": checkpoint.FORMAT, "epoch": epoch,
            "model": {"conv.weight": torch.randn(64, 64, generator=g),
                      "conv.bias": torch.zeros(64), "bn.num_batches_tracked": torch.tensor(3)},
            "student": {"conv.weight": torch.ones(2, 2, dtype=torch.bfloat16)},
            "optimizer": None, "config": {}, "classes": ["NORMAL", "PNEUMONIA"]}


def _predict(ckpt: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    img = tmp_path / "x.png"
    Image.fromarray(np.full((40, 40), 100, np.uint8)).save(img)
    code = main(["predict", "--checkpoint", str(ckpt), str(img), "--out", str(tmp_path / "p")])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "run" / checkpoint.FILENAME
    checkpoint.save(_state(), str(path))
    return path


def test_checksum_is_recorded_and_a_clean_checkpoint_loads(saved):
    state = checkpoint.load(str(saved))
    assert state["weights_sha256"] == checkpoint.weights_digest(_state())
    assert torch.equal(state["model"]["conv.weight"], _state()["model"]["conv.weight"])
    assert checkpoint.weights_digest(_state(1)) != checkpoint.weights_digest(_state())
    assert [p.name for p in saved.parent.iterdir()] == [checkpoint.FILENAME]


def test_flipped_weight_bytes_are_a_checksum_mismatch(saved, tmp_path, capsys):
    data = bytearray(saved.read_bytes())
    raw = _state()["model"]["conv.weight"].numpy().tobytes()
    at = data.find(raw)
    assert at > 0  # torch.save stores tensor bytes uncompressed
    for i in range(at + 100, at + 100 + 5000, 7):
        data[i] ^= 0x40
    saved.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        checkpoint.load(str(saved))
    assert str(e.value) == f"{saved}: checksum mismatch (weights corrupted)"
    code, last = _predict(saved.parent, tmp_path, capsys)  # via the run directory
    assert (code, last) == (2, f"multimix predict: error: {saved}: checksum mismatch (weights "
                               "corrupted)")


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b"", "empty file (0 bytes), not a checkpoint"),
    (lambda b: b"101\n", "not a checkpoint file (torch.load: "),
    (lambda b: b[:len(b) // 2], "truncated or damaged checkpoint file ("),
    (lambda b: os.urandom(3000), "not a checkpoint file (torch.load: "),
])
def test_empty_garbage_and_truncated_files_are_one_line_naming_the_file(saved, tmp_path, capsys,
                                                                        damage, reason):
    saved.write_bytes(damage(saved.read_bytes()))
    code, last = _predict(saved, tmp_path, capsys)
    assert code == 2 and last.startswith(f"multimix predict: error: {saved}: {reason}"), last


def test_a_foreign_torch_file_and_a_missing_checkpoint(tmp_path, capsys):
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    code, last = _predict(other, tmp_path, capsys)
    assert (code, last) == (2, f"multimix predict: error: {other}: not a MultiMix checkpoint "
                               "(missing format marker)")
    code, last = _predict(tmp_path / "nope", tmp_path, capsys)
    assert (code, last) == (2, f"multimix predict: error: {tmp_path / 'nope'}: no such "
                               "checkpoint (give a checkpoint file, a checkpoint directory or "
                               "a run directory)")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.json").write_text('{"checkpoint": "checkpoint_epoch-0003"}')
    code, last = _predict(run, tmp_path, capsys)
    assert (code, last) == (2, f"multimix predict: error: {run}/best.json names "
                               f"checkpoint_epoch-0003, but {run}/checkpoint_epoch-0003/"
                               f"{checkpoint.FILENAME} does not exist")


def test_checkpoints_without_a_checksum_still_load(tmp_path):
    path = tmp_path / checkpoint.FILENAME
    torch.save(_state(), path)  # as older versions wrote it (no weights_sha256)
    state = checkpoint.load(str(path))
    assert "weights_sha256" not in state and state["epoch"] == 0


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(saved, monkeypatch):
    real_fdopen = os.fdopen

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, data):  # 1000 bytes reach the disk, then it is full
            self.f.write(bytes(data)[:1000])
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(StorageError) as e:
        checkpoint.save(_state(epoch=1), str(saved))
    assert str(e.value) == f"{saved}: no space left on device (disk full)"
    monkeypatch.undo()
    assert checkpoint.load(str(saved))["epoch"] == 0  # the previous one, whole
    assert [p.name for p in saved.parent.iterdir()] == [checkpoint.FILENAME]  # no temp file


def test_s3_access_denied_and_missing_object_are_one_line(s3_server, tmp_path):
    bucket = s3_server.make_bucket("mm-ckpt-faults")
    st = StorageConfig(**s3_server.storage_overrides())
    uri = f"s3://{bucket}/runs/x/{checkpoint.FILENAME}"
    checkpoint.save(_state(), uri, st)
    assert checkpoint.load(uri, st)["epoch"] == 0
    wrong = StorageConfig(endpoint=st.endpoint, region=st.region, access_key_id="mmtestkey",
                          secret_access_key="wrong-secret-0000")
    with pytest.raises(StorageError) as e:
        checkpoint.load(uri, wrong)
    assert str(e.value).startswith(f"access denied to s3://{bucket}/runs/x")
    assert "wrong-secret" not in str(e.value)
    with pytest.raises(DataError) as e:
        checkpoint.load(f"s3://{bucket}/runs/y", st)
    assert str(e.value) == (f"s3://{bucket}/runs/y: no such checkpoint (give a checkpoint "
                            "file, a checkpoint directory or a run directory)")

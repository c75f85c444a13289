"""multimix.data.allocator: freed batch memory is reused instead of page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_PROBE = r"""
import json, resource, sys
import numpy as np
from multimix.data.allocator import keep_freed_memory
from multimix.data.augment import Augmenter, row_keys

rng = np.random.default_rng(0)
imgs = rng.integers(0, 256, (64, 256, 256), dtype=np.uint8)
keys = row_keys([str(i) for i in range(64)], 0)
aug = Augmenter(256)

def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        weak, strong = aug.pair(imgs, keys)
        del weak, strong
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

faults()  # warm-up: imports, caches, first heap growth
before = faults()
ok = keep_freed_memory()
again = keep_freed_memory()
faults()
after = faults()
print(json.dumps({"ok": ok, "again": again, "before": before, "after": after}))
"""


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_batches_stop_page_faulting_once_applied():
    r = _probe()
    if not r["ok"]:
        pytest.skip("no glibc mallopt on this platform")
    assert r["again"] is True  # idempotent
    # 4 calls x 2 views x 4 MB: with glibc's defaults the freed views are handed back to the
    # OS and faulted in again (thousands of faults); tuned, they are reused
    assert r["before"] > 1000, r
    assert r["after"] < r["before"] / 10, r


def test_can_be_disabled():
    r = _probe(MULTIMIX_MALLOC_TUNING="0")
    assert r["ok"] is False and r["again"] is False
    assert r["after"] > 1000, r  # nothing changed

"""The pure-torch core imports with ``ray`` made unimportable."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

CORE = ["multimix.variants", "multimix.model", "multimix.objective", "multimix.engine",
        "multimix.metrics", "multimix.validate", "multimix.data.augment", "multimix.data.images",
        "multimix.data.decode", "multimix.data.pools", "multimix.bench.step", "multimix.ema",
        "multimix.data.verify", "multimix.preflight", "multimix.data.dataset",
        "multimix.data.storage", "multimix.resources", "multimix.config"]


def test_core_imports_without_ray():
    present = [m for m in CORE if importlib.util.find_spec(m) is not None]
    assert {"multimix.variants", "multimix.model", "multimix.objective", "multimix.engine",
            "multimix.validate", "multimix.data.decode", "multimix.data.pools"} <= set(present)
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        f"for m in {present!r}:\n"
        "    __import__(m)\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k, v in sys.modules.items()"
        " if v is not None)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"

"""One-shot check of a fresh GPU node (run it through ``scripts/gpu_check.sh`` or
``make gpu-check``); writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out``.

1. collectives: the Train worker's per-epoch reduction and metric gathering under a process
   group set up as Ray Train sets it up (``multimix.bench.collectives``): NCCL (world size 1,
   and 2 with two GPUs) and gloo (world size 2);
2. ``bench step --device cuda``: fp32, bf16, bf16 + channels_last; each against the
   official-semantics step in fp32 (the fp32 run's baseline);
3. ``bench train --device cuda`` at 256² with the fastest of those settings (Ray);
4. a 2-epoch ``multimix train`` on the synthetic demo set at 256² with ``scaling.use_gpu=true``
   through Ray (the same settings), then ``evaluate`` of its best checkpoint;
5. ``bench step`` with bf16 + channels_last + compile (last: compiling is the slowest part);
   the fastest of the four variants wins.

Every command's timeout is cut to what is left of ``--budget`` seconds (570: under a 600 s limit
on the whole command), so the summary is always written.

Without CUDA the CUDA parts are skipped with a line saying so (the step is measured on the CPU
in fp32 instead; Ray parts run on the CPU); without Ray (or with ``MULTIMIX_NO_RAY=1``, which
also makes ``ray`` unimportable in every process this script starts) the Ray parts are skipped
with a line. ``--quick``: tiny sizes and steps (CI). Needs the repository on ``PYTHONPATH``
(``gpu_check.sh`` sets it), not an installed package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

NO_RAY = os.environ.get("MULTIMIX_NO_RAY", "") not in ("", "0")
if NO_RAY:  # also in the processes torch.multiprocessing spawns (they import this module)
    sys.modules["ray"] = None

ROOT = Path(__file__).resolve().parents[1]
#: bench step variants: name -> flags
VARIANTS = {
    "fp32": [],
    "bf16": ["--precision", "bf16"],
    "bf16+channels_last": ["--precision", "bf16", "--channels-last"],
    "bf16+channels_last+compile": ["--precision", "bf16", "--channels-last", "--compile"],
}


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", flush=True)


def _python() -> list[str]:
    """How to start ``python -m multimix.cli`` (with ``ray`` blocked under MULTIMIX_NO_RAY)."""
    if NO_RAY:
        return [sys.executable, "-c", "import sys, runpy; sys.modules['ray'] = None; "
                "sys.argv[0] = 'multimix'; runpy.run_module('multimix.cli', run_name='__main__')"]
    return [sys.executable, "-m", "multimix.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "")
                                                        .split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throw-away cluster
    return env


#: monotonic deadline of the whole check (--budget); every command's timeout stops there
_DEADLINE = {"t": float("inf")}


def _cli(args: list[str], timeout: float, log_path: Path) -> tuple[int, str, float]:
    """Run ``multimix ARGS``; stdout+stderr appended to ``log_path``; returns (rc, stdout,
    seconds). The timeout is cut to what is left of ``--budget``."""
    t0 = time.perf_counter()
    timeout = max(1.0, min(timeout, _DEADLINE["t"] - time.monotonic()))
    try:
        proc = subprocess.run(_python() + args, capture_output=True, text=True, env=_env(),
                              timeout=timeout, cwd=str(ROOT))
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, exc.stdout or ""
        err = (exc.stderr or "") + f"\ntimed out after {timeout:.0f} s"
        out, err = (out.decode() if isinstance(out, bytes) else out,
                    err.decode() if isinstance(err, bytes) else err)
    text = f"$ multimix {' '.join(args)}\n--- stdout\n{out}\n--- stderr\n{err}\n"
    _LAST["text"] = text
    with open(log_path, "a") as f:
        f.write(f"\n===== {time.strftime('%H:%M:%S')} rc={rc}\n{text}")
    return rc, out, time.perf_counter() - t0


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    return None


_LAST = {"text": ""}


def _fail_line(*_) -> str:
    """The last non-empty line of the latest command's output (its error, as a rule)."""
    lines = [x for x in _LAST["text"].splitlines() if x.strip()]
    return lines[-1][:300] if lines else "(no output)"


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.steps: dict = {}
        self.log = self.out / "gpu_check.log"  # every command's output, appended
        self.log.write_text("")
        self.work = Path(args.work or self.out / "work")  # prepared data, run directories
        self.work.mkdir(parents=True, exist_ok=True)

    def skip(self, name: str, reason: str) -> None:
        log(f"SKIP {name}: {reason}")
        self.steps[name] = {"status": "skipped", "reason": reason}

    def record(self, name: str, ok: bool, seconds: float, result=None, reason=None) -> None:
        st = {"status": "ok" if ok else "failed", "seconds": round(seconds, 1)}
        if result is not None:
            st["result"] = result
        if reason:
            st["reason"] = reason
        self.steps[name] = st
        log(f"{'OK  ' if ok else 'FAIL'} {name} ({seconds:.0f} s)" + (f": {reason}" if reason
                                                                     else ""))


def host_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "ray": None, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if info["cuda"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if not NO_RAY and importlib.util.find_spec("ray") is not None:
        try:
            import ray

            info["ray"] = ray.__version__
        except Exception as exc:  # noqa: BLE001 - report, and treat Ray as missing
            info["ray_error"] = f"{type(exc).__name__}: {exc}"
    return info


def run_collectives(c: Check, cuda: bool, gpus: int) -> None:
    from multimix.bench.collectives import check

    plans = [("gloo", 2)]
    if cuda:
        plans = [("nccl", 1)] + ([("nccl", 2)] if gpus >= 2 else []) + plans
    else:
        c.skip("collectives nccl", "no CUDA device (torch.cuda.is_available() is False)")
    for backend, world in plans:
        name = f"collectives {backend} world={world}"
        t0 = time.perf_counter()
        try:
            res = check(backend, world)
            c.record(name, res["ok"], time.perf_counter() - t0, res,
                     "; ".join(res["problems"][:3]) or None)
        except Exception as exc:  # noqa: BLE001 - the failure goes into the summary
            c.record(name, False, time.perf_counter() - t0,
                     reason=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    if cuda and gpus < 2:
        c.skip("collectives nccl world=2", f"{gpus} GPU (NCCL world size 2 needs two)")


def run_bench_step(c: Check, cuda: bool, variants, results: dict) -> dict | None:
    """The step ``variants`` (results collected in ``results``); returns the settings of the
    fastest variant measured so far (or None)."""
    a = c.args
    size, batch = (32, 2) if a.quick else (a.size, 10)
    iters, warm = (2, 1) if a.quick else (20, 5)
    if not cuda:
        if "fp32" not in variants:
            return None
        for v in VARIANTS:
            c.skip(f"bench step cuda {v}", "no CUDA device (torch.cuda.is_available() is False)")
        size_cpu = 32 if a.quick else 64
        name = f"bench step cpu fp32 {size_cpu}²"
        extra = ["--width", "0.25"] if a.quick else []
        rc, out, s = _cli(["bench", "step", "--device", "cpu", "--size", str(size_cpu),
                           "--batch", "2", "--iters", str(iters), "--warmup", str(warm),
                           "--json", *extra], 900, c.log)
        res = _last_json(out) if rc == 0 else None
        c.record(name, res is not None, s, res,
                 None if res else _fail_line(c.log))
        return None
    for v in variants:
        flags = VARIANTS[v]
        name = f"bench step cuda {v}"
        logp = c.log
        rc, out, s = _cli(["bench", "step", "--device", "cuda", "--size", str(size), "--batch",
                           str(batch), "--iters", str(iters), "--warmup", str(warm), "--json",
                           *flags], 600, logp)
        res = _last_json(out) if rc == 0 else None
        if res is not None:
            results[v] = res
        c.record(name, res is not None, s, res, None if res else _fail_line(logp))
    if "fp32" not in results:
        return None
    official = results["fp32"]
    table = {}
    for v, r in results.items():
        table[v] = {"img_per_s": r["img_per_s"], "peak_mem_mb": r["peak_mem_mb"],
                    "speedup_vs_official_fp32": r["img_per_s"] / official["baseline_img_per_s"],
                    "mem_vs_official_fp32": (r["peak_mem_mb"] / official["baseline_peak_mem_mb"]
                                             if r.get("peak_mem_mb") else None),
                    "compile_fell_back": bool(r.get("settings", {}).get("compile_fallback"))}
    best = max(table, key=lambda v: table[v]["img_per_s"])
    summary = {"variants": table, "winner": best,
               "official_fp32_img_per_s": official["baseline_img_per_s"],
               "official_fp32_peak_mem_mb": official["baseline_peak_mem_mb"],
               "goal_speedup_3x": table[best]["speedup_vs_official_fp32"] >= 3.0,
               "goal_mem_half": (table[best]["mem_vs_official_fp32"] or 9) <= 0.5}
    c.steps["bench step winner"] = {"status": "ok", "result": summary}
    log(f"winner: {best} ({table[best]['img_per_s']:.0f} img/s, "
        f"{table[best]['speedup_vs_official_fp32']:.2f}× the official fp32 step, memory "
        f"{table[best]['mem_vs_official_fp32'] or float('nan'):.2f}×); set the paper preset's "
        "optim.precision / channels_last / compile from this")
    flags = VARIANTS[best]
    return {"optim.precision": "bf16" if "bf16" in flags else "none",
            "optim.channels_last": "--channels-last" in flags,
            "optim.compile": "--compile" in flags}


def _sets(settings: dict | None) -> list[str]:
    out = []
    for k, v in (settings or {}).items():
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def run_bench_train(c: Check, cuda: bool, ray_ok: str | None, settings) -> None:
    name = f"bench train {'cuda' if cuda else 'cpu'}"
    if ray_ok:
        c.skip(name, ray_ok)
        return
    a = c.args
    if a.quick:
        args = ["--config", "cpu-small", "--size", "64", "--steps", "4", "--warmup", "2",
                "--n-cls", "160"]
    elif cuda:
        args = ["--config", "paper", "--size", str(a.size), "--steps", "200", "--warmup", "20"]
    else:
        args = ["--config", "cpu-small", "--size", "64", "--steps", "20", "--warmup", "5"]
    logp = c.log
    rc, out, s = _cli(["bench", "train", "--device", "cuda" if cuda else "cpu", "--json", *args,
                       *_sets(settings)], 600, logp)
    res = _last_json(out) if rc == 0 else None
    c.record(name, res is not None, s, res, None if res else _fail_line(logp))
    if res:
        log(f"feed_ratio {res['feed_ratio']}, cpus_per_gpu_needed {res['cpus_per_gpu_needed']}")


def run_train(c: Check, cuda: bool, ray_ok: str | None, settings) -> None:
    name = "train 2 epochs + evaluate"
    if ray_ok:
        c.skip(name, ray_ok)
        return
    a = c.args
    size = 64 if (a.quick or not cuda) else a.size
    data, runs = c.work / "data", c.work / "runs"
    logp = c.log
    t0 = time.perf_counter()
    if not (data / "cls" / "manifest.json").exists():
        rc, _, _ = _cli(["prepare", "--demo", "--out", str(data), "--size", str(size),
                         "--quiet"], 600, c.log)
        if rc != 0:
            c.record(name, False, time.perf_counter() - t0,
                     reason="prepare --demo: " + _fail_line(c.log))
            return
    over = [f"data.cls_data={data / 'cls'}", f"data.seg_data={data / 'seg'}",
            f"data.image_size={size}", "data.cls_labeled=40", "data.seg_labeled=10",
            "optim.epochs=2", f"run.storage_path={runs}", "run.name=gpu-check"]
    if a.quick:
        over += ["optim.steps_per_epoch=2"]
    if cuda:
        over += ["scaling.use_gpu=true", "scaling.gpus_per_worker=1"]
    else:
        over += ["scaling.use_gpu=false"]
    config = "paper" if cuda else "cpu-small"
    args = ["train", "--config", config, "--evaluate", *_sets(settings)]
    for o in over:
        args += ["--set", o]
    t1 = time.perf_counter()
    rc, out, s = _cli(args, 600, logp)
    wall = time.perf_counter() - t1
    res = None
    if rc == 0:
        try:
            hist = json.loads((runs / "gpu-check" / "history.json").read_text())
            res = {"wall_s": round(wall, 1), "epochs": len(hist), "size": size,
                   "config": config, "use_gpu": cuda, "final": hist[-1]}
            rep = sorted((runs / "gpu-check").glob("**/report.json"))
            res["evaluation_json"] = str(rep[-1]) if rep else None
            res["evaluation_report"] = next((ln.split(":", 1)[1].strip() for ln in
                                             out.splitlines()
                                             if ln.startswith("evaluation report:")), None)
        except (OSError, ValueError, IndexError) as exc:
            c.record(name, False, s, reason=f"run files: {exc}")
            return
    ok = res is not None and len(res["final"]) > 0 and res["epochs"] == 2 and bool(
        res["evaluation_report"])
    c.record(name, ok, time.perf_counter() - t0, res, None if ok else _fail_line(logp))


def _fmt(v, nd=2):
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "—" if v is None else str(v)


def write_summary(c: Check, info: dict) -> None:
    doc = {"host": info, "quick": c.args.quick, "steps": c.steps,
           "ok": all(s["status"] != "failed" for s in c.steps.values())}
    (c.out / "gpu_check.json").write_text(json.dumps(doc, indent=1, default=float))
    md = ["# multimix GPU check", "",
          f"Host: {info.get('gpu_name', 'no GPU')} ({info.get('gpu_memory_gib', '—')} GiB), "
          f"{info['cpus']} CPUs, Python {info['python']}, torch {info['torch']}, "
          f"Ray {info['ray'] or 'not available'}; {info['time']}"
          + (" (quick mode)" if c.args.quick else ""), "",
          "| step | status | seconds | note |", "|---|---|---|---|"]
    for name, st in c.steps.items():
        md.append(f"| {name} | {st['status']} | {_fmt(st.get('seconds'), 1)} | "
                  f"{st.get('reason', '') or ''} |")
    win = c.steps.get("bench step winner", {}).get("result")
    if win:
        md += ["", f"## bench step (CUDA, {c.args.size}², 10 img/stream)", "",
               "| variant | img/s | × official fp32 | peak MB | memory × official |",
               "|---|---|---|---|---|"]
        for v, r in win["variants"].items():
            md.append(f"| {v} | {_fmt(r['img_per_s'], 1)} | "
                      f"{_fmt(r['speedup_vs_official_fp32'])} | {_fmt(r['peak_mem_mb'], 0)} | "
                      f"{_fmt(r['mem_vs_official_fp32'])} |")
        md.append(f"| official semantics, fp32 | {_fmt(win['official_fp32_img_per_s'], 1)} | "
                  f"1.00 | {_fmt(win['official_fp32_peak_mem_mb'], 0)} | 1.00 |")
        md += ["", f"Winner: **{win['winner']}** (goals: ≥ 3× speed "
               f"{'met' if win['goal_speedup_3x'] else 'NOT met'}, ≤ 0.5× memory "
               f"{'met' if win['goal_mem_half'] else 'NOT met'})."]
    for key in [k for k in c.steps if k.startswith("bench train")]:
        r = c.steps[key].get("result")
        if r:
            md += ["", f"## {key}", ""] + [f"- {k}: {_fmt(r[k])}" for k in (
                "train_img_per_s", "step_img_per_s", "feed_ratio", "data_wait_fraction",
                "data_cpus", "data_cpus_busy", "data_img_per_cpu_s",
                "augment_img_per_s_per_core", "cpus_per_gpu_needed")]
    r = c.steps.get("train 2 epochs + evaluate", {}).get("result")
    if r:
        f = r["final"]
        md += ["", "## train 2 epochs + evaluate", "",
               f"{r['config']} at {r['size']}², use_gpu={r['use_gpu']}: {r['wall_s']} s wall; "
               f"last epoch: " + ", ".join(f"{k}={_fmt(f[k], 4)}" for k in (
                   "train_loss", "val_cls_auc", "val_seg_dice_mean", "val_score", "img_per_s")
                   if k in f), f"Report: {r.get('evaluation_report')}"]
    (c.out / "gpu_check.md").write_text("\n".join(md) + "\n")
    log(f"summary: {c.out / 'gpu_check.json'} and {c.out / 'gpu_check.md'}"
        f" ({'all ran' if doc['ok'] else 'SOME FAILED'})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "gpu-check"))
    p.add_argument("--work", default=None,
                   help="prepared data and run directories (default: OUT/work)")
    p.add_argument("--size", type=int, default=256, help="image side of the CUDA runs")
    p.add_argument("--quick", action="store_true", help="tiny sizes and steps (CI on CPU)")
    p.add_argument("--budget", type=float, default=570,
                   help="seconds for the whole check (default 570: a 600 s limit on the "
                        "command, less the summary); a part cut short is marked failed")
    p.add_argument("--skip", action="append", default=[],
                   choices=("collectives", "bench_step", "bench_train", "train"),
                   help="leave a part out (repeatable)")
    args = p.parse_args(argv)
    c = Check(args)
    t0 = time.perf_counter()
    _DEADLINE["t"] = time.monotonic() + args.budget
    info = host_info()
    log(f"host: {json.dumps(info)}")
    cuda, gpus = bool(info["cuda"]), int(info["gpus"])
    if not cuda:
        log("no CUDA device: the CUDA parts are skipped, the rest runs on the CPU")
    if NO_RAY:
        ray_missing = "Ray made unavailable (MULTIMIX_NO_RAY=1)"
    elif info["ray"] is None:
        ray_missing = ("Ray is not importable" + (f" ({info['ray_error']})"
                                                   if "ray_error" in info else "")
                       + ": unpack scripts/pack_ray.sh's .carry/ray-py312.tar.xz (gpu_check.sh "
                       "does) or pip install ray")
    else:
        ray_missing = None
    if ray_missing:
        log(f"{ray_missing}: the Ray parts are skipped")
    for part in args.skip:
        c.skip(part, "--skip")
    if "collectives" not in args.skip:
        run_collectives(c, cuda, gpus)
    # compile last: its compilation is the slowest part, and the Ray parts must fit the budget
    # (they run with the best settings without compile)
    steps: dict = {}
    settings = (run_bench_step(c, cuda, [v for v in VARIANTS if "compile" not in v], steps)
                if "bench_step" not in args.skip else None)
    if "bench_train" not in args.skip:
        run_bench_train(c, cuda, ray_missing, settings)
    if "train" not in args.skip:
        run_train(c, cuda, ray_missing, settings)
    if "bench_step" not in args.skip and cuda:
        run_bench_step(c, cuda, [v for v in VARIANTS if "compile" in v], steps)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    write_summary(c, info)
    return 0 if all(s["status"] != "failed" for s in c.steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

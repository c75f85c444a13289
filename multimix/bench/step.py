"""``multimix bench step``: img/s and peak memory of :func:`multimix.engine.train_step` against a
naive step with the official semantics, measured in the same run.

The naive step (:func:`naive_train_step`) is what the official notebook computes, written fairly
(all streams batched into one forward, same model, same loss, same single host sync): every one of
the five streams (labeled, weak, strong, labeled-seg, unlabeled-seg) goes through the encoder, the
saliency pass *and* the decoder, and the weak view keeps its autograd graph (its logits are only
detached when the pseudo-labels are made). Our step runs the weak view under ``no_grad``, the
saliency and the decoder on the two segmentation streams only.

Throughput counts the images a step consumes (5 streams × ``--batch``), over the median step time
of ``--iters`` timed steps after ``--warmup`` untimed ones; ours and the baseline alternate so that
load from other processes hits both alike.

Peak memory is the extra memory one step needs over the state after warm-up (model, optimizer
state, caches):

* CUDA: ``torch.cuda.max_memory_allocated()`` during the step minus the memory allocated before it.
* CPU: torch has no CPU allocator statistics, so the process's resident memory is used: after
  the timed steps, for each variant, ``gc.collect()`` + glibc ``malloc_trim(0)`` (free heap pages go
  back to the OS), read ``VmRSS`` as the baseline, reset the high-water mark
  (``echo 5 > /proc/self/clear_refs``), run one more (untimed) step, read ``VmHWM``; the
  difference is the step's peak. Where ``clear_refs`` is not writable the variant is measured in a
  fresh subprocess instead (its whole-process ``VmHWM`` over the post-warm-up ``VmRSS``), named in
  ``mem_method``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

from multimix.config import Config
from multimix.errors import UserError

STREAMS = ("cls_img", "weak_img", "strong_img", "seg_img", "useg_img")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=256, help="image side (multiple of 32)")
    parser.add_argument("--batch", type=int, default=10, help="images per stream (5 streams)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--precision", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="Module.compile() the blocks")
    parser.add_argument("--width", type=float, default=1.0, help="width factor of 16..256")
    parser.add_argument("--variant", default="multimix")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--_mem-worker", dest="mem_worker", choices=("ours", "baseline"),
                        default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------


def _setup(args):
    import torch

    from multimix.engine import build_optimizer, prepare_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.size % 32:
        raise UserError(f"--size {args.size}: must be a multiple of 32")
    cfg = Config()
    cfg.model.variant = args.variant
    cfg.model.width = args.width
    cfg.optim.precision = args.precision
    cfg.optim.channels_last = bool(args.channels_last)
    cfg.optim.compile = bool(args.compile)
    device = torch.device(args.device)
    from multimix.model import create_model

    torch.manual_seed(0)
    model = prepare_model(create_model(cfg.model), cfg, device)
    opt, _ = build_optimizer(model, cfg)
    g = torch.Generator().manual_seed(1)
    B, H = args.batch, args.size
    batch = {k: torch.randint(0, 256, (B, 1, H, H), dtype=torch.uint8, generator=g)
             for k in STREAMS}
    batch["cls_label"] = torch.randint(0, 2, (B,), generator=g)
    batch["seg_mask"] = torch.randint(0, 2, (B, 1, H, H), dtype=torch.uint8, generator=g)
    batch["seg_ignore"] = torch.zeros(B, 1, H, H, dtype=torch.uint8)
    return cfg, device, model, opt, batch


def naive_train_step(model, batch, optimizer, cfg, device, variant=None) -> dict:
    """The official semantics, batched: encoder + saliency + decoder over all five streams, weak
    view with its graph kept; same loss and optimizer as :func:`multimix.engine.train_step`."""
    import torch

    from multimix.engine import autocast, to_input
    from multimix.model import unwrap
    from multimix.objective import TERM_KEYS, multimix_loss

    optim_cfg, obj_cfg = cfg.optim, cfg.objective
    net = unwrap(model)
    variant = variant or net.variant
    model.train()
    sizes = [batch[k].shape[0] for k in STREAMS]
    x = torch.cat([to_input(batch[k], device, optim_cfg.channels_last) for k in STREAMS])
    targets = {k: batch[k].to(device) for k in ("cls_label", "seg_mask", "seg_ignore")}
    with autocast(device, optim_cfg.precision):
        full = net.forward_all(x)
    parts = {}
    for name, key in (("cls_logits", "cls_logits"), ("seg_logits", "seg_logits")):
        if key in full:
            parts[name] = torch.split(full[key], sizes)
    out = {}
    if "cls_logits" in parts:
        c = parts["cls_logits"]
        out.update(cls_logits=c[0], weak_logits=c[1].detach(), strong_logits=c[2])
    if "seg_logits" in parts:
        s = parts["seg_logits"]
        out.update(seg_logits=s[3], useg_logits=s[4])
    loss, terms = multimix_loss(out, targets, obj_cfg, variant)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return dict(zip(TERM_KEYS, torch.stack([terms[k] for k in TERM_KEYS]).tolist()))


def _step_fn(which: str):
    from multimix.engine import train_step

    return train_step if which == "ours" else naive_train_step


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _mem_worker(args) -> int:
    """Child process: peak extra RSS of one step of ``args.mem_worker`` (CPU)."""
    cfg, device, model, opt, batch = _setup(args)
    step = _step_fn(args.mem_worker)
    for _ in range(max(1, args.warmup)):
        step(model, batch, opt, cfg, device)
    res = _cpu_memory(step, model, batch, opt, cfg, device, allow_absolute=True)
    print(json.dumps(res))
    return 0


def _child_args(args, which: str) -> list[str]:
    a = [sys.executable, "-m", "multimix.bench.step", "--_mem-worker", which,
         "--size", str(args.size), "--batch", str(args.batch), "--device", args.device,
         "--precision", args.precision, "--width", str(args.width), "--variant", args.variant,
         "--warmup", str(max(1, args.warmup)), "--threads", str(args.threads or 0)]
    if args.channels_last:
        a.append("--channels-last")
    if args.compile:
        a.append("--compile")
    return a


def _cpu_memory_subprocess(args, which: str) -> dict:
    import torch

    if not args.threads:
        args.threads = torch.get_num_threads()
    proc = subprocess.run(_child_args(args, which), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker ({which}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_memory(step, model, batch, opt, cfg, device, allow_absolute: bool = False) -> dict:
    """Peak extra RSS (MB) of one step in this process over the post-warm-up RSS.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``); where that is refused,
    returns None, or with ``allow_absolute`` (a fresh subprocess) the whole-process peak."""
    gc.collect()
    _malloc_trim()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method = "rss-hwm-reset"
    except OSError:
        if not allow_absolute:
            return None
        method = "rss-hwm-absolute"
    step(model, batch, opt, cfg, device)
    peak = _status_kb("VmHWM")
    return {"peak_mem_mb": (peak - base) / 1024.0, "base_rss_mb": base / 1024.0,
            "mem_method": method}


def _cuda_memory(step, model, batch, opt, cfg, device) -> float:
    import torch

    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(model, batch, opt, cfg, device)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ---------------------------------------------------------------------------------------------


def _compiled_setup(args):
    """:func:`_setup`, with ``--compile`` tried on one step of each kind first: where it fails,
    one line on stderr and the model is rebuilt without compile (``compile_fallback``)."""
    cfg, device, model, opt, batch = _setup(args)
    if not args.compile:
        return cfg, device, model, opt, batch, None
    import torch._dynamo

    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False  # here a failure must show
    try:
        for which in ("ours", "baseline"):
            _step_fn(which)(model, batch, opt, cfg, device)
        return cfg, device, model, opt, batch, None
    except Exception as exc:  # noqa: BLE001 - any compile failure: measure eagerly
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
        print(f"bench step: --compile failed ({reason}); measuring without compile",
              file=sys.stderr, flush=True)
        args.compile = False
        del model, opt
        torch._dynamo.reset()
        cfg, device, model, opt, batch = _setup(args)
        return cfg, device, model, opt, batch, reason
    finally:
        torch._dynamo.config.suppress_errors = suppress


def measure(args) -> dict:
    """Run the benchmark; return the result dict (what ``--json`` prints)."""
    cfg, device, model, opt, batch, fallback = _compiled_setup(args)
    steps = {"ours": _step_fn("ours"), "baseline": _step_fn("baseline")}
    images = len(STREAMS) * args.batch

    mem = {}
    if not args.no_memory and device.type == "cuda":
        for which in ("ours", "baseline"):
            steps[which](model, batch, opt, cfg, device)  # warm
            mem[which] = {"peak_mem_mb": _cuda_memory(steps[which], model, batch, opt, cfg,
                                                      device), "mem_method": "cuda-max-allocated"}

    for _ in range(max(0, args.warmup)):
        for which in ("ours", "baseline"):
            steps[which](model, batch, opt, cfg, device)
    times = {"ours": [], "baseline": []}
    for i in range(max(1, args.iters)):
        order = ("ours", "baseline") if i % 2 == 0 else ("baseline", "ours")
        for which in order:
            _sync(device)
            t0 = time.perf_counter()
            steps[which](model, batch, opt, cfg, device)
            _sync(device)
            times[which].append(time.perf_counter() - t0)
    if not args.no_memory and device.type != "cuda":
        for which in ("ours", "baseline"):
            mem[which] = _cpu_memory(steps[which], model, batch, opt, cfg, device)
        if mem["ours"] is None or mem["baseline"] is None:
            del model, opt, batch
            gc.collect()
            for which in ("ours", "baseline"):
                mem[which] = _cpu_memory_subprocess(args, which)
                mem[which]["mem_method"] = "rss-hwm-subprocess"

    import torch

    t_ours = statistics.median(times["ours"])
    t_base = statistics.median(times["baseline"])
    res = {
        "img_per_s": images / t_ours,
        "baseline_img_per_s": images / t_base,
        "ratio": t_base / t_ours,
        "peak_mem_mb": mem.get("ours", {}).get("peak_mem_mb"),
        "baseline_peak_mem_mb": mem.get("baseline", {}).get("peak_mem_mb"),
        "mem_ratio": None,
        "step_s": times["ours"],
        "baseline_step_s": times["baseline"],
        "settings": {
            "size": args.size, "batch": args.batch, "images_per_step": images,
            "device": str(device), "precision": args.precision,
            "channels_last": bool(args.channels_last), "compile": bool(args.compile),
            "width": args.width, "variant": args.variant, "iters": args.iters,
            "warmup": args.warmup, "threads": args.threads or torch.get_num_threads(),
            "mem_method": mem.get("ours", {}).get("mem_method"),
            "compile_fallback": fallback,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
            "torch": torch.__version__,
        },
    }
    if res["peak_mem_mb"] is not None and res["baseline_peak_mem_mb"]:
        res["mem_ratio"] = res["peak_mem_mb"] / res["baseline_peak_mem_mb"]
    return res


def run(args) -> int:
    if getattr(args, "mem_worker", None):
        return _mem_worker(args)
    res = measure(args)
    if args.json:
        print(json.dumps(res))
        return 0
    s = res["settings"]
    print(f"bench step: {s['variant']} {s['size']}² × {s['batch']}/stream ({s['images_per_step']} "
          f"img/step) on {s['device']}, precision={s['precision']}, "
          f"channels_last={s['channels_last']}, compile={s['compile']}, width={s['width']}, "
          f"threads={s['threads']}")
    print(f"  ours     : {res['img_per_s']:8.2f} img/s   (median step {statistics.median(res['step_s']):.3f} s)")
    print(f"  baseline : {res['baseline_img_per_s']:8.2f} img/s   (median step "
          f"{statistics.median(res['baseline_step_s']):.3f} s)")
    print(f"  speed-up : {res['ratio']:.2f}×")
    if res["peak_mem_mb"] is not None:
        print(f"  peak mem : {res['peak_mem_mb']:.0f} MB vs {res['baseline_peak_mem_mb']:.0f} MB "
              f"→ {res['mem_ratio']:.2f}× ({s['mem_method']})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="multimix bench step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

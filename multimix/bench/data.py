"""``multimix bench data``: weak+strong augmentation pairs/s per CPU core, fast vs the paper's.

Measures, in one run and on the same images (real Kermany X-rays when ``$MULTIMIX_DATA`` points
at ``../shared/data``, else synthetic phantoms), at ``--size`` (256 by default):

1. ``img_per_s_per_core``: weak+strong pairs per CPU-second of :class:`Augmenter` (uint8 in,
   uint8 out; CPU time of this process, so other load on the machine matters less);
2. ``baseline_img_per_s_per_core``: the same for the paper's per-image sequential Pillow
   pipeline (:func:`multimix.data.augment.paper_pair`) (both: best of ``--reps``), and
   ``ratio``: the median over the reps of 1 / 2, each rep timing both back to back (this
   VM's speed drifts by up to 2x between runs; the back-to-back ratio is far steadier);
3. ``decode_augment_img_per_s_per_core``: PNG decode + fast pair in-process (the best a data
   pipeline can do, since every row must be decoded); ``decode_ms_per_img``: decode alone, of
   PNGs stored at ``--png-level`` (default: ``multimix prepare``'s, 0 = uncompressed);
4. ``object_store_put_ms_per_img``: ``ray.put`` of one output block (both views), per row;
   ``e2e_img_per_s_per_core``: the Ray Data pipeline read Parquet → decode → augment → batches
   (:func:`multimix.data.readers.stream_dataset`, the reader training uses) from a temporary
   local Parquet set in ``multimix prepare``'s row order, ``--e2e-passes`` passes (default 6)
   in one execution, consumed as a Train worker does (through a ``streaming_split`` of one and
   the worker's :class:`~multimix.data.batches.StreamCursor`, with a local shuffle buffer only
   when ``--e2e-shuffle-rows`` is set): rows/s divided by the CPUs the pipeline used (wall
   time: other load on the machine lowers it); ``e2e_img_per_cpu_s``: rows per CPU-second that
   this process and its Ray processes used (robust to other load); ``e2e_first_batch_s``:
   seconds from the start to the first batch (an execution's start-up);
   ``e2e_steady_img_per_s_per_core``: the rate after the first batch; a pass is
   ``--e2e-rows`` rows (default 4,096: about one epoch over Kermany's unlabeled pool);
   ``e2e_transport_*``: the same pipeline with augmentation replaced by nothing
   (:class:`Unaugmented`: both views are the decoded image), i.e. the pipeline's own cost, the
   most any augmentation could reach end to end here;
   ``e2e_*_consumer_cpu_ms_per_img``: CPU of the consuming process per row (a Train worker's
   share: the batches cut from blocks, or ``--e2e-shuffle-rows``' local shuffle buffer);
   ``e2e_s3_*`` the same from an S3 server when ``--s3-endpoint`` is given;
5. ``e2e_vs_bare`` = e2e / 1, ``e2e_vs_decode_augment`` = e2e / 3 (wall), and
   ``e2e_cpu_s_vs_decode_augment`` (CPU-time based); ``e2e_steady_vs_bare`` (after the first
   batch); ``e2e_transport_vs_bare``.

The Parquet sets it measures are written by :mod:`multimix.testing`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import numpy as np

from multimix.bench import ratio
from multimix.config import load_config
from multimix.data import storage
from multimix.data.allocator import keep_freed_memory
from multimix.data.augment import Augmenter, paper_pair, row_keys
from multimix.data.batches import StreamCursor
from multimix.data.images import IMAGE_PNG_LEVEL, decode_png, encode_png
from multimix.data.prepare import row_order_key
from multimix.data.readers import block_rows, configure_data_context, stream_dataset
from multimix.testing import kermany_rows, synthetic_rows, write_dataset

# ---------------------------------------------------------------------------------------------
# the benchmark


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--n", type=int, default=256, help="distinct images (default 256)")
    p.add_argument("--batch", type=int, default=64, help="augmentation batch (default 64)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (best is kept)")
    p.add_argument("--e2e-passes", type=int, default=6, help="timed passes over the e2e set "
                   "(default 6; run in one execution, as training does)")
    p.add_argument("--e2e-shuffle-rows", type=int, default=0, metavar="N",
                   help="data.shuffle_buffer_rows of the e2e consumer (default 0: batches cut "
                        "from whole blocks; N > 0: Ray Data's local shuffle buffer of N rows)")
    p.add_argument("--e2e-rows", type=int, default=4096,
                   help="rows of the e2e Parquet set, one pass (default 4096; the images repeated "
                        "under new ids)")
    p.add_argument("--png-level", type=int, default=None, choices=range(10), metavar="0-9",
                   help="zlib level of the stored images (default: multimix prepare's, 0)")
    p.add_argument("--no-e2e", action="store_true", help="skip the Ray Data measurements")
    p.add_argument("--cpus", type=int, default=None,
                   help="CPUs for the Ray Data pipeline (default: all of this machine)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic phantoms even when $MULTIMIX_DATA is set")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint (http://host:port) for e2e_s3")
    p.add_argument("--s3-bucket", default="multimix-bench", help="existing bucket (default "
                   "multimix-bench)")
    p.add_argument("--s3-access-key", default=None)
    p.add_argument("--s3-secret-key", default=None)
    p.add_argument("--s3-region", default="us-east-1")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="measure with glibc's default malloc settings (see "
                        "multimix.data.allocator; the pipeline's map tasks apply them)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _images(args) -> tuple[np.ndarray, list[dict], str]:
    root = os.environ.get("MULTIMIX_DATA")
    if root and not args.synthetic and os.path.isdir(os.path.join(root, "kermany-cxr")):
        rows = kermany_rows(root, args.n, args.size)
        source = "kermany-cxr"
    else:
        rows = synthetic_rows(args.n, args.size)
        source = "synthetic"
    return np.stack([r["image"] for r in rows]), rows, source


def _cpu_rate(fn, n_items: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return n_items / max(best, 1e-9)


def _tree_cpu(root: int | None = None) -> dict:
    """``{pid: CPU seconds}`` of this process (or ``root``) and all its descendants (the local
    Ray cluster it started: GCS, raylet, workers), read from /proc (empty where there is none).

    Each process counts its own time plus that of its children that have exited and been
    waited for (``cutime``/``cstime``), so processes that end during a measurement (Ray kills
    the Parquet footer-reader actors after every pass) stay counted in their parent."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        parent: dict = {}
        cpu: dict = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)] = int(st[1])
            cpu[int(d)] = sum(int(x) for x in st[11:15]) / tick  # u/s time + reaped children
    except (OSError, ValueError, AttributeError):
        return {}
    me, out = root or os.getpid(), {}
    for pid in cpu:
        p, seen = pid, 0
        while p and p != me and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p == me:
            out[pid] = cpu[pid]
    return out


def _cpu_used(before: dict, after: dict) -> float:
    """CPU seconds the process tree used between two :func:`_tree_cpu` snapshots: the growth
    of every process alive at the end (new ones from zero). A process that ended and was not
    reaped inside the tree drops out (an undercount, never a negative total)."""
    return sum(max(0.0, c - before.get(pid, 0.0)) for pid, c in after.items())


class Unaugmented:
    """Stands in for :class:`~multimix.data.augment.Augmenter` in the map tasks and renders
    nothing: both views are the decoded image. ``bench data``'s ``e2e_transport_*`` runs
    the pipeline with it, so what is left is the pipeline's own cost (read, decode, Ray Data's
    tasks, object store and split, the consumer)."""

    def pair(self, img, keys):
        return img, img

    def weak(self, img, keys):
        return img

    def geometric(self, keys, *arrays):
        return arrays


def _e2e(uri: str, ids: list[str], cfg, passes: int, cpus: int, augmenter=None) -> dict:
    """The ``unl_cls`` stream over ``passes`` passes in one execution, consumed as a Train
    worker does (a ``streaming_split`` of one, the worker's
    :class:`~multimix.data.batches.StreamCursor`, a local shuffle buffer with
    ``data.shuffle_buffer_rows``): ``wall`` rows/s/CPU, ``cpu`` rows per CPU-second used by
    the driver + Ray processes, ``first_batch_s`` (seconds from the start to the first batch:
    one execution's start-up), ``steady`` (rows/s/CPU after it) and ``consumer_ms`` (CPU
    milliseconds per row of this process, the consumer: a Train worker's share).
    ``augmenter``: see :func:`multimix.data.readers.stream_dataset`."""
    configure_data_context()

    def source(n_passes: int):
        ds = stream_dataset(uri, ids, cfg, stream="unl_cls", passes=n_passes,
                            augmenter=augmenter)
        return ds.streaming_split(1, equal=True)[0]

    b = cfg.data.unlabeled_batch
    shuffle = cfg.data.shuffle_buffer_rows
    warm = StreamCursor(source(1), b, "unl_cls", shuffle_rows=shuffle)
    for _ in range(max(1, len(ids) // b)):  # warm-up pass (worker processes, imports)
        warm.next()
    warm.close()
    cursor = StreamCursor(source(passes), b, "unl_cls", passes=passes, shuffle_rows=shuffle)
    steps = max(2, passes * len(ids) // b)
    c0, t0 = _tree_cpu(), time.perf_counter()
    cursor.next()
    t_first = time.perf_counter()
    for _ in range(steps - 1):
        cursor.next()
    end = time.perf_counter()
    cursor.close()
    c1 = _tree_cpu()
    wall, cpu_s = end - t0, _cpu_used(c0, c1)
    rows = steps * b
    me = os.getpid()
    return {"wall": rows / wall / cpus, "cpu": rows / cpu_s if cpu_s > 0 else float("nan"),
            "consumer_ms": (c1.get(me, 0.0) - c0.get(me, 0.0)) * 1e3 / rows,
            "first_batch_s": t_first - t0,
            "steady": (rows - b) / (end - t_first) / cpus if end > t_first else float("nan")}


def _e2e_fields(out: dict, res: dict, tag: str, where: str) -> None:
    out[f"e2e{where}{tag}_img_per_s_per_core"] = round(res["wall"], 1)
    out[f"e2e{where}{tag}_img_per_cpu_s"] = round(res["cpu"], 1)
    out[f"e2e{where}{tag}_first_batch_s"] = round(res["first_batch_s"], 2)
    out[f"e2e{where}{tag}_steady_img_per_s_per_core"] = round(res["steady"], 1)
    out[f"e2e{where}{tag}_consumer_cpu_ms_per_img"] = round(res["consumer_ms"], 3)


def _put_ms_per_row(size: int) -> float:
    """Milliseconds per row to put one pipeline output block (weak + strong ``uint8`` views of
    ``_yield_rows(size)`` rows) into Ray's object store: the transfer every streamed row pays
    on top of decode + augment (best of 5)."""
    import ray

    rows = block_rows(size)
    block = {k: np.full((rows, size, size), 7, np.uint8) for k in ("weak_img", "strong_img")}
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        ref = ray.put(block)
        best = min(best, time.perf_counter() - t0)
        del ref
    return best * 1e3 / rows


def run(args) -> int:
    if args.png_level is None:
        args.png_level = IMAGE_PNG_LEVEL
    tuned = False if args.no_malloc_tuning else keep_freed_memory()
    imgs, rows, source = _images(args)
    n, size = len(imgs), args.size
    aug = Augmenter(size)
    keys = row_keys([r["id"] for r in rows], 0)
    b = args.batch

    def fast():
        for j in range(0, n, b):
            aug.pair(imgs[j:j + b], keys[j:j + b])

    rng = random.Random(0)

    def paper():
        for i in range(n):
            paper_pair(imgs[i], rng)

    pngs = [encode_png(im, args.png_level) for im in imgs]

    def decode_fast():
        for j in range(0, n, b):
            aug.pair(np.stack([decode_png(x) for x in pngs[j:j + b]]), keys[j:j + b])

    fast()  # warm caches
    ours = base = 0.0
    ratios = []
    for _ in range(args.reps):  # interleaved: each rep's ratio is taken under the same load
        o, p = _cpu_rate(fast, n, 1), _cpu_rate(paper, n, 1)
        ours, base = max(ours, o), max(base, p)
        ratios.append(o / p)
    dec = _cpu_rate(decode_fast, n, max(1, args.reps - 1))
    dec_only = _cpu_rate(lambda: [decode_png(x) for x in pngs], n, max(1, args.reps - 1))
    out = {
        "size": size, "n": n, "source": source, "malloc_tuned": tuned,
        "img_per_s_per_core": round(ours, 1),
        "baseline_img_per_s_per_core": round(base, 1),
        "ratio": round(float(np.median(ratios)), 2),
        "decode_augment_img_per_s_per_core": round(dec, 1),
        "decode_ms_per_img": round(1e3 / dec_only, 3),
        "png_level": args.png_level,
        "png_kb_per_img": round(sum(len(x) for x in pngs) / n / 1024, 1),
    }
    if not args.no_e2e:
        import logging

        import ray
        import ray.data  # configures Ray Data's logging on import

        # keep Ray Data's per-execution INFO lines out of the report
        logging.getLogger("ray.data").setLevel(logging.WARNING)

        cpus = args.cpus or os.cpu_count() or 1
        started = False
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            started = True
        try:
            cpus = int(ray.cluster_resources().get("CPU", cpus))
            over = {"data": {"image_size": size, "unlabeled_batch": b,
                             "shuffle_buffer_rows": args.e2e_shuffle_rows},
                    "scaling": {"data_cpus_per_task": 1.0, "data_concurrency": cpus}}
            e2e_rows = [dict(r, id=f"{r['id']}#{k}") for k in range(max(1, -(-args.e2e_rows // n)))
                        for r in rows][: max(args.e2e_rows, 1)]
            e2e_rows.sort(key=lambda r: row_order_key(r["id"]))  # as multimix prepare writes
            ids = [r["id"] for r in e2e_rows]
            with tempfile.TemporaryDirectory(prefix="mm-bench-") as tmp:
                uri = write_dataset(os.path.join(tmp, "cls"), e2e_rows, "cls", size,
                                    shards=max(2, cpus), png_level=args.png_level)
                cfg = load_config(None, over)
                _e2e_fields(out, _e2e(uri, ids, cfg, args.e2e_passes, cpus), "", "")
                _e2e_fields(out, _e2e(uri, ids, cfg, args.e2e_passes, cpus,
                                      augmenter=Unaugmented()), "_transport", "")
                out["object_store_put_ms_per_img"] = round(_put_ms_per_row(size), 3)
                out["e2e_cpus"] = cpus
                out["e2e_shuffle_buffer_rows"] = args.e2e_shuffle_rows
                if args.s3_endpoint:
                    _e2e_fields(out, _s3_e2e(args, uri, ids, over, cpus), "", "_s3")
                else:
                    out["e2e_s3"] = "skipped: no --s3-endpoint given"
        finally:
            if started:
                ray.shutdown()
        for key, num, den in (
                ("e2e_vs_bare", "e2e_img_per_s_per_core", ours),
                ("e2e_vs_decode_augment", "e2e_img_per_s_per_core", dec),
                ("e2e_cpu_s_vs_decode_augment", "e2e_img_per_cpu_s", dec),
                ("e2e_transport_vs_bare", "e2e_transport_img_per_s_per_core", ours),
                ("e2e_steady_vs_bare", "e2e_steady_img_per_s_per_core", ours)):
            out[key] = ratio(out[num], den)
    if args.json:
        print(json.dumps(out))
    else:
        _table(out)
    return 0


_LABELS = {
    "img_per_s_per_core": "bare augmentation, fast (pairs/s/core)",
    "baseline_img_per_s_per_core": "bare augmentation, paper Pillow chain",
    "ratio": "fast / paper",
    "decode_augment_img_per_s_per_core": "PNG decode + fast pair, in-process",
    "decode_ms_per_img": "PNG decode alone (ms/img)",
    "png_level": "zlib level of the stored images",
    "png_kb_per_img": "stored PNG size (KB/img)",
    "object_store_put_ms_per_img": "object-store put of an output block (ms/img)",
    "e2e_vs_bare": "e2e (wall) / bare augmentation",
    "e2e_vs_decode_augment": "e2e (wall) / decode + augment",
    "e2e_cpu_s_vs_decode_augment": "e2e (CPU-s) / decode + augment",
    "e2e_transport_vs_bare": "e2e unaugmented (wall) / bare augmentation",
    "e2e_steady_vs_bare": "e2e after 1st batch / bare",
}
for _where, _w in (("", "local"), ("_s3", "S3")):
    for _tag, _r in (("", "augmented"), ("_transport", "unaugmented")):
        _LABELS[f"e2e{_where}{_tag}_img_per_s_per_core"] = f"e2e {_r}, {_w} (img/s / CPUs, wall)"
        _LABELS[f"e2e{_where}{_tag}_img_per_cpu_s"] = f"e2e {_r}, {_w} (img per CPU-s used)"
        _LABELS[f"e2e{_where}{_tag}_first_batch_s"] = f"e2e {_r}, {_w}: start → 1st batch (s)"
        _LABELS[f"e2e{_where}{_tag}_steady_img_per_s_per_core"] = (
            f"e2e {_r}, {_w}, after the 1st batch (img/s / CPUs)")
        _LABELS[f"e2e{_where}{_tag}_consumer_cpu_ms_per_img"] = (
            f"e2e {_r}, {_w}: consumer CPU (ms/img)")


def _table(out: dict) -> None:
    print(f"multimix bench data: {out['size']}² images, {out['n']} distinct ({out['source']}), "
          f"malloc tuning {'on' if out['malloc_tuned'] else 'off'} (both pipelines)")
    for k, v in out.items():
        if k in ("size", "n", "source", "malloc_tuned"):
            continue
        print(f"  {_LABELS.get(k, k):44s} {v}")


def _s3_e2e(args, local_uri: str, ids, over: dict, cpus: int) -> dict:
    import pyarrow.fs as pafs

    st = {"endpoint": args.s3_endpoint, "region": args.s3_region}
    if args.s3_access_key:
        st.update(access_key_id=args.s3_access_key, secret_access_key=args.s3_secret_key)
    cfg = load_config(None, {**over, "storage": st})
    prefix = f"bench-{os.getpid()}-{int(time.time())}"
    uri = f"s3://{args.s3_bucket}/{prefix}"
    fs, path = storage.resolve(uri, cfg.storage)
    with storage.storage_errors(uri, cfg.storage):
        pafs.copy_files(local_uri, path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    try:
        return _e2e(uri, ids, load_config(None, {**over, "storage": st, "data": {
            **over["data"], "cls_data": uri}}), args.e2e_passes, cpus)
    finally:
        storage.delete_dir(uri, cfg.storage)


if __name__ == "__main__":  # python -m multimix.bench.data
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))

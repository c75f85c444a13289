"""Small prepared datasets for tests and benchmarks, written directly with pyarrow (DESIGN §1).

:func:`write_dataset` writes rows (ids, images, labels or masks) as a prepared dataset
(``manifest.json`` + Parquet shards) without ``multimix prepare``'s source discovery, so a test
controls row order, row-group size, PNG level or a corrupt cell; :func:`kermany_rows`,
:func:`v7_rows` and :func:`synthetic_rows` make such rows from the real chest X-rays
(``$MULTIMIX_DATA``) or synthetic phantoms. Used by the tests and by ``multimix bench data``. :func:`free_ports`: loopback ports for
test servers (SeaweedFS, a Ray head) and ``multimix bench collectives``.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np

from multimix.data.images import (IMAGE_PNG_LEVEL, MASK_PNG_LEVEL, encode_png, load_grey,
                                  resize_image, resize_mask)
from multimix.data.prepare import COMPRESSION, ROW_GROUP_ROWS, ROW_ORDER, row_order_key
from multimix.data.synthetic import phantom

__all__ = ["free_ports", "kermany_rows", "synthetic_rows", "v7_rows", "write_dataset"]


def free_ports(n: int = 1, avoid: range = range(0)) -> list[int]:
    """``n`` distinct free loopback (127.0.0.1) ports outside ``avoid``. Every socket stays
    bound until all ports are chosen: bound and closed one at a time, the OS may hand out the
    same port twice (CI once gave a Ray head's dashboard agent the same HTTP and gRPC port, and
    `ray start` refused it). A port is free when returned, not reserved: the caller binds it
    soon (a server that finds it taken is retried by the caller)."""
    socks: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            if len(socks) >= n + 1000:
                raise RuntimeError(f"free_ports: no {n} free ports outside {avoid} in "
                                   f"{len(socks)} tries")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in avoid and port not in ports:
                ports.append(port)
        return ports
    finally:
        for sock in socks:
            sock.close()


def write_dataset(root: str, rows: list[dict], task: str, size: int, shards: int = 2,
                  row_group_rows: int | None = None, png_level: int | None = None) -> str:
    """rows: dicts with id, image (uint8 HxW), and label (cls) or mask/ignore (seg) arrays, or
    ``image_bytes`` to store raw bytes (e.g. a corrupt PNG). Rows are written in the given order
    in ``row_group_rows``-row groups, images at zlib level ``png_level`` (defaults: what
    ``multimix prepare`` writes); the manifest records ``row_order`` when that order is
    :func:`~multimix.data.prepare.row_order_key`'s."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    level = IMAGE_PNG_LEVEL if png_level is None else png_level
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    recs = []
    for r in rows:
        img = r.get("image_bytes")
        if img is None:
            img = encode_png(r["image"], level)
        recs.append({
            "id": r["id"], "source": "test", "task": task, "image": img,
            "mask": (encode_png(r["mask"] * 255, MASK_PNG_LEVEL)
                     if r.get("mask") is not None else None),
            "ignore": (encode_png(r["ignore"] * 255, MASK_PNG_LEVEL)
                       if r.get("ignore") is not None else None),
            "label": r.get("label"), "hash": r["id"], "path": r["id"],
            "orig_height": size, "orig_width": size,
        })
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("task", pa.string()),
                        ("image", pa.binary()), ("mask", pa.binary()), ("ignore", pa.binary()),
                        ("label", pa.int32()), ("hash", pa.string()), ("path", pa.string()),
                        ("orig_height", pa.int32()), ("orig_width", pa.int32())])
    names = []
    for k, part in enumerate(np.array_split(np.arange(len(recs)), shards)):
        name = f"data/part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist([recs[i] for i in part], schema=schema),
                       os.path.join(root, name), row_group_size=row_group_rows or ROW_GROUP_ROWS,
                       compression={n: COMPRESSION.get(n, "SNAPPY") for n in schema.names})
        names.append(name)
    manifest = {"format": "multimix-prepared/1", "num_rows": len(recs), "image_size": size,
                **({"row_order": ROW_ORDER} if [r["id"] for r in rows] == sorted(
                    (r["id"] for r in rows), key=row_order_key) else {}),
                "source": "test", "task": task, "shards": names, "skipped": 0,
                "duplicate_groups": [], "report": "report.json", "parameters": {},
                "created": "2026-01-01T00:00:00"}
    if task == "cls":
        manifest["classes"] = ["NORMAL", "PNEUMONIA"]
        manifest["counts"] = {"cls": {}}
    else:
        manifest["counts"] = {"seg": len(recs), "with_ignore": 0}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root


def kermany_rows(data_root, n: int, size: int) -> list[dict]:
    from pathlib import Path

    out = []
    for cls, name in enumerate(("NORMAL", "PNEUMONIA")):
        files = sorted((Path(data_root) / "kermany-cxr" / "train" / name).glob("*.jpeg"))
        for f in files[: n // 2]:
            out.append({"id": f"{name}/{f.stem}", "image": resize_image(load_grey(f), size),
                        "label": cls})
    return out


def v7_rows(data_root, n: int, size: int) -> list[dict]:
    from pathlib import Path

    root = Path(data_root) / "v7-covid-lungs"
    out = []
    for f in sorted((root / "images").glob("*.png"))[:n]:
        ign = root / "ignore" / f.name
        out.append({
            "id": f.stem,
            "image": resize_image(load_grey(f), size),
            "mask": resize_mask(load_grey(root / "masks" / f.name), size),
            "ignore": resize_mask(load_grey(ign), size) if ign.exists() else None,
        })
    return out


def synthetic_rows(n: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img, _ = phantom(size, np.random.default_rng(rng.integers(1 << 62)), bool(i % 2))
        out.append({"id": f"{'PNEUMONIA' if i % 2 else 'NORMAL'}/syn-{i:05d}", "image": img,
                    "label": i % 2})
    return out

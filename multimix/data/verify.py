"""``multimix verify``: prepared datasets checked against their manifests (shard list, sizes,
row counts, sha256, shard files the manifest does not list); the checks themselves are
:func:`multimix.data.dataset.check`, which every reader runs through
:func:`~multimix.data.dataset.open_dataset`.
"""

from __future__ import annotations

import json

from multimix.config import add_config_arguments, load_config
from multimix.data import storage
from multimix.data.dataset import check, read_manifest, shard_entry
from multimix.errors import UserError

__all__ = ["add_shard_info", "run", "add_arguments"]


def add_shard_info(uri: str, storage_cfg=None) -> dict:
    """Write ``shard_info`` for the shards a manifest lists (as they are now) into it; returns
    the manifest. For tests and for upgrading a dataset prepared before ``shard_info``."""
    manifest = read_manifest(uri, storage_cfg)
    fs, root = storage.resolve(uri, storage_cfg)
    manifest["shard_info"] = [shard_entry(fs, f"{root.rstrip('/')}/{rel}", rel)
                              for rel in manifest.get("shards") or []]
    storage.write_text(storage.join(uri, "manifest.json"),
                       json.dumps(manifest, indent=1) + "\n", storage_cfg)
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI: multimix verify


def add_arguments(p) -> None:
    p.add_argument("datasets", nargs="+", metavar="DATASET",
                   help="prepared dataset(s): folder or s3://bucket/prefix")
    add_config_arguments(p, what="storage settings")


def run(args) -> int:
    """Check every dataset (shard list, sizes, row counts, sha256, unlisted shard files); one
    line per problem; exit 1 on any."""
    cfg = load_config(args.config, args.set)
    bad = 0
    for uri in args.datasets:
        try:
            manifest = read_manifest(uri, cfg.storage)
            ds, problems = check(uri, cfg.storage, checksums=True, manifest=manifest,
                                 extra_files=True)
        except UserError as exc:
            ds, problems = None, [str(exc)]
        for line in problems:
            print(f"{line}")
        if problems:
            bad += 1
            continue
        rows = sum(s.rows for s in ds.shards)
        size = sum(s.bytes for s in ds.shards)
        how = ("shards, sizes, row counts and sha256 match the manifest"
               if manifest.get("shard_info") else
               "shards and row counts match the manifest; no checksums recorded (prepared "
               "before shard_info), so the shards' contents cannot be checked")
        print(f"{uri}: ok: {len(ds.shards)} shard(s), {rows} rows, {size / 2**20:.1f} MiB; "
              f"{how}")
    return 1 if bad else 0

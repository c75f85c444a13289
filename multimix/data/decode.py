"""Stored PNG bytes → ``uint8`` arrays (no Ray): the decoding shared by the streaming readers
(:mod:`multimix.data.readers`, inside Ray Data tasks) and the in-memory labeled pools
(:mod:`multimix.data.pools`).

- :func:`binary_cells`: an Arrow binary column → zero-copy views of each stored PNG;
- :func:`decode_rows`: a batch of rows → ``(N, size, size)`` ``uint8`` arrays per column (masks
  binarised to {0, 1}), undecodable rows skipped and reported, never fatal;
- :func:`to_tensor`: ``(N, H, W)`` ``uint8`` → ``(N, 1, H, W)`` torch tensor (DESIGN §3).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from multimix.data.images import decode_png
from multimix.errors import DataError

__all__ = ["binary_cells", "decode_rows", "to_tensor"]


def binary_cells(col) -> list:
    """An Arrow binary column (``Array`` or ``ChunkedArray``) → one value per row: a zero-copy
    ``memoryview`` into the column's data buffer, or ``None`` for a null.

    Stands in for ``col.to_pylist()`` / ``take`` + ``to_pylist`` (both copy every image into a
    new ``bytes``; a chunked ``take`` first concatenates all chunks): the decoder reads the
    stored PNG where Arrow put it. The views keep the Arrow buffers alive. Columns of another
    type (e.g. all-null, binary views) fall back to ``to_pylist()``.
    """
    import pyarrow as pa

    out: list = []
    for arr in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
        t = arr.type
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
            out.extend(arr.to_pylist())
            continue
        n = len(arr)
        if not n:
            continue
        _, offs, data = arr.buffers()[:3]
        width = 8 if pa.types.is_large_binary(t) else 4
        offsets = np.frombuffer(offs, np.int64 if width == 8 else np.int32, count=n + 1,
                                offset=arr.offset * width).tolist()
        mv = memoryview(data if data is not None else b"").cast("B")  # Arrow exports "b"
        cells = [mv[offsets[i]:offsets[i + 1]] for i in range(n)]
        if arr.null_count:
            for i in np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).tolist():
                cells[i] = None
        out.extend(cells)
    return out


def decode_rows(batch: Mapping[str, Any], size: int,
                columns: Sequence[str]) -> tuple[list, dict, list]:
    """Decode the PNG ``columns`` of every row of ``batch`` (``{"id": [...], column: [bytes |
    memoryview | None, ...]}``).

    Returns ``(ids, arrays, skipped)``: the ids of the decoded rows, ``{column: uint8 (N, size,
    size)}`` for them (``mask``/``ignore`` binarised to {0, 1}; a missing or null mask/ignore is
    zeros), and ``[(id, reason), ...]`` of the rows skipped (undecodable, or not ``size``²).
    Pixels go straight from the decoder into preallocated arrays (no per-row lists, no
    ``np.stack``); masks are binarised in place, once per batch.
    """
    ids = [i if isinstance(i, str) else str(i) for i in batch["id"]]
    out = {c: np.empty((len(ids), size, size), np.uint8) for c in columns}
    good_ids: list = []
    skipped: list = []
    k = 0
    for r, rid in enumerate(ids):
        try:
            for c in columns:
                data = batch[c][r] if c in batch else None
                if data is None and c != "image":
                    out[c][k] = 0
                    continue
                a = decode_png(data)
                if a.shape != (size, size):
                    raise DataError(f"image is {a.shape[0]}x{a.shape[1]}, expected {size}x{size}")
                out[c][k] = a
        except Exception as exc:  # noqa: BLE001 - any bad row is skipped, never fatal
            skipped.append((rid, str(exc)[:200]))
            continue
        good_ids.append(rid)
        k += 1
    for c in columns:
        out[c] = out[c][:k]
        if c != "image":
            np.greater(out[c], 127, out=out[c])  # 0/255 → {0, 1}, in place
    return good_ids, out, skipped


def to_tensor(a: np.ndarray):
    """``uint8 (N, H, W)`` → a torch ``uint8 (N, 1, H, W)`` tensor (shares memory when ``a``
    is contiguous)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)

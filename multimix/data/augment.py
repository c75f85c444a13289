"""Weak and strong (FixMatch / RandAugment) augmentation of 8-bit grey images: numpy + Pillow only.

Two implementations of the *same* random transform:

- :func:`paper_apply` / :func:`paper_pair` — the reference: Pillow ops applied one after another,
  as the FixMatch code the paper builds on does (``RandomHorizontalFlip``, ``RandomCrop(pad=12.5%,
  reflect)``, then ``RandAugmentMC(n=2, m=10)``: each of ``n`` ops drawn with replacement from the
  pool, magnitude ``v ~ U{1..m-1}``, applied with probability 1/2; rotate/shear/translate fill
  with grey 128; optional ``CutoutAbs`` with grey 127). Used as the benchmark baseline and as the
  test oracle.
- :class:`Augmenter` — the fast version used by the data pipeline. It does less work:

  * **flip + crop** is an integer-pixel rigid map, so it is a numpy *slice* of the image
    reflect-padded once per source image (shared by its weak and strong view); no resampling.
    The weak view is nothing else.
  * the **geometric** RandAugment ops of a view (rotate, shear-x/y, translate-x/y) are composed
    into ONE 3x3 matrix and applied with ONE Pillow ``Image.transform(AFFINE, NEAREST,
    fillcolor=128)`` on the cropped view (nearest and grey fill as in the paper; composing two
    warps into one differs from warping twice only by nearest-neighbour rounding).
  * the **point** ops (autocontrast, brightness, contrast, equalize, posterize, solarize,
    identity) are composed into ONE 256-entry lookup table. The histogram-dependent ones
    (autocontrast, equalize, contrast's mean) use the histogram of the image *as it is at that
    point of the chain*: the input histogram pushed through the LUT composed so far
    (``bincount(lut, weights=hist)``), so the composed LUT is exact, bit for bit, against the
    sequential Pillow ops.
  * order: the LUT stage and the warp stage are placed in the order in which the first op of each
    kind occurs in the drawn chain (sharpness, a 3x3 spatial filter, is applied at its own place
    when drawn). With the paper's ``n=2`` every chain is therefore executed in its true order:
    the result equals the sequential Pillow pipeline exactly whenever at most one geometric op is
    drawn, and up to nearest-neighbour rounding when both ops are geometric. For ``n>2`` a point
    op drawn between two geometric ops is moved next to the other point ops (documented
    approximation; the LUT is still exact for the image it is applied to).
  * data stay ``uint8`` throughout; random parameters for a whole batch are drawn vectorised.

Randomness is **per sample**: the parameters of a view are a pure function of a 64-bit key per
row (:func:`row_keys` hashes ``(seed, epoch, stream, row id)``), expanded with a counter-based
generator (splitmix64). Results therefore do not depend on batch composition, worker or order.

This module imports nothing from Ray (DESIGN "rule of the house").
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "OPS",
    "POINT_OPS",
    "GEOMETRIC_OPS",
    "ViewParams",
    "Augmenter",
    "row_keys",
    "mix_keys",
    "uniforms",
    "op_value",
    "pad_size",
    "paper_apply",
    "paper_pair",
    "paper_sample",
    "fast_apply",
    "reflect_pad",
    "compose_lut",
    "compose_affine",
]

#: RandAugment pool of the paper (FixMatch's, without colour ops: the images are grey)
OPS = (
    "autocontrast", "brightness", "contrast", "equalize", "identity", "posterize", "rotate",
    "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y",
)
POINT_OPS = frozenset({"autocontrast", "brightness", "contrast", "equalize", "identity",
                       "posterize", "solarize"})
GEOMETRIC_OPS = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})
_HIST_OPS = frozenset({"autocontrast", "equalize", "contrast"})
PARAMETER_MAX = 10
FILL = 128  # rotate / shear / translate fill (FixMatch: (128, 128, 128))
CUTOUT_FILL = 127  # FixMatch CutoutAbs colour
_SIGNED = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})


# ---------------------------------------------------------------------------------------------
# parameters


def pad_size(size: int, pad_fraction: float) -> int:
    """Reflect padding of the random crop, in pixels (FixMatch: ``int(size * 0.125)``)."""
    return int(size * pad_fraction)


def op_value(name: str, v: int, negative: bool, size: int):
    """The op's argument in its own units for magnitude level ``v`` (FixMatch's ``fixmatch_augment_pool``).

    brightness/contrast/sharpness: enhance factor ``v*0.9/10 + 0.05``; posterize: bits
    ``int(v*4/10) + 4``; rotate: degrees ``int(v*30/10)``; shear: ``v*0.3/10``; solarize:
    threshold ``256 - int(v*256/10)``; translate: pixels ``int(±v*0.3/10 * size)``. Signed ops
    are negated when ``negative``. Autocontrast/equalize/identity take no argument (None).
    """
    if name in ("brightness", "contrast", "sharpness"):
        return float(v) * 0.9 / PARAMETER_MAX + 0.05
    if name == "posterize":
        return int(v * 4 / PARAMETER_MAX) + 4
    if name == "solarize":
        return 256 - int(v * 256 / PARAMETER_MAX)
    if name == "rotate":
        deg = int(v * 30 / PARAMETER_MAX)
        return -deg if negative else deg
    if name in ("shear_x", "shear_y"):
        s = float(v) * 0.3 / PARAMETER_MAX
        return -s if negative else s
    if name in ("translate_x", "translate_y"):
        f = float(v) * 0.3 / PARAMETER_MAX
        if negative:
            f = -f
        return int(f * size)
    return None


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view.

    ``flip`` then a crop at offset ``(dy, dx)`` of the reflect-padded (flipped) image, then the
    applied RandAugment ops in order (``(name, value)``, value from :func:`op_value`), then an
    optional cutout box ``(x0, y0, x1, y1)`` (inclusive, as ``ImageDraw.rectangle``).
    """

    flip: bool
    dy: int
    dx: int
    ops: tuple = ()
    cutout: Optional[tuple] = None


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(keys: np.ndarray, k: int) -> np.ndarray:
    """``(N, k)`` float64 uniforms in [0, 1), a pure function of each 64-bit key (counter-based)."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1, 1)
    ctr = (np.arange(1, k + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)).reshape(1, -1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(_splitmix64(keys ^ ctr))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def row_keys(ids: Iterable, seed: int, epoch: int = 0, stream: str = "") -> np.ndarray:
    """One 64-bit key per row: ``blake2b(seed, epoch, stream, id)``. Same id → same key anywhere."""
    prefix = f"{int(seed)}|{int(epoch)}|{stream}|".encode()
    out = []
    for i in ids:
        if isinstance(i, bytes):
            b = i
        else:
            b = str(i).encode()
        out.append(int.from_bytes(hashlib.blake2b(prefix + b, digest_size=8).digest(), "little"))
    return np.array(out, dtype=np.uint64)


def mix_keys(*parts: int) -> int:
    """A 64-bit key from integers (e.g. seed, rank, epoch, step, index) for in-memory pools."""
    h = hashlib.blake2b("|".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


# ---------------------------------------------------------------------------------------------
# point ops as lookup tables (exact replicas of Pillow's, checked by the tests)

_RAMP = Image.frombytes("L", (256, 1), bytes(range(256)))


@lru_cache(maxsize=4096)
def _blend_lut(base: int, factor: float) -> np.ndarray:
    """``Image.blend(const(base), image, factor)`` per grey level: Brightness (base 0), Contrast (base mean)."""
    out = Image.blend(Image.new("L", (256, 1), base), _RAMP, factor)
    a = np.frombuffer(out.tobytes(), dtype=np.uint8).astype(np.intp)
    a.setflags(write=False)
    return a


@lru_cache(maxsize=64)
def _static_lut(name: str, value) -> np.ndarray:
    x = np.arange(256, dtype=np.intp)
    if name == "brightness":
        return _blend_lut(0, value)
    if name == "posterize":
        return x & ~(2 ** (8 - value) - 1)
    if name == "solarize":
        return np.where(x < value, x, 255 - x)
    raise KeyError(name)


def _autocontrast_lut(h: np.ndarray) -> Optional[np.ndarray]:
    nz = np.flatnonzero(h)
    if nz.size == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1])
    if hi <= lo:
        return None
    scale = 255.0 / (hi - lo)
    offset = -lo * scale
    v = np.trunc(np.arange(256, dtype=np.float64) * scale + offset)
    return np.clip(v, 0, 255).astype(np.intp)


def _equalize_lut(h: np.ndarray) -> Optional[np.ndarray]:
    histo = h[h > 0]
    if histo.size <= 1:
        return None
    step = (int(histo.sum()) - int(histo[-1])) // 255
    if not step:
        return None
    n = step // 2 + np.concatenate([[0], np.cumsum(h[:-1], dtype=np.int64)])
    return np.clip(n // step, 0, 255).astype(np.intp)


def _contrast_lut(h: np.ndarray, factor: float) -> np.ndarray:
    count = int(h.sum())
    mean = int((float(np.dot(np.arange(256, dtype=np.int64), h)) / count) + 0.5) if count else 0
    return _blend_lut(mean, factor)


def compose_lut(ops: Sequence[tuple], hist: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """One LUT (``intp[256]``) for a chain of point ops applied to an image whose histogram is
    ``hist`` (needed only for autocontrast/equalize/contrast). None when it is the identity."""
    lut = None
    for name, value in ops:
        if name == "identity":
            continue
        if name in _HIST_OPS:
            h = hist if lut is None else np.bincount(lut, weights=hist, minlength=256).astype(np.int64)
            if name == "autocontrast":
                step = _autocontrast_lut(h)
            elif name == "equalize":
                step = _equalize_lut(h)
            else:
                step = _contrast_lut(h, value)
            if step is None:
                continue
        else:
            step = _static_lut(name, value)
        lut = step if lut is None else step[lut]
    return lut


# ---------------------------------------------------------------------------------------------
# geometric ops as affine matrices (output pixel → source pixel, Pillow's convention)


def _rotate_matrix(angle: float, w: int, h: int) -> np.ndarray:
    """The matrix ``Image.rotate(angle)`` uses (same arithmetic, so the floats are identical)."""
    angle = angle % 360.0
    cx, cy = w / 2, h / 2
    a = -math.radians(angle)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0,
         round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return np.array([m[0:3], m[3:6], [0.0, 0.0, 1.0]])


def _op_matrix(name: str, value, w: int, h: int) -> np.ndarray:
    if name == "rotate":
        return _rotate_matrix(value, w, h)
    m = np.eye(3)
    if name == "shear_x":
        m[0, 1] = value
    elif name == "shear_y":
        m[1, 0] = value
    elif name == "translate_x":
        m[0, 2] = value
    elif name == "translate_y":
        m[1, 2] = value
    return m


def compose_affine(ops: Sequence[tuple], w: int, h: int) -> tuple:
    """Pillow AFFINE coefficients of a chain of geometric ops applied in order."""
    m = None
    for name, value in ops:
        step = _op_matrix(name, value, w, h)
        m = step if m is None else m @ step  # out→src: first op's map applied last
    return tuple(float(x) for x in m[:2].ravel())


def _plan(ops: Sequence[tuple]) -> list:
    """Stages ``[("lut", ops) | ("warp", ops) | ("sharp", factor)]`` (see the module docstring)."""
    stages: list = []
    lut_idx = warp_idx = None
    for name, value in ops:
        if name in POINT_OPS:
            if name == "identity":
                continue
            if lut_idx is None:
                lut_idx = len(stages)
                stages.append(("lut", []))
            stages[lut_idx][1].append((name, value))
        elif name in GEOMETRIC_OPS:
            if warp_idx is None:
                warp_idx = len(stages)
                stages.append(("warp", []))
            stages[warp_idx][1].append((name, value))
        elif name == "sharpness":
            stages.append(("sharp", value))
        else:
            raise ValueError(f"unknown augmentation op {name!r}")
    return stages


def _crop_view(padded: np.ndarray, prm: ViewParams, size_hw: tuple, pad: int) -> np.ndarray:
    """flip + crop of the reflect-padded image as a numpy view (no copy)."""
    h, w = size_hw
    if prm.flip:
        x0 = 2 * pad - prm.dx  # crop(pad(flip(x)), dx) == flip(crop(pad(x), 2p - dx))
        return padded[prm.dy:prm.dy + h, x0:x0 + w][:, ::-1]
    return padded[prm.dy:prm.dy + h, prm.dx:prm.dx + w]


def _smooth(a: np.ndarray) -> np.ndarray:
    """Pillow's ``ImageFilter.SMOOTH`` (3x3 kernel 1,1,1/1,5,1/1,1,1 /13, border pixels kept) in
    integer numpy: bit-identical to Pillow (checked by the tests) and ~3x faster here."""
    x = a.astype(np.uint16)
    s = x[:-2, :-2] + x[:-2, 1:-1]
    s += x[:-2, 2:]
    s += x[1:-1, :-2]
    s += x[1:-1, 2:]
    s += x[2:, :-2]
    s += x[2:, 1:-1]
    s += x[2:, 2:]
    s += x[1:-1, 1:-1] * 5
    out = a.copy()
    out[1:-1, 1:-1] = (2 * s + 13) // 26  # round(s / 13); s/13 is never within float error of .5
    return out


def _sharpness(im: Image.Image, factor: float, a: Optional[np.ndarray] = None) -> Image.Image:
    """``ImageEnhance.Sharpness(im).enhance(factor)``: blend(SMOOTH(im), im, factor).

    ``a``: the pixels of ``im`` as an array when the caller has them (saves a copy)."""
    if a is None:
        a = np.asarray(im)
    degenerate = Image.fromarray(_smooth(a))
    return Image.blend(degenerate, im, factor)


def _wrap(a: np.ndarray) -> Image.Image:
    """Zero-copy Pillow image over a C-contiguous ``uint8 (H, W)`` array."""
    return Image.frombuffer("L", (a.shape[1], a.shape[0]), a, "raw", "L", 0, 1)


class _Padded:
    """A reflect-padded source image in a flat buffer with one row of slack, so that any
    ``(h, w)`` crop of it can be handed to Pillow *without a copy* (a strided mapped image:
    Pillow checks ``offset + stride * h <= len(buffer)``)."""

    __slots__ = ("flat", "array", "stride")

    def __init__(self, hp: int, wp: int):
        self.flat = np.empty(hp * wp + wp, np.uint8)
        self.array = self.flat[: hp * wp].reshape(hp, wp)
        self.stride = wp

    def pil(self, y: int, x: int, h: int, w: int) -> Image.Image:
        """Pillow image over ``array[y:y+h, x:x+w]`` (zero-copy, read-only)."""
        off = y * self.stride + x
        return Image.frombuffer("L", (w, h), self.flat[off:], "raw", "L", self.stride, 1)


def _histogram(im: Image.Image) -> np.ndarray:
    return np.asarray(im.histogram(), dtype=np.int64)


def fast_apply(padded, prm: ViewParams, pad: int, out: np.ndarray) -> None:
    """Render one view from its reflect-padded source into ``out`` ``(H, W) uint8`` (fast path).

    ``padded``: a :class:`_Padded` (zero-copy Pillow crops) or a plain ``uint8`` array.
    The un-flipped crop is never copied before the first op: Pillow reads it in place (a
    strided image) and numpy's ``take`` reads it as a view; a flipped crop is copied once
    (reversed) into ``out``. The histogram of a flipped crop is that of the un-flipped one.
    """
    if not isinstance(padded, _Padded):
        arr = np.asarray(padded, dtype=np.uint8)
        padded = _Padded(*arr.shape)
        padded.array[...] = arr
    h, w = out.shape
    crop = _crop_view(padded.array, prm, (h, w), pad)
    stages = _plan(prm.ops)
    lut = None
    if len(stages) == 1 and stages[0][0] == "lut":
        ops = stages[0][1]
        x_src = 2 * pad - prm.dx if prm.flip else prm.dx  # the un-flipped crop's columns
        hist = (_histogram(padded.pil(prm.dy, x_src, h, w))
                if any(n in _HIST_OPS for n, _ in ops) else None)
        lut = compose_lut(ops, hist)
        stages = []
    if not stages:
        if lut is None:
            out[...] = crop  # flip + crop: one copy, no resampling
        else:
            np.take(lut.astype(np.uint8), crop, out=out)  # LUT straight from the view
    else:
        cur = None  # numpy pixels of `im` when known to be current (a view or `out`)
        if prm.flip:
            out[...] = crop
            im, cur = _wrap(out), out
        else:
            im, cur = padded.pil(prm.dy, prm.dx, h, w), crop
        for kind, payload in stages:
            if kind == "lut":
                hist = (_histogram(im) if any(n in _HIST_OPS for n, _ in payload) else None)
                lut = compose_lut(payload, hist)
                if lut is not None:
                    im, cur = im.point(lut.astype(np.uint8).tobytes()), None
            elif kind == "warp":
                coeffs = compose_affine(payload, w, h)
                im = im.transform((w, h), Image.Transform.AFFINE, coeffs,
                                  Image.Resampling.NEAREST, fillcolor=FILL)
                cur = None
            else:
                im, cur = _sharpness(im, payload, cur), None
        if cur is None:
            out[...] = np.asarray(im)
        elif cur is not out:
            out[...] = cur
    if prm.cutout is not None:
        x0, y0, x1, y1 = prm.cutout
        out[y0:y1 + 1, x0:x1 + 1] = CUTOUT_FILL


def reflect_pad(images: np.ndarray, p: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``np.pad(images, ((0,0),(p,p),(p,p)), mode="reflect")`` with plain slice copies (faster).

    ``out``: a ``uint8 (N, H+2p, W+2p)`` array to write into (returned)."""
    n, h, w = images.shape
    if p == 0 and out is None:
        return images
    if p == 0 or p >= h - 1 or p >= w - 1:  # nothing to reflect, or the slices below would
        # need a stop index of -1 (p = side - 1) or a repeated reflection (p >= side): np.pad
        r = np.pad(images, ((0, 0), (p, p), (p, p)), mode="reflect")
        if out is None:
            return r
        out[...] = r
        return out
    o = np.empty((n, h + 2 * p, w + 2 * p), np.uint8) if out is None else out
    o[:, p:p + h, p:p + w] = images
    o[:, p:p + h, :p] = images[:, :, p:0:-1]
    o[:, p:p + h, p + w:] = images[:, :, w - 2:w - 2 - p:-1]
    o[:, :p] = o[:, 2 * p:p:-1]
    o[:, p + h:] = o[:, p + h - 2:h - 2:-1]
    return o


# ---------------------------------------------------------------------------------------------
# the fast augmenter


@dataclass
class Augmenter:
    """Weak / strong views of batches of ``uint8 (N, H, W)`` images, parameters per sample.

    Args:
        size: image side (square images).
        pad_fraction: random-crop reflect padding as a fraction of ``size``.
        n_ops, magnitude: RandAugment ``n`` and ``m`` (``v ~ U{1..m-1}``, FixMatch's RandAugmentMC).
        cutout: add FixMatch's cutout (a grey square of half the side) to strong views.
    """

    size: int
    pad_fraction: float = 0.125
    n_ops: int = 2
    magnitude: int = 10
    cutout: bool = False
    pad: int = field(init=False)

    def __post_init__(self) -> None:
        self.pad = pad_size(self.size, self.pad_fraction)

    @classmethod
    def from_config(cls, aug_cfg, image_size: int) -> "Augmenter":
        return cls(size=image_size, pad_fraction=aug_cfg.pad_fraction, n_ops=aug_cfg.n_ops,
                   magnitude=aug_cfg.magnitude, cutout=aug_cfg.cutout)

    # -- parameters -------------------------------------------------------------------------

    def sample(self, keys: np.ndarray, strong: bool) -> list[ViewParams]:
        """Parameters of one view per key (vectorised draw; a pure function of each key)."""
        keys = np.asarray(keys, dtype=np.uint64)
        n = len(keys)
        k = 3 + (4 * self.n_ops + 2 if strong else 0)
        u = uniforms(keys, k)
        span = 2 * self.pad + 1
        flip = u[:, 0] < 0.5
        dy = np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
        dx = np.minimum((u[:, 2] * span).astype(np.int64), span - 1)
        if not strong:
            return [ViewParams(f, y, x) for f, y, x in zip(flip.tolist(), dy.tolist(), dx.tolist())]
        m = self.magnitude
        c = 3 + 4 * np.arange(self.n_ops)
        op_idx = np.minimum((u[:, c] * len(OPS)).astype(np.int64), len(OPS) - 1).tolist()
        levels = ((1 + (u[:, c + 1] * (m - 1)).astype(np.int64)) if m > 1
                  else np.full((n, self.n_ops), m)).tolist()
        applied = (u[:, c + 2] < 0.5).tolist()
        negative = (u[:, c + 3] < 0.5).tolist()
        flip, dy, dx = flip.tolist(), dy.tolist(), dx.tolist()
        out = []
        for i in range(n):
            ops = tuple(
                (OPS[o], op_value(OPS[o], v, neg, self.size))
                for o, v, a, neg in zip(op_idx[i], levels[i], applied[i], negative[i]) if a
            )
            cut = None
            if self.cutout:
                cc = 3 + 4 * self.n_ops
                cut = _cutout_box(u[i, cc] * self.size, u[i, cc + 1] * self.size, self.size)
            out.append(ViewParams(flip[i], dy[i], dx[i], ops, cut))
        return out

    # -- rendering --------------------------------------------------------------------------

    def _padded(self, images: np.ndarray) -> np.ndarray:
        return reflect_pad(images, self.pad)

    def apply(self, images: np.ndarray, params: Sequence[ViewParams]) -> np.ndarray:
        """Render one view per image with the given parameters → ``uint8 (N, H, W)``."""
        return self.render(images, params)[0]

    def render(self, images: np.ndarray, *param_lists: Sequence[ViewParams]) -> list[np.ndarray]:
        """Render several views of every image (one list of parameters per view).

        Each source image is reflect-padded once (a small per-image buffer, which stays in
        cache and in the allocator's free lists) and shared by all its views.
        """
        images = _as_batch(images)
        outs = [np.empty_like(images) for _ in param_lists]
        n, h, w = images.shape
        padded = _Padded(h + 2 * self.pad, w + 2 * self.pad)  # reused for every image
        for i in range(n):
            reflect_pad(images[i:i + 1], self.pad, out=padded.array[None])
            for out, params in zip(outs, param_lists):
                fast_apply(padded, params[i], self.pad, out[i])
        return outs

    def weak(self, images: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Flip + reflect-padded random crop (one slice per image)."""
        return self.apply(images, self.sample(keys, strong=False))

    def pair(self, images: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(weak, strong) views of the same images; independent flip/crop, as FixMatch."""
        keys = np.asarray(keys, dtype=np.uint64)
        weak, strong = self.render(images, self.sample(keys, strong=False),
                                   self.strong_params(keys))
        return weak, strong

    def strong_params(self, keys: np.ndarray) -> list[ViewParams]:
        """The strong-view parameters :meth:`pair` uses for these keys (for tests/debugging)."""
        return self.sample(np.asarray(keys, dtype=np.uint64) ^ np.uint64(0x5DEECE66D), True)

    def geometric(self, keys: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
        """The same flip + crop applied to several aligned batches (image, mask, ignore).

        Pure slicing, so masks stay exactly binary (nearest by construction).
        """
        params = self.sample(keys, strong=False)
        return [self.apply(a, params) for a in arrays]


def _as_batch(images: np.ndarray) -> np.ndarray:
    a = np.asarray(images)
    if a.ndim != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (N, H, W), got {a.dtype} {a.shape}")
    return a


def _cutout_box(cx: float, cy: float, size: int) -> tuple:
    """FixMatch ``CutoutAbs`` box for centre (cx, cy): side ``int(size*0.5)``."""
    v = int(size * 0.5)
    x0 = int(max(0, cx - v / 2.0))
    y0 = int(max(0, cy - v / 2.0))
    x1 = int(min(size, x0 + v))
    y1 = int(min(size, y0 + v))
    return (x0, y0, x1, y1)


# ---------------------------------------------------------------------------------------------
# the reference (paper) pipeline: sequential Pillow ops


def _paper_op(img: Image.Image, name: str, value) -> Image.Image:
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(value)
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(value)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "identity":
        return img
    if name == "posterize":
        return ImageOps.posterize(img, value)
    if name == "rotate":
        return img.rotate(value, fillcolor=FILL)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(value)
    if name == "shear_x":
        return img.transform(img.size, Image.Transform.AFFINE, (1, value, 0, 0, 1, 0),
                             fillcolor=FILL)
    if name == "shear_y":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, value, 1, 0),
                             fillcolor=FILL)
    if name == "solarize":
        return ImageOps.solarize(img, value)
    if name == "translate_x":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, value, 0, 1, 0),
                             fillcolor=FILL)
    if name == "translate_y":
        return img.transform(img.size, Image.Transform.AFFINE, (1, 0, 0, 0, 1, value),
                             fillcolor=FILL)
    raise ValueError(f"unknown augmentation op {name!r}")


def paper_apply(image: np.ndarray, prm: ViewParams, pad: int) -> np.ndarray:
    """Reference: the view rendered as FixMatch's torchvision/Pillow pipeline does, op by op.

    ``RandomHorizontalFlip`` (``transpose``), ``RandomCrop(padding=pad, padding_mode="reflect")``
    (``np.pad`` reflect, as torchvision does for PIL images, then ``crop``), the RandAugment ops
    one after another, then cutout (``ImageDraw.rectangle``).
    """
    from PIL import ImageDraw

    img = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = img.size
    if prm.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if pad:
        img = Image.fromarray(np.pad(np.asarray(img), pad, mode="reflect"))
    img = img.crop((prm.dx, prm.dy, prm.dx + w, prm.dy + h))
    for name, value in prm.ops:
        img = _paper_op(img, name, value)
    if prm.cutout is not None:
        img = img.copy()
        ImageDraw.Draw(img).rectangle(prm.cutout, CUTOUT_FILL)
    return np.asarray(img)


def paper_sample(size: int, pad: int, rng: random.Random, strong: bool, n_ops: int = 2,
                 magnitude: int = 10, cutout: bool = False) -> ViewParams:
    """Draw one view's parameters the way FixMatch's code does (python ``random``)."""
    flip = rng.random() < 0.5
    dy = rng.randint(0, 2 * pad)
    dx = rng.randint(0, 2 * pad)
    if not strong:
        return ViewParams(flip, dy, dx)
    ops = []
    for name in rng.choices(OPS, k=n_ops):
        v = rng.randint(1, magnitude - 1) if magnitude > 1 else magnitude
        if rng.random() < 0.5:
            ops.append((name, op_value(name, v, rng.random() < 0.5, size)))
    cut = _cutout_box(rng.uniform(0, size), rng.uniform(0, size), size) if cutout else None
    return ViewParams(flip, dy, dx, tuple(ops), cut)


def paper_pair(image: np.ndarray, rng: random.Random, pad_fraction: float = 0.125,
               n_ops: int = 2, magnitude: int = 10, cutout: bool = False):
    """The paper's per-image weak + strong views (benchmark baseline): draw, then sequential ops."""
    size = image.shape[0]
    pad = pad_size(size, pad_fraction)
    weak = paper_apply(image, paper_sample(size, pad, rng, False), pad)
    strong = paper_apply(image, paper_sample(size, pad, rng, True, n_ops, magnitude, cutout), pad)
    return weak, strong

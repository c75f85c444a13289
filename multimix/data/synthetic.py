"""Synthetic chest-radiograph phantoms for the built-in demo (``multimix prepare --demo``).

**Synthetic, not medical data.** Each phantom is a dark background, a bright body ellipse with a
spine band and faint ribs, and two darker lung fields (tapered ellipses with random size,
position and tilt; the heart cuts a notch into the left lung). ``PNEUMONIA`` phantoms carry 1-3
bright, soft opacities inside the lungs; ``NORMAL`` ones do not. Segmentation phantoms come with
the lung mask. Intensity gain/offset, noise and blur vary per image, so a model has to learn the
shapes (lungs) and the in-lung brightness (opacity), not a fixed pixel value.

Everything is a pure function of ``(seed, task, index)``: the same seed gives the same images on
any machine, and image *i* does not depend on how many images are generated.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SOURCE_NAME", "CLASSES", "phantom", "make_demo"]

SOURCE_NAME = "synthetic-demo"
#: same order as Kermany's class folders: index 0 = NORMAL, 1 = PNEUMONIA
CLASSES = ("NORMAL", "PNEUMONIA")

_TASK_CODE = {"cls": 1, "seg": 2}


def _blur(a: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1]/4 blur applied ``passes`` times (edge-replicated), float32."""
    for _ in range(passes):
        p = np.pad(a, 1, mode="edge")
        a = (p[:-2, 1:-1] + 2 * p[1:-1, 1:-1] + p[2:, 1:-1]) / 4
        p = np.pad(a, 1, mode="edge")
        a = (p[1:-1, :-2] + 2 * p[1:-1, 1:-1] + p[1:-1, 2:]) / 4
    return a


def _lung(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float,
          tilt: float) -> np.ndarray:
    """Boolean lung field: an ellipse narrowed towards its apex (top)."""
    c, s = np.cos(tilt), np.sin(tilt)
    u, v = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    t = np.clip((v + ry) / (2 * ry), 0.0, 1.0)  # 0 at the apex, 1 at the base
    rx_eff = rx * (0.45 + 0.55 * np.sqrt(t))
    return (u / rx_eff) ** 2 + (v / ry) ** 2 < 1.0


def phantom(size: int, rng: np.random.Generator, opacity: bool) -> tuple[np.ndarray, np.ndarray]:
    """One phantom.

    Args:
        size: side in pixels.
        rng: the image's own generator.
        opacity: add pneumonia-like opacities inside the lungs.

    Returns:
        ``(image uint8 (size, size), lung mask uint8 (size, size) in {0, 1})``.
    """
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(lin, lin, indexing="ij")
    bg = rng.uniform(5, 30)
    body_level = rng.uniform(140, 180)
    img = np.full((size, size), bg, np.float32)

    # body, spine, ribs
    bx, by = rng.uniform(0.78, 0.92), rng.uniform(0.95, 1.1)
    body = (x / bx) ** 2 + ((y - 0.1) / by) ** 2 < 1
    img[body] = body_level
    spine = np.exp(-((x - rng.normal(0, 0.02)) / 0.07) ** 2) * rng.uniform(25, 45)
    img += spine * body
    freq, phase = rng.uniform(5.5, 7.5), rng.uniform(0, 2 * np.pi)
    ribs = np.maximum(0, np.sin(2 * np.pi * (y * freq / 2 + 0.6 * x ** 2) + phase)) ** 4
    img += ribs * rng.uniform(8, 18) * body

    # lungs (patient's right = image left), heart notch in the image-right lung
    sep = rng.uniform(0.33, 0.43)
    cy = rng.uniform(-0.15, 0.02)
    right = _lung(x, y, -sep + rng.normal(0, 0.02), cy + rng.normal(0, 0.03),
                  rng.uniform(0.22, 0.29), rng.uniform(0.48, 0.6), rng.normal(0, 0.08))
    left = _lung(x, y, sep + rng.normal(0, 0.02), cy + rng.normal(0, 0.03),
                 rng.uniform(0.2, 0.27), rng.uniform(0.45, 0.57), rng.normal(0, 0.08))
    heart = ((x - rng.uniform(0.08, 0.18)) / rng.uniform(0.22, 0.3)) ** 2 + (
        (y - rng.uniform(0.2, 0.32)) / rng.uniform(0.18, 0.24)) ** 2 < 1
    lungs = (right | left) & ~heart & body
    lung_soft = _blur(lungs.astype(np.float32), 2)
    img -= lung_soft * rng.uniform(80, 110)
    # lung texture (vessels): low-frequency noise, both classes
    tex = _blur(rng.normal(0, 1, (size, size)).astype(np.float32), 3)
    img += lung_soft * tex * rng.uniform(10, 20)

    if opacity:
        ys, xs = np.nonzero(lungs)
        if len(ys):
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(len(ys)))
                oy, ox = lin[ys[k]], lin[xs[k]]
                sig = rng.uniform(0.1, 0.18)
                blob = np.exp(-((x - ox) ** 2 + (y - oy) ** 2) / (2 * sig ** 2))
                img += blob * lung_soft * rng.uniform(55, 90)

    gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-10, 10)
    img = img * gain + offset
    img = _blur(img, int(rng.integers(0, 2)))
    img += rng.normal(0, rng.uniform(2, 6), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lungs.astype(np.uint8)


def make_demo(n_cls: int, n_seg: int, size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The demo records.

    Returns:
        ``(cls_records, seg_records)``. A cls record is ``{"id": "NORMAL/cls-00000", "image":
        uint8 (size, size), "label": 0|1}`` (classes alternate, so the set is balanced); a seg
        record is ``{"id": "seg-00000", "image": uint8 (size, size), "mask": uint8 (size, size)
        in {0, 1}}`` (half of them with opacities, which the mask does not exclude).
    """
    if n_cls < 0 or n_seg < 0 or size < 8:
        raise ValueError(f"make_demo: need n_cls, n_seg >= 0 and size >= 8, got "
                         f"{n_cls}, {n_seg}, {size}")
    cls_records = []
    for i in range(n_cls):
        label = i % 2
        rng = np.random.default_rng([seed, _TASK_CODE["cls"], i])
        img, _ = phantom(size, rng, opacity=bool(label))
        cls_records.append({"id": f"{CLASSES[label]}/cls-{i:05d}", "image": img, "label": label})
    seg_records = []
    for i in range(n_seg):
        rng = np.random.default_rng([seed, _TASK_CODE["seg"], i])
        img, mask = phantom(size, rng, opacity=bool(i % 2))
        seg_records.append({"id": f"seg-{i:05d}", "image": img, "mask": mask, "label": None})
    cls_records.sort(key=lambda r: r["id"])
    return cls_records, seg_records

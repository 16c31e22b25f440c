"""Folders of small real-looking pictures (shapes on noisy backgrounds), made from a seed: a data
set of one's own to try data=imagefolder, fine-tuning and task=predict on, and the tests' data.

    python scripts/make_shape_folders.py demo      # demo/pretrain, demo/own (imbalanced)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def shape_image(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A small real-looking picture: one shape of a random colour, place and size on a noisy
    background of another colour (uint8 HxWx3)."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    background = rng.uniform(0, 120, 3)
    image = background + rng.normal(0, 18, (size, size, 3))
    r = rng.uniform(0.22, 0.34) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    mask = {
        "circle": dy**2 + dx**2 < r**2,
        "square": (dy < r * 0.85) & (dx < r * 0.85),
        "triangle": (yy - cy < r) & (yy - cy > -r) & (dx < (yy - cy + r) / 2),
        "cross": ((dy < r / 3.5) & (dx < r)) | ((dx < r / 3.5) & (dy < r)),
        "ring": (dy**2 + dx**2 < r**2) & (dy**2 + dx**2 > (0.6 * r) ** 2),
        "bar": (dy < r / 4) & (dx < r),
    }[kind]
    image[mask] = rng.uniform(140, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_shape_folders(
    root: Path, counts: dict[str, int], seed: int = 0, size: int = 32, formats: bool = True
) -> Path:
    """root/<shape>/<i>.png|jpg: counts[shape] pictures of each shape; with `formats`, a mix of
    PNG and JPEG, RGB, grayscale (L) and RGBA images, as one's own folders have."""
    rng = np.random.default_rng(seed)
    for kind, n in counts.items():
        folder = root / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            picture = Image.fromarray(shape_image(kind, rng, size))
            if formats and i % 5 == 3:
                picture = picture.convert("L")
            elif formats and i % 5 == 4:
                picture = picture.convert("RGBA")
            name = f"{kind}_{i:03d}." + ("jpg" if formats and i % 2 and i % 5 != 4 else "png")
            picture.save(folder / name, quality=95) if name.endswith("jpg") else picture.save(
                folder / name
            )
    return root

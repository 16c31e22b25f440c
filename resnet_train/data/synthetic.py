"""Random images and labels made from the seed, for smoke runs and tests.

Each class has its own random low-frequency template, and every image is its class's template
plus noise, so a model can learn something in one epoch and a falling loss means the loop works.
"""

from __future__ import annotations

import numpy as np


def make_synthetic(
    num_images: int, num_classes: int, image_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, H, W, 3) and labels as int64 (N,), balanced over classes."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 4, 4, 3))
    scale = -(-image_size // 4)
    templates = coarse.repeat(scale, axis=1).repeat(scale, axis=2)[:, :image_size, :image_size]
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    # made a chunk at a time (the same draws as at once): the float64 noise of a whole set took
    # 24 times its size in memory
    for start in range(0, num_images, CHUNK_IMAGES):
        part = labels[start : start + CHUNK_IMAGES]
        noise = rng.normal(0, 48, size=(len(part), image_size, image_size, 3))
        images[start : start + len(part)] = np.clip(templates[part] + noise, 0, 255)
    return images, labels


CHUNK_IMAGES = 1024

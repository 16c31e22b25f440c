"""Seeded, stratified index splits: the validation set and quick-run subsets."""

from __future__ import annotations

import numpy as np


def stratified_split(
    labels: np.ndarray, valid_ratio: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, valid): round(valid_ratio * n_c) images of each class c go to
    valid, the rest to train. Disjoint, covering, and the same for the same labels and seed."""
    labels = np.asarray(labels)
    if not 0 <= valid_ratio < 1:
        raise ValueError(f"valid_ratio={valid_ratio!r} is invalid: must be in [0, 1)")
    rng = np.random.default_rng(seed)
    train_parts, valid_parts = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_valid = int(round(valid_ratio * len(idx)))
        valid_parts.append(idx[:n_valid])
        train_parts.append(idx[n_valid:])
    train = np.sort(np.concatenate(train_parts)) if train_parts else np.empty(0, dtype=np.int64)
    valid = np.sort(np.concatenate(valid_parts)) if valid_parts else np.empty(0, dtype=np.int64)
    return train, valid


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices drawn per class in proportion to the class counts (all when size >= n)."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    _, chosen = stratified_split(labels, size / n, seed)
    return chosen

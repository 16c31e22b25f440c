"""Seeded, stratified index splits: the validation set and quick-run subsets."""

from __future__ import annotations

import math

import numpy as np


def allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """`total` items shared among classes of these sizes in proportion to them, by the largest
    remainder method: each class gets the floor of its quota, and the items left go to the
    largest fractional parts (ties to the lower class). The shares add up to `total` exactly,
    where rounding each quota alone does not (5 of 10 classes of 4 images: round(0.5) = 0 each)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if not 0 <= total <= n:
        raise ValueError(f"cannot take {total} of {n} items")
    if n == 0:
        return np.zeros_like(counts)
    quotas = counts * (total / n)
    shares = np.minimum(np.floor(quotas).astype(np.int64), counts)
    left = total - int(shares.sum())
    order = np.argsort(-(quotas - shares), kind="stable")  # largest remainder first
    for c in order:
        if left == 0:
            break
        if shares[c] < counts[c]:
            shares[c] += 1
            left -= 1
    return shares


def valid_count(n: int, valid_ratio: float) -> int:
    """How many of n images the validation set takes: valid_ratio * n rounded half up."""
    return min(int(math.floor(valid_ratio * n + 0.5)), n)


def stratified_take(labels: np.ndarray, total: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (taken, rest): exactly `total` taken, shared among the classes in
    proportion to their sizes, each class's share drawn at random. Disjoint, covering, and the
    same for the same labels and seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    shares = allocate(counts, total)
    taken_parts, rest_parts = [], []
    for c, share in zip(classes, shares, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        taken_parts.append(idx[:share])
        rest_parts.append(idx[share:])
    empty = np.empty(0, dtype=np.int64)
    taken = np.sort(np.concatenate(taken_parts)) if taken_parts else empty
    rest = np.sort(np.concatenate(rest_parts)) if rest_parts else empty
    return taken, rest


def stratified_split(
    labels: np.ndarray, valid_ratio: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, valid): valid_count(n, valid_ratio) images go to valid, shared
    among the classes by their sizes. Disjoint, covering, and the same for the same labels and
    seed."""
    if not 0 <= valid_ratio < 1:
        raise ValueError(f"valid_ratio={valid_ratio!r} is invalid: must be in [0, 1)")
    valid, train = stratified_take(labels, valid_count(len(labels), valid_ratio), seed)
    return train, valid


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Exactly `size` indices (all when size >= n), shared among the classes by their sizes."""
    n = len(labels)
    if size >= n:
        return np.arange(n)
    chosen, _ = stratified_take(labels, size, seed)
    return chosen

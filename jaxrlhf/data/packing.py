"""First-fit-decreasing packing of examples into fixed-capacity rows (SFT and preference packing)."""

from __future__ import annotations

import numpy as np


def pack_first_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Packs ``order`` (example indices) into bins of at most ``capacity`` tokens.

    First-fit decreasing: longest first, each into the first open bin with room. Returns a list
    of bins, each a list of example indices in packing order.
    """
    order = np.asarray(order, np.int64)
    if len(order) and int(lengths[order].max()) > capacity:
        i = int(order[np.argmax(lengths[order])])
        raise ValueError(f"example {i} has {int(lengths[i])} tokens > packing capacity {capacity}")
    bins: list[list[int]] = []
    room = np.zeros(len(order), np.int64)  # room left in each open bin (at most one bin per item)
    for i in order[np.lexsort((order, -lengths[order]))].tolist():
        n = int(lengths[i])
        fits = np.flatnonzero(room[: len(bins)] >= n)
        if len(fits):
            b = int(fits[0])
            bins[b].append(i)
        else:
            b = len(bins)
            bins.append([i])
            room[b] = capacity
        room[b] -= n
    return bins

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


def row_buckets(max_rows: int, unit: int, count: int) -> list[int]:
    """The fixed set of packed row counts a run uses: ``count`` evenly spaced multiples of ``g``.

    ``g = round_up(ceil(max_rows / count), unit)``, so every bucket is a multiple of ``unit`` (the
    micro-batch count and the mesh's batch-axis size) and the largest, ``count * g``, holds
    ``max_rows`` (a batch's most rows: every sequence alone in its row). ``count = 0``: no buckets
    (every multiple of ``unit`` up to ``max_rows``, i.e. exact row counts).

    Measured on 994 UltraFeedback pairs (Qwen2.5 tokenizer, 3 shuffled epochs, batches of 8-64 pairs,
    rows of 512-1024 tokens): exact row counts give 8-37 shapes per run; ``count = 4`` gives at most 4
    for 10-28 % more rows than exact (``count = 8``: at most 8 shapes, 4-16 % more rows).
    """
    unit = max(1, int(unit))
    top = -(-int(max_rows) // unit) * unit
    if count <= 0:
        return list(range(unit, top + 1, unit))
    per = -(-top // int(count))
    g = -(-per // unit) * unit
    return [g * k for k in range(1, int(count) + 1) if g * (k - 1) < top]


def bucket_rows(needed: int, buckets: list[int]) -> int:
    """The smallest bucket ``>= needed``; raises naming both when none holds it."""
    for b in buckets:
        if b >= needed:
            return b
    raise ValueError(f"a packed batch needs {needed} rows, more than the largest row bucket {buckets[-1]}")


def pad_packed_rows(batch: dict[str, np.ndarray], rows: int, micro_batches: int, pad_id: int) -> dict:
    """A packed preference batch (``PreferenceDataset.collate_packed``) grown to ``rows`` rows.

    The new rows are empty (``pad_id`` ids, every mask and segment id 0), so no loss or count
    changes. Rows are interleaved by micro-batch (row ``r`` belongs to micro-batch
    ``r % micro_batches``), so appending ``rows - R`` rows (a multiple of ``micro_batches``) gives
    each micro-batch the same number of new rows at its end and keeps every segment's index
    ``l * T + s - 1``; only the index of a padding pair (``per_mb_rows * T``, the ``segment_sums``
    slot outside every segment) moves to the new ``per_mb_rows' * T``.
    """
    R, T = batch["input_ids"].shape
    if rows == R:
        return batch
    if rows < R or (rows - R) % micro_batches:
        raise ValueError(f"cannot grow {R} packed rows to {rows} in {micro_batches} micro-batches")
    out = dict(batch)
    for k, v in batch.items():
        if v.ndim == 2:
            fill = pad_id if k.endswith("input_ids") else 0
            out[k] = np.concatenate([v, np.full((rows - R, T), fill, v.dtype)])
    old, new = (R // micro_batches) * T, (rows // micro_batches) * T
    for k in ("chosen_index", "rejected_index"):
        out[k] = np.where(batch[k] == old, new, batch[k]).astype(batch[k].dtype)
    return out

"""Deterministic, resumable, multi-host batch iteration with length bucketing or packing.

Every process holds the whole tokenized dataset (token lists are small) and computes the same
epoch plan from ``(seed, epoch)``; it then collates only its own contiguous block of rows
``[process_index * B / P, (process_index + 1) * B / P)`` of each global batch. The padded length
``T`` is computed from the *global* batch, so all processes produce the same shapes.

The plan of an epoch (shuffle from ``seed + epoch``):

- plain: a permutation of the examples cut into global batches;
- ``bucket``: the permutation is cut into windows of ``bucket_window`` batches, each window is
  sorted by length and cut into batches, and the batch order is shuffled, so each batch holds
  examples of similar length;
- ``packing``, SFT: windows of the permutation are packed first-fit-decreasing into rows of
  ``max_length`` tokens (segment ids 1, 2, ...; positions restart per segment) and the packed rows
  are shuffled and cut into global batches.
- ``packing``, preference pairs: batches are planned as without packing (``global_batch_size``
  pairs, plain or bucketed), then the ``2 B`` sequences of each batch are packed into rows of
  ``max_length`` (``PreferenceDataset.collate_packed``): the same pairs per step, far less padding;
  the row count is rounded up to one of ``packed_row_buckets`` fixed counts
  (``jaxrlhf.data.packing.row_buckets``; empty rows pad), so a run compiles at most that many
  shapes instead of one per distinct row count.

The rows that do not fill a last global batch are left out of that epoch (``drop_remainder``; the
next epoch reshuffles) unless ``drop_remainder=False``, which fills the last batch with
all-padding rows (all masks 0) instead.
"""

from __future__ import annotations

import numpy as np

from jaxrlhf.data.packing import bucket_rows, pack_first_fit, pad_packed_rows, row_buckets
from jaxrlhf.data.sources import option
from jaxrlhf.data.tokenize import PromptDataset, SFTDataset, TokenizedDataset

_STATE_VERSION = 1


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class BatchIterator:
    """Infinite (``repeat=True``) iterator over this process's slice of each global batch.

    Args:
      dataset: an ``SFTDataset``, ``PreferenceDataset`` or ``PromptDataset``.
      global_batch_size: rows per global batch (packed rows when packing), divisible by
        ``process_count``.
      seed: shuffling seed; epoch ``e`` uses ``rng([seed, e])``.
      shuffle: shuffle examples (and batch order) every epoch.
      bucket: length-bucketed batches (see module docstring).
      packing: pack SFT examples, or each batch's preference sequences, into rows of
        ``dataset.max_length`` (adds ``segment_ids``; see the module docstring).
        ``seed``, ``shuffle``, ``bucket`` and ``packing`` default to ``config.data``'s values (kept
        by ``build_dataset`` in ``dataset.iterator_defaults``).
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.
      pad_id: padding id for ``input_ids`` (default ``dataset.pad_id``).
      padding_side: ``"right"`` (default) or ``"left"`` for sequence batches; prompt batches are
        always left-padded.
      pad_to_multiple_of: ``T`` is the longest sequence of the global batch rounded up to this
        multiple (capped at the dataset's maximum), giving a small set of shapes to compile.
      fixed_length: pad every batch to the maximum (``max_length``, or ``max_prompt_length`` for
        prompts): one shape, one compile. Packed batches are always fixed-length.
      bucket_window: batches per bucketing/packing window.
      micro_batches: packed preference batches: micro-batches the train step splits a batch into
        (each is packed on its own, so no pair spans two micro-batches).
      row_multiple: packed preference batches: the row count is a multiple of this (the mesh's
        batch-axis size) and of ``process_count``.
      packed_row_buckets: packed preference batches: the row count is rounded up to one of this
        many evenly spaced counts (``row_buckets``; ``config.data.packed_row_buckets``); 0: the
        exact count each batch needs (one compile per distinct count).
      repeat: loop over epochs forever; ``False`` stops after one epoch (evaluation).
      drop_remainder: leave out the rows of a last partial batch (else pad it with empty rows).

    Attributes:
      last_padding_fraction: padding share of the last global batch's ``B * T`` token slots (both
        halves for preference batches).
      last_num_rows: real (non-padding) rows in the last local batch.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        global_batch_size: int,
        *,
        seed: int | None = None,
        shuffle: bool | None = None,
        bucket: bool | None = None,
        packing: bool | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        pad_id: int | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int = 64,
        fixed_length: bool = False,
        bucket_window: int = 8,
        repeat: bool = True,
        drop_remainder: bool = True,
        micro_batches: int = 1,
        row_multiple: int = 1,
        packed_row_buckets: int | None = None,
    ):
        given = dict(seed=seed, shuffle=shuffle, bucket=bucket, packing=packing)
        fallback = dict(seed=0, shuffle=True, bucket=False, packing=False)
        opts = {
            k: v if v is not None else dataset.iterator_defaults.get(k, fallback[k]) for k, v in given.items()
        }
        seed, shuffle, bucket, packing = opts["seed"], opts["shuffle"], opts["bucket"], opts["packing"]
        if packed_row_buckets is None:
            packed_row_buckets = dataset.iterator_defaults.get("packed_row_buckets", 4)
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        B = int(global_batch_size)
        if B < 1 or B % process_count:
            raise ValueError(
                f"global_batch_size={B} must be positive and divisible by process_count={process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if packing and not (isinstance(dataset, SFTDataset) or dataset.kind == "preference"):
            raise ValueError(f"packing is supported for SFT and preference datasets, not {dataset.kind!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(dataset, PromptDataset):
            padding_side = "left"
        self.dataset = dataset
        self.global_batch_size = B
        self.seed, self.shuffle, self.bucket, self.packing = (
            int(seed),
            bool(shuffle),
            bool(bucket),
            bool(packing),
        )
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = B // process_count
        self.pad_id = dataset.pad_id if pad_id is None else int(pad_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.fixed_length = bool(fixed_length) or self.packing
        self.pack_pairs = self.packing and dataset.kind == "preference"  # packed per batch
        self.pack_sft = self.packing and not self.pack_pairs  # packed in the epoch plan
        self.micro_batches = int(micro_batches)
        self.row_multiple = int(np.lcm(max(1, int(row_multiple)), self.process_count))
        if self.pack_pairs and B % self.micro_batches:
            raise ValueError(f"global_batch_size={B} not divisible by micro_batches={self.micro_batches}")
        unit = int(np.lcm(self.micro_batches, self.row_multiple))
        self.row_buckets = row_buckets(2 * B, unit, int(packed_row_buckets)) if self.pack_pairs else []
        self.bucket_window = int(bucket_window)
        self.repeat, self.drop_remainder = bool(repeat), bool(drop_remainder)
        self.max_len = dataset.max_prompt_length if isinstance(dataset, PromptDataset) else dataset.max_length
        self.epoch, self.position = 0, 0
        self._plan_epoch: int | None = None
        self._plan: list = []
        self.last_padding_fraction = 0.0
        self.last_num_rows = 0
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset of {len(dataset)} examples gives no full global batch of {B} rows"
                + (" (packed)" if packing else "")
            )

    @classmethod
    def from_config(cls, dataset, data_cfg, global_batch_size: int, **kwargs) -> BatchIterator:
        """Reads ``seed``, ``shuffle``, ``bucket``, ``packing`` and ``packed_row_buckets`` from
        ``config.data``."""
        kw = {k: option(data_cfg, k) for k in ("seed", "shuffle", "bucket", "packing", "packed_row_buckets")}
        kw.update(kwargs)
        return cls(dataset, global_batch_size, **kw)

    @property
    def padding_fraction(self) -> float:
        """Alias of ``last_padding_fraction``."""
        return self.last_padding_fraction

    # -- plan ------------------------------------------------------------------------------

    def _epoch_plan(self, epoch: int) -> list:
        """Global batches of epoch ``epoch``: lists of example indices, or of bins when packing."""
        if self._plan_epoch == epoch:
            return self._plan
        n, B = len(self.dataset), self.global_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        lengths = self.dataset.lengths
        if self.pack_sft:
            window = max(B, self.bucket_window * B)
            bins = []
            for s in range(0, n, window):
                bins += pack_first_fit(lengths, order[s : s + window], self.max_len)
            if self.shuffle:
                bins = [bins[j] for j in rng.permutation(len(bins))]
            units = bins
        elif self.bucket:
            usable = order[: (n // B) * B] if self.drop_remainder else order
            window = self.bucket_window * B
            units = []
            for s in range(0, len(usable), window):
                chunk = usable[s : s + window]
                units += chunk[np.argsort(lengths[chunk], kind="stable")].tolist()
            units = [int(i) for i in units]
        else:
            units = order.tolist()
        batches = [units[s : s + B] for s in range(0, len(units), B)]
        if batches and len(batches[-1]) < B:
            if self.drop_remainder:
                batches.pop()
            else:
                batches[-1] = batches[-1] + [[] if self.pack_sft else -1] * (B - len(batches[-1]))
        if self.bucket and self.shuffle and not self.pack_sft:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the same for every epoch unless packing)."""
        return len(self._epoch_plan(self.epoch))

    # -- state -----------------------------------------------------------------------------

    def get_state(self) -> dict:
        """A small JSON-able dict; ``set_state`` on a fresh iterator resumes the same stream."""
        return {
            "version": _STATE_VERSION,
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": self.seed,
            "num_examples": len(self.dataset),
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "bucket": self.bucket,
            "packing": self.packing,
        }

    def set_state(self, state: dict) -> None:
        """Restores ``get_state()``; raises naming any field that does not match this iterator."""
        mine = self.get_state()
        for key in ("version", "seed", "num_examples", "global_batch_size", "shuffle", "bucket", "packing"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"data iterator state mismatch on {key!r}: checkpoint has {state[key]!r}, "
                    f"this run has {mine[key]!r}; the resumed stream would differ"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    # -- iteration -------------------------------------------------------------------------

    def __iter__(self):
        return self

    def _seq_len(self, global_units: list) -> tuple[int, int]:
        """(T, real tokens of the global batch)."""
        ds = self.dataset
        if self.pack_sft:
            return self.max_len, int(sum(ds.lengths[i] for b in global_units for i in b))
        idx = np.asarray([i for i in global_units if i >= 0], np.int64)
        longest = int(ds.lengths[idx].max()) if len(idx) else 1
        if self.fixed_length:
            T = self.max_len
        else:
            T = min(_round_up(longest, self.pad_to_multiple_of), max(self.max_len, longest))
        if hasattr(ds, "chosen_lengths"):
            real = int(ds.chosen_lengths[idx].sum() + ds.rejected_lengths[idx].sum()) // 2
        else:
            real = int(ds.lengths[idx].sum())
        return T, real

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._epoch_plan(self.epoch)
        if self.position >= len(plan):
            if not self.repeat:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
            plan = self._epoch_plan(self.epoch)
        units = plan[self.position]
        self.position += 1
        T, real = self._seq_len(units)
        self.last_padding_fraction = 1.0 - real / float(self.global_batch_size * T)
        lo = self.process_index * self.local_batch_size
        local = units[lo : lo + self.local_batch_size]
        if self.pack_pairs:  # packed over the global batch, then this process's rows and pairs
            out = self.dataset.collate_packed(units, T, self.pad_id, self.micro_batches, self.row_multiple)
            rows = bucket_rows(out["input_ids"].shape[0], self.row_buckets)
            out = pad_packed_rows(out, rows, self.micro_batches, self.pad_id)
            rows = out["input_ids"].shape[0] // self.process_count
            self.last_padding_fraction = 1.0 - out["attention_mask"].sum() / float(out["attention_mask"].size)
            self.last_num_rows = sum(1 for i in local if i >= 0)
            sl = lambda x, n: x[self.process_index * n : (self.process_index + 1) * n]
            return {k: sl(v, rows) if v.ndim == 2 else sl(v, self.local_batch_size) for k, v in out.items()}
        if self.pack_sft:
            self.last_num_rows = sum(1 for b in local if b)
            return self.dataset.collate_packed(local, T, self.pad_id)
        self.last_num_rows = sum(1 for i in local if i >= 0)
        return self.dataset.collate(local, T, self.pad_id, self.padding_side)

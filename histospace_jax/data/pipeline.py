"""Grain input pipelines over tile stores and feature caches.

A source is a random-access view of chosen rows of a store (or of any arrays): element i is a dict with the
requested columns of row `rows[i]`, plus 'index' (the row in the store) and 'patient_idx'. Loaders add
per-epoch shuffling, batching and sharding by JAX process; their iterator state can be saved and restored
(see checkpointing.py), so a resumed job continues with exactly the next batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import grain
import jax
import numpy as np

from histospace_jax.data.store import normalise_location, open_store
from histospace_jax.distributed import ProcessSliceSampler


class LazyStoreColumn:
    """`tiles` or `expression` of a store, opened on first access in each process.

    Grain worker processes receive a pickled copy; opening there (rather than pickling a TensorStore handle)
    keeps workers independent. A URL store is read from the URL by every worker, except `memory://`, whose data
    exists only in the process that wrote it (use worker_count=0 with it).
    """

    def __init__(self, store_path: str, column: str):
        self.store_path = normalise_location(store_path)
        self.column = column
        self._view = None

    def _get(self):
        if self._view is None:
            self._view = getattr(open_store(self.store_path), self.column)
        return self._view

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self):
        return len(self._get())

    def __getstate__(self):
        return {"store_path": self.store_path, "column": self.column, "_view": None}


class ArraySource:
    """Random-access source over `rows` of equal-length columns (numpy arrays or lazy store columns)."""

    def __init__(self, columns: Mapping[str, Any], rows: Sequence[int] | None = None,
                 patient_idx: np.ndarray | None = None):
        self.columns = dict(columns)
        n = len(next(iter(self.columns.values())))
        self.rows = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        self.patient_idx = None if patient_idx is None else np.asarray(patient_idx, np.int32)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        out = {name: np.asarray(col[row]) for name, col in self.columns.items()}
        out["index"] = np.int64(row)
        if self.patient_idx is not None:
            out["patient_idx"] = np.int32(self.patient_idx[row])
        return out

    def __repr__(self) -> str:
        return f"ArraySource(columns={list(self.columns)}, n={len(self)})"


def patient_indices(store) -> tuple[list[str], np.ndarray]:
    """Patients in order of first appearance and each spot's index into that list."""
    patients = store.patients
    lookup = {p: i for i, p in enumerate(patients)}
    return patients, np.array([lookup[p] for p in store.obs["patient"]], np.int32)


def train_loader(source, *, global_batch_size: int, seed: int, num_epochs: int | None = None,
                 worker_count: int = 0, shard_by_process: bool = True) -> grain.DataLoader:
    """Shuffled (new order every epoch), batched, drop-remainder loader. Each process gets its shard and
    batches of global_batch_size / process_count rows."""
    per_process = global_batch_size // jax.process_count()
    if per_process * jax.process_count() != global_batch_size:
        raise ValueError(f"global batch {global_batch_size} does not split over {jax.process_count()} processes")
    sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=num_epochs, seed=seed)
    if shard_by_process and jax.process_count() > 1:
        # Process p reads rows [p*b, (p+1)*b) of every global batch of the single-process stream, so N
        # processes train on exactly the batches one process would (see distributed.ProcessSliceSampler).
        sampler = ProcessSliceSampler(sampler, global_batch_size, jax.process_index(), jax.process_count())
    return grain.DataLoader(data_source=source, sampler=sampler,
                            operations=[grain.transforms.Batch(per_process, drop_remainder=True)],
                            worker_count=worker_count, shard_options=grain.sharding.NoSharding())


def ordered_batches(source, batch_size: int, pad_to_multiple: int = 1):
    """Every element once, in order, in batches of `batch_size`; the last batch is padded to a multiple of
    `pad_to_multiple` rows with 'mask' = 0 on the padding (every batch carries 'mask')."""
    n = len(source)
    for start in range(0, n, batch_size):
        items = [source[i] for i in range(start, min(n, start + batch_size))]
        batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
        yield pad_batch(batch, -(-len(items) // pad_to_multiple) * pad_to_multiple)


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict:
    """Pads every array to `size` rows (repeating row 0) and adds a float 'mask' (1 real, 0 padding)."""
    n = len(next(iter(batch.values())))
    out = {}
    for k, v in batch.items():
        if k == "mask":
            continue
        pad = np.repeat(v[:1], size - n, axis=0) if size > n else v[:0]
        out[k] = np.concatenate([v, pad], axis=0)
    mask = np.zeros(size, np.float32)
    mask[:n] = batch["mask"] if "mask" in batch else 1.0
    out["mask"] = mask
    return out

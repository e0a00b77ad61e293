"""Checkpoints (Orbax) and atomic file writes.

A checkpoint holds, together and at the same step, the train state (any pytree of arrays), the Grain
iterator position and a small JSON of progress, so a resumed job continues with exactly the next batch.
Orbax writes each step into a temporary directory and renames it when complete: a killed job leaves either
the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and what to do."""


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, data_iterator=None, meta: dict | None = None) -> None:
        items = {"state": ocp.args.StandardSave(_to_numpy_tree(state)),
                 "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int | None, template: Any, *, data_iterator=None) -> tuple[Any, dict]:
        """Restores into the structure of `template` (same pytree, same shapes); returns (state, meta)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to restore.")
        items = {"state": ocp.args.StandardRestore(_to_numpy_tree(template)), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.directory} (step {step}): does not match the current configuration ({e}). It was written "
                "by a run with a different model or data; use a new --workdir or delete that directory."
            ) from e
        return restored["state"], dict(restored["meta"] or {})

    def close(self) -> None:
        self._manager.close()


def _to_numpy_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def state_dict(state) -> dict:
    """A flax TrainState as a plain nested dict of arrays (static fields dropped), for Orbax."""
    return flax.serialization.to_state_dict(state)


def load_state_dict(template, restored: dict):
    return flax.serialization.from_state_dict(template, restored)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Writes via a temporary file in the same directory and renames it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def save_npz_atomic(path: str, **arrays) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())

"""The one atomic writer: every file a run or an ingest writes goes to a temporary file in the same directory,
is flushed and fsynced, then renamed into place. A killed job leaves the old file or the new one, never half."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def write_file(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes the file at a temporary path beside `path` (for libraries that write files
    themselves, e.g. anndata); it is then synced and renamed to `path`, or removed if anything fails."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_file(path, write)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, allow_nan=True, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def write_csv(path: str, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    """Rows of dicts as CSV; NaN becomes an empty cell, floats keep 6 significant digits."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in columns})
    write_text(path, buf.getvalue())


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def write_npz(path: str, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(path, buf.getvalue())

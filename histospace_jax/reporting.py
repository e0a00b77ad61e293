"""Results a person can read (JSON, CSV, Markdown) and look at (PNG), and the JSONL metric log."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from typing import Mapping, Sequence

from histospace_jax.checkpointing import write_bytes_atomic, write_text_atomic


class MetricWriter:
    """Appends one JSON object per line to workdir/metrics.jsonl (TensorFlow-free stand-in for clu writers)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, kind: str, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), "kind": kind, "step": int(step)}
        row.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _plain(v):
    try:
        return float(v) if not isinstance(v, (str, int, bool)) else v
    except (TypeError, ValueError):
        return str(v)


class Progress:
    """Step, loss, throughput and ETA lines for long loops."""

    def __init__(self, name: str, total_steps: int, items_per_step: int, start_step: int = 0):
        self.name, self.total, self.items = name, total_steps, items_per_step
        self.start_step, self.t0 = start_step, time.time()

    def line(self, step: int, **values) -> str:
        done = max(step - self.start_step, 1)
        elapsed = time.time() - self.t0
        rate = done * self.items / max(elapsed, 1e-9)
        eta = (self.total - step) * elapsed / done
        vals = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return f"[{self.name}] step {step}/{self.total} {vals} {rate:.1f} tiles/s ETA {_fmt_s(eta)}"


def _fmt_s(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_csv_atomic(path: str, rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in columns})
    write_text_atomic(path, buf.getvalue())


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def plot_curves(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
                xlabel: str, ylabel: str, logy: bool = False) -> None:
    """Line plot of named (x, y) series, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", ms=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def format_table(rows: Sequence[Sequence], header: Sequence[str]) -> str:
    cells = [list(map(_cell, header))] + [list(map(_cell, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)

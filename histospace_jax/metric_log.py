"""metrics.jsonl: one JSON object per logged metric (TensorFlow-free stand-in for clu's metric writers).

Each line names the training loop that wrote it. A loop resumed from step s first drops its own lines after s
(`rewind`), so a resumed run's log has no duplicate lines for the steps it re-runs.
"""

from __future__ import annotations

import json
import os
import time

from histospace_jax import atomic


class MetricWriter:
    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, kind: str, step: int, *, loop: str = "", **values) -> None:
        if not self.enabled:
            return
        row = {"time": round(time.time(), 3), "kind": kind, "step": int(step)}
        if loop:
            row["loop"] = loop
        row.update({k: _plain(v) for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rewind(self, loop: str, after_step: int) -> int:
        """Drops `loop`'s lines with step > after_step (written by a run killed before its next checkpoint).
        Returns how many lines were dropped."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if row.get("loop") == loop and int(row.get("step", 0)) > after_step:
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            atomic.write_text(self.path, "".join(kept))
        return len(lines) - len(kept)


def _plain(v):
    try:
        return float(v) if not isinstance(v, (str, int, bool)) else v
    except (TypeError, ValueError):
        return str(v)

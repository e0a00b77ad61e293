r"""Speed and memory of `python -m histospace_jax.prepare` on the shared HER2ST sections.

    python benchmarks/prepare_speed.py [--input=../shared/data/her2st] [--workers=1,2] [--stain=macenko]

Each configuration runs `prepare` in a fresh subprocess; prints wall time, sections per minute, and peak resident
memory of the whole process tree (sampled from /proc every 50 ms, so worker processes are included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("input", os.path.join(os.path.dirname(REPO), "shared", "data", "her2st"), "HER2ST release.")
flags.DEFINE_list("workers", ["1", "2"], "Worker counts to time.")
flags.DEFINE_string("stain", "macenko", "Stain normalisation method.")
flags.DEFINE_list("extra", [], "Extra prepare flags, e.g. --extra=--nocolour_cast.")


def _tree_rss_kb(root_pid: int) -> int:
    """Total VmRSS of `root_pid` and all its descendants (Linux /proc)."""
    parent, rss = {}, {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(name)
        parent[pid] = int(fields.get("PPid", "0").strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0]) if "VmRSS" in fields else 0
    total, frontier = 0, {root_pid}
    while frontier:
        total += sum(rss.get(p, 0) for p in frontier)
        frontier = {c for c, p in parent.items() if p in frontier}
    return total


def run(workers: int, out: str) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "histospace_jax.prepare", "--format=her2st", f"--input={FLAGS.input}",
           f"--output={out}", f"--workers={workers}", f"--stain={FLAGS.stain}", *FLAGS.extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return wall, peak[0] / 1024.0


def main(argv):
    del argv
    n_sections = len([f for f in os.listdir(os.path.join(FLAGS.input, "data", "ST-cnts")) if f.endswith(".tsv.gz")])
    print(f"HER2ST at {FLAGS.input}: {n_sections} sections; {os.cpu_count()} CPUs; stain={FLAGS.stain}")
    with tempfile.TemporaryDirectory() as tmp:
        for w in FLAGS.workers:
            store = os.path.join(tmp, f"store_w{w}")
            wall, peak_mb = run(int(w), store)
            print(f"workers={w}: {wall:.1f} s, {n_sections / wall * 60:.1f} sections/min, peak RSS {peak_mb:.0f} MB "
                  "(process tree)")
            with open(os.path.join(store, "report", "report.json")) as f:
                rep = json.load(f)
            per_section = ", ".join(f"{e['section']} {e['spots_written']}" for e in rep["sections"])
            print(f"  {rep['n_spots']} spots written ({per_section}); dropped {rep['dropped']}")


if __name__ == "__main__":
    app.run(main)

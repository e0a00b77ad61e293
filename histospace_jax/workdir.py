"""The workdir: proven writable with enough free space before any work starts, and cleaned of temporaries a
killed run left behind."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

from histospace_jax.errors import WorkdirError

ENV_MIN_FREE_MB = "HISTOSPACE_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 50


def check_workdir(workdir: str, min_free_mb: float | None = None) -> str:
    """Creates `workdir` if needed and proves it writable (a probe file is written, synced and removed);
    raises WorkdirError naming the path and the fix. Returns the absolute path."""
    workdir = os.path.abspath(workdir)
    if min_free_mb is None:
        min_free_mb = float(os.environ.get(ENV_MIN_FREE_MB, DEFAULT_MIN_FREE_MB))
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=workdir)
        try:
            os.write(fd, b"histospace_jax write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise WorkdirError(e.errno or errno.EIO,
                           f"--workdir={workdir} is not writable ({e.strerror or e}); choose a directory you can "
                           "write to, or fix its permissions / free space") from e
    free_mb = shutil.disk_usage(workdir).free / 2 ** 20
    if free_mb < min_free_mb:
        raise WorkdirError(errno.ENOSPC,
                           f"--workdir={workdir}: only {free_mb:.0f} MiB free on its disk (need at least "
                           f"{min_free_mb:.0f} MiB, ${ENV_MIN_FREE_MB}); free space or choose another workdir")
    return workdir


def free_bytes(path: str) -> int:
    """Free bytes on the disk that holds `path` (or would: its nearest existing parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def ensure_free_space(path: str, need_bytes: int, what: str) -> None:
    """Raises WorkdirError (ENOSPC) before writing `need_bytes` under `path` when its disk has less free: a full
    disk met in the middle of a write takes the process down in a native writer thread, without our message."""
    free = free_bytes(path)
    if free < need_bytes:
        raise WorkdirError(errno.ENOSPC,
                           f"{path}: {what} needs about {need_bytes / 2 ** 20:.0f} MiB but its disk has "
                           f"{free / 2 ** 20:.0f} MiB free; free space (or use a --workdir on a larger disk) and "
                           "rerun the same command: it resumes from its last checkpoint")


def clean_stale_temporaries(workdir: str) -> list[str]:
    """Removes temporaries a killed run left behind (Orbax *.orbax-checkpoint-tmp-* step directories,
    atomic-write .NAME.XXXX.tmp files, feature-cache *.tmp-* directories). Single-process jobs only: call
    before training starts. Returns the removed paths."""
    removed = []
    for root, dirs, files in os.walk(workdir):
        for d in list(dirs):
            if ".orbax-checkpoint-tmp" in d or (root.endswith("cache") and ".tmp-" in d):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
                removed.append(os.path.join(root, d))
                dirs.remove(d)
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                os.unlink(os.path.join(root, f))
                removed.append(os.path.join(root, f))
    return removed

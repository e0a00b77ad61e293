"""Multi-process (multi-host) setup and process-aware helpers.

Every process of a job runs the same command. `initialize(config.distributed)` must run before anything
touches JAX devices (main.py calls it first). After it, `jax.pmap` maps over the devices of *all* processes:
each process passes its local shard (leading axis = jax.local_device_count()) and collectives (psum) span
every process, so the train steps' gradient and BatchNorm sums are global.

How a process finds the others (first match wins):
  1. config.distributed.coordinator_address / num_processes / process_id, or the environment variables
     HISTOSPACE_COORDINATOR_ADDRESS, HISTOSPACE_NUM_PROCESSES, HISTOSPACE_PROCESS_ID (launch/gpu_box.sh);
  2. mode="on", or mode="auto" inside a detected cluster (Cloud TPU pod slice, SLURM, Open MPI):
     `jax.distributed.initialize()` with no arguments, which auto-detects the cluster;
  3. otherwise a single process (nothing is initialised).
On CPU, cross-process collectives need an implementation: `cpu_collectives` ("gloo" by default).

Data: `ProcessSliceSampler` gives process p rows [p*b, (p+1)*b) of every global batch of the single-process
stream (b = global batch / process count), so N processes see exactly the batches one process would see.
Outputs: only the primary process (index 0) writes results and logs; every process takes part in Orbax
checkpoint saves (Orbax synchronises them and writes shared items once).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
# Private, but the public initialize() only reports the same mistake less specifically.
from jax._src import xla_bridge

ENV_COORDINATOR = "HISTOSPACE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "HISTOSPACE_NUM_PROCESSES"
ENV_PROCESS_ID = "HISTOSPACE_PROCESS_ID"
MODES = ("auto", "on", "off")

# Environment markers of multi-process launchers that jax.distributed.initialize() auto-detects.
_CLUSTER_MARKERS = ("MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                    "OMPI_COMM_WORLD_SIZE")


def _get(cfg: Any, key: str, default):
    if cfg is None:
        return default
    try:
        v = cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)
    except (KeyError, AttributeError):
        return default
    return default if v is None else v


def resolve(cfg: Any = None, environ: dict | None = None) -> dict | None:
    """The keyword arguments for jax.distributed.initialize, or None for a single process.

    Pure (reads only `cfg` and `environ`), so the decision is testable without starting anything.
    """
    env = os.environ if environ is None else environ
    mode = str(_get(cfg, "mode", "auto"))
    if mode not in MODES:
        raise ValueError(f"config.distributed.mode={mode!r}; use one of {MODES}")
    if mode == "off":
        return None
    addr = str(_get(cfg, "coordinator_address", "")) or env.get(ENV_COORDINATOR, "")
    n = int(_get(cfg, "num_processes", 0)) or int(env.get(ENV_NUM_PROCESSES, "0") or 0)
    pid = int(_get(cfg, "process_id", -1))
    if pid < 0 and env.get(ENV_PROCESS_ID, "") != "":
        pid = int(env[ENV_PROCESS_ID])
    kwargs: dict = {"initialization_timeout": int(_get(cfg, "initialization_timeout", 300))}
    ids = str(_get(cfg, "local_device_ids", ""))
    if ids:
        kwargs["local_device_ids"] = [int(i) for i in ids.split(",") if i.strip()]
    if addr:
        if n <= 0 or pid < 0:
            raise ValueError(
                f"distributed: coordinator_address={addr!r} needs num_processes (> 0) and process_id (>= 0) too; "
                f"set --config.distributed.num_processes/process_id or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}")
        if not 0 <= pid < n:
            raise ValueError(f"distributed: process_id={pid} is outside [0, num_processes={n})")
        return {"coordinator_address": addr, "num_processes": n, "process_id": pid, **kwargs}
    if mode == "on" or _in_cluster(env):
        return kwargs  # jax.distributed.initialize() auto-detects coordinator, count and id
    return None


def _in_cluster(env) -> bool:
    for k in _CLUSTER_MARKERS:
        v = env.get(k, "")
        if not v:
            continue
        if k == "TPU_WORKER_HOSTNAMES":
            if "," in v:
                return True
        elif k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            if v.isdigit() and int(v) > 1:
                return True
        else:
            return True
    return False


def initialize(cfg: Any = None) -> dict:
    """Starts the JAX distributed system when the config/environment asks for it. Call before any device use.

    Returns {'process_index', 'process_count', 'initialized'}. Calling it again is a no-op.
    """
    kwargs = resolve(cfg)
    collectives = str(_get(cfg, "cpu_collectives", "gloo"))
    if kwargs is not None and not jax.distributed.is_initialized():
        if xla_bridge.backends_are_initialized():
            raise RuntimeError("distributed.initialize() was called after JAX touched its devices; call it first "
                               "(histospace_jax.main does) and do not call jax.devices() at import time")
        if collectives:
            # CPU devices cannot reduce across processes without a collectives backend (harmless on TPU/GPU).
            jax.config.update("jax_cpu_collectives_implementation", collectives)
        jax.distributed.initialize(**kwargs)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "initialized": jax.distributed.is_initialized()}


def process_batch_size(global_batch_size: int, process_count: int) -> int:
    per = global_batch_size // process_count
    if per * process_count != global_batch_size or per == 0:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes; "
                         "choose a batch size divisible by the process count")
    return per


class ProcessSliceSampler:
    """Grain sampler: this process's slice of every global batch of a single-process IndexSampler.

    Local record i is global record (i // b) * B + p * b + i % b (B = global batch, b = B / process count,
    p = process index). Batching the local stream in batches of b gives process p rows [p*b, (p+1)*b) of each
    global batch, in the same order as one process batching the global stream in batches of B. Only the
    process's own rows are read. Iterator checkpoints (Grain) store the local position, as with any sampler.
    """

    def __init__(self, base, global_batch_size: int, process_index: int, process_count: int):
        self._base = base
        self._global = int(global_batch_size)
        self._p = int(process_index)
        self._n = int(process_count)
        self._local = process_batch_size(self._global, self._n)
        if not 0 <= self._p < self._n:
            raise ValueError(f"process_index {self._p} outside [0, {self._n})")
        base_len = len(base)
        # Only whole global batches are served (drop remainder), so every process has the same length.
        self._len = (base_len // self._global) * self._local if base_len < (1 << 62) else base_len

    def global_index(self, i: int) -> int:
        return (i // self._local) * self._global + self._p * self._local + i % self._local

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        if index < 0 or index >= self._len:
            raise IndexError(f"ProcessSliceSampler index {index} outside [0, {self._len})")
        meta = self._base[self.global_index(index)]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:
        return (f"ProcessSliceSampler(base={self._base!r}, global_batch_size={self._global}, "
                f"process_index={self._p}, process_count={self._n})")

"""train_and_evaluate(config, workdir): runs config.mode (a table of modes, one module each under modes/),
then writes results.json and report.md and prints the result table. Rerunning the same command with the same
workdir resumes from the latest checkpoints."""

from __future__ import annotations

import os
import time

import jax
import ml_collections

from histospace_jax import atomic, config as config_lib, console, datasets, metric_log, report_md
from histospace_jax.modes import ae_study, external, loo, pretrain_ae, train_all

MODES = {
    "loo": loo.run,
    "train": train_all.run,
    "external": external.run,
    "pretrain_ae": pretrain_ae.run,
    "ae_study": ae_study.run,
}
TABLES = {
    "loo": console.loo_table,
    "external": console.external_table,
    "ae_study": console.ae_study_table,
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    config_lib.validate(config)
    t0 = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    writer = metric_log.MetricWriter(os.path.join(workdir, "metrics.jsonl"), enabled=jax.process_index() == 0)
    console.log(f"histospace_jax: mode={config.mode} workdir={workdir} devices={jax.local_device_count()} "
                f"({jax.devices()[0].platform}) processes={jax.process_count()}")
    store, ae_store, dataset = datasets.resolve_stores(config)
    config_lib.resolve_auto(config, log=console.log)
    inputs = datasets.RunInputs(store=store, ae_store=ae_store, dataset=dataset, writer=writer)
    results, report_kwargs = MODES[config.mode](config, workdir, inputs)
    results["config"] = config.to_dict()
    results["elapsed_s"] = round(time.time() - t0, 1)
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(workdir, "results.json"), results)
        report_md.write_report(workdir, results, **report_kwargs)
    if config.mode in TABLES:
        console.log(TABLES[config.mode](results))
    console.log(f"results: {os.path.join(workdir, 'results.json')} ({time.time() - t0:.0f} s)")
    return results

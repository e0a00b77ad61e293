"""One module per mode of `python -m histospace_jax.main` (config.mode); train.MODES dispatches to them.

Each has `run(config, workdir, inputs) -> (results, report_kwargs)`: it trains what it needs through the engine
(autoencoder.py, folds.py, loop.py), writes its own tables and figures, and returns the content of
results.json (train.py adds the config and the wall time, writes results.json and report.md, prints the table).
"""

"""The package's shape and its configs: no import cycle and no upward import (imports inside functions
included), every configs/*.py loads from any working directory, and every numeric config key is validated."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from histospace_jax import builders, checkpointing, config as config_lib
from histospace_jax.errors import ConfigError
from tests.conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "histospace_jax")

# Layers, lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    {"errors", "atomic", "layers", "stats", "config"},
    {"models", "losses", "metrics", "context", "console", "metric_log", "distributed", "xla_tuning"},
    {"steps", "plots", "data", "ingest", "checkpointing", "preemption", "workdir", "spatial_anndata"},
    {"builders", "features", "datasets", "evaluation", "clustering", "controls", "counting_base"},
    {"loop"},
    {"autoencoder", "folds", "model_export"},
    {"modes", "report_md"},
    {"train", "predict", "prepare"},
    {"main"},
]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO_ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str) -> set[str]:
    """Every histospace_jax module `path` imports, at any depth of the file (functions included)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] == "histospace_jax"}


def import_graph() -> dict[str, set[str]]:
    files = {}
    for root, _, names in os.walk(PACKAGE):
        for n in names:
            if n.endswith(".py"):
                files[_module_name(os.path.join(root, n))] = os.path.join(root, n)
    graph = {}
    for module, path in files.items():
        # `from histospace_jax import x` names module x when x is a module, else an attribute of the package.
        graph[module] = {m for m in _imports(path, module) if m in files and m != module}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else ""
    for i, group in enumerate(LAYERS):
        if top in group:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: place it there")


def test_no_import_cycle_and_no_upward_import():
    graph = import_graph()
    assert {"histospace_jax.train", "histospace_jax.loop", "histospace_jax.modes.loo"} <= set(graph)
    upward = [f"{a} -> {b}" for a, deps in graph.items() if a != "histospace_jax"
              for b in deps if b != "histospace_jax" and layer_of(b) > layer_of(a)]
    assert not upward, upward
    # Cycles: depth-first search over the whole graph.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_the_graph_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "histospace_jax" / "x.py"
    path.parent.mkdir()
    path.write_text("def f():\n    from histospace_jax import train\n    import histospace_jax.loop as l\n")
    assert _imports(str(path), "histospace_jax.x") >= {"histospace_jax.train", "histospace_jax.loop"}


# ------------------------------------------------------------------------------------------------ configs

CONFIG_FILES = sorted(f for f in os.listdir(os.path.join(REPO_ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_from_another_directory_and_validates(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != REPO_ROOT])
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", os.path.join(REPO_ROOT, "configs", name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    config_lib.validate(c)
    assert c.mode in config_lib.MODES


def test_every_numeric_key_has_a_range():
    numeric = {k for k, v in config_lib.flat_items(config_lib.get_config())
               if isinstance(v, (int, float)) and not isinstance(v, bool)
               or (isinstance(v, tuple) and v and all(isinstance(e, (int, float)) for e in v))}
    assert numeric - set(config_lib.NUMERIC_RANGES) == set()


@pytest.mark.parametrize("key,builder,standard,paper,given,bad", [
    ("model.dropout_rate", builders.dropout_rate, 0.0, 0.0, 0.25, 1.5),
    ("train.huber_delta", builders.huber_delta, 3.0, 1.0, 0.5, -1.0),
    ("train.learning_rate", builders.learning_rate, 3e-4, 1e-3, 5e-4, 0.0),
])
def test_unset_recipe_number_is_the_recipes_and_a_given_value_is_kept(key, builder, standard, paper, given, bad):
    section, name = key.split(".")
    logs = []
    for recipe, expected in (("standard", standard), ("paper", paper)):
        c = config_lib.get_config()
        c.recipe = recipe
        config_lib.validate(c)  # unset passes validation
        assert builder(c) == expected  # before resolve_auto too
        config_lib.resolve_auto(c, log=logs.append)
        assert c[section][name] == expected and f"{name}={expected:g}" in logs[-1]
    c = config_lib.get_config()
    c[section][name] = given
    config_lib.resolve_auto(c, log=logs.append)
    assert c[section][name] == given and builder(c) == given and name not in logs[-1]
    if key == "model.dropout_rate":
        assert builders.architecture(c)["dropout_rate"] == given
    c[section][name] = bad
    with pytest.raises(ConfigError, match=f"{key}={bad}"):
        config_lib.validate(c)
    assert set(config_lib.RECIPE_NUMBERS) <= set(config_lib.NUMERIC_RANGES)


def test_smoothing_is_the_recipes_until_set_and_never_part_of_a_head_checkpoints_signature():
    logs = []
    for recipe, expected in (("standard", {"radius": 1.5, "weights": (1.0, 0.75, 0.5, 0.25)}), ("paper", None)):
        c = config_lib.get_config()
        c.recipe = recipe
        assert builders.smoothing(c) == expected  # before resolve_auto too
        config_lib.resolve_auto(c, log=logs.append)
        assert builders.smoothing(c) == expected
    recipe_lines = [x for x in logs if x.startswith("recipe=")]
    assert "smoothing=validated" in recipe_lines[0] and "smoothing=none" in recipe_lines[1]
    c = config_lib.get_config()
    c.model.smoothing, c.model.smoothing_weight = "neighbours", 0.8
    c.recipe = "paper"
    assert builders.smoothing(c) == {"radius": 1.5, "weights": (0.8,)}
    c.model.smoothing = "none"
    assert builders.smoothing(c) is None
    # Smoothing acts on finished predictions, so changing it reuses the trained heads.
    sig = checkpointing.compat_signature(c, checkpointing.HEAD_KEYS)
    assert "model.context" in sig and not any(k.startswith("model.smoothing") for k in sig)
    for key, value, message in (
            ("smoothing_weight", 0.0, "model.smoothing_weight=0.0: must be a number in (0, 1]"),
            ("smoothing_weights", (1.0, 1.5), "model.smoothing_weights=(1.0, 1.5): each value must be a number in "
                                              "(0, 1]"),
            ("smoothing", "yes", "model.smoothing='yes': use 'none' | 'neighbours' | 'validated' | 'auto'")):
        c = config_lib.get_config()
        c.model[key] = value
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_lib.validate(c)


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 0, "train.batch_size=0: must be an integer >= 1"),
    ("loo.random_encoder_draws", 0, "loo.random_encoder_draws=0: must be an integer >= 1"),
    ("train.epochs", -3, "train.epochs=-3: must be an integer >= 0"),
    ("train.learning_rate", 0.0, "train.learning_rate=0.0: must be a number > 0"),
    ("ae.val_fraction", 1.0, "ae.val_fraction=1.0: must be a number in [0, 1)"),
    ("model.dropout_rate", -0.1, "model.dropout_rate=-0.1: must be a number in [0, 1)"),
    ("loo.fdr", 0.0, "loo.fdr=0.0: must be a number in (0, 1)"),
    ("model.head_fc_features", (256, 0), "model.head_fc_features=(256, 0): each value must be an integer >= 1"),
    ("data.tile_size", 100, "data.tile_size=100: must be a multiple of 8"),
    ("mode", "lol", "mode='lol': use 'loo' | 'train'"),
    ("loo.random_encoder_control", "yes", "loo.random_encoder_control='yes': use 'on' | 'off' | 'auto'"),
])
def test_out_of_range_values_name_the_key_and_range(key, value, message):
    c = config_lib.get_config()
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c)
    assert message in str(e.value)


@pytest.mark.subprocess
def test_bad_values_exit_64_from_any_directory_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    config = os.path.join(REPO_ROOT, "configs", "loo.py")
    for flag, text in (("--config.train.batch_size=0", "train.batch_size=0: must be an integer >= 1"),
                       ("--config.train.epochs=-3", "train.epochs=-3: must be an integer >= 0"),
                       # unset by default (the recipe's), still a number when given
                       ("--config.model.dropout_rate=1.5", "model.dropout_rate=1.5: must be a number in [0, 1)")):
        r = subprocess.run([sys.executable, "-m", "histospace_jax.main", f"--config={config}",
                            f"--workdir={tmp_path}/wd", flag], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 64, r.stderr[-2000:]
        assert text in r.stderr and "Traceback" not in r.stderr
        assert not os.path.exists(tmp_path / "wd")

"""Models, optimizers and train states built from a config: the one place that turns `config.model` into
modules, so every mode (and predict) builds the same network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from histospace_jax import config as config_lib, models, steps, xla_tuning

AXIS = "batch"  # the pmap axis every step and BatchNorm reduces over


def _arch(config) -> dict:
    m = config.model
    return dict(variant=m.variant, encoder_features=tuple(m.encoder_features), dtype=compute_dtype(config))


def compute_dtype(config):
    """model.compute_dtype: float32, or bfloat16 compute with float32 parameters (mixed precision)."""
    return jnp.dtype(config.model.get("compute_dtype", "float32"))


def autoencoder(config) -> models.Autoencoder:
    # The encoder's conv formulation follows the options its train step is compiled with (same function).
    conv_impl = xla_tuning.conv_impl_for(xla_tuning.conv_step_options())
    return models.Autoencoder(upconv_impl=config.model.upconv_impl, axis_name=AXIS, conv_impl=conv_impl,
                              **_arch(config))


def encoder(config) -> models.Encoder:
    return models.Encoder(config.model.variant, tuple(config.model.encoder_features), dtype=compute_dtype(config))


def histospace(config, n_genes: int, axis_name: str | None = AXIS, conv_impl: str = "fast") -> models.HistoSpace:
    """`conv_impl`: xla_tuning.conv_impl_for the options the model's programs are compiled with."""
    m = config.model
    return models.HistoSpace(n_genes=n_genes, conv_features=tuple(m.head_conv_features),
                             fc_features=tuple(m.head_fc_features), dropout_rate=dropout_rate(config),
                             axis_name=axis_name, output_init=_output_init(config), conv_impl=conv_impl,
                             use_context=uses_context(config), feature_dtype=feature_dtype(config), **_arch(config))


def feature_dtype(config):
    """train.feature_cache_dtype ("auto": model.compute_dtype): the dtype the heads read frozen features in."""
    setting = str(config.train.get("feature_cache_dtype", "auto"))
    return compute_dtype(config) if setting == "auto" else jnp.dtype(setting)


def uses_context(config) -> bool:
    return config.model.get("context", "none") == "neighbours"


def smoothing(config) -> dict | None:
    """How predictions are smoothed over adjacent spots (model.smoothing), or None when they are not:
    {"radius": spot spacings, "weights": the candidate weights of a spot's own prediction}. One candidate is a
    fixed weight ("neighbours"); several are chosen between per fold on inner validation ("validated").
    Before resolve_auto (e.g. a bare config in a test), "auto" means the recipe's choice."""
    value = config.model.get("smoothing", "none")
    if value == "auto":
        value = config_lib.RECIPES[config.recipe].smoothing
    if value == "none":
        return None
    weights = ((float(config.model.smoothing_weight),) if value == "neighbours" else
               tuple(float(w) for w in config.model.smoothing_weights))
    return {"radius": float(config.model.smoothing_radius), "weights": weights}


def _output_init(config) -> str:
    # Before resolve_auto (e.g. a bare config in a test), "auto" means the recipe's choice.
    value = config.model.output_init
    return config_lib.RECIPES[config.recipe].output_init if value == "auto" else value


def dropout_rate(config) -> float:
    return config_lib.recipe_number(config, "model.dropout_rate")


def huber_delta(config) -> float:
    return config_lib.recipe_number(config, "train.huber_delta")


def learning_rate(config) -> float:
    """The heads' Adam learning rate: train.learning_rate, or the recipe's when unset."""
    return config_lib.recipe_number(config, "train.learning_rate")


def head_seed(config) -> int:
    """train.head_seed, or `seed` when unset."""
    value = config.train.get("head_seed")
    return int(config.seed if value is None else value)


def architecture(config) -> dict:
    """The model's architecture as model.json records it (histospace_from_architecture reads it back)."""
    m = config.model
    return {"variant": m.variant, "encoder_features": list(m.encoder_features),
            "head_conv_features": list(m.head_conv_features), "head_fc_features": list(m.head_fc_features),
            "dropout_rate": dropout_rate(config), "output_init": _output_init(config),
            "compute_dtype": str(compute_dtype(config)), "context": config.model.get("context", "none"),
            "context_radius": float(config.model.get("context_radius", 1.5)),
            "feature_dtype": str(feature_dtype(config))}


def histospace_from_architecture(arch: dict, n_genes: int) -> models.HistoSpace:
    return models.HistoSpace(n_genes=n_genes, variant=arch["variant"],
                             encoder_features=tuple(arch["encoder_features"]),
                             conv_features=tuple(arch["head_conv_features"]),
                             fc_features=tuple(arch["head_fc_features"]), dropout_rate=arch.get("dropout_rate", 0.0),
                             output_init=arch.get("output_init", "lecun"),
                             dtype=jnp.dtype(arch.get("compute_dtype", "float32")),
                             use_context=arch.get("context", "none") == "neighbours",
                             feature_dtype=jnp.dtype(arch["feature_dtype"]) if "feature_dtype" in arch else None)


def autoencoder_state(config) -> steps.TrainState:
    c, t = config.ae, config.data.tile_size
    tx = steps.make_ae_optimizer(c.learning_rate, c.weight_decay)
    return steps.create_train_state(autoencoder(config), jax.random.PRNGKey(config.seed),
                                    jnp.zeros((1, t, t, 3)), tx)


def head_states(config, n_genes: int, encoder_variables: list[dict], seed_offsets,
                conv_impl: str = "fast") -> list[steps.TrainState]:
    """HistoSpace states with fresh heads (seeded by head_seed(config) and each of `seed_offsets`) on the frozen
    encoders (one per state). They share one module and optimizer, so they stack (vmap over heads)."""
    c = config.train
    model = histospace(config, n_genes, conv_impl=conv_impl)
    tx = steps.make_regression_optimizer(learning_rate(config), c.weight_decay)
    return [steps.create_regression_state(model, jax.random.PRNGKey(head_seed(config) * 100003 + int(k)), enc, tx,
                                          config.data.tile_size) for enc, k in zip(encoder_variables, seed_offsets)]


def encoder_variables_of(ae_state) -> dict:
    """The encoder's {'params', 'batch_stats'} inside an autoencoder state, as host arrays."""
    v = {"params": ae_state.params["encoder"]}
    if ae_state.batch_stats:
        v["batch_stats"] = ae_state.batch_stats["encoder"]
    return jax.tree_util.tree_map(np.asarray, v)


def random_encoder_variables(config, seed: int) -> dict:
    """An untrained encoder (the control that shows what pretraining buys)."""
    t = config.data.tile_size
    v = encoder(config).init(jax.random.PRNGKey(seed), jnp.zeros((1, t, t, 3)))
    return jax.tree_util.tree_map(np.asarray, dict(v))


def count_params(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))

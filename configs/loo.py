"""Leave-one-patient-out cross-validation (the paper's protocol), with controls. On the demo by default; for
real data: --config.data.store=STORE [--config.ae.store=IMAGE_STORE | --config.ae.checkpoint=DIR].

Controls reported beside the model: the training-mean profile predictor, the untrained head, and (on here)
the same heads trained on a randomly initialised encoder (`loo.random_encoder_control`: on for real stores,
off on the synthetic demo unless set to "on").

The paper's head-complexity sweep: --config.model.head_conv_features=128,128,128 (more conv blocks) and
--config.model.head_fc_features=1024 (wider FC); run one workdir per head.
"""

from histospace_jax import config as default


def get_config():
    return default.get_config()

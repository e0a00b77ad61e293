"""Leave-one-patient-out cross-validation (the paper's protocol). On the demo by default; for real data:
--config.data.store=STORE [--config.ae.store=IMAGE_STORE | --config.ae.checkpoint=DIR]."""

from configs import default


def get_config():
    return default.get_config()

"""The LOO path end to end on a tiny synthetic demo: minutes-scale on a CPU, for smoke tests."""

from histospace_jax import config as default


def get_config():
    c = default.get_config()
    c.data.demo.update(dict(n_patients=3, sections_per_patient=2, grid=(6, 6), n_genes=16,
                            n_pretrain_patients=1, pretrain_grid=(8, 8)))
    c.ae.epochs = 1
    c.ae.batch_size = 16
    c.train.epochs = 2
    c.train.batch_size = 16
    # A few dozen head steps: at the standard recipe's 3e-4 the heads hardly leave the training mean in that
    # budget (flat genes, a failed fold), which is not what this path test is about.
    c.train.learning_rate = 1e-3
    c.eval_batch_size = 64
    c.log_every_steps = 5
    c.checkpoint.every_steps = 5
    return c

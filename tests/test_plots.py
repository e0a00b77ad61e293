"""Plot helpers: what they draw, not only that a file appears."""

from PIL import Image

from histospace_jax import plots


def test_huber_series_draws_a_refit_as_its_own_line(tmp_path):
    """A refit restarts at epoch 1 under its own fold name: one line per fold, each in epoch order, never one
    line drawn back from the last epoch of the first training to the refit's first."""
    curve = [{"epoch": e, "fold": "(all)", "train_huber": 1.0 / e} for e in (1, 2, 3)]
    curve += [{"epoch": e, "fold": "(all) (refit)", "train_huber": 2.0 / e} for e in (1, 2)]
    series = plots.huber_series(curve, "train Huber {fold}")
    assert series == {"train Huber (all)": ([1, 2, 3], [1.0, 0.5, 1.0 / 3]),
                      "train Huber (all) (refit)": ([1, 2], [2.0, 1.0])}
    path = tmp_path / "curve.png"
    plots.plot_curves(str(path), series, title="t", xlabel="epoch", ylabel="Huber", logy=True)
    assert Image.open(path).size[0] > 100

"""Every figure a run writes, drawn with matplotlib (set up once here, headless) and saved atomically as PNG."""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs write PNG files, never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from histospace_jax import atomic, metrics  # noqa: E402


def save_figure(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def plot_curves(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str,
                xlabel: str, ylabel: str, logy: bool = False) -> None:
    """Line plot of named (x, y) series."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o", ms=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def huber_series(curve: Sequence[Mapping], label: str = "{fold}") -> dict:
    """The training Huber loss of head curve rows ({"epoch", "fold", "train_huber", ...}) as one plot_curves
    series per curve fold (label.format(fold=...)): a refit restarts at epoch 1 under its own fold name, and
    joined into one line it would draw back across the plot."""
    series: dict = {}
    for r in curve:
        xs, ys = series.setdefault(label.format(fold=r["fold"]), ([], []))
        xs.append(r["epoch"])
        ys.append(r["train_huber"])
    return series


def grid_xy(obs: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return obs["array_x"][rows].astype(float), obs["array_y"][rows].astype(float)


def tile_mosaic(x: np.ndarray, y: np.ndarray, tiles: np.ndarray, px: int = 12) -> tuple[np.ndarray, list]:
    """The section's H&E rebuilt from its spot tiles (each shrunk to px x px) at their grid positions, on
    white; returns (image, imshow extent in grid units)."""
    x0, y0 = x.min(), y.min()
    w, h = int(np.ptp(x)) + 1, int(np.ptp(y)) + 1
    img = np.full((h * px, w * px, 3), 255, np.uint8)
    for xi, yi, t in zip(x, y, tiles):
        small = np.asarray(Image.fromarray(np.asarray(t)).resize((px, px), Image.Resampling.BOX))
        r, c = int(yi - y0) * px, int(xi - x0) * px
        img[r:r + px, c:c + px] = small
    return img, [x0 - 0.5, x0 + w - 0.5, y0 + h - 0.5, y0 - 0.5]


def plot_spatial_maps(path: str, obs: dict, rows: np.ndarray, genes: list[str], truth: np.ndarray,
                      pred: np.ndarray, title: str = "", max_sections: int = 4, tiles=None) -> None:
    """Per named gene (rows of panels) and per section: measured beside predicted expression on the spot grid,
    over the section's H&E (rebuilt from the spot tiles when `tiles` [len(rows), T, T, 3] is given).

    truth/pred: [len(rows), len(genes)]. Measured and predicted share one colour scale per gene and section
    (the 2nd-98th percentile of both together), so a flat prediction looks flat; r over the shown spots is in
    the title.
    """
    sections = list(dict.fromkeys(obs["section"][rows].tolist()))
    if len(sections) > max_sections:
        title = (title + "; " if title else "") + f"first {max_sections} of {len(sections)} sections shown"
        sections = sections[:max_sections]
    ncol = 2 * len(sections)
    fig, axes = plt.subplots(len(genes), ncol, figsize=(2.6 * ncol, 2.5 * len(genes) + 0.4), dpi=100,
                             squeeze=False)
    for si, s in enumerate(sections):
        sel = obs["section"][rows] == s
        x, y = grid_xy(obs, rows[sel])
        mosaic = tile_mosaic(x, y, tiles[sel]) if tiles is not None else None
        for gi, g in enumerate(genes):
            r_sec = metrics.pearson_per_gene(truth[sel, gi:gi + 1], pred[sel, gi:gi + 1])[0]
            both = np.concatenate([truth[sel, gi], pred[sel, gi]])
            vmin, vmax = np.percentile(both, [2, 98]) if len(both) else (0.0, 1.0)
            for k, (name, vals) in enumerate((("measured", truth[sel, gi]), ("predicted", pred[sel, gi]))):
                ax = axes[gi, 2 * si + k]
                if mosaic is not None:
                    ax.imshow(mosaic[0], extent=mosaic[1])
                sc = ax.scatter(x, y, c=vals, s=_marker_size(x, y), marker="s", cmap="viridis", vmin=vmin,
                                vmax=vmax, alpha=0.75 if mosaic is not None else 1.0, linewidths=0)
                ax.set_aspect("equal")
                if mosaic is None:
                    ax.invert_yaxis()
                ax.set_xticks([])
                ax.set_yticks([])
                label = f"{g} {name}\n{s}" + (f" (r={r_sec:.2f})" if k == 1 and np.isfinite(r_sec) else "")
                ax.set_title(label, fontsize=8)
                fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def _marker_size(x, y, panel_pt: float = 150.0) -> float:
    """Square-marker area (pt^2) so neighbouring grid spots nearly touch in a ~2 inch panel."""
    extent = max(float(np.ptp(x)) if len(x) else 1.0, float(np.ptp(y)) if len(y) else 1.0, 1.0) + 1.0
    return float(np.clip((panel_pt / extent * 0.85) ** 2, 4.0, 400.0))


def plot_reconstructions(path: str, images: np.ndarray, recons: dict, title: str) -> None:
    """Top row: input tiles; one row per variant: its reconstructions."""
    n = len(images)
    rows = 1 + len(recons)
    fig, axes = plt.subplots(rows, n, figsize=(1.3 * n, 1.4 * rows + 0.3), dpi=100, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j])
        for i, (name, rec) in enumerate(recons.items()):
            axes[i + 1, j].imshow(np.clip(rec[j], 0, 1))
    for i, name in enumerate(["input"] + list(recons)):
        axes[i, 0].set_ylabel(name, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_clusters(path: str, x, y, is_cancer: np.ndarray, clusters: np.ndarray, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    for ax, vals, name, names in ((axes[0], is_cancer.astype(int), "pathologist", ("non-cancer", "cancer")),
                                  (axes[1], clusters, "K-means (k=2) on predicted expression",
                                   ("cluster matched to non-cancer", "cluster matched to cancer"))):
        for v, colour in ((0, "tab:blue"), (1, "tab:red")):
            sel = vals == v
            ax.scatter(np.asarray(x)[sel], np.asarray(y)[sel], s=_marker_size(x, y, 250.0), marker="s", c=colour,
                       label=names[v])
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2, frameon=False)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def plot_overlay(path: str, rgb: np.ndarray, px, py, values, gene: str, box_px: int, thumbnail_px: int) -> None:
    h, w = rgb.shape[:2]
    s = thumbnail_px / max(h, w)
    thumb = np.asarray(Image.fromarray(rgb).resize((max(1, int(w * s)), max(1, int(h * s))),
                                                   Image.Resampling.BOX))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.4), dpi=100)
    axes[0].imshow(thumb)
    axes[0].set_title("slide", fontsize=9)
    axes[1].imshow(thumb, alpha=0.45)
    marker = max(2.0, (box_px * s * 72 / 100) ** 2 * 0.8)
    sc = axes[1].scatter(np.asarray(px) * s, np.asarray(py) * s, c=values, s=marker, marker="s", cmap="magma",
                         alpha=0.85)
    fig.colorbar(sc, ax=axes[1], fraction=0.046, pad=0.02, label="predicted expression")
    axes[1].set_title(f"{gene}: predicted expression ({len(values)} tiles)", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)

"""The paper's two standard figures, saved as PNG (host NumPy arrays in, files out).

* :func:`plot_latent_variance` - Fig. 1: latent codes of held-out images, coloured by label, over
  a heat-map of the decoder's predictive variance (mean over pixels) on a grid of the 2-D latent
  space. Where no data were seen the decoder should be uncertain.
* :func:`plot_reconstructions` - Fig. 8: for a few images, the input, the mean reconstruction and
  its variance, one row each; several groups (e.g. in- and out-of-distribution) share one colour
  scale for the variance so they can be compared by eye (no variance row for a deterministic model).

Figures are drawn on a matplotlib ``Figure`` with the Agg canvas directly, so nothing here touches
pyplot's global state or needs a display.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np  # plotting works on host arrays
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

__all__ = ["latent_grid", "plot_latent_variance", "plot_reconstructions", "reconstruction_figure"]


def latent_grid(z, n=40, margin=0.1):
    """A regular n x n grid covering the codes z (N, 2) plus a margin: (xs (n,), ys (n,), points (n*n, 2))."""
    z = np.asarray(z, dtype=float)
    if z.ndim != 2 or z.shape[1] != 2:
        raise ValueError(f"latent_grid needs 2-D codes of shape (N, 2), got {z.shape}")
    low, high = z.min(axis=0), z.max(axis=0)
    pad = margin * np.maximum(high - low, 1e-6)
    xs = np.linspace(low[0] - pad[0], high[0] + pad[0], n)
    ys = np.linspace(low[1] - pad[1], high[1] + pad[1], n)
    gx, gy = np.meshgrid(xs, ys)  # row i <-> ys[i], column j <-> xs[j]
    return xs, ys, np.stack([gx.ravel(), gy.ravel()], axis=1)


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_latent_variance(z, labels, xs, ys, variance, path, title="Latent codes over decoder variance", note=None):
    """Fig. 1: scatter z (N, 2) coloured by labels over the heat-map variance (len(ys), len(xs)) or None.

    note: a text written into the axes instead, e.g. why there is no heat-map (a deterministic decoder has
    no output variance, and a 0-to-1 colour bar over zeros would say otherwise).
    """
    z = np.asarray(z)
    fig = Figure(figsize=(6.4, 5.2))
    ax = fig.add_subplot()
    if variance is not None:
        variance = np.asarray(variance).reshape(len(ys), len(xs))
        mesh = ax.pcolormesh(xs, ys, variance, cmap="magma", shading="auto")
        fig.colorbar(mesh, ax=ax, label="decoder variance (mean over pixels)")
    if note:
        ax.text(0.02, 0.98, note, transform=ax.transAxes, va="top", ha="left", fontsize=8,
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    points = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=4, alpha=0.8, linewidths=0)
    if labels is not None:
        fig.colorbar(points, ax=ax, label="label", ticks=range(10))
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.set_title(title)
    return _save(fig, path)


def plot_reconstructions(groups, path, n=8, title="Inputs, mean and variance of reconstructions", log_scale=False):
    """Fig. 8: groups = [(name, x, x_mean, x_var), ...] of image arrays (N, 1, H, W); n columns each.

    x_var None: a group without predictive variance (a deterministic autoencoder) - its variance row is left
    out rather than drawn as zeros on a colour scale that would claim a range it does not have.
    """
    return _save(reconstruction_figure(groups, n, title, log_scale), path)


def reconstruction_figure(groups, n=8, title="Inputs, mean and variance of reconstructions", log_scale=False):
    """The Figure of plot_reconstructions: rows input / mean / variance per group (no variance row if x_var is None),
    the variance rows on one colour scale with a colour bar (log_scale: logarithmic, over 4 decades below the max)."""
    if not groups:
        raise ValueError("plot_reconstructions needs at least one group")
    n = min(n, *(len(g[1]) for g in groups))
    variances = [np.asarray(g[3])[:n] for g in groups if g[3] is not None]
    vmax = max((float(v.max()) for v in variances), default=0.0) or 1.0
    scale = LogNorm(vmin=1e-4 * vmax, vmax=vmax, clip=True) if log_scale else Normalize(vmin=0, vmax=vmax)
    rows = [(name, what, np.asarray(images)[:n], kw) for name, x, x_mean, x_var in groups
            for what, images, kw in (("input", x, dict(cmap="gray", vmin=0, vmax=1)),
                                     ("mean", x_mean, dict(cmap="gray", vmin=0, vmax=1)),
                                     ("variance", x_var, dict(cmap="viridis", norm=scale)))
            if images is not None]
    fig = Figure(figsize=(1.1 * n + 1.6, 1.15 * len(rows)))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for ri, (name, what, images, kw) in enumerate(rows):
        for j in range(n):
            ax = axes[ri, j]
            image = ax.imshow(images[j].reshape(images.shape[-2:]), **kw)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[ri, 0].set_ylabel(f"{name}\n{what}", fontsize=8)
        if what == "variance":
            fig.colorbar(image, ax=list(axes[ri]), fraction=0.02, pad=0.01, label="variance")
    said = (("log " if log_scale else "") + f"variance scale {scale.vmin:.3g} to {vmax:.3g}" if variances
            else "no predictive variance: a deterministic model")
    fig.suptitle(f"{title} ({said})", fontsize=9)
    return fig

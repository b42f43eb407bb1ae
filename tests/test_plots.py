"""Tests for minilae.plots: the figures say what their data hold (host-only: matplotlib on NumPy arrays)."""
from __future__ import annotations

import numpy as np
import pytest

from minilae.plots import plot_reconstructions, reconstruction_figure

pytestmark = pytest.mark.backends("numpy")


def images(rng, n=5):
    return rng.uniform(0, 1, size=(n, 1, 4, 4))


@pytest.mark.parametrize("log_scale", [False, True])
@pytest.mark.parametrize("with_variance", [True, False])
def test_reconstruction_rows_and_scale(with_variance, log_scale):
    """Catches a deterministic model's zero variance drawn as a row on a '0 to 1' colour scale (the ae bug of
    issue 15), a variance scale that is not the largest variance shown, and a variance row without its colour bar."""
    rng = np.random.default_rng(0)
    x_var = 0.02 * images(rng) if with_variance else None
    groups = [("MNIST", images(rng), images(rng), x_var), ("FashionMNIST", images(rng), images(rng), x_var)]
    fig = reconstruction_figure(groups, n=4, log_scale=log_scale)
    rows = 3 if with_variance else 2
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(fig.axes) == 2 * rows * 4 + len(colour_bars) and len(colour_bars) == (2 if with_variance else 0)
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel() and ax not in colour_bars]
    assert labels == [f"{g}\n{w}" for g in ("MNIST", "FashionMNIST") for w in ("input", "mean", "variance")[:rows]]
    title = fig._suptitle.get_text()
    if with_variance:
        low = 1e-4 * x_var[:4].max() if log_scale else 0
        assert f"variance scale {low:.3g} to {x_var[:4].max():.3g}" in title and ("log" in title) == log_scale
    else:
        assert "no predictive variance" in title and "0 to" not in title


def test_plot_reconstructions_writes_png(tmp_path):
    """Catches the saved file not being a PNG (or not written where asked)."""
    rng = np.random.default_rng(1)
    path = plot_reconstructions([("MNIST", images(rng), images(rng), None)], tmp_path / "sub" / "r.png", n=3)
    assert path == tmp_path / "sub" / "r.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_groups_is_an_error():
    with pytest.raises(ValueError, match="at least one group"):
        reconstruction_figure([])

"""Missing-data imputation and generation (paper appendix A.3, Fig. 11, Table 3).

Our reading of A.3, for an image x with a mask m (1 = observed: the lower half; all 0 for
generation) and missing pixels first filled with uniform noise u:

  stage 1 (a chain):  x^0 = m x + (1 - m) u,   x^{t+1} = m x + (1 - m) r_t(x^t),  t < steps,
                      r_t one stochastic encode-decode pass (``sample_reconstructions(x, 1, rng)``:
                      a fresh sampled network / mask / member / latent draw each step);
  stage 2 (refine):   x_s = m x + (1 - m) 1/R sum_r r_r(x^steps), R = 5 further passes, averaged;

run for S = 5 chains with independent noise, giving 5 imputations x_1..x_S per image. The
classifier's predictions are averaged over them, p(y | x) = 1/S sum_s p(y | x_s), and scored by
accuracy, ECE, MCE and RMSCE (15 bins). MSE is the per-pixel error of the imputations on the
missing pixels, averaged over s; log p(x) = 1/S sum_s log N(x | x_s, I) of the true image. The row
"classifier" classifies the chains' starting images x^0 (observed half, noise elsewhere).
"""
from __future__ import annotations

import numpy as np

from ..backend import asarray, to_numpy
from ..losses import Gaussian
from . import metrics
from .report import markdown_table, new_figure, save_figure

__all__ = ["lower_half_mask", "impute", "evaluate", "table_markdown", "figures", "COLUMNS"]

COLUMNS = ("accuracy", "ece", "mce", "rmsce", "mse", "log_px")


def lower_half_mask(shape):
    """m = 1 on the lower half of the image rows (observed), 0 on the upper half."""
    m = np.zeros(shape, dtype=np.float32)
    m[..., shape[-2] // 2:, :] = 1.0
    return m


def impute(predictor, x, mask, rng, chains=5, steps=5, refine=5, noise_seed=0):
    """(S, N, *shape) host imputations of host images x with host mask (1 = observed), as in the module doc."""
    noise = np.random.default_rng(noise_seed).random((chains,) + x.shape).astype(x.dtype)
    keep = mask * x
    out = []
    for s in range(chains):  # independent chains; all N images of a step share one sampled network
        z = keep + (1 - mask) * noise[s]
        for _ in range(steps):
            z = keep + (1 - mask) * to_numpy(predictor.sample_reconstructions(z, 1, rng=rng)[0])
        refined = to_numpy(predictor.sample_reconstructions(z, refine, rng=rng)).mean(axis=0)
        out.append(keep + (1 - mask) * refined)
    return np.stack(out), keep + (1 - mask) * noise[0]


def _log_px(x, imputations):
    """1/S sum_s log N(x | x_s, I) per image, with the library's Gaussian likelihood."""
    lik, xb = Gaussian(1.0), asarray(x.reshape(len(x), -1))
    return np.mean([to_numpy(-lik.nll(asarray(f.reshape(len(x), -1)), xb)) for f in imputations], axis=0)


def evaluate(predictor, classifier, x, y, mask, rng, **kw):
    """Table 3 row of one method: calibration of the averaged classifier, MSE and log p(x); plus the imputations."""
    imputations, start = impute(predictor, x, mask, rng, **kw)
    probs = np.mean([classifier.probs(f) for f in imputations], axis=0)
    missing = (1 - mask).astype(bool)
    mse = float(np.mean([((f - x)[np.broadcast_to(missing, x.shape)] ** 2).mean() for f in imputations]))
    row = {**metrics.calibration(probs, y), "mse": mse, "log_px": float(_log_px(x, imputations).mean())}
    return row, imputations, start


def classifier_alone(classifier, start, y):
    """The classifier on the chains' starting images (observed half, noise elsewhere)."""
    return {**metrics.calibration(classifier.probs(start), y), "mse": None, "log_px": None}


def table_markdown(rows, n_images, chains):
    return (f"Imputation of the upper half of {n_images} MNIST test images ({chains} imputations per image)\n\n"
            + markdown_table(["method", *COLUMNS], [[m] + [r[c] for c in COLUMNS] for m, r in rows.items()]))


def _image_rows(ax_row, images, label):
    for ax, im in zip(ax_row, images):
        ax.imshow(im.reshape(im.shape[-2:]), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    ax_row[0].set_ylabel(label, fontsize=7)


def figures(out, x, start, imputations, generations, n=8):
    """Fig. 11: truth, observed input, then each method's first imputation; and generations from nothing."""
    n = min(n, len(x))
    fig, axes = new_figure(2 + len(imputations), n, size=(1.0, 1.05))
    _image_rows(axes[0], x[:n], "truth")
    _image_rows(axes[1], start[:n], "observed")
    for row, (method, imp) in zip(axes[2:], imputations.items()):
        _image_rows(row, imp[0][:n], method)
    names = [save_figure(fig, out, "imputations.png")]
    fig, axes = new_figure(len(generations), n, size=(1.0, 1.05))
    for row, (method, gen) in zip(axes, generations.items()):
        _image_rows(row, gen[0][:n], method)
    names.append(save_figure(fig, out, "generations.png"))
    return names

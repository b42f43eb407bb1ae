"""Semi-supervised k-nearest-neighbour classification on the latent codes (paper appendix A.4, Fig. 12).

For n labels per class and each of R repetitions, n images per class of the validation set are
drawn as the labelled set (the same draws for every method); the rest of the validation set is
classified. Embeddings are K encodings per image, ``sample_codes(x, K)`` (K = 1 for a deterministic
encoder). Distances between stochastic embeddings are averaged over the K draws,

  D(i, j) = 1/K sum_k ||z_k(x_i) - z_k(x_j)||^2 = ||e_i - e_j||^2,  e_i = [z_1(x_i), ..., z_K(x_i)] / sqrt(K),

pairing draw k of both images (draw k is one sampled network / mask / member for all inputs), so
KNN on the concatenated, scaled embeddings e is KNN under the averaged distance. k is chosen from
CANDIDATE_K by 2-fold cross-validation on the labelled set (:func:`metrics.choose_k`); the
accuracy is that of the chosen k on the unlabelled rest.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from . import metrics
from .report import fmt, markdown_table, new_figure, save_figure

__all__ = ["CANDIDATE_K", "LABELS", "embed", "labelled_draws", "evaluate", "table_markdown", "figure"]

CANDIDATE_K = (1, 3, 5, 7, 9, 11, 15, 21, 31, 51)
LABELS = (1, 2, 5, 10, 20, 50, 100)


def embed(predictor, x, n_samples, seed):
    """Host (N, K * latent) embeddings e_i = [z_1(x_i), ..., z_K(x_i)] / sqrt(K)."""
    z = to_numpy(predictor.sample_codes(x, n_samples, rng=seed)).astype(np.float64)
    return z.transpose(1, 0, 2).reshape(z.shape[1], -1) / np.sqrt(z.shape[0])


def check_labels(y, labels_per_class):
    """ValueError if some n exceeds a class's size minus one (n labelled, >= 1 left to classify)."""
    counts = np.bincount(y, minlength=10)
    too_many = [n for n in labels_per_class if n >= counts.min()]
    if too_many:
        raise ValueError(f"labels per class {too_many} do not fit: the smallest class of the validation set "
                         f"(class {int(counts.argmin())}) has {int(counts.min())} images, so n must be below that")


def labelled_draws(y, n, repetitions, seed):
    """Per repetition, a boolean mask of n labelled images per class (seeded by (seed, n, repetition))."""
    draws = []
    for r in range(repetitions):
        rng = np.random.default_rng([seed, n, r])
        mask = np.zeros(len(y), dtype=bool)
        for c in np.unique(y):  # ten classes
            mask[rng.choice(np.flatnonzero(y == c), n, replace=False)] = True
        draws.append(mask)
    return draws


def evaluate(e, y, labels_per_class, repetitions, seed):
    """{n: {'accuracy': [per repetition], 'k': [chosen k]}} for host embeddings e (N, D) and labels y."""
    result = {}
    for n in labels_per_class:
        acc, ks = [], []
        for r, lab in enumerate(labelled_draws(y, n, repetitions, seed)):
            k, _ = metrics.choose_k(e[lab], y[lab], CANDIDATE_K, np.random.default_rng([seed, n, r, 1]))
            acc.append(float((metrics.knn_predict(e[lab], y[lab], e[~lab], k, 10) == y[~lab]).mean()))
            ks.append(k)
        result[n] = {"accuracy": acc, "k": ks}
    return result


def table_markdown(results, n_val):
    cols = list(next(iter(results.values())))
    rows = [[m] + [f"{fmt(float(np.mean(r[n]['accuracy'])))} ± {fmt(float(np.std(r[n]['accuracy'])))}"
                   for n in cols] for m, r in results.items()]
    return (f"KNN accuracy on {n_val} MNIST validation images (mean ± std over repetitions) against labels "
            "per class\n\n" + markdown_table(["method", *map(str, cols)], rows))


def figure(results, out):
    """Fig. 12: accuracy against labels per class, one line per method, band = +- one std over repetitions."""
    fig, axes = new_figure(1, 1, size=(5.5, 3.8))
    ax = axes[0, 0]
    for method, r in results.items():
        ns = list(r)
        acc = np.array([r[n]["accuracy"] for n in ns])
        mean, std = acc.mean(axis=1), acc.std(axis=1)
        ax.plot(ns, mean, marker="o", label=method)
        ax.fill_between(ns, mean - std, mean + std, alpha=0.2)
    ax.set(xscale="log", xlabel="labels per class", ylabel="accuracy", title="KNN on latent codes")
    ax.legend(fontsize=8)
    return [save_figure(fig, out, "knn_accuracy.png")]

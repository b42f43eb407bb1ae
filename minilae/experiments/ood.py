"""Out-of-distribution detection (paper Sec. 5, appendix A.2, Fig. 9 and 10).

A conv autoencoder with a 2-D latent space is trained on FashionMNIST; its test images are the
in-distribution set and MNIST's test images the out-of-distribution set (``reverse`` swaps them).
Every score is "higher = more out-of-distribution":

  log-likelihood     -log p(x) = -1/K sum_k log p(x | theta_k), the per-sampled-network likelihood
  typicality         | -log p(x) - mean(-log p(x')) |, x' the held-out in-distribution validation
                     images (Nalisnick et al. 2019: distance from the typical set's entropy estimate)
  latent variance    sum_j Var_k[z_kj], the spread of the sampled encodings
  output variance    mean over pixels of Var_k[x_hat_k], the spread of the sampled reconstructions

A variance that is identically zero (a deterministic network) is no score: its cells are None /
'-', never an AUROC of 0.5. Metrics per method and score: AUROC, AUPRC, FPR at 95% TPR
(:mod:`minilae.experiments.metrics`; out-of-distribution = positive class).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from . import metrics
from .report import markdown_table, new_figure, save_figure

__all__ = ["SCORES", "METRICS", "scores", "evaluate", "figures", "table_markdown", "datasets"]

SCORES = ("log-likelihood", "typicality", "latent variance", "output variance")
METRICS = {"auroc": metrics.auroc, "auprc": metrics.average_precision, "fpr95": metrics.fpr_at_tpr}


def datasets(reverse=False):
    """(in-distribution, out-of-distribution) dataset names."""
    return ("mnist", "fashionmnist") if reverse else ("fashionmnist", "mnist")


def _host(pred):
    return {k: to_numpy(getattr(pred, k)) for k in ("z_var", "x_var", "log_px")}


def scores(pred, typical_nll):
    """{score name: (N,) host array or None} of one host prediction; typical_nll = mean -log p on held-out data."""
    n = pred["log_px"].shape[0]
    z_var, x_var = pred["z_var"].reshape(n, -1).sum(axis=1), pred["x_var"].reshape(n, -1).mean(axis=1)
    return {"log-likelihood": -pred["log_px"], "typicality": np.abs(-pred["log_px"] - typical_nll),
            "latent variance": z_var if np.any(pred["z_var"] != 0) else None,
            "output variance": x_var if np.any(pred["x_var"] != 0) else None}


def evaluate(predictor, x_in, x_out, x_held, n_samples, seed):
    """{'scores': {score: (in, out) arrays or None}, 'metrics': {score: {metric: value or None}}} of one method."""
    held, pin, pout = (_host(predictor.predict(x, n_samples, rng=seed)) for x in (x_held, x_in, x_out))
    typical = float(np.mean(-held["log_px"]))
    s_in, s_out = scores(pin, typical), scores(pout, typical)
    labels = np.r_[np.zeros(len(x_in)), np.ones(len(x_out))]
    result = {"scores": {}, "metrics": {}}
    for name in SCORES:
        if s_in[name] is None or s_out[name] is None:
            result["scores"][name] = None
            result["metrics"][name] = {m: None for m in METRICS}
            continue
        result["scores"][name] = (s_in[name], s_out[name])
        both = np.r_[s_in[name], s_out[name]]
        result["metrics"][name] = {m: f(labels, both) for m, f in METRICS.items()}
    return result


def table_markdown(results, in_name, out_name):
    """One Markdown table per metric: rows = methods, columns = scores."""
    parts = [f"Out-of-distribution detection: in {in_name} (test), out {out_name} (test)"]
    for metric in METRICS:
        rows = [[m] + [r["metrics"][s][metric] for s in SCORES] for m, r in results.items()]
        parts += ["", f"**{metric.upper()}**", "", markdown_table(["method", *SCORES], rows)]
    return "\n".join(parts)


def figures(results, out, in_name, out_name):
    """Fig. 9 a-b (ROC curves of the variances), 9 c (AUROC per score), Fig. 10 (output-variance histograms)."""
    names = []
    fig, axes = new_figure(1, 2)
    for ax, score in zip(axes[0], ("latent variance", "output variance")):
        for method, r in results.items():
            if r["scores"][score] is not None:
                s_in, s_out = r["scores"][score]
                fpr, tpr = metrics.roc_curve(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])
                ax.plot(fpr, tpr, label=f"{method} ({r['metrics'][score]['auroc']:.2f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")  # also the legend when no method has the score
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, {score}")
        ax.legend(fontsize=7)
    names.append(save_figure(fig, out, "roc.png"))

    fig, axes = new_figure(1, 1, size=(6.4, 3.4))
    ax, width = axes[0, 0], 0.8 / max(len(results), 1)
    for i, (method, r) in enumerate(results.items()):
        values = [r["metrics"][s]["auroc"] for s in SCORES]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=method)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(SCORES))], SCORES, fontsize=8)
    ax.set(ylabel="AUROC", ylim=(0, 1), title=f"AUROC, in {in_name} / out {out_name}")
    ax.legend(fontsize=7)
    names.append(save_figure(fig, out, "auroc.png"))

    stochastic = [(m, r) for m, r in results.items() if r["scores"]["output variance"] is not None]
    if stochastic:
        fig, axes = new_figure(1, len(stochastic))
        for ax, (method, r) in zip(axes[0], stochastic):
            s_in, s_out = r["scores"]["output variance"]
            bins = np.histogram_bin_edges(np.r_[s_in, s_out], bins=40)
            ax.hist(s_in, bins, alpha=0.6, density=True, label=f"in ({in_name})")
            ax.hist(s_out, bins, alpha=0.6, density=True, label=f"out ({out_name})")
            ax.set(xlabel="output variance (mean over pixels)", title=method)
            ax.legend(fontsize=7)
        names.append(save_figure(fig, out, "output_variance_histogram.png"))
    return names

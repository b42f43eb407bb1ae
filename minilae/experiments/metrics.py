"""Evaluation metrics written from scratch (host NumPy): ranking scores, calibration, nearest neighbours.

Conventions:
* ranking metrics take binary ``labels`` (1 = positive, e.g. out-of-distribution) and ``scores``
  (higher = more positive). Both classes must be present and scores finite, else ValueError.
* AUROC = P(s+ > s-) + P(s+ = s-) / 2 = U / (n0 n1), computed from ranks with ties averaged;
  all scores equal therefore gives exactly 0.5.
* Average precision (AUPRC) = sum over distinct thresholds t, descending, of (R(t) - R(t')) P(t),
  where P, R are precision and recall of {s >= t} and t' the previous (larger) threshold: tied
  scores enter together, as one step (the step-wise definition of scikit-learn).
* FPR at 95% TPR: the threshold is the largest score t with TPR(t) = #{s+ >= t} / n1 >= 0.95;
  the value is FPR(t) = #{s- >= t} / n0.
* Calibration: confidence = max_c p_c, prediction = argmax_c p_c (lowest index on ties); 15
  equal-width bins [b/15, (b+1)/15), the last one closed at 1. ECE = sum_b n_b/N |acc_b - conf_b|,
  MCE = max over non-empty bins |acc_b - conf_b|, RMSCE = sqrt(sum_b n_b/N (acc_b - conf_b)^2).
* k-nearest neighbours: squared Euclidean distance; neighbours ordered by distance, equal
  distances by training index (stable sort); majority vote, a tied vote going to the tied class
  whose nearest member comes first in that order.
"""
from __future__ import annotations

import numpy as np

__all__ = ["auroc", "average_precision", "fpr_at_tpr", "roc_curve", "calibration", "knn_predict",
           "choose_k", "N_BINS"]

N_BINS = 15


def _ranking_inputs(labels, scores):
    """(bool labels, float scores) checked: same length, finite scores, both classes present."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of one length, got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(scores)).sum())} are NaN or infinite")
    labels = labels.astype(bool)
    n1 = int(labels.sum())
    if n1 == 0 or n1 == labels.size:
        raise ValueError(f"ranking metrics need both classes; got {n1} positives and {labels.size - n1} negatives")
    return labels, scores


def average_ranks(a):
    """Ranks 1..n of a, tied values sharing the mean of their ranks."""
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # start index of each run of equal values, and the run each element belongs to
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    run = np.cumsum(np.r_[True, sorted_a[1:] != sorted_a[:-1]]) - 1
    ends = np.r_[starts[1:], a.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(a.size)
    ranks[order] = mean_rank[run]
    return ranks


def auroc(labels, scores):
    """AUROC = (sum of positives' ranks - n1 (n1 + 1) / 2) / (n0 n1), ties averaged (Mann-Whitney U)."""
    labels, scores = _ranking_inputs(labels, scores)
    n1 = labels.sum()
    n0 = labels.size - n1
    return float((average_ranks(scores)[labels].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def _threshold_counts(labels, scores):
    """(thresholds descending, #positives >= t, #negatives >= t) at every distinct score t."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[s[1:] != s[:-1], True]  # last element of each run of tied scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    return s[last], tp, fp


def roc_curve(labels, scores):
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    labels, scores = _ranking_inputs(labels, scores)
    _, tp, fp = _threshold_counts(labels, scores)
    return np.r_[0.0, fp / (~labels).sum()], np.r_[0.0, tp / labels.sum()]


def average_precision(labels, scores):
    """AP = sum_t (R(t) - R(t_prev)) P(t) over distinct thresholds t, descending (ties enter together)."""
    labels, scores = _ranking_inputs(labels, scores)
    _, tp, fp = _threshold_counts(labels, scores)
    recall = tp / labels.sum()
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(labels, scores, tpr=0.95):
    """FPR(t*) at the largest threshold t* with TPR(t*) >= tpr."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    labels, scores = _ranking_inputs(labels, scores)
    _, tp, fp = _threshold_counts(labels, scores)
    first = int(np.argmax(tp / labels.sum() >= tpr))  # thresholds descend, TPR ascends; the last one has TPR 1
    return float(fp[first] / (~labels).sum())


def calibration(probs, labels, n_bins=N_BINS):
    """{'accuracy', 'ece', 'mce', 'rmsce'} of predictive probabilities probs (N, C) for int labels (N,)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"probs must be (N, C) and labels (N,) with N >= 1, got {probs.shape} and {labels.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1, atol=1e-6):
        raise ValueError("probs must be finite, >= 0, with rows summing to 1")
    if labels.dtype.kind not in "iu" or (labels < 0).any() or (labels >= probs.shape[1]).any():
        raise ValueError(f"labels must be integers in [0, {probs.shape[1] - 1}]")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    n_b = np.bincount(bins, minlength=n_bins)
    filled = n_b > 0
    gap = np.abs(np.bincount(bins, correct, n_bins)[filled] - np.bincount(bins, conf, n_bins)[filled]) / n_b[filled]
    weight = n_b[filled] / conf.size
    return {"accuracy": float(correct.mean()), "ece": float((weight * gap).sum()), "mce": float(gap.max()),
            "rmsce": float(np.sqrt((weight * gap ** 2).sum()))}


def squared_distances(a, b):
    """D_ij = ||a_i - b_j||^2 = ||a_i||^2 + ||b_j||^2 - 2 a_i . b_j (clipped at 0 against rounding)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def knn_predict(train_z, train_y, test_z, k, n_classes=None):
    """Majority vote of the k nearest training codes (ties: the tied class with the nearest member)."""
    train_z, test_z, train_y = np.atleast_2d(train_z), np.atleast_2d(test_z), np.asarray(train_y)
    if train_y.shape != (train_z.shape[0],) or train_z.shape[1] != test_z.shape[1]:
        raise ValueError(f"train_z (N, D), train_y (N,) and test_z (M, D) disagree: {train_z.shape}, "
                         f"{train_y.shape}, {test_z.shape}")
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= train_z.shape[0]:
        raise ValueError(f"k must be an integer in [1, {train_z.shape[0]}] (the training size), got {k!r}")
    k = int(k)
    n_classes = int(train_y.max()) + 1 if n_classes is None else int(n_classes)
    nearest = np.argsort(squared_distances(test_z, train_z), axis=1, kind="stable")[:, :k]
    votes = train_y[nearest]  # (M, k), nearest first
    onehot = votes[:, :, None] == np.arange(n_classes)[None, None, :]
    counts = onehot.sum(axis=1)
    first = np.where(onehot.any(axis=1), onehot.argmax(axis=1), k)  # position of each class's nearest member
    tied = counts == counts.max(axis=1, keepdims=True)
    return np.where(tied, first, k + 1).argmin(axis=1)


def choose_k(z, y, candidates, rng, n_folds=2):
    """The candidate k of best mean accuracy over a random n_folds split of (z, y); ties: the smaller k.

    Candidates larger than the smallest training part are dropped; returns (k, {k: accuracy})."""
    z, y = np.atleast_2d(z), np.asarray(y)
    if len(y) < n_folds:
        raise ValueError(f"{n_folds}-fold cross-validation needs at least {n_folds} labelled points, got {len(y)}")
    folds = np.array_split(rng.permutation(len(y)), n_folds)
    smallest_train = len(y) - max(len(f) for f in folds)
    ks = sorted(k for k in set(candidates) if 1 <= k <= smallest_train)
    if not ks:
        raise ValueError(f"no candidate k in {sorted(candidates)} fits a training part of {smallest_train} points")
    acc = {}
    for k in ks:
        hits = [(knn_predict(z[np.setdiff1d(np.arange(len(y)), f)], y[np.setdiff1d(np.arange(len(y)), f)],
                             z[f], k) == y[f]).mean() for f in folds]
        acc[k] = float(np.mean(hits))
    best = max(ks, key=lambda k: (acc[k], -k))
    return best, acc

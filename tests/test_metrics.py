"""minilae.experiments.metrics against brute-force definitions on small inputs with ties and degenerate cases.

Host-only code (NumPy metrics on host arrays), so these run on the numpy backend only.
"""
from __future__ import annotations

import numpy as np
import pytest

from minilae.experiments import metrics

pytestmark = pytest.mark.backends("numpy")


def brute_auroc(labels, scores):
    """P(s+ > s-) + P(s+ = s-) / 2 over all (positive, negative) pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def brute_counts(labels, scores, t):
    return ((scores >= t) & (labels == 1)).sum(), ((scores >= t) & (labels == 0)).sum()


def brute_ap(labels, scores):
    """sum over distinct thresholds, descending, of (R(t) - R(prev)) P(t) with {s >= t}."""
    ap, prev = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        tp, fp = brute_counts(labels, scores, t)
        recall = tp / (labels == 1).sum()
        ap += (recall - prev) * tp / (tp + fp)
        prev = recall
    return ap


def brute_fpr95(labels, scores, tpr=0.95):
    for t in sorted(set(scores), reverse=True):
        tp, fp = brute_counts(labels, scores, t)
        if tp / (labels == 1).sum() >= tpr:
            return fp / (labels == 0).sum()


def ranking_case(seed, n, levels):
    """Integer scores from few levels: many ties; both classes present."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    return labels, rng.integers(0, levels, n).astype(float)


@pytest.mark.parametrize("seed,n,levels", [(0, 7, 3), (1, 20, 4), (2, 40, 40), (3, 33, 2), (4, 60, 1000)])
def test_ranking_metrics_match_brute_force(seed, n, levels):
    """Catches mis-averaged tie ranks (e.g. ordinal ranks), thresholds that split tied scores, an AP step
    summed per item instead of per distinct threshold, or an FPR@95 taken one threshold off."""
    labels, scores = ranking_case(seed, n, levels)
    assert metrics.auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores), abs=1e-12)
    assert metrics.average_precision(labels, scores) == pytest.approx(brute_ap(labels, scores), abs=1e-12)
    assert metrics.fpr_at_tpr(labels, scores) == pytest.approx(brute_fpr95(labels, scores), abs=1e-12)
    fpr, tpr = metrics.roc_curve(labels, scores)  # trapezoids over grouped thresholds = tie-averaged AUROC
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(brute_auroc(labels, scores), abs=1e-12)


def test_fpr_at_exactly_95_percent_tpr():
    """TPR reaches 0.95 exactly at t = 11 (19 of 20 positives): FPR counts negatives >= 11 (none). Catches a
    strict TPR > 0.95 rule, which takes the next threshold (10) and counts the negative at 10.5."""
    labels = np.r_[np.ones(20, int), np.zeros(3, int)]
    scores = np.r_[np.arange(10.0, 30.0), [9.5, 10.5, 5.0]]
    assert metrics.fpr_at_tpr(labels, scores) == 0.0 == brute_fpr95(labels, scores)
    assert metrics.fpr_at_tpr(labels, scores, tpr=1.0) == pytest.approx(1 / 3)


def test_ranking_degenerate_values():
    """All scores equal: AUROC exactly 0.5 (documented), AP = positive rate, FPR@95 = 1; perfect and reversed
    separation: 1 and 0. Catches a tie rule that favours either class."""
    labels = np.array([0, 1, 0, 1, 1])
    same = np.full(5, 3.0)
    assert metrics.auroc(labels, same) == 0.5
    assert metrics.average_precision(labels, same) == pytest.approx(0.6)
    assert metrics.fpr_at_tpr(labels, same) == 1.0
    assert metrics.auroc(labels, labels * 2.0) == 1.0 and metrics.auroc(labels, -labels * 2.0) == 0.0
    assert metrics.fpr_at_tpr(labels, labels * 2.0) == 0.0
    assert metrics.average_precision(labels, labels * 2.0) == 1.0


@pytest.mark.parametrize("labels,scores,match", [
    ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
    ([0, 0], [0.1, 0.2], "both classes"),
    ([0, 1, 1], [0.1, np.nan, 0.3], "finite"),
    ([0, 1, 2], [0.1, 0.2, 0.3], "0 .negative. or 1"),
    ([0, 1], [0.1, 0.2, 0.3], "one length"),
])
@pytest.mark.parametrize("fn", [metrics.auroc, metrics.average_precision, metrics.fpr_at_tpr, metrics.roc_curve])
def test_ranking_bad_input(fn, labels, scores, match):
    """One class empty, NaN scores, non-binary labels, mismatched lengths: a clear ValueError, never NaN."""
    with pytest.raises(ValueError, match=match):
        fn(np.array(labels), np.array(scores))


def brute_calibration(probs, labels, n_bins=15):
    """Loop over bins [b/B, (b+1)/B) (last closed): n_b/N weighted |acc - conf|, max, RMS."""
    conf, pred = probs.max(1), probs.argmax(1)
    ece, mce, ms = 0.0, 0.0, 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf >= lo) & ((conf < hi) if b < n_bins - 1 else (conf <= hi))
        if inside.any():
            gap = abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
            ece += inside.mean() * gap
            ms += inside.mean() * gap ** 2
            mce = max(mce, gap)
    return ece, mce, np.sqrt(ms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_matches_brute_force(seed):
    """Catches a wrong bin (edges, the conf = 1 bin), unweighted ECE, or an MCE over empty bins."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(50, 4)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[0] = [1.0, 0, 0, 0]  # confidence exactly 1: the last bin
    probs[1] = [1 / 3, 2 / 3 - 1 / 15, 1 / 15, 0]  # not an edge
    probs[2] = [0.6, 0.4, 0, 0]  # 0.6 = 9/15: the edge of bin 9
    labels = rng.integers(0, 4, 50)
    got = metrics.calibration(probs, labels)
    ece, mce, rmsce = brute_calibration(probs, labels)
    assert got["ece"] == pytest.approx(ece, abs=1e-12) and got["mce"] == pytest.approx(mce, abs=1e-12)
    assert got["rmsce"] == pytest.approx(rmsce, abs=1e-12)
    assert got["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())


def test_calibration_perfect_and_bad_input():
    """Certain and correct: all errors 0. Bad rows, labels out of range, empty input: ValueError."""
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert metrics.calibration(probs, np.array([0, 1, 2, 1])) == {"accuracy": 1.0, "ece": 0.0, "mce": 0.0,
                                                                   "rmsce": 0.0}
    assert metrics.calibration(probs, np.array([1, 2, 0, 0]))["ece"] == 1.0
    with pytest.raises(ValueError, match="rows summing to 1"):
        metrics.calibration(np.array([[0.5, 0.6]]), np.array([0]))
    with pytest.raises(ValueError, match="labels must be integers"):
        metrics.calibration(np.array([[0.5, 0.5]]), np.array([2]))
    with pytest.raises(ValueError, match="N >= 1"):
        metrics.calibration(np.zeros((0, 2)), np.zeros(0, int))


def brute_knn(train_z, train_y, test_z, k):
    """Per test point: sort by (distance, index), vote; tie -> the tied class whose member comes first."""
    out = []
    for q in test_z:
        order = sorted(range(len(train_z)), key=lambda j: (float(((train_z[j] - q) ** 2).sum()), j))[:k]
        votes = [int(train_y[j]) for j in order]
        top = max(votes.count(c) for c in set(votes))
        out.append(next(v for v in votes if votes.count(v) == top))
    return np.array(out)


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2), (2, 4), (3, 5), (4, 12)])
def test_knn_matches_brute_force(seed, k):
    """Integer coordinates make equal distances exact: catches an unstable neighbour order, a vote tie going
    to the smallest label instead of the nearest member, or distances of the wrong sign/scale."""
    rng = np.random.default_rng(seed)
    train_z = rng.integers(0, 3, (12, 2)).astype(float)
    train_y = rng.integers(0, 3, 12)
    test_z = rng.integers(0, 3, (15, 2)).astype(float)
    np.testing.assert_array_equal(metrics.knn_predict(train_z, train_y, test_z, k), brute_knn(train_z, train_y,
                                                                                              test_z, k))


def test_knn_tie_rule_and_bad_k():
    """k = 2 with one neighbour of each class: the nearer one wins, whatever the labels' order."""
    train_z, test_z = np.array([[0.0], [1.0], [5.0]]), np.array([[0.4], [0.6]])
    assert list(metrics.knn_predict(train_z, np.array([1, 0, 0]), test_z, 2)) == [1, 0]
    for k in (0, 4, 1.5):
        with pytest.raises(ValueError, match="k must be an integer"):
            metrics.knn_predict(train_z, np.array([1, 0, 0]), test_z, k)


def test_choose_k_matches_brute_force():
    """The k of best 2-fold accuracy on the same split, ties to the smaller k; candidates beyond the smaller
    training part dropped. Catches scoring on the training fold or picking the larger of tied k."""
    rng = np.random.default_rng(3)
    z, y = rng.normal(size=(21, 2)), rng.integers(0, 3, 21)
    k, acc = metrics.choose_k(z, y, (1, 3, 5, 11, 50), np.random.default_rng(7))
    folds = np.array_split(np.random.default_rng(7).permutation(21), 2)
    assert sorted(acc) == [1, 3, 5]  # training parts of 10 and 11 points: 11 and 50 do not fit
    for kk in acc:
        hits = [np.mean(brute_knn(np.delete(z, f, 0), np.delete(y, f), z[f], kk) == y[f]) for f in folds]
        assert acc[kk] == pytest.approx(np.mean(hits))
    assert k == min(kk for kk in acc if acc[kk] == max(acc.values()))
    with pytest.raises(ValueError, match="no candidate k"):
        metrics.choose_k(z[:4], y[:4], (3, 5), np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.choose_k(z[:1], y[:1], (1,), np.random.default_rng(0))

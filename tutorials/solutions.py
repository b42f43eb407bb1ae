"""Reference solutions and checkers of the tutorials' exercises (try the exercise before reading on).

Each exercise in a notebook has a stub that returns ``None`` and a checking cell that calls
:func:`exercise`: it first shows that the checker rejects a deliberately wrong answer (so the check
can fail), then checks your answer - or, while your stub still returns ``None``, this file's
reference solution, which is how CI proves every checker works.
"""
from __future__ import annotations

import math

import numpy as np

from minilae.backend import asarray, to_numpy


def exercise(name, check, yours, reference, wrong):
    """Run check on a wrong answer (it must raise AssertionError), then on yours - or on the reference while
    yours is still the stub that returns None."""
    try:
        check(wrong)
    except AssertionError:
        pass
    else:
        raise AssertionError(f"{name}: the checker accepted a wrong answer")

    def stub_aware(*args, **kwargs):
        out = yours(*args, **kwargs)
        if out is None:
            raise _Stub
        return out

    try:
        check(stub_aware)
        who = "your answer"
    except _Stub:
        check(reference)
        who = "the reference solution (tutorials/solutions.py; write yours in the cell above)"
    print(f"{name}: {who} passes the check")


class _Stub(Exception):
    """Raised when an exercise stub returns None (not answered yet)."""


# ----------------------------------------------------------------------------------------------
# 04: the Laplacian autoencoder

def evidence(log_lik, lam, theta, G):
    """log p(D | lambda) ~= log p(D | theta*) - lambda/2 ||theta*||^2 + P/2 log lambda - 1/2 sum_i log(G_i + lambda)."""
    return log_lik - 0.5 * lam * theta @ theta + 0.5 * theta.size * math.log(lam) - 0.5 * np.log(G + lam).sum()


def check_evidence(fn):
    """fn(log_lik, lam, theta, G) against minilae.laplace.log_marginal_likelihood for three lambdas."""
    from minilae.laplace import log_marginal_likelihood  # noqa: PLC0415

    rng = np.random.default_rng(0)
    theta, G = rng.standard_normal(50), rng.exponential(size=50) * 10
    for lam in (0.1, 1.0, 30.0):
        want = log_marginal_likelihood(math.log(lam), asarray(theta), asarray(G), -123.0)
        got = float(fn(-123.0, lam, theta, G))
        assert abs(got - want) < 1e-10 * abs(want), (lam, got, want)


def marginal_variances(Lambda):
    """diag(Lambda^-1) from a Cholesky factor Lambda = L L^T: (Lambda^-1)_ii = sum_k (L^-1)_ki^2."""
    L_inv = np.linalg.inv(np.linalg.cholesky(Lambda))
    return (L_inv ** 2).sum(axis=0)


def check_marginal_variances(fn):
    """fn(Lambda) == diag(inv(Lambda)) on a random SPD matrix with strong correlations."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((12, 12))
    Lambda = A @ A.T + 0.1 * np.eye(12)
    got = np.asarray(fn(Lambda))
    want = np.diag(np.linalg.inv(Lambda))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-8, atol=0), (got, want)


def online_precision(H0, G, alpha, t):
    """H_t of H_{t+1} = (1 - alpha) H_t + G for a fixed G: (1 - alpha)^t H_0 + (1 - (1 - alpha)^t) G / alpha."""
    decay = (1 - alpha) ** t
    return decay * H0 + (1 - decay) * G / alpha


def check_online_precision(fn):
    """fn(H0, G, alpha, t) against t steps of the recursion, for a few alphas and t."""
    rng = np.random.default_rng(2)
    H0, G = rng.exponential(size=7), rng.exponential(size=7)
    for alpha in (0.5, 0.05, 1e-3):
        H = H0.copy()
        for t in range(1, 201):
            H = (1 - alpha) * H + G
            if t in (1, 10, 200):
                assert np.allclose(fn(H0, G, alpha, t), H, rtol=1e-10), (alpha, t)


# ----------------------------------------------------------------------------------------------
# 03: Hessian, GGN, Fisher

def ggn_from_jacobians(J, H_out):
    """G = sum_n J_n^T H_out,n J_n for J (B, d, P), H_out (B, d, d)."""
    return np.einsum("bdp,bde,beq->pq", J, H_out, J)


def check_ggn(fn):
    """fn(J, H_out) against minilae.curvature.ggn on a small tanh net with a Bernoulli likelihood."""
    from minilae import curvature  # noqa: PLC0415
    from minilae.layers import Linear, Sequential, Tanh  # noqa: PLC0415
    from minilae.losses import Bernoulli  # noqa: PLC0415

    rng = np.random.default_rng(3)
    net = Sequential(Linear(3, 5, rng=rng), Tanh(), Linear(5, 4, rng=rng))
    x = asarray(rng.standard_normal((6, 3)))
    f = net.forward(x)
    got = np.asarray(fn(to_numpy(net.jac_params(x)), to_numpy(Bernoulli().hess(f))))
    want = to_numpy(curvature.ggn(net, Bernoulli(), x))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-10, atol=1e-14), "not sum_n J^T H J"


def bernoulli_fisher(f):
    """E_y[r r^T] per example for logits f (B, d): pixels independent, r_i = p_i - y_i, y_i in {0, 1}."""
    p = 1 / (1 + np.exp(-f))
    mean_r = p * (p - 1) + (1 - p) * p                         # E[r_i] = 0, written out
    second = p * (p - 1) ** 2 + (1 - p) * p ** 2               # E[r_i^2]
    out = mean_r[:, :, None] * mean_r[:, None, :]
    idx = np.arange(f.shape[1])
    out[:, idx, idx] = second
    return out


def check_bernoulli_fisher(fn):
    """fn(f) against minilae.curvature.output_fisher (quadrature over y) for Bernoulli logits."""
    from minilae.curvature import output_fisher  # noqa: PLC0415
    from minilae.losses import Bernoulli  # noqa: PLC0415

    f = 2 * np.random.default_rng(4).standard_normal((5, 3))
    got = np.asarray(fn(f))
    want = to_numpy(output_fisher(Bernoulli(), asarray(f)))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-10, atol=1e-14), "not E_y[r r^T]"


def kl_gaussian(mu0, s0, mu, s):
    """KL(N(mu0, e^s0) || N(mu, e^s)) = 1/2 [s - s0 + (e^s0 + (mu0 - mu)^2) e^-s - 1], element-wise."""
    return 0.5 * (s - s0 + (np.exp(s0) + (mu0 - mu) ** 2) * np.exp(-s) - 1)


def check_kl(fn):
    """fn against quadrature of p0 log(p0 / p) on a fine grid, for a few pairs of Gaussians."""
    rng = np.random.default_rng(5)
    mu0, s0, mu, s = rng.standard_normal(4), rng.uniform(-1, 1, 4), rng.standard_normal(4), rng.uniform(-1, 1, 4)
    y = np.linspace(-15, 15, 200001)[:, None]
    dy = y[1, 0] - y[0, 0]

    def log_normal(y, m, logvar):
        return -0.5 * (np.log(2 * np.pi) + logvar + (y - m) ** 2 * np.exp(-logvar))

    p0 = np.exp(log_normal(y, mu0, s0))
    want = (p0 * (log_normal(y, mu0, s0) - log_normal(y, mu, s))).sum(axis=0) * dy
    got = np.asarray(fn(mu0, s0, mu, s))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-7, atol=1e-10), (got, want)


# ----------------------------------------------------------------------------------------------
# 02: backpropagating the Hessian

def linear_ggn_diagonal(M, x):
    """diag(sum_b J_p^T M_b J_p) of y = W x + b: (M_b,oo x_b,i^2 over b, flattened like W; then sum_b M_b,oo)."""
    m = np.einsum("boo->bo", M)
    return np.concatenate([np.einsum("bo,bi->oi", m, x ** 2).ravel(), m.sum(axis=0)])


def check_linear_ggn_diagonal(fn):
    """fn(M, x) against the diagonal of the dense sum_b J_p^T M_b J_p from Linear.jac_params."""
    from minilae.layers import Linear  # noqa: PLC0415

    rng = np.random.default_rng(6)
    layer = Linear(4, 3, rng=rng)
    x = rng.standard_normal((5, 4))
    A = rng.standard_normal((5, 3, 3))
    M = A @ A.transpose(0, 2, 1)                               # a full PSD M per sample
    J = to_numpy(layer.jac_params(asarray(x)))
    want = np.einsum("bop,boq,bqp->p", J, M, J)
    got = np.asarray(fn(M, x))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-10, atol=1e-14), "not diag(J^T M J)"


def squared_kernel_backprop(T, m):
    """m_in = (T * T)^T m per sample, for the convolution matrix T (d_out, d_in) and m (B, d_out)."""
    return m @ (T * T)


def check_squared_kernel_backprop(fn):
    """fn(T, m) against Conv2d.backprop_diag, the transposed convolution with the squared kernel."""
    from minilae.layers import Conv2d  # noqa: PLC0415

    rng = np.random.default_rng(7)
    conv = Conv2d(2, 3, 3, stride=2, padding=1, rng=rng)
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    conv(x)
    m = rng.random((2,) + conv.out_shape((2, 6, 6)))
    want = to_numpy(conv.backprop_diag(asarray(m))).reshape(2, -1)
    got = np.asarray(fn(to_numpy(conv.conv_matrix((2, 6, 6))), m.reshape(2, -1)))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-10, atol=1e-14), "not (T * T)^T m"


# ----------------------------------------------------------------------------------------------
# 01: layers and Jacobians

def upsample_jacobian(C, H, W, s):
    """J_x of nearest up-sampling by s: I_C kron (U_H kron U_W), U_n = I_n kron 1_s (each output copies one input)."""
    def up(n):
        return np.kron(np.eye(n), np.ones((s, 1)))
    return np.kron(np.eye(C), np.kron(up(H), up(W)))


def check_upsample_jacobian(fn):
    """fn(C, H, W, s) against Upsample(s).jac_input for one sample."""
    from minilae.layers import Upsample  # noqa: PLC0415

    for C, H, W, s in ((2, 3, 2, 2), (1, 2, 4, 3)):
        x = asarray(np.random.default_rng(8).standard_normal((1, C, H, W)))
        want = to_numpy(Upsample(s).jac_input(x))[0]
        got = np.asarray(fn(C, H, W, s))
        assert got.shape == want.shape and np.array_equal(got, want), (C, H, W, s)


def maxpool_jacobian(x, k):
    """J_x of k x k max-pooling for one sample x (C, H, W): row (c, h, w) has a single 1 at its window's arg-max."""
    C, H, W = x.shape
    Ho, Wo = H // k, W // k
    windows = x[:, :Ho * k, :Wo * k].reshape(C, Ho, k, Wo, k).transpose(0, 1, 3, 2, 4).reshape(C, Ho, Wo, k * k)
    best = windows.argmax(axis=-1)
    c, h, w = np.meshgrid(np.arange(C), np.arange(Ho), np.arange(Wo), indexing="ij")
    rows = (c * Ho + h) * Wo + w
    cols = (c * H + h * k + best // k) * W + w * k + best % k
    J = np.zeros((C * Ho * Wo, C * H * W))
    J[rows.ravel(), cols.ravel()] = 1.0
    return J


def check_maxpool_jacobian(fn):
    """fn(x, k) against MaxPool2d(k).jac_input for one sample (random input: no ties)."""
    from minilae.layers import MaxPool2d  # noqa: PLC0415

    for shape, k in (((2, 4, 4), 2), ((1, 6, 6), 3)):
        x = np.random.default_rng(9).standard_normal(shape)
        want = to_numpy(MaxPool2d(k).jac_input(asarray(x[None])))[0]
        got = np.asarray(fn(x, k))
        assert got.shape == want.shape and np.array_equal(got, want), (shape, k)


def linear_vjp_params(x, v):
    """J_theta^T v of y = W x + b summed over the batch: (vec(sum_b v_b x_b^T), sum_b v_b)."""
    return np.concatenate([(v.T @ x).ravel(), v.sum(axis=0)])


def check_linear_vjp_params(fn):
    """fn(x, v) against Linear.vjp_params after a forward at x."""
    from minilae.layers import Linear  # noqa: PLC0415

    rng = np.random.default_rng(10)
    layer = Linear(4, 3, rng=rng)
    x, v = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    layer.forward(asarray(x))
    want = to_numpy(layer.vjp_params(asarray(v)))
    got = np.asarray(fn(x, v))
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-12, atol=1e-14), "not (v x^T, v)"


# ----------------------------------------------------------------------------------------------
# 05: uncertainty in use

def auroc_by_pairs(labels, scores):
    """P(score of a positive > score of a negative), ties counting 1/2, over all n1 n0 pairs."""
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=float)
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean(pos > neg) + 0.5 * np.mean(pos == neg))


def check_auroc(fn):
    """fn(labels, scores) against minilae.experiments.metrics.auroc on tied and untied scores."""
    from minilae.experiments.metrics import auroc  # noqa: PLC0415

    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 200)
    for scores in (rng.integers(0, 4, 200) + labels, rng.standard_normal(200) + labels):
        assert abs(fn(labels, scores) - auroc(labels, scores)) < 1e-12


def ece(probs, labels, n_bins=15):
    """sum_b n_b / N |acc_b - conf_b| over n_bins equal-width bins of the confidence max_c p_c."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):          # a loop over at most n_bins bins, not over data
        inside = bins == b
        total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def check_ece(fn):
    """fn(probs, labels) against minilae.experiments.metrics.calibration(...)['ece']."""
    from minilae.experiments.metrics import calibration  # noqa: PLC0415

    rng = np.random.default_rng(12)
    probs = rng.dirichlet(np.ones(10) * 0.5, size=500)
    # under-confident where the confidence is low (always right), over-confident elsewhere (random labels), so
    # that the gaps of the bins have both signs and only a per-bin |acc - conf| gets the ECE
    labels = np.where(probs.max(axis=1) < 0.5, probs.argmax(axis=1), rng.integers(0, 10, 500))
    assert abs(fn(probs, labels) - calibration(probs, labels)["ece"]) < 1e-12

"""KFAC: the Kronecker factors against brute force where KFAC is exact (one sample of a Linear layer, a deep
linear network, a convolution with one output position), the factors' parts that are exact on any net
(G from the backpropagated M, the Linear bias block), the KFC factors of Conv2d against a loop reference,
and the KroneckerLaplace algebra (mat-vec, sampling covariance, log-det, marginal variances, evidence)
against the dense Kronecker product in float64."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minilae.backend import asarray, to_numpy, xp
from minilae.gradcheck import assert_close, relative_error
from minilae.hessian import MemoryBudgetError, estimate_cost, ggn_blocks, ggn_kfac
from minilae.hessian.chain import leaf_layers
from minilae.kfac import KronBlock, KroneckerLaplace, kron_order
from minilae.laplace import log_marginal_likelihood_grad
from minilae.layers import Conv2d, ConvTranspose2d, Flatten, Linear, MissingRuleError, Reshape, Sequential, Tanh
from minilae.losses import Bernoulli, Categorical, Gaussian
from minilae.posthoc import dataset_kfac, fit_posthoc

EXACT = 1e-10  # two exact computations of the same quantity in float64: round-off only
LIKELIHOODS = {"gaussian": lambda: Gaussian(0.7), "bernoulli": Bernoulli, "categorical": Categorical}


def targets(name, f, rng):
    if name == "categorical":
        return asarray(rng.integers(0, f.shape[1], size=f.shape[0]))
    return asarray(rng.random(f.shape) if name == "bernoulli" else rng.standard_normal(f.shape))


def brute_blocks(model, lik, x, y):
    """Per parametric layer, sum_b J_p^T H J_p from the dense Jacobian of the whole network (P_l x P_l)."""
    J = model.jac_params(x)  # (B, d, P)
    G = (J.transpose(0, 2, 1) @ lik.hess(model(x), y) @ J).sum(axis=0)
    out, start = [], 0
    for layer in leaf_layers(model):
        if layer.num_params:
            out.append(G[start:start + layer.num_params, start:start + layer.num_params])
        start += layer.num_params
    return out


def in_kron_order(block_matrix, blk):
    """A layer's (P_l x P_l) block in the flat order, re-indexed to the rows-of-W~ order of kron(G, A)."""
    idx = kron_order(*blk.shape, blk.bias)
    return block_matrix[idx][:, idx]


def kfac_blocks(model, lik, x, y, method="kfac"):
    return ggn_kfac(model, lik, x, y, method=method)


# ---- where KFAC is exact --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lik_name", list(LIKELIHOODS))
@pytest.mark.parametrize("method", ["kfac", "kfac-approx"])
def test_one_sample_of_a_linear_layer_is_exact(method, lik_name, bias):
    """One sample: the GGN block is kron(M, a a^T) exactly. Catches a wrong scaling (1/n with n != 1 term),
    the bias column placed elsewhere than kron_order says, A or G transposed or swapped. 'kfac-approx' is
    exact too where M is diagonal (Gaussian, Bernoulli), and must differ under the Categorical's full M."""
    rng = np.random.default_rng(1)
    layer = Linear(4, 3, bias=bias, rng=rng)
    x = asarray(rng.standard_normal((1, 4)))
    lik = LIKELIHOODS[lik_name]()
    y = targets(lik_name, layer(x), rng)
    (blk,) = kfac_blocks(layer, lik, x, y, method)
    assert blk.n == 1 and blk.shape == (3, 4 + bias)
    expected = in_kron_order(brute_blocks(layer, lik, x, y)[0], blk)
    if method == "kfac-approx" and lik_name == "categorical":
        assert relative_error(blk.matrix(), expected) > 1e-3
    else:
        assert_close(blk.matrix(), expected, EXACT, "KFAC block of one sample", atol=EXACT)


@pytest.mark.parametrize("bias", [True, False])
def test_a_deep_linear_network_is_exact(bias):
    """Linear layers only, Gaussian likelihood: M at every layer is the same for every sample, so
    kron(G, A) / N is the exact block of every layer for a batch of 5. Catches G read off the wrong M (e.g.
    the M of the layer below), n counted per batch of layers instead of per sample."""
    rng = np.random.default_rng(2)
    model = Sequential(Linear(4, 3, bias=bias, rng=rng), Linear(3, 5, bias=bias, rng=rng),
                       Linear(5, 2, bias=bias, rng=rng))
    x = asarray(rng.standard_normal((5, 4)))
    lik = Gaussian(0.7)
    y = targets("gaussian", model(x), rng)
    blocks = kfac_blocks(model, lik, x, y)
    for i, (blk, exact) in enumerate(zip(blocks, brute_blocks(model, lik, x, y))):
        assert blk.n == 5
        assert_close(blk.matrix(), in_kron_order(exact, blk), 1e-9, f"deep linear layer {i}", atol=1e-12)


def test_a_convolution_with_one_output_position_and_one_sample_is_exact():
    """Kernel = image: one position (T = 1), so KFC has no spatial sum to drop and is exact for one sample.
    Catches the im2col columns and the weight layout (C, k_h, k_w) disagreeing in A."""
    rng = np.random.default_rng(3)
    model = Sequential(Conv2d(2, 3, 3, rng=rng), Flatten())
    x = asarray(rng.standard_normal((1, 2, 3, 3)))
    lik = Bernoulli()
    y = targets("bernoulli", model(x), rng)
    (blk,) = kfac_blocks(model, lik, x, y)
    assert_close(blk.matrix(), in_kron_order(brute_blocks(model, lik, x, y)[0], blk), EXACT, "1x1-output conv",
                 atol=EXACT)


def small_net(rng):
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh(), Flatten(), Linear(2 * 4 * 4, 6, rng=rng), Tanh(),
                      Linear(6, 3, rng=rng))


@pytest.mark.parametrize("lik_name", ["gaussian", "categorical"])
def test_on_a_nonlinear_net_the_exact_parts_are_exact_and_the_rest_is_reported(lik_name):
    """What is true of KFAC on any net: every block symmetric PSD; a Linear layer's bias block is exact
    (its input entry is 1 for every sample, so A[bias, bias] / n = 1 and the bias block is G = sum_b M_b);
    the trace of a Linear block tr(G) tr(A) / n. The weight blocks are approximations: their error against
    the exact block (and the error of their diagonal against the exact diagonal) is reported, and must not
    be 0 (else this net would not test KFAC at all). Catches a G summed over the wrong axis, a wrong n,
    non-PSD factors."""
    rng = np.random.default_rng(4)
    model = small_net(rng)
    x = asarray(rng.standard_normal((4, 1, 4, 4)))
    lik = LIKELIHOODS[lik_name]()
    y = targets(lik_name, model(x), rng)
    blocks = kfac_blocks(model, lik, x, y)
    errors = []
    for blk, exact in zip(blocks, brute_blocks(model, lik, x, y)):
        K, E = to_numpy(blk.matrix()), to_numpy(in_kron_order(exact, blk))
        assert_close(K, K.T, EXACT, "KFAC block symmetric", atol=EXACT * abs(K).max())
        assert np.linalg.eigvalsh(K).min() >= -1e-12 * abs(K).max()
        errors.append((relative_error(K, E), relative_error(np.diag(K), np.diag(E))))
        if blk.n == x.shape[0]:  # the Linear layers (one term per sample; a conv has B T)
            n_out, n_in = blk.shape
            bias = np.arange(n_out) * n_in + n_in - 1
            assert_close(K[np.ix_(bias, bias)], E[np.ix_(bias, bias)], EXACT, "Linear bias block", atol=EXACT)
    print(f"KFAC vs exact block ({lik_name}): (block, diagonal) relative errors per layer {errors}")
    assert all(e > 1e-3 for e, _ in errors[:2])


def bottleneck_net(rng):
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh(), Flatten(), Linear(32, 2, rng=rng), Tanh(),
                      Linear(2, 8, rng=rng), Tanh(), Linear(8, 6, rng=rng))


@pytest.mark.parametrize("net, lik_name", [(small_net, "categorical"), (bottleneck_net, "gaussian")])
def test_g_read_off_the_walk_is_the_exact_output_curvature(net, lik_name):
    """'kfac' walks M as a square-root factor where that is smaller: small_net keeps the 3-column factor all
    the way; bottleneck_net multiplies its 6-column factor out at the 2-feature bottleneck (sqrt -> full)
    and factors M again where the chain widens (full -> sqrt). G must equal the layer's rule applied to the
    dense M_l = sum of J^T H J of the layers above. Catches a missed switch of form, G read with the rule
    of the wrong form, the sqrt read-off rule."""
    rng = np.random.default_rng(5)
    model = net(rng)
    x = asarray(rng.standard_normal((3, 1, 4, 4)))
    lik = LIKELIHOODS[lik_name]()
    y = targets(lik_name, model(x), rng)
    blocks = kfac_blocks(model, lik, x, y)
    layers, hs = leaf_layers(model), [x]
    for layer in layers:
        hs.append(layer(hs[-1]))
    M = lik.hess(hs[-1], y)
    expected = []
    for i in range(len(layers) - 1, -1, -1):
        if layers[i].num_params:
            layers[i](hs[i])
            expected.append(layers[i].kfac_output_factor(M))
        Ji = layers[i].jac_input(hs[i])
        M = Ji.transpose(0, 2, 1) @ M @ Ji
    for blk, G in zip(blocks, expected[::-1]):
        assert_close(blk.G, G, 1e-10, "G from the walk", atol=1e-12)


# ---- the layers' factor rules ---------------------------------------------------------------

@pytest.mark.parametrize("stride, padding, bias", [(1, 1, True), (2, 0, False), (2, 1, True)])
def test_conv_kfc_factors_against_a_loop_reference(stride, padding, bias):
    """A = sum_{b,l} c c^T with c the zero-padded patch (and 1), G = sum_{b,l} M[(., l), (., l)], from explicit
    loops over samples and positions. The three G rules agree: G(M) = G_sqrt(V) for M = V^T V, and
    G_diag(m) = G(diag(m)). Catches a padding/stride error in the patches, positions and channels swapped
    in G, the bias entry of A counting positions wrongly."""
    rng = np.random.default_rng(6)
    conv = Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias, rng=rng)
    x = rng.standard_normal((2, 2, 5, 5))
    y = conv(asarray(x))
    B, C_out, Ho, Wo = y.shape
    L = Ho * Wo
    xp_pad = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    A_ref = np.zeros((2 * 9 + bias,) * 2)
    for b in range(B):
        for h in range(Ho):
            for w in range(Wo):
                c = xp_pad[b, :, h * stride:h * stride + 3, w * stride:w * stride + 3].ravel()
                c = np.concatenate([c, [1.0]]) if bias else c
                A_ref += np.outer(c, c)
    assert_close(conv.kfac_input_factor(), A_ref, EXACT, "KFC input factor A", atol=EXACT)
    assert conv.kfac_positions(tuple(y.shape[1:])) == L
    V = rng.standard_normal((B, 4, C_out * L))
    M = V.transpose(0, 2, 1) @ V
    G_ref = np.zeros((C_out, C_out))
    for b in range(B):
        for l in range(L):
            G_ref += M[b][np.ix_(np.arange(C_out) * L + l, np.arange(C_out) * L + l)]
    assert_close(conv.kfac_output_factor(asarray(M)), G_ref, EXACT, "KFC output factor G", atol=EXACT)
    assert_close(conv.kfac_output_factor_from_sqrt(asarray(V.reshape(B, 4, C_out, Ho, Wo))), G_ref, EXACT,
                 "G from the square-root factor", atol=EXACT)
    m = rng.random((B, C_out, Ho, Wo))
    M_diag = np.zeros((B, C_out * L, C_out * L))
    M_diag[:, np.arange(C_out * L), np.arange(C_out * L)] = m.reshape(B, -1)
    assert_close(conv.kfac_output_factor_from_diag(asarray(m)), conv.kfac_output_factor(asarray(M_diag)), EXACT,
                 "G from diag(M)")


def test_linear_factor_rules_agree():
    """Linear: A = sum [x;1][x;1]^T, G(M) = G_sqrt(V) for M = V^T V, G_diag(m) = diag(sum m)."""
    rng = np.random.default_rng(7)
    layer = Linear(3, 2, rng=rng)
    x = rng.standard_normal((4, 3))
    layer(asarray(x))
    a = np.concatenate([x, np.ones((4, 1))], axis=1)
    assert_close(layer.kfac_input_factor(), a.T @ a, EXACT, "Linear A")
    V = rng.standard_normal((4, 5, 2))
    assert_close(layer.kfac_output_factor_from_sqrt(asarray(V)),
                 layer.kfac_output_factor(asarray(V.transpose(0, 2, 1) @ V)), EXACT, "Linear G from sqrt")
    m = rng.random((4, 2))
    assert_close(layer.kfac_output_factor_from_diag(asarray(m)), np.diag(m.sum(axis=0)), EXACT, "Linear G diag")


def test_a_parametric_layer_without_factors_is_refused_by_name():
    """ConvTranspose2d has no Kronecker rules: the walk and the cost estimate both refuse, naming it, and
    never fall back to another structure silently."""
    rng = np.random.default_rng(8)
    model = Sequential(ConvTranspose2d(1, 2, 2, stride=2, rng=rng), Tanh(), Flatten(), Linear(32, 2, rng=rng))
    x = asarray(rng.standard_normal((2, 1, 2, 2)))
    with pytest.raises(MissingRuleError, match="ConvTranspose2d.kfac_input_factor"):
        ggn_kfac(model, Gaussian(), x, asarray(rng.standard_normal((2, 2))))
    with pytest.raises(MissingRuleError, match="ConvTranspose2d"):
        estimate_cost(model, (1, 2, 2), 2, "kfac")
    with pytest.raises(ValueError, match="choose 'kfac' or 'kfac-approx'"):
        ggn_kfac(model, Gaussian(), x, x, method="exact")


@pytest.mark.parametrize("method", ["kfac", "kfac-approx"])
def test_the_memory_budget_refuses_what_the_estimate_says(method):
    """The walk runs with exactly the estimate's peak and is refused one byte below it."""
    rng = np.random.default_rng(9)
    model = small_net(rng)
    x = asarray(rng.standard_normal((3, 1, 4, 4)))
    y = asarray(rng.standard_normal((3, 3)))
    need = estimate_cost(model, (1, 4, 4), 3, method, dtype=np.float64).peak_bytes
    ggn_kfac(model, Gaussian(), x, y, method=method, memory_budget=need)
    with pytest.raises(MemoryBudgetError, match="would need"):
        ggn_kfac(model, Gaussian(), x, y, method=method, memory_budget=need - 1)


# ---- the posterior against the dense Kronecker product --------------------------------------

def random_posterior(rng, prior=0.3):
    """Two blocks (with and without bias) of random PSD factors, and the dense precision in flat order."""
    blocks, start = [], 0
    for n_out, n_in, bias, n in ((3, 4, True, 7), (2, 3, False, 5)):
        Fa, Fg = rng.standard_normal((n_in, n_in + 1)), rng.standard_normal((n_out, n_out))
        blocks.append(KronBlock(asarray(Fa @ Fa.T), asarray(Fg @ Fg.T), n, start, bias))
        start += n_out * n_in
    mean = asarray(rng.standard_normal(start))
    q = KroneckerLaplace(mean, blocks, prior)
    Lam = np.eye(start) * q.prior_precision
    for blk in blocks:
        idx = blk.offset + to_numpy(kron_order(*blk.shape, blk.bias))
        Lam[np.ix_(idx, idx)] += to_numpy(blk.matrix())
    return q, Lam


def test_posterior_algebra_against_the_dense_precision():
    """mat-vec, diag(Lambda), diag(Lambda^-1), log det and log q(theta) against the dense Lambda in flat
    order. Catches the rows-of-W~ order applied the wrong way round, A used where A^T belongs (asymmetric
    factors would hide it, so the test factors are symmetric but not diagonal), D = g a / n + lambda with
    the wrong n or without lambda, the variances read off the diagonal of the precision."""
    rng = np.random.default_rng(10)
    q, Lam = random_posterior(rng)
    v = rng.standard_normal((2, q.num_params))
    assert_close(q.matvec(asarray(v)), v @ Lam, 1e-12, "Lambda v")
    assert_close(q.precision, np.diag(Lam), 1e-12, "diag(Lambda)")
    cov = np.linalg.inv(Lam)
    assert_close(q.variance, np.diag(cov), 1e-10, "diag(Lambda^-1)")
    assert float(to_numpy(q.variance).max()) <= 1 / q.prior_precision
    assert math.isclose(q.log_det_precision(), np.linalg.slogdet(Lam)[1], rel_tol=1e-12)
    theta = to_numpy(q.mean) + v
    d = v
    dense = -0.5 * np.einsum("ki,ij,kj->k", d, Lam, d) + 0.5 * np.linalg.slogdet(Lam)[1] \
        - 0.5 * q.num_params * math.log(2 * math.pi)
    assert_close(q.log_density(asarray(theta)), dense, 1e-12, "log q(theta)")
    assert_close(np.sort(to_numpy(q.eigenvalues)) + q.prior_precision, np.linalg.eigvalsh(Lam), 1e-10, "spectrum")


class BasisRng:
    """A Generator stand-in whose 'normal draws' for block after block are the unit vectors of R^P, so that
    sample(P, rng) - mean is exactly the matrix S with S^T S the sampling covariance."""

    def __init__(self, P):
        self.P, self.offset = P, 0

    def standard_normal(self, shape, dtype=None):
        n, size = shape[0], int(np.prod(shape[1:]))
        E = np.zeros((n, size))
        E[self.offset:self.offset + size] = np.eye(size)
        self.offset += size
        return asarray(E.reshape(shape))


def test_sampling_covariance_is_the_inverse_precision():
    """theta = mean + S eps with S^T S = Lambda^-1 exactly (the map is read off by feeding unit vectors), and
    a seeded Monte Carlo check of the same covariance on the real backend Generator. Catches U_A^T vs U_A,
    the noise divided by D instead of sqrt(D), a sample written to the wrong parameters."""
    rng = np.random.default_rng(11)
    q, Lam = random_posterior(rng)
    S = to_numpy(q.sample(q.num_params, BasisRng(q.num_params))) - to_numpy(q.mean)
    assert_close(S.T @ S, np.linalg.inv(Lam), 1e-10, "sampling covariance", atol=1e-12)
    draws = to_numpy(q.sample(20000, xp().random.default_rng(0))) - to_numpy(q.mean)
    emp = draws.T @ draws / len(draws)
    # Monte Carlo (seeded): an entry's standard error is ~ sqrt(2 / n) = 1% of the covariance's scale; the
    # largest of the 324 entries' errors stays under ~4 of them
    assert relative_error(emp, np.linalg.inv(Lam)) < 4 * math.sqrt(2 / len(draws))


def test_evidence_is_the_dense_formula_and_its_optimum_is_stationary():
    """log p(D | lambda) = loglik - lambda/2 |theta|^2 + P/2 log lambda - 1/2 log det(H + lambda I) with the dense
    KFAC H, and the optimised lambda has zero derivative in log lambda. Catches eigenvalues without 1/n."""
    rng = np.random.default_rng(12)
    q, Lam = random_posterior(rng, prior=1.0)
    H = Lam - np.eye(q.num_params) * q.prior_precision
    theta = to_numpy(q.mean)
    for lam in (0.1, 2.0):
        dense = -3.0 - lam / 2 * theta @ theta + q.num_params / 2 * math.log(lam) \
            - 0.5 * np.linalg.slogdet(H + lam * np.eye(q.num_params))[1]
        assert math.isclose(q.log_marginal_likelihood(-3.0, lam), dense, rel_tol=1e-12)
    lam = q.optimize_prior_precision()
    assert abs(log_marginal_likelihood_grad(math.log(lam), q.mean, q.eigenvalues)) < 1e-6 * q.num_params


def test_posterior_refuses_blocks_that_do_not_tile_the_parameters():
    rng = np.random.default_rng(13)
    q, _ = random_posterior(rng)
    with pytest.raises(ValueError, match="cover 18 parameters, the mean has 19"):
        KroneckerLaplace(asarray(np.zeros(19)), q.blocks)
    with pytest.raises(ValueError, match="starts at 12"):
        KroneckerLaplace(q.mean, q.blocks[::-1])
    with pytest.raises(ValueError, match="different layers"):
        q.blocks[0] + q.blocks[1]


def test_state_round_trip_gives_the_same_posterior():
    """to_state / from_state (what a checkpoint stores): the same samples for the same seed."""
    rng = np.random.default_rng(14)
    q, _ = random_posterior(rng)
    state = {k: v for k, v in q.to_state().items()}
    state["mean"] = to_numpy(state["mean"])
    state["blocks"] = [{**b, "A": to_numpy(b["A"]), "G": to_numpy(b["G"])} for b in state["blocks"]]
    r = KroneckerLaplace.from_state(state, np.float64)
    assert r.prior_precision == q.prior_precision
    assert_close(r.sample(3, xp().random.default_rng(1)), q.sample(3, xp().random.default_rng(1)), 0.0, "samples")


# ---- post-hoc -------------------------------------------------------------------------------

def test_posthoc_factors_over_batches_are_those_of_the_whole_set():
    """A, G and n summed over batches of 3 equal the factors of one batch of all 7 images, and fit_posthoc
    returns a KroneckerLaplace at the model's parameters with the stationary evidence. Catches a batch's
    factors replacing instead of adding, n not summed (the scale 1/n of the last batch only)."""
    rng = np.random.default_rng(15)
    model = Sequential(Flatten(), Linear(16, 4, rng=rng), Tanh(), Linear(4, 16, rng=rng), Reshape((1, 4, 4)))
    x = rng.random((7, 1, 4, 4))
    blocks, log_lik = dataset_kfac(model, x, Gaussian(1.0), batch_size=3)
    whole = ggn_kfac(model, Gaussian(1.0), asarray(x), asarray(x))
    for got, ref in zip(blocks, whole):
        assert got.n == ref.n == 7
        assert_close(got.A, ref.A, 1e-12, "A over batches")
        assert_close(got.G, ref.G, 1e-12, "G over batches")
    q, info = fit_posthoc(model, x, method="kfac", batch_size=3)
    assert isinstance(q, KroneckerLaplace) and info["hessian"] == "kfac"
    assert_close(q.mean, model.get_params(), 0.0, "mean")
    assert math.isclose(info["log_likelihood"], log_lik)
    assert abs(log_marginal_likelihood_grad(math.log(q.prior_precision), q.mean, q.eigenvalues)) < 1e-4


"""Hessian engine: every structure against brute force J^T H J from the dense Jacobians, the approximate
diagonal where it must (and must not) be exact, mixed at its two limits and in between, the GGN against a
finite-difference Hessian where they coincide, the cost table, and the memory refusal."""
from __future__ import annotations

import tracemalloc
import types

import numpy as np
import pytest

from minilae import curvature
from minilae.backend import asarray, get_backend, to_numpy, xp
from minilae.backend import array_module
from minilae.gradcheck import assert_close, numerical_jacobian, relative_error
from minilae.hessian import (DEFAULT_THRESHOLD, METHODS, MemoryBudgetError, estimate_cost, ggn_blocks, ggn_diagonal,
                            ggn_kfac)
from minilae.hessian.chain import BUDGET_FRACTION, leaf_layers, resolve_budget
from minilae.layers import (ELU, AvgPool2d, Conv2d, ConvTranspose2d, Dropout, Elementwise, Flatten, Layer,
                            LeakyReLU, Linear, MaxPool2d, MissingRuleError, ReLU, Reshape, Sequential, Sigmoid,
                            Softplus, Tanh, Upsample)
from minilae.losses import Bernoulli, Categorical, Gaussian
from minilae.models import conv_autoencoder, mlp_autoencoder

EXACT = 1e-10  # two exact computations of the same quantity: round-off only
FD = 1e-6  # against central finite differences (eps = 1e-6, float64)
SIGMA = 0.7


class FixedDropout(Dropout):
    """Dropout in training mode whose mask is drawn once, so repeated forwards apply the same function."""

    def __init__(self, p, shape, seed):
        super().__init__(p)
        keep = np.random.default_rng(seed).random(shape) >= p
        self.fixed = asarray(keep / (1.0 - p))
        self.train()

    def _forward(self, x):
        self.scale = self.fixed
        return x * self.scale


def mlp(rng):
    """Linear, Tanh, ReLU, Sigmoid, Dropout (eval) - flat output of 3."""
    return Sequential(Linear(5, 7, rng=rng), Tanh(), Linear(7, 6, rng=rng), ReLU(), Dropout(0.3).eval(),
                      Linear(6, 4, rng=rng), Sigmoid(), Linear(4, 3, rng=rng)), (5,)


def conv(rng):
    """Every layer type with strides, paddings, asymmetric kernels, both conv backprop paths; image output."""
    return Sequential(
        Conv2d(2, 3, 3, stride=2, padding=1, rng=rng), Tanh(),            # (3, 4, 4)
        Upsample(2),                                                      # (3, 8, 8)
        Conv2d(3, 2, 3, rng=rng), ReLU(),                                 # (2, 6, 6): C_out < C_in
        MaxPool2d(2), Flatten(),                                          # 18
        FixedDropout(0.25, (3, 18), seed=1),
        Linear(18, 5, rng=rng), Sigmoid(), Linear(5, 12, rng=rng),
        Reshape(3, 2, 2),
        Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(1, 2), rng=rng),     # (2, 3, 3)
    ), (2, 7, 7)


def strided(rng):
    """Strided convolutions inside the chain, widening and narrowing: M switches form at each of them."""
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh(),       # (2, 6, 6) = 72
                      Conv2d(2, 3, 3, stride=2, padding=1, rng=rng), Sigmoid(),  # (3, 3, 3) = 27
                      Conv2d(3, 8, 3, stride=2, padding=1, rng=rng), Tanh(),     # (8, 2, 2) = 32
                      Conv2d(8, 2, (3, 2), stride=(2, 1), padding=(1, 0), rng=rng)), (1, 6, 6)  # (2, 1, 1)


def conv_flat(rng):
    """Conv, Sigmoid, max-pool that drops a trailing row and column, Linear: flat output of 4."""
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Sigmoid(), MaxPool2d(2), Flatten(),
                      Linear(8, 4, rng=rng)), (1, 5, 5)


def nested(rng):
    """An autoencoder whose encoder is itself a Sequential (nested chains are unrolled)."""
    enc = Sequential(Linear(4, 3, rng=rng), Tanh(), Linear(3, 2, rng=rng))
    return Sequential(enc, Tanh(), Linear(2, 4, rng=rng)), (4,)


def mlp_ae(rng):
    return mlp_autoencoder(input_shape=(1, 3, 3), latent_size=2, hidden=(5,), seed=rng), (1, 3, 3)


def conv_ae(rng):
    return conv_autoencoder(input_shape=(1, 4, 4), latent_size=2, channels=(2, 3), hidden=(4, 3), seed=rng), (1, 4, 4)


def decoder(rng):
    """A decoder of the new layers mixed with the old: ConvTranspose2d up-sampling (stride 2, padding,
    output padding), ELU, LeakyReLU, AvgPool2d, Softplus; image output."""
    return Sequential(
        Linear(3, 8, rng=rng), Reshape(2, 2, 2),
        ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, rng=rng), ELU(0.8),   # (3, 4, 4)
        Conv2d(3, 2, 3, padding=1, rng=rng), LeakyReLU(0.1),                                 # (2, 4, 4)
        AvgPool2d(2), Softplus(),                                                            # (2, 2, 2)
        ConvTranspose2d(2, 1, 2, stride=2, rng=rng),                                         # (1, 4, 4)
    ), (3,)


def pool_mix(rng):
    """Image in, flat out: Softplus, AvgPool2d, an asymmetric ConvTranspose2d, LeakyReLU, ELU between
    Conv2d and Linear layers."""
    return Sequential(
        Conv2d(1, 2, 3, padding=1, rng=rng), Softplus(), AvgPool2d(2),                       # (2, 3, 3)
        ConvTranspose2d(2, 2, (2, 3), stride=(1, 2), padding=(0, 1), output_padding=(0, 1), rng=rng),  # (2, 4, 6)
        LeakyReLU(0.2), Flatten(), Linear(48, 4, rng=rng), ELU(), Linear(4, 3, rng=rng),
    ), (1, 6, 6)


NETS = {"mlp": mlp, "conv": conv, "strided": strided, "conv_flat": conv_flat, "nested": nested, "mlp_ae": mlp_ae,
        "conv_ae": conv_ae, "decoder": decoder, "pool_mix": pool_mix}
FLAT = {"mlp", "conv_flat", "nested", "pool_mix"}  # flat outputs: Categorical applies
CASES = [(n, lik) for n in NETS for lik in ("gaussian", "bernoulli", "categorical")
         if lik != "categorical" or n in FLAT]
CASE_IDS = [f"{n}-{lik}" for n, lik in CASES]
BATCH = 3


def likelihood(name):
    return {"gaussian": lambda: Gaussian(sigma=SIGMA), "bernoulli": Bernoulli, "categorical": Categorical}[name]()


def make(net, lik_name, seed=0):
    """(model, likelihood, x, y) with random targets of the right kind."""
    rng = np.random.default_rng(seed)
    model, in_shape = NETS[net](rng)
    x = asarray(rng.standard_normal((BATCH,) + in_shape))
    f = model(x)
    if lik_name == "categorical":
        y = asarray(rng.integers(0, f.shape[1], size=BATCH))
    elif lik_name == "bernoulli":
        y = asarray(rng.random(f.shape))
    else:
        y = asarray(rng.standard_normal(f.shape))
    return model, likelihood(lik_name), x, y


def brute_force_ggn(model, lik, x, y, per_sample=False):
    """G = sum_b J_b^T H_b J_b from the dense Jacobian of the whole network, (P, P) or (B, P, P)."""
    J = model.jac_params(x)  # (B, d, P)
    H = lik.hess(model(x), y)
    G = J.transpose(0, 2, 1) @ H @ J
    return G if per_sample else G.sum(axis=0)


def param_slices(model):
    """Slice of each parametric leaf layer in the flat vector."""
    out, start = [], 0
    for layer in leaf_layers(model):
        if layer.num_params:
            out.append(slice(start, start + layer.num_params))
        start += layer.num_params
    return out


def dense_mixed_reference(model, lik, x, y, threshold):
    """Algorithm 1 with dense per-layer Jacobians, replacing M by diag(diag(M)) at every feature of size
    > threshold: the definition of 'mixed' (threshold 0: approx, inf: exact). Per sample, (B, P)."""
    layers = leaf_layers(model)
    hs = [x]
    for layer in layers:
        hs.append(layer(hs[-1]))

    def held(M):
        return M if M.shape[1] <= threshold else M * xp().eye(M.shape[1])

    M, parts = held(lik.hess(hs[-1], y)), []
    for layer, h in zip(reversed(layers), reversed(hs[:-1])):
        if layer.num_params:
            Jp = layer.jac_params(h)
            parts.append(np.einsum("bop,boq,bqp->bp", Jp, M, Jp))
        Ji = layer.jac_input(h)
        M = held(Ji.transpose(0, 2, 1) @ M @ Ji)
    return np.concatenate(parts[::-1], axis=1)


# ---- exact structures against brute force -----------------------------------------------------

@pytest.mark.parametrize("net,lik_name", CASES, ids=CASE_IDS)
def test_exact_blocks_equal_brute_force(net, lik_name):
    model, lik, x, y = make(net, lik_name)
    G = brute_force_ggn(model, lik, x, y)
    blocks = ggn_blocks(model, lik, x, y)
    slices = param_slices(model)
    assert len(blocks) == len(slices)
    for k, (block, sl) in enumerate(zip(blocks, slices)):
        assert block.shape == (sl.stop - sl.start,) * 2
        assert_close(block, G[sl, sl], EXACT, f"block {k}")


@pytest.mark.parametrize("net,lik_name", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("method", ["exact", "sqrt"])
def test_exact_diagonal_equals_diagonal_of_brute_force(net, lik_name, method):
    model, lik, x, y = make(net, lik_name)
    G = brute_force_ggn(model, lik, x, y, per_sample=True)
    diag = ggn_diagonal(model, lik, x, y, method=method, per_sample=True)
    assert diag.shape == (BATCH, model.num_params)
    assert_close(diag, np.einsum("bpp->bp", G), EXACT, f"{method} per-sample diagonal")
    assert_close(ggn_diagonal(model, lik, x, y, method=method), np.einsum("bpp->p", G), EXACT,
                 f"{method} summed diagonal")


class FactorGaussian(Gaussian):
    """The Gaussian likelihood with its diagonal Hessian undeclared: 'sqrt' then pushes the factor S = I / sigma."""

    diagonal_hessian = False


@pytest.mark.parametrize("net", [*NETS, "single_linear", "activations_only"])
def test_sqrt_from_the_diagonal_head_equals_sqrt_from_the_factor(net):
    """Bug caught: the diagonal head of 'sqrt' (diag(H_out) kept down to the first mixing layer, then M_in or
    its factor diag(sqrt(m)) J_in) losing or misplacing a term - e.g. m instead of sqrt(m) in the factor, or
    the wrong feature's form handed to the rest of the walk. Both paths are exact: they agree in float64 on
    every net (ending in a narrowing Linear: the factor branch; in a widening one or Reshape: full M_in; a
    single layer and a chain without mixing layers: the head alone)."""
    rng = np.random.default_rng(3)
    if net == "single_linear":
        model, in_shape = Sequential(Linear(5, 3, rng=rng)), (5,)
    elif net == "activations_only":
        model, in_shape = Sequential(Linear(4, 6, rng=rng), Tanh(), Reshape(2, 3), Sigmoid()), (4,)
    else:
        model, in_shape = NETS[net](rng)
    x = asarray(rng.standard_normal((BATCH,) + in_shape))
    y = asarray(rng.standard_normal((BATCH,) + tuple(model(x).shape[1:])))
    head = ggn_diagonal(model, Gaussian(sigma=SIGMA), x, y, method="sqrt", per_sample=True)
    factor = ggn_diagonal(model, FactorGaussian(sigma=SIGMA), x, y, method="sqrt", per_sample=True)
    assert_close(head, factor, 1e-12, "sqrt: diagonal head vs the factor of H_out")


@pytest.mark.parametrize("net", ["conv", "mlp_ae"])
def test_exact_diagonal_is_the_diagonal_of_the_blocks(net):
    model, lik, x, y = make(net, "gaussian")
    blocks = ggn_blocks(model, lik, x, y, per_sample=True)
    expected = np.concatenate([np.einsum("bpp->bp", b) for b in blocks], axis=1)
    assert_close(ggn_diagonal(model, lik, x, y, method="exact", per_sample=True), expected, EXACT, "diag of blocks")


# ---- approximate diagonal ---------------------------------------------------------------------

def diagonal_m_nets(rng):
    """Chains in which M stays diagonal under a Gaussian or Bernoulli likelihood: one parametric layer at
    the bottom, then only layers whose Jacobian rows have a single non-zero."""
    return {
        "linear": (Sequential(Linear(4, 3, rng=rng)), (4,)),
        "linear_tanh_dropout": (Sequential(Linear(4, 5, rng=rng), Tanh(), FixedDropout(0.5, (3, 5), 2)), (4,)),
        "conv_sigmoid_pool": (Sequential(Conv2d(2, 3, 3, stride=2, padding=1, rng=rng), Sigmoid(), MaxPool2d(2),
                                         Flatten()), (2, 8, 8)),
        "conv_relu_upsample": (Sequential(Conv2d(3, 2, 3, padding=2, rng=rng), ReLU(), Upsample(2)), (3, 4, 4)),
        "single_conv_layer": (Conv2d(2, 2, 2, stride=2, rng=rng), (2, 4, 6)),
        "convT_elu_leaky_relu": (Sequential(ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1, rng=rng),
                                            ELU(), LeakyReLU(0.3), Softplus()), (2, 3, 2)),
    }


@pytest.mark.parametrize("net", ["linear", "linear_tanh_dropout", "conv_sigmoid_pool", "conv_relu_upsample",
                                 "single_conv_layer", "convT_elu_leaky_relu"])
@pytest.mark.parametrize("lik_name", ["gaussian", "bernoulli"])
def test_approx_is_exact_where_M_stays_diagonal(net, lik_name):
    rng = np.random.default_rng(3)
    model, in_shape = diagonal_m_nets(rng)[net]
    x = asarray(rng.standard_normal((BATCH,) + in_shape))
    f = model(x)
    y = asarray(rng.random(f.shape))
    lik = likelihood(lik_name)
    exact = np.einsum("bpp->bp", brute_force_ggn(model, lik, x, y, per_sample=True))
    approx = ggn_diagonal(model, lik, x, y, method="approx", per_sample=True)
    assert_close(approx, exact, EXACT, "approx where M is diagonal")


@pytest.mark.parametrize("net,lik_name", [("mlp", "gaussian"), ("conv", "bernoulli"), ("conv_ae", "gaussian"),
                                          ("conv_flat", "categorical")])
def test_approx_is_not_secretly_exact(net, lik_name):
    """Where M gains off-diagonal terms (two parametric layers, or a Categorical H_out), approx differs."""
    model, lik, x, y = make(net, lik_name)
    exact = ggn_diagonal(model, lik, x, y, method="exact")
    approx = ggn_diagonal(model, lik, x, y, method="approx")
    first = param_slices(model)[0]  # the layer furthest from the output sees the most coupling
    assert relative_error(approx[first], exact[first]) > 1e-2
    assert (approx >= 0).all()  # still a diagonal of PSD matrices


def test_approx_of_a_single_linear_layer_under_categorical_differs():
    """H_out of a Categorical is not diagonal, so even one layer makes approx inexact."""
    rng = np.random.default_rng(4)
    model, x = Sequential(Linear(3, 4, rng=rng)), asarray(rng.standard_normal((5, 3)))
    lik, y = Categorical(), asarray(rng.integers(0, 4, size=5))
    G = brute_force_ggn(model, lik, x, y)
    weight = slice(0, 12)  # a Linear's weight diagonal needs only diag(M): exact even here
    approx = ggn_diagonal(model, lik, x, y, method="approx")
    assert_close(approx[weight], np.diag(G)[weight], EXACT, "Linear weight diagonal")
    assert_close(approx, np.diag(G), EXACT, "whole diagonal")  # bias diag = diag(M) too
    # ... the difference shows one layer further down
    model2 = Sequential(Linear(3, 4, rng=rng), Linear(4, 4, rng=rng))
    model2(x)
    G2 = brute_force_ggn(model2, lik, x, y)
    assert relative_error(ggn_diagonal(model2, lik, x, y, method="approx"), np.diag(G2)) > 1e-2


# ---- mixed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("net,lik_name", [("conv", "gaussian"), ("conv", "bernoulli"), ("conv_ae", "gaussian"),
                                          ("mlp_ae", "bernoulli"), ("mlp", "categorical"), ("conv_flat", "gaussian")])
def test_mixed_limits_are_exact_and_approx(net, lik_name):
    model, lik, x, y = make(net, lik_name)
    largest = max(int(np.prod(s)) for s in model.shapes(tuple(x.shape[1:])))
    exact = ggn_diagonal(model, lik, x, y, method="exact")
    approx = ggn_diagonal(model, lik, x, y, method="approx")
    assert_close(ggn_diagonal(model, lik, x, y, method="mixed", threshold=largest), exact, EXACT, "mixed(max)")
    assert_close(ggn_diagonal(model, lik, x, y, method="mixed", threshold=np.inf), exact, EXACT, "mixed(inf)")
    assert_close(ggn_diagonal(model, lik, x, y, method="mixed", threshold=0), approx, EXACT, "mixed(0)")


@pytest.mark.parametrize("net", ["conv", "strided", "conv_ae", "mlp_ae", "decoder", "pool_mix"])
def test_mixed_switches_exactly_at_every_threshold(net):
    """Every threshold between the feature sizes (each switch full <-> diag at a different layer) against
    the dense definition."""
    model, lik, x, y = make(net, "gaussian")
    sizes = sorted({int(np.prod(s)) for s in model.shapes(tuple(x.shape[1:]))})
    for threshold in [0] + sizes[:-1]:  # 0: the approximate method against its dense definition
        got = ggn_diagonal(model, lik, x, y, method="mixed", threshold=threshold, per_sample=True)
        assert_close(got, dense_mixed_reference(model, lik, x, y, threshold), EXACT, f"threshold {threshold}")


def test_mixed_default_threshold_and_bad_thresholds():
    model, lik, x, y = make("mlp_ae", "gaussian")
    assert_close(ggn_diagonal(model, lik, x, y, method="mixed"),
                 ggn_diagonal(model, lik, x, y, method="mixed", threshold=DEFAULT_THRESHOLD), 0.0, "default")
    with pytest.raises(ValueError, match="threshold"):
        ggn_diagonal(model, lik, x, y, method="mixed", threshold=-1)
    with pytest.raises(TypeError, match="threshold"):
        ggn_diagonal(model, lik, x, y, method="mixed", threshold="big")


# ---- GGN == Hessian where the residual term vanishes -----------------------------------------

def smooth_net(rng):
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh(), Flatten(), Linear(18, 4, rng=rng), Sigmoid(),
                      Linear(4, 3, rng=rng)), (1, 3, 3)


@pytest.mark.parametrize("lik_name", ["gaussian", "bernoulli", "categorical"])
def test_ggn_equals_fd_hessian_at_zero_residual(lik_name):
    """y = E[y | f]: the residual term of the Hessian vanishes, so blocks and diagonal equal the FD Hessian."""
    rng = np.random.default_rng(5)
    model, in_shape = smooth_net(rng)
    x = asarray(rng.standard_normal((2,) + in_shape))
    lik = likelihood(lik_name)
    y = lik.mean(model(x))
    H = curvature.hessian(model, lik, x, y)
    model(x)  # the FD loop left the caches at a perturbed point; refresh them at theta
    atol = 1e-9 * float(abs(H).max())  # the FD Hessian's error is absolute, ~1e-10 of its scale (x10 margin)
    for block, sl in zip(ggn_blocks(model, lik, x, y), param_slices(model)):
        assert_close(block, H[sl, sl], FD, "block vs FD Hessian", atol=atol)
    for method in ("exact", "sqrt"):
        assert_close(ggn_diagonal(model, lik, x, y, method=method), np.diag(H), FD, f"{method} vs FD Hessian")


@pytest.mark.parametrize("layer_name,lik_name", [("linear", "gaussian"), ("linear", "bernoulli"),
                                                  ("linear", "categorical"), ("conv", "gaussian"),
                                                  ("conv", "bernoulli")])
def test_ggn_equals_fd_hessian_when_linear_in_parameters(layer_name, lik_name):
    """f linear in theta: d^2 f / d theta^2 = 0, so the GGN is the Hessian at any targets."""
    rng = np.random.default_rng(6)
    if layer_name == "linear":
        model, x = Linear(4, 3, rng=rng), asarray(rng.standard_normal((5, 4)))
    else:
        model, x = Conv2d(2, 2, 3, stride=2, padding=1, rng=rng), asarray(rng.standard_normal((2, 2, 5, 4)))
    f = model(x)
    y = asarray(rng.integers(0, 3, size=5) if lik_name == "categorical" else rng.random(f.shape))
    lik = likelihood(lik_name)
    H = curvature.hessian(model, lik, x, y)
    model(x)
    (block,) = ggn_blocks(model, lik, x, y)
    assert_close(block, H, FD, "GGN block vs FD Hessian")
    assert_close(ggn_diagonal(model, lik, x, y, method="exact"), np.diag(H), FD, "diagonal vs FD Hessian")


# ---- API details ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,kw", [("approx", {}), ("exact", {}), ("sqrt", {}), ("mixed", {"threshold": 20})])
def test_per_sample_sums_to_batch_and_f_is_not_recomputed(method, kw):
    model, lik, x, y = make("conv", "bernoulli")
    summed = ggn_diagonal(model, lik, x, y, method=method, **kw)
    per = ggn_diagonal(model, lik, x, y, method=method, per_sample=True, **kw)
    assert summed.shape == (model.num_params,) and per.shape == (BATCH, model.num_params)
    assert_close(per.sum(axis=0), summed, EXACT, "sum of per-sample diagonals")

    def no_forward(*args, **kwargs):
        raise AssertionError("the model was run again although f was given")

    f = model(x)
    model.forward = no_forward
    assert_close(ggn_diagonal(model, lik, x, y, method=method, f=f, **kw), summed, EXACT, "with f given")


def test_single_layer_and_wrong_inputs_are_reported():
    rng = np.random.default_rng(7)
    layer, x = Linear(3, 2, rng=rng), asarray(rng.standard_normal((4, 3)))
    y = asarray(rng.standard_normal((4, 2)))
    assert ggn_diagonal(layer, Gaussian(), x, y, method="exact").shape == (8,)
    assert ggn_diagonal(layer, "gaussian", x, y).shape == (8,)  # likelihood by name
    with pytest.raises(ValueError, match="method"):
        ggn_diagonal(layer, Gaussian(), x, y, method="kfac")
    with pytest.raises(ValueError, match="f is not the output of the model's last forward"):
        ggn_diagonal(layer, Gaussian(), x, y, f=xp().zeros((4, 3)))

    class Square(Layer):
        def _forward(self, x):
            return x ** 2

    for method in ("approx", "exact", "sqrt"):
        model = Sequential(Linear(3, 3, rng=rng), Square(), Linear(3, 2, rng=rng))
        with pytest.raises(TypeError, match="Square"):
            ggn_diagonal(model, Gaussian(), x, y, method=method)


# ---- cost estimate and memory budget ----------------------------------------------------------

def five_conv(channels=3):
    """The benchmark's net: five 3x3 convolutions that keep channels and size."""
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(5):
        layers += [Conv2d(channels, channels, 3, padding=1, rng=rng), Tanh()]
    return Sequential(*layers[:-1])


def test_cost_estimate_scales_as_table_1():
    """Full M grows with the square of the pixels, diagonal M linearly; rows cover every layer."""
    model = five_conv()
    small, large = (estimate_cost(model, (3, s, s), 4, method) for method in ("exact",) for s in (8, 16))
    assert len(small.rows) == len(model.layers)
    assert large.rows[0].m_bytes == 16 * small.rows[0].m_bytes  # 4x pixels -> 16x memory
    a_small, a_large = (estimate_cost(model, (3, s, s), 4, "approx") for s in (8, 16))
    assert a_large.rows[0].m_bytes == 4 * a_small.rows[0].m_bytes
    assert 12 < large.total_flops / small.total_flops <= 16.5
    assert 3.5 < a_large.total_flops / a_small.total_flops <= 4.5
    text = str(small)
    assert "Conv2d" in text and "Tanh" in text and "peak" in text
    mixed = estimate_cost(model, (3, 8, 8), 4, "mixed", threshold=10_000)
    assert mixed.peak_bytes == small.peak_bytes  # every feature (192) under the threshold: as exact


def test_memory_budget_refuses_before_allocating():
    """The conv AE's exact GGN at batch 64 needs tens of GB: refused with the size, nothing big allocated."""
    model = conv_autoencoder()
    x = asarray(np.random.default_rng(8).random((64, 1, 28, 28)))
    f = model(x)
    table = estimate_cost(model, (1, 28, 28), 64, "exact", dtype=np.float64)
    need = table.rows[0].peak_bytes  # the last layer, where the walk starts and is refused
    assert need > 1e10 and table.output_bytes < 4e9
    tracemalloc.start()
    try:
        with pytest.raises(MemoryBudgetError, match="would need") as err:
            ggn_diagonal(model, Gaussian(), x, x, method="exact", f=f, memory_budget=4e9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e9, f"allocated {peak} bytes before refusing"
    assert str(need) in str(err.value)  # the message states the bytes the estimate gives
    with pytest.raises(MemoryBudgetError, match="would need"):
        ggn_blocks(model, Gaussian(), x[:2], x[:2], memory_budget=1e8)


def test_small_budget_refuses_what_the_estimate_says():
    model, lik, x, y = make("conv", "gaussian")
    need = estimate_cost(model, tuple(x.shape[1:]), BATCH, "exact", dtype=np.float64).peak_bytes
    ggn_diagonal(model, lik, x, y, method="exact", memory_budget=need)  # exactly enough: runs
    with pytest.raises(MemoryBudgetError):
        ggn_diagonal(model, lik, x, y, method="exact", memory_budget=need - 1)


@pytest.mark.backends("guard", "cupy")
def test_default_budget_is_the_free_device_memory(monkeypatch):
    """Bug caught: on a device the default budget read the host's free memory (or missed what CuPy's pool
    holds free), so a GGN too large for the GPU started allocating. With 1 GiB free on the device and
    0.5 GiB free in the pool the budget is 0.8 * 1.5 GiB, and the conv AE's exact GGN is refused first."""
    from minilae import _guard  # noqa: PLC0415
    dev = xp()
    monkeypatch.setattr(dev.cuda.runtime, "memGetInfo", lambda: (2**30, 2**34))
    monkeypatch.setattr(dev, "get_default_memory_pool", lambda: types.SimpleNamespace(free_bytes=lambda: 2**29))
    assert resolve_budget(None, dev) == BUDGET_FRACTION * 1.5 * 2**30
    model = conv_autoencoder()
    x = asarray(np.random.default_rng(8).random((16, 1, 28, 28)))
    f = model(x)
    with _guard.watch() as seen, pytest.raises(MemoryBudgetError, match=r"memory budget of 1\.2 GiB"):
        ggn_diagonal(model, Gaussian(), x, x, method="exact", f=f)
    if get_backend() == "guard":  # only the output Hessian (16 x 784 x 784, 79 MB: within budget) was allocated
        assert seen["largest"] <= 16 * 784 * 784, "allocated the step it refused"

# ---- f=f must belong to the caches (issue 8, item 2) -------------------------------------------

GGN_CALLS = {"approx": lambda m, l, x, y, f: ggn_diagonal(m, l, x, y, method="approx", f=f),
             "exact": lambda m, l, x, y, f: ggn_diagonal(m, l, x, y, method="exact", f=f),
             "mixed": lambda m, l, x, y, f: ggn_diagonal(m, l, x, y, method="mixed", threshold=4, f=f),
             "sqrt": lambda m, l, x, y, f: ggn_diagonal(m, l, x, y, method="sqrt", f=f),
             "blocks": lambda m, l, x, y, f: ggn_blocks(m, l, x, y, f=f)}
STALE = "f is not the output of the model's last forward"


def ggn_reference(model, lik, x, y):
    """The GGN diagonal from the dense Jacobians at x (independent of the engine's caches)."""
    return np.diagonal(to_numpy(brute_force_ggn(model, lik, x, y))).copy()


@pytest.mark.parametrize("call", list(GGN_CALLS))
@pytest.mark.parametrize("net", ["mlp_ae", "conv_ae", "nested"])
def test_f_of_an_earlier_forward_is_refused(net, call):
    """Catches forward_once checking only the first layer's cached input shape: after model(x1), model(x2)
    (same shape), passing x1 and f1 silently gave the GGN of x2 (7% off on the MLP AE)."""
    model, lik, x1, y = make(net, "gaussian")
    x2 = x1[::-1] * 0.5
    f1 = model(x1)
    model(x2)
    with pytest.raises(ValueError, match=STALE):
        GGN_CALLS[call](model, lik, x1, y, f1)
    f1 = model(x1)  # the same call right after its own forward is accepted and right
    got = GGN_CALLS[call](model, lik, x1, y, f1)
    if call != "blocks":
        assert_close(got, ggn_reference(model, lik, x1, y) if call in ("exact", "sqrt") else
                     GGN_CALLS[call](model, lik, x1, y, None), EXACT, f"{call} with f of its own forward")


@pytest.mark.parametrize("call", list(GGN_CALLS))
def test_f_after_set_params_or_a_shared_layer_forward_is_refused(call):
    """Catches the engine reading caches taken at other parameters (set_params since f) or written by a
    forward of a sub-model sharing the layers (the encoder), which f=f used to accept."""
    model, lik, x, y = make("mlp_ae", "gaussian")
    f = model(x)
    model.set_params(model.get_params() * 1.1)
    with pytest.raises(ValueError, match=STALE):
        GGN_CALLS[call](model, lik, x, y, f)
    f = model(x)
    model.encode(x[:1])
    with pytest.raises(ValueError, match=STALE):
        GGN_CALLS[call](model, lik, x, y, f)


def test_f_after_predict_is_refused(rng):
    """Catches predict() leaving the caches of its last sampled network (parameters restored, caches not):
    ggn_diagonal(x, f=f) from before predict came out 50% wrong without an error."""
    from minilae.laplace import DiagonalLaplace
    from minilae.predictive import predict

    model, lik, x, y = make("mlp_ae", "gaussian")
    theta = model.get_params()
    posterior = DiagonalLaplace(theta, xp().full(theta.shape, 10.0), 1.0)
    f = model(x)
    predict(model, x, posterior, n_samples=2, rng=xp().random.default_rng(0))
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(theta))
    with pytest.raises(ValueError, match=STALE):
        ggn_diagonal(model, lik, x, y, method="exact", f=f)
    assert_close(ggn_diagonal(model, lik, x, y, method="exact"), ggn_reference(model, lik, x, y), EXACT,
                 "recomputed after predict")


def test_f_with_another_x_is_refused_but_an_equal_copy_is_accepted():
    """Catches x being used for shapes only: ggn_diagonal(x2, f=model(x1)) gave the GGN at x1 for x2."""
    model, lik, x, y = make("conv_ae", "gaussian")
    f = model(x)
    with pytest.raises(ValueError, match="another input than x"):
        ggn_diagonal(model, lik, x * 0.5, y, method="exact", f=f)
    f = model(x)
    with pytest.raises(ValueError, match="another input than x"):
        ggn_diagonal(model, lik, x[:2], y[:2], method="exact", f=f)
    f = model(x)
    got = ggn_diagonal(model, lik, x.copy(), y, method="exact", f=f)
    assert_close(got, ggn_reference(model, lik, x, y), EXACT, "f with an equal copy of x")


@pytest.mark.parametrize("method,kw", [("approx", {}), ("mixed", {"threshold": 20}), ("sqrt", {})])
@pytest.mark.parametrize("net", ["conv", "conv_ae", "decoder", "pool_mix"])
def test_every_method_refuses_what_its_estimate_says(net, method, kw):
    """Catches 'approx' ignoring memory_budget (issue 8, item 15): it ran whatever the budget said,
    while estimate_cost(..., 'approx') promised the same refusal as the other methods."""
    model, lik, x, y = make(net, "gaussian")
    need = estimate_cost(model, tuple(x.shape[1:]), BATCH, method, dtype=np.float64, **kw).peak_bytes
    ggn_diagonal(model, lik, x, y, method=method, memory_budget=need, **kw)  # exactly enough: runs
    with pytest.raises(MemoryBudgetError, match=rf"would need .* \({need} bytes\)"):
        ggn_diagonal(model, lik, x, y, method=method, memory_budget=need - 1, **kw)


# ---- a user's own layer, defined outside the package (issue 12) ---------------------------------

class Swish(Elementwise):
    """y = x sigmoid(x): an activation needs only its forward and sigma'."""

    def _forward(self, x):
        return x * 0.5 * (1.0 + array_module(x).tanh(0.5 * x))

    def derivative(self, x):
        s = 0.5 * (1.0 + array_module(x).tanh(0.5 * x))
        return s + x * s * (1.0 - s)


class ChannelScale(Layer):
    """y[c] = a[c] x[c] + b[c] per channel: a parametric layer with only forward and its two products."""

    param_names = ("scale", "shift")

    def __init__(self, channels, rng):
        super().__init__()
        self.scale = asarray(rng.uniform(0.5, 1.5, channels))
        self.shift = asarray(rng.standard_normal(channels))

    def _per_channel(self, p):
        return p.reshape((-1,) + (1,) * (self._x.ndim - 2))

    def _forward(self, x):
        return x * self._per_channel(self.scale) + self._per_channel(self.shift)

    def _vjp_input(self, v):  # v: (B, K, C, ...)
        return v * self._per_channel(self.scale)

    def _vjp_params(self, v):
        spatial = tuple(range(3, v.ndim))
        return xp().concatenate([(v * self._x[:, None]).sum(axis=spatial), v.sum(axis=spatial)], axis=2)


class DiagonalChannelScale(ChannelScale):
    """ChannelScale with the one rule 'approx' needs: J_in is diagonal, so (J_in * J_in)^T m = a^2 m."""

    one_input_per_output = one_output_per_input = True

    def backprop_diag(self, m):
        return m * self._per_channel(self.scale) ** 2


def user_net(rng, scale_layer=DiagonalChannelScale):
    """Conv2d, Swish, the user's channel scale, ConvTranspose2d, Swish, Linear: flat output of 3."""
    return Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Swish(), scale_layer(2, rng),
                      ConvTranspose2d(2, 1, 2, stride=2, rng=rng), Swish(), Flatten(), Linear(16, 3, rng=rng))


def fd_ggn_diagonal(model, lik, x, y):
    """diag(sum_b J_b^T H_b J_b) with J from central differences of the whole network's output in theta
    (nothing of the layers' own Jacobians or rules): per sample (B, P)."""
    theta = model.get_params()

    def outputs(t):
        model.set_params(t)
        return model(x)

    J = to_numpy(numerical_jacobian(outputs, theta.copy()))  # (B d, P)
    model.set_params(theta)
    f = model(x)
    J = J.reshape(x.shape[0], -1, theta.size)
    return np.einsum("bop,boq,bqp->bp", J, to_numpy(lik.hess(f, y)), J)


@pytest.mark.parametrize("lik_name", ["gaussian", "categorical"])
def test_user_layers_defined_outside_the_package_get_every_method_right(lik_name):
    """Bug caught: the engine needing a rule a user's layer cannot be expected to write (exact and sqrt must
    run from forward and the two products alone), or a base-class default that is wrong for a layer the
    package did not anticipate. exact / sqrt against the GGN from finite differences of the whole network;
    approx and mixed at every threshold against their dense definition."""
    rng = np.random.default_rng(11)
    model, x = user_net(rng), asarray(rng.standard_normal((BATCH, 1, 2, 2)))
    lik = likelihood(lik_name)
    f = model(x)
    y = asarray(rng.integers(0, 3, size=BATCH)) if lik_name == "categorical" else asarray(rng.random(f.shape))
    scale = model[2]
    scale_x = model[:2](x)  # the user's products and the dense Jacobians built from them vs differences
    assert_close(scale.jac_params(scale_x), numerical_jacobian(lambda t: scale_params_out(scale, scale_x, t),
                                                               scale.get_params().copy()).reshape(BATCH, 8, 4),
                 FD, "user layer J_p")
    reference = fd_ggn_diagonal(model, lik, x, y)
    atol = 1e-9 * float(np.abs(reference).max())  # FD round-off is absolute (see the FD Hessian tests)
    for method in ("exact", "sqrt"):
        assert_close(ggn_diagonal(model, lik, x, y, method=method, per_sample=True), reference, FD, method,
                     atol=atol)
    sizes = sorted({int(np.prod(s)) for s in model.shapes(tuple(x.shape[1:]))})
    for threshold in [0] + sizes[:-1]:  # 0 is 'approx'
        got = ggn_diagonal(model, lik, x, y, method="mixed", threshold=threshold, per_sample=True)
        assert_close(got, dense_mixed_reference(model, lik, x, y, threshold), EXACT, f"mixed({threshold})")
    assert_close(ggn_diagonal(model, lik, x, y, method="approx", per_sample=True),
                 dense_mixed_reference(model, lik, x, y, 0), EXACT, "approx")


def scale_params_out(layer, x, theta):
    layer.set_params(theta)
    return layer(x)


def test_a_missing_rule_names_the_method_to_implement():
    """Bug caught: an AttributeError or a bare NotImplementedError deep in the engine instead of saying which
    method of which class to write; and 'exact' refusing a layer that has only its products."""
    rng = np.random.default_rng(12)
    model, x = user_net(rng, scale_layer=ChannelScale), asarray(rng.standard_normal((BATCH, 1, 2, 2)))
    y = asarray(rng.random((BATCH, 3)))
    for method, kw in (("approx", {}), ("mixed", {"threshold": 4})):
        with pytest.raises(MissingRuleError, match=r"ChannelScale\.backprop_diag\(m\)"):
            ggn_diagonal(model, Gaussian(), x, y, method=method, **kw)
    ggn_diagonal(model, Gaussian(), x, y, method="exact")  # runs from the products alone
    ggn_blocks(model, Gaussian(), x, y)

    class NoProducts(Layer):
        def _forward(self, x):
            return 2.0 * x

    for method in ("exact", "sqrt"):
        with pytest.raises(MissingRuleError, match=r"NoProducts\._vjp_input\(v\)"):
            ggn_diagonal(Sequential(Linear(4, 3, rng=rng), NoProducts(), Linear(3, 3, rng=rng)), Gaussian(),
                         x.reshape(BATCH, 4), y, method=method)


def test_cost_estimate_covers_the_new_layers():
    """Every method's table has a row per layer with positive bytes and FLOPs for the new layers, and the
    approximate method stays linear in the pixels through ConvTranspose2d / AvgPool2d. Bug caught: the
    transposed convolution's diagonal rule costed as the Layer default (a dense B d_out P Jacobian), which
    refuses 'approx' on a decoder that fits easily."""
    rng = np.random.default_rng(13)
    model = Sequential(Conv2d(2, 4, 3, padding=1, rng=rng), ELU(), AvgPool2d(2), Softplus(),
                       ConvTranspose2d(4, 2, 4, stride=2, padding=1, rng=rng), LeakyReLU())
    for method in METHODS:
        table = estimate_cost(model, (2, 8, 8), 4, method)
        assert len(table.rows) == len(model.layers)
        assert all(r.peak_bytes > 0 and r.flops > 0 for r in table.rows), method
        assert "ConvTranspose2d" in str(table) and "AvgPool2d" in str(table)
    small, large = (estimate_cost(model, (2, s, s), 4, "approx") for s in (8, 32))
    assert 14 < large.peak_bytes / small.peak_bytes <= 16.5
    assert 14 < large.total_flops / small.total_flops <= 16.5
    (row,) = [r for r in large.rows if r.layer.startswith("ConvTranspose2d")]
    dense_jp_bytes = 4 * row.d_out * row.params * large.itemsize  # what the Layer default would hold
    assert row.peak_bytes < 0.1 * dense_jp_bytes, "approx through ConvTranspose2d costed as a dense J_p"


WALKS = {**GGN_CALLS, "kfac": lambda m, l, x, y, f: ggn_kfac(m, l, x, y, f=f),
         "kfac-approx": lambda m, l, x, y, f: ggn_kfac(m, l, x, y, method="kfac-approx", f=f),
         "gradient": lambda m, l, x, y, f: m.vjp_params(l.grad(f, y))}
PUSHES = ("vjp_input", "vjp_input_chunked", "backprop_full", "backprop_diag", "diag_of_backprop", "backprop_from_diag")


@pytest.mark.parametrize("call", list(WALKS))
def test_every_walk_ends_at_the_first_parametric_layer(call, monkeypatch):
    """Nothing below the first Linear needs a gradient or curvature, so nothing is pushed through it. Bug caught:
    every walk ran down to layer 0, so the MLP AE's first Linear pushed its 784-feature M (or gradient) into the
    Flatten: 10% of the MLP gradient's time, and for the exact diagonal a B x 784^2 M that the memory budget
    could refuse. The results must not change, and the cost table has no rows below that layer."""
    rng = np.random.default_rng(21)
    model = Sequential(Flatten(), Linear(12, 5, rng=rng), Tanh(), Linear(5, 12, rng=rng), Reshape(3, 2, 2))
    lik, x = Gaussian(), asarray(rng.random((4, 3, 2, 2)))
    want = WALKS[call](model, lik, x, x, model(x))
    first = model.layers[1]
    for name in PUSHES:
        monkeypatch.setattr(first, name, lambda *a, _name=name, **k: pytest.fail(f"pushed through {_name}"))
    got = WALKS[call](model, lik, x, x, model(x))
    if call.startswith("kfac"):
        got, want = [a for b in got for a in (b.A, b.G)], [a for b in want for a in (b.A, b.G)]
    for g, w in zip(*(v if isinstance(v, list) else [v] for v in (got, want)), strict=True):
        assert_close(g, w, EXACT, f"{call} without the push below the first Linear")
    if call in METHODS:
        assert [r.index for r in estimate_cost(model, (3, 2, 2), 4, call).rows] == [4, 3, 2, 1]


@pytest.mark.parametrize("net", ["mlp_ae", "conv_ae", "decoder", "conv"])
def test_approx_under_a_gaussian_starts_from_the_constant(net, monkeypatch):
    """M_L = I / sigma^2 travels as a ConstantDiag down to the first layer that mixes its inputs, and the walk
    gives what the materialised m gives (the decoder ends in a ConvTranspose2d, which takes the Layer default:
    the materialised m), per sample too. Bugs caught: the constant rules never taken (the speed-up lost
    silently), the last layer's diagonal read off the wrong m."""
    from minilae.hessian.approx import approx_diagonal
    from minilae.hessian.chain import feature_shapes, resolve_budget
    model, lik, x, y = make(net, "gaussian")
    f = model(x)
    layers = leaf_layers(model)
    shapes = feature_shapes(layers, tuple(x.shape[1:]))
    want = approx_diagonal(layers, shapes, lik.hess_diag(f, y), resolve_budget(None, xp()))
    last = next(layer for layer in layers[::-1] if layer.num_params)
    for name in ("param_diag_from_diag", "backprop_diag") if isinstance(last, (Linear, Conv2d)) else ():
        monkeypatch.setattr(last, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} on a materialised m"))
    assert_close(ggn_diagonal(model, lik, x, y, method="approx", f=f), want, EXACT, f"{net} from the constant")
    monkeypatch.undo()
    per_sample = ggn_diagonal(model, lik, x, y, method="approx", per_sample=True, f=f)
    assert_close(per_sample.sum(axis=0), want, EXACT, f"{net} per sample")


@pytest.mark.parametrize("lik_name", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("method,kw", [("approx", {}), ("exact", {}), ("sqrt", {}), ("mixed", {"threshold": 20}),
                                       ("mixed", {"threshold": 1000})])
def test_scale_multiplies_the_result(method, kw, lik_name):
    """scale = N / B goes onto H_out (or the sqrt walk's result). Bugs caught: the factor applied twice, or
    squared where the walk pushes a square-root factor; the likelihood's own array scaled in place."""
    model, lik, x, y = make("conv_ae", lik_name)
    f = model(x)
    plain = ggn_diagonal(model, lik, x, y, method=method, f=f, **kw)
    assert_close(ggn_diagonal(model, lik, x, y, method=method, f=f, scale=2.5, **kw), 2.5 * plain, EXACT,
                 f"{method} {kw} scaled")
    assert_close(ggn_diagonal(model, lik, x, y, method=method, f=f, **kw), plain, EXACT, f"{method} again, unscaled")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="scale"):
            ggn_diagonal(model, lik, x, y, method=method, f=f, scale=bad, **kw)


def test_cost_rows_are_remembered_per_layer_and_arguments():
    """step_cost keeps each row per layer and arguments (the walks ask at every step). Bugs caught: a row of
    another batch size or dtype handed out from the memo; a user's unhashable layer (an __eq__ without
    __hash__) refused with a TypeError instead of being costed directly."""
    class Unhashable(Tanh):
        def __eq__(self, other):
            return self is other
        __hash__ = None

    rng = np.random.default_rng(22)
    model = Sequential(Linear(3, 4, rng=rng), Unhashable(), Linear(4, 3, rng=rng))
    rows = {(B, dt): estimate_cost(model, (3,), B, "approx", dtype=dt).rows
            for B in (4, 8) for dt in ("float32", "float64")}
    for (B, dt), r in rows.items():
        scale = B // 4 * (2 if dt == "float64" else 1)
        assert [row.m_bytes for row in r] == [scale * row.m_bytes for row in rows[(4, "float32")]], (B, dt)
    x = asarray(rng.random((5, 3)))
    assert_close(ggn_diagonal(model, Gaussian(), x, x), ggn_diagonal(model, Gaussian(), x, x, memory_budget=1e9),
                 EXACT, "an unhashable layer in the walk")


@pytest.mark.parametrize("method,kw", [("exact", {}), ("sqrt", {}), ("mixed", {"threshold": 5}),
                                       ("mixed", {"threshold": 1})])
def test_exact_sqrt_and_mixed_under_a_gaussian_start_from_the_constant(method, kw, monkeypatch):
    """The exact walks' diagonal head takes the constant too: the MLP AE's last Linear forms c W^T W once for
    the batch, and 'exact' never forms the (B, d, d) M_L (mixed: with M full from that Linear's input on,
    threshold 5, or diagonal, threshold 1). Bugs caught: the constant rules never taken there (the per-image
    W^T diag(m) W kept, or the full M_L pushed), and the results moved by it (against the brute-force
    diagonal, and the mixed walk from the materialised m)."""
    from minilae.hessian.chain import feature_shapes
    from minilae.hessian.mixed import mixed_diagonal
    model, lik, x, y = make("mlp_ae", "gaussian")
    f = model(x)
    layers = leaf_layers(model)
    if method in ("exact", "sqrt"):
        want = ggn_reference(model, lik, x, y)
        f = model(x)  # the brute force ran forwards of its own
    else:
        want = mixed_diagonal(layers, feature_shapes(layers, tuple(x.shape[1:])), lik.hess_diag(f, y), kw["threshold"],
                              resolve_budget(None, xp()))
    last = next(layer for layer in layers[::-1] if layer.num_params)
    for name in ("param_diag_from_diag", "backprop_diag", "backprop_from_diag", "backprop_full", "param_diag"):
        monkeypatch.setattr(last, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} on a materialised m"))
    monkeypatch.setattr(lik, "output_curvature", lambda *a, **k: pytest.fail("the full M_L formed"))
    assert_close(ggn_diagonal(model, lik, x, y, method=method, f=f, **kw), want, EXACT, f"{method} {kw}")

"""Layers: forward against independent references, dense Jacobians against central finite
differences, structured products against the dense Jacobians, and clear errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import correlate2d
from scipy.special import expit

from minilae.backend import asarray, get_default_dtype, set_default_dtype, to_numpy, xp
from minilae.gradcheck import assert_close, fd_roundoff, numerical_jacobian
from minilae.layers.base import ConstantDiag
from minilae.layers import (ELU, AvgPool2d, Conv2d, ConvTranspose2d, Dropout, Elementwise, Flatten, Layer,
                            LeakyReLU, Linear, MaxPool2d, ReLU, Reshape, Sequential, Sigmoid, Softplus, Tanh, Upsample)

RTOL = 1e-6  # vs central differences (eps = 1e-6, float64)
EXACT = 1e-12  # two analytic forms of the same quantity: round-off only

# (C_in, C_out, kernel, stride, padding, H, W, bias): square/non-square kernels, strides that
# drop trailing rows, padding larger than needed, 1x1 kernels, no bias
CONV_CONFIGS = [
    (1, 2, 3, 1, 0, 5, 5, True),
    (2, 3, 3, 1, 1, 5, 4, True),
    (2, 2, 3, 2, 1, 6, 5, True),
    (3, 2, (2, 3), (2, 1), (0, 2), 5, 6, True),
    (2, 3, 1, 1, 0, 3, 3, True),
    (1, 2, 3, 3, 2, 7, 7, True),
    (2, 2, 2, 1, 0, 4, 4, False),
    # C_out < C_in at stride 1: J_in^T v runs as a convolution of v (the other code path)
    (3, 2, 3, 1, 1, 5, 5, True),
    (4, 1, (3, 2), 1, (2, 0), 4, 5, True),
    (3, 1, 3, 1, 0, 5, 6, True),
    # C_out <= C_in / 8 at stride 1: the forward scatters the per-offset products (Conv2d._scatters)
    (8, 1, 3, 1, 1, 5, 5, True),
    (9, 1, (2, 3), 1, (1, 0), 4, 5, False),
]
CONV_IDS = [f"c{c[0]}-{c[1]}_k{c[2]}_s{c[3]}_p{c[4]}_{c[5]}x{c[6]}{'' if c[7] else '_nobias'}"
            for c in CONV_CONFIGS]


# (C_in, C_out, kernel, stride, padding, output_padding, H, W, bias) for ConvTranspose2d: stride 1 and 2,
# padding cropping the output, output padding on one or both axes, asymmetric kernels, no bias
CONVT_CONFIGS = [
    (1, 2, 3, 1, 0, 0, 3, 3, True),
    (2, 3, 3, 2, 1, 1, 3, 2, True),
    (3, 2, (2, 3), (2, 1), (0, 1), (1, 0), 2, 3, True),
    (2, 2, 2, 2, 0, 0, 2, 3, False),
    (2, 1, 3, 3, 1, 2, 2, 2, True),
]
CONVT_IDS = [f"c{c[0]}-{c[1]}_k{c[2]}_s{c[3]}_p{c[4]}_op{c[5]}_{c[6]}x{c[7]}{'' if c[8] else '_nobias'}"
             for c in CONVT_CONFIGS]


def make_convt(cfg, rng, batch=2):
    C_in, C_out, k, s, p, op, H, W, bias = cfg
    layer = ConvTranspose2d(C_in, C_out, k, stride=s, padding=p, output_padding=op, bias=bias, rng=rng)
    return layer, asarray(rng.standard_normal((batch, C_in, H, W)))


def make_conv(cfg, rng, batch=2):
    C_in, C_out, k, s, p, H, W, bias = cfg
    layer = Conv2d(C_in, C_out, k, stride=s, padding=p, bias=bias, rng=rng)
    return layer, asarray(rng.standard_normal((batch, C_in, H, W)))


def away_from_zero(rng, shape, gap=0.1):
    """Normal draws pushed at least `gap` away from 0 (ReLU's kink)."""
    x = rng.standard_normal(shape)
    return x + gap * np.sign(x)


def distinct(rng, shape):
    """A random permutation of well separated values: no ties, so max-pool's arg-max is stable
    under a 1e-6 perturbation."""
    n = int(np.prod(shape))
    return rng.permutation(n).reshape(shape) / n - 0.5


# id -> factory(rng) -> (layer, x). Every layer type, several shapes.
LAYER_CASES = {
    "linear": lambda r: (Linear(5, 4, rng=r), r.standard_normal((3, 5))),
    "linear_nobias": lambda r: (Linear(3, 6, bias=False, rng=r), r.standard_normal((2, 3))),
    **{f"conv_{i}": (lambda r, c=c: make_conv(c, r)) for i, c in zip(CONV_IDS, CONV_CONFIGS)},
    **{f"convT_{i}": (lambda r, c=c: make_convt(c, r)) for i, c in zip(CONVT_IDS, CONVT_CONFIGS)},
    "tanh": lambda r: (Tanh(), r.standard_normal((2, 3, 2, 2))),
    "leaky_relu": lambda r: (LeakyReLU(0.2), away_from_zero(r, (2, 3, 4))),
    "elu": lambda r: (ELU(0.7), away_from_zero(r, (2, 2, 3, 3))),
    "softplus": lambda r: (Softplus(), 3 * r.standard_normal((3, 5))),
    "avgpool2_odd": lambda r: (AvgPool2d(2), r.standard_normal((2, 2, 5, 4))),
    "avgpool3": lambda r: (AvgPool2d(3), r.standard_normal((2, 1, 6, 7))),
    "sigmoid": lambda r: (Sigmoid(), 3 * r.standard_normal((3, 5))),
    "relu": lambda r: (ReLU(), away_from_zero(r, (2, 2, 3, 3))),
    "maxpool2_odd": lambda r: (MaxPool2d(2), distinct(r, (2, 2, 5, 4))),
    "maxpool3": lambda r: (MaxPool2d(3), distinct(r, (2, 1, 6, 6))),
    "upsample2": lambda r: (Upsample(2), r.standard_normal((2, 2, 2, 3))),
    "upsample3": lambda r: (Upsample(3), r.standard_normal((2, 1, 2, 2))),
    "flatten": lambda r: (Flatten(), r.standard_normal((2, 3, 2, 2))),
    "reshape": lambda r: (Reshape(3, 4), r.standard_normal((2, 2, 6))),
    "dropout_eval": lambda r: (Dropout(0.5, seed=0).eval(), r.standard_normal((2, 7))),
}
PARAM_CASES = [k for k in LAYER_CASES if k.startswith(("linear", "conv"))]
FREE_CASES = [k for k in LAYER_CASES if k not in PARAM_CASES]


@pytest.fixture(params=list(LAYER_CASES), ids=list(LAYER_CASES))
def case(request, rng):
    layer, x = LAYER_CASES[request.param](rng)
    return layer, asarray(x)


@pytest.fixture(params=PARAM_CASES, ids=PARAM_CASES)
def param_case(request, rng):
    layer, x = LAYER_CASES[request.param](rng)
    return layer, asarray(x)


# ---- finite-difference helpers ---------------------------------------------------------------

def fd_jac_input(layer, x):
    """Per-sample central-difference input Jacobian (B, d_out, d_in); also asserts that no
    sample's output depends on another sample's input."""
    B = x.shape[0]
    J = numerical_jacobian(lambda z: layer.forward(z), x)
    J = J.reshape(B, J.shape[0] // B, B, J.shape[1] // B)
    same = np.arange(B)
    per_sample = J[same, :, same]  # (B, d_out, d_in)
    cross = J.copy()
    cross[same, :, same] = 0.0
    assert np.abs(cross).max() <= EXACT * max(np.abs(per_sample).max(), 1.0), "samples interact"
    return per_sample


def fd_jac_params(layer, x):
    """Central-difference parameter Jacobian (B, d_out, P), theta perturbed via set_params."""
    theta0 = layer.get_params()

    def f(theta):
        layer.set_params(theta)
        return layer.forward(x)

    J = numerical_jacobian(f, theta0.copy())
    layer.set_params(theta0)
    return J.reshape(x.shape[0], -1, theta0.size)


def random_cotangent(rng, layer, x, K=None):
    out = layer.out_shape(x.shape[1:])
    return asarray(rng.standard_normal((x.shape[0],) + ((K,) if K else ()) + tuple(out)))


# ---- independent forward references ------------------------------------------------------------

def conv_reference(x, weight, bias, stride, padding):
    """Cross-correlation by scipy's correlate2d on the zero-padded input, then strided subsampling."""
    (sh, sw), (ph, pw) = stride, padding
    xpad = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    B, C_in = x.shape[:2]
    C_out = weight.shape[0]
    rows = []
    for b in range(B):
        maps = []
        for o in range(C_out):
            full = sum(correlate2d(xpad[b, c], weight[o, c], mode="valid") for c in range(C_in))
            maps.append(full[::sh, ::sw] + (0.0 if bias is None else bias[o]))
        rows.append(maps)
    return np.array(rows)


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=CONV_IDS)
def test_conv_forward_matches_scipy(cfg, rng):
    layer, x = make_conv(cfg, rng, batch=3)
    bias = layer.bias if cfg[-1] else None
    expected = conv_reference(to_numpy(x), to_numpy(layer.weight), None if bias is None else to_numpy(bias),
                              layer.stride, layer.padding)
    y = layer.forward(x)
    assert y.shape == (3,) + layer.out_shape(x.shape[1:])
    assert_close(y, expected, EXACT, "conv forward")


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=CONV_IDS)
def test_conv_matrix_reproduces_forward(cfg, rng):
    layer, x = make_conv(cfg, rng)
    T = layer.conv_matrix(x.shape[1:])
    y = layer.forward(x)
    b = xp().repeat(layer.bias, y[0, 0].size) if cfg[-1] else 0.0
    assert_close((x.reshape(len(x), -1) @ T.T + b).reshape(y.shape), y, EXACT, "T x + b")


def test_im2col_layout_is_c_u_v(rng):
    """cols[b, (h, w), (c, u, v)] = x_pad[b, c, h*s_h + u, w*s_w + v], checked element by element."""
    layer = Conv2d(2, 1, (2, 3), stride=(2, 1), padding=(1, 0), rng=rng)
    x = rng.standard_normal((2, 2, 4, 5))
    cols = to_numpy(layer.im2col(asarray(x)))
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    _, Ho, Wo = layer.out_shape(x.shape[1:])
    assert cols.shape == (2, Ho * Wo, 2 * 2 * 3)
    for b in range(2):
        for h in range(Ho):
            for w in range(Wo):
                for c in range(2):
                    for u in range(2):
                        for v in range(3):
                            assert cols[b, h * Wo + w, (c * 2 + u) * 3 + v] == xpad[b, c, 2 * h + u, w + v]


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=CONV_IDS)
def test_col2im_is_the_adjoint_of_im2col(cfg, rng):
    """<im2col(x), D> = <x, col2im(D)>, also with an extra leading axis on D."""
    layer, x = make_conv(cfg, rng)
    cols = layer.im2col(x)
    D = asarray(rng.standard_normal((x.shape[0], 3) + cols.shape[1:]))
    back = layer.col2im(D, x.shape[1:])
    assert back.shape == (x.shape[0], 3) + x.shape[1:]
    for k in range(3):
        assert_close((x * back[:, k]).sum(), (cols * D[:, k]).sum(), EXACT, "adjoint identity")


@pytest.mark.parametrize("cfg", [c for c in CONV_CONFIGS if c[3] == 1], ids=lambda c: f"{c}")  # all have p < k
def test_conv_input_product_paths_agree(cfg, rng, monkeypatch):
    """J_in^T v via col2im and via the flipped-kernel convolution of v (stride 1) are the same map."""
    layer, x = make_conv(cfg, rng)
    layer(x)
    v = random_cotangent(rng, layer, x, K=2)
    C_in, C_out, H, W = cfg[0], cfg[1], cfg[5], cfg[6]
    Ho, Wo = layer.out_shape(x.shape[1:])[1:]
    assert layer._transpose_is_a_convolution() == (C_out * H * W < C_in * Ho * Wo)  # the cheaper path
    via_conv = layer._vjp_input_as_convolution(v)
    monkeypatch.setattr(layer, "_transpose_is_a_convolution", lambda: False)
    assert_close(via_conv, layer.vjp_input(v), EXACT, "two J_in^T v paths")


def test_conv_accepts_non_contiguous_input(rng):
    layer = Conv2d(2, 3, 3, stride=2, padding=0, rng=rng)
    x = asarray(rng.standard_normal((2, 7, 9, 2))).transpose(0, 3, 1, 2)  # a strided view, NCHW
    assert_close(layer.forward(x), layer.forward(xp().ascontiguousarray(x)), 0.0, "non-contiguous")


def test_linear_forward_matches_reference(rng):
    layer = Linear(4, 3, rng=rng)
    x = rng.standard_normal((5, 4))
    W, b = to_numpy(layer.weight), to_numpy(layer.bias)
    expected = np.array([[sum(W[o, i] * x[b_, i] for i in range(4)) + b[o] for o in range(3)] for b_ in range(5)])
    assert_close(layer(asarray(x)), expected, EXACT, "linear forward")
    nobias = Linear(4, 3, bias=False, rng=rng)
    assert_close(nobias(asarray(x)), x @ to_numpy(nobias.weight).T, EXACT, "linear without bias")
    assert nobias.num_params == 12


@pytest.mark.parametrize("layer, reference, derivative", [
    (Tanh(), np.tanh, lambda x: 1 / np.cosh(x) ** 2),
    (Sigmoid(), expit, lambda x: expit(x) * expit(-x)),
    (ReLU(), lambda x: np.where(x > 0, x, 0.0), lambda x: np.where(x > 0, 1.0, 0.0)),
    (LeakyReLU(0.1), lambda x: np.where(x > 0, x, 0.1 * x), lambda x: np.where(x > 0, 1.0, 0.1)),
    (ELU(1.3), lambda x: np.where(x > 0, x, 1.3 * (np.exp(x) - 1)), lambda x: np.where(x > 0, 1.0, 1.3 * np.exp(x))),
    (Softplus(), lambda x: np.logaddexp(0.0, x), expit),
], ids=["tanh", "sigmoid", "relu", "leaky_relu", "elu", "softplus"])
def test_elementwise_forward_and_derivative(layer, reference, derivative, rng):
    x = 4 * away_from_zero(rng, (3, 2, 4))
    assert isinstance(layer, Elementwise)
    assert_close(layer(asarray(x)), reference(x), EXACT, "forward")
    # atol: 1 - tanh^2 cancels for large |x|, leaving round-off of machine-epsilon size (the scale is 1)
    assert_close(layer.derivative(asarray(x)), derivative(x), EXACT, "derivative", atol=1e-15)


def test_sigmoid_is_overflow_free():
    with np.errstate(all="raise"):
        y = Sigmoid()(asarray(np.array([[-1000.0, 0.0, 1000.0]])))
    assert_close(y, np.array([[0.0, 0.5, 1.0]]), 0.0, "sigmoid at +-1000")


def test_new_activations_are_overflow_free_and_match_pytorch_at_the_kink():
    """Bug caught: ELU's exp or Softplus's exp overflowing for large |x| (inf/NaN in forward or derivative),
    and a kink value other than PyTorch's (LeakyReLU' = slope, ELU' = alpha at 0)."""
    x = asarray(np.array([[-1000.0, 0.0, 1000.0]]))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # exp(-1000) underflowing to 0 is right
        assert_close(Softplus()(x), np.array([[0.0, np.log(2.0), 1000.0]]), EXACT, "softplus at +-1000")
        assert_close(ELU(2.0)(x), np.array([[-2.0, 0.0, 1000.0]]), EXACT, "elu at +-1000")
        assert_close(ELU(2.0).derivative(x), np.array([[0.0, 2.0, 1.0]]), 0.0, "elu' at -1000, 0, 1000")
        assert_close(LeakyReLU(0.3).derivative(x), np.array([[0.3, 0.3, 1.0]]), 0.0, "leaky relu'")


def test_relu_derivative_is_zero_at_the_kink():
    assert ReLU().derivative(asarray(np.array([[0.0, -0.0]]))).tolist() == [[0.0, 0.0]]


def pool_by_loops(x, k, reduce):
    """The reference pooling: reduce over every k x k window (stride k; trailing rows/columns dropped)."""
    B, C, H, W = x.shape
    return np.array([[[[reduce(x[b, c, i * k:(i + 1) * k, j * k:(j + 1) * k]) for j in range(W // k)]
                       for i in range(H // k)] for c in range(C)] for b in range(B)])


@pytest.mark.parametrize("k, shape", [(2, (2, 3, 4, 6)), (2, (1, 2, 5, 5)), (3, (2, 1, 7, 6))])
def test_maxpool_forward_matches_loops(k, shape, rng):
    x = rng.standard_normal(shape)
    expected = pool_by_loops(x, k, np.max)
    pool = MaxPool2d(k)
    assert_close(pool(asarray(x)), expected, 0.0, "max-pool forward")
    # the arg-max cache indexes the flattened k*k window; input_index maps it to flat input positions
    assert np.array_equal(to_numpy(pool._argmax), pool_by_loops(x, k, np.argmax))
    idx = to_numpy(pool.input_index(asarray(x)))
    B = shape[0]
    assert_close(np.take_along_axis(x.reshape(B, -1), idx, axis=1), expected.reshape(B, -1), 0.0, "input_index")


# ---- max-pool ties: the first index of the window (row-major), as PyTorch and numpy.argmax -----

def pool_reference(x, k):
    """Loop reference: y = window max, J_in with one 1 per output at the window's first arg-max."""
    B, C, H, W = x.shape
    Ho, Wo = H // k, W // k
    y = np.zeros((B, C, Ho, Wo))
    J = np.zeros((B, C * Ho * Wo, C * H * W))
    n_tied = 0
    for b in range(B):
        for c in range(C):
            for i in range(Ho):
                for j in range(Wo):
                    window = x[b, c, i * k:(i + 1) * k, j * k:(j + 1) * k]
                    u, v = divmod(int(np.argmax(window)), k)  # argmax: the first maximum, row-major
                    y[b, c, i, j] = window.max()
                    J[b, (c * Ho + i) * Wo + j, (c * H + i * k + u) * W + j * k + v] = 1.0
                    n_tied += int(np.sum(window == window.max()) > 1)
    return y, J, n_tied


def zero_bordered_pool_input(rng):
    """What the conv AE's first MaxPool2d sees on MNIST: conv + tanh of an image whose border is 0,
    so the border windows are constant (all tied) and equal across samples."""
    x = np.zeros((2, 1, 10, 10))
    x[:, :, 3:7, 3:7] = rng.uniform(0, 1, (2, 1, 4, 4))
    return to_numpy(Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh())(asarray(x)))


TIED_INPUTS = {  # id -> (k, factory(rng) -> x); every case has windows with several maxima
    "all_zero": (2, lambda r: np.zeros((2, 2, 4, 4))),
    "all_equal_odd": (3, lambda r: np.full((1, 2, 7, 6), 0.3)),
    "few_levels": (2, lambda r: r.integers(0, 3, (2, 2, 5, 4)).astype(float)),
    "few_levels_k3": (3, lambda r: r.integers(0, 2, (2, 1, 6, 7)).astype(float)),
    "mnist_border": (2, zero_bordered_pool_input),
}


@pytest.fixture(params=list(TIED_INPUTS), ids=list(TIED_INPUTS))
def tied(request, rng):
    k, make = TIED_INPUTS[request.param]
    x = make(rng)  # host: the loop reference reads it
    y, J, n_tied = pool_reference(x, k)
    assert n_tied > 0, "the case must contain tied windows"
    return MaxPool2d(k), asarray(x), y, J


def test_maxpool_ties_forward_and_dense_jacobian_pick_the_first_index(tied):
    """Bug caught: a tie rule other than the first index (e.g. `>=` in the running max picks the last)."""
    pool, x, y, J = tied
    assert_close(pool(x), y, 0.0, "forward on tied windows")
    assert_close(pool.jac_input(x), J, 0.0, "J_in on tied windows: one 1 per row, at the first maximum")
    assert np.array_equal(to_numpy(pool.input_index(x)), J.argmax(axis=2))


@pytest.mark.parametrize("K", [None, 3])
def test_maxpool_ties_route_the_product_to_the_first_index_only(tied, K, rng):
    """Bug caught: J_in^T v sending v to the last or to every tied index of a window."""
    pool, x, _, J = tied
    v = random_cotangent(rng, pool, x, K)
    pool(x)
    vk = to_numpy(v).reshape(x.shape[0], K or 1, -1)
    expected = np.einsum("bko,boi->bki", vk, J).reshape((x.shape[0],) + ((K,) if K else ()) + x.shape[1:])
    assert_close(pool.vjp_input(v), expected, 0.0, "J_in^T v on tied windows")


@pytest.mark.parametrize("k, shape", [(2, (2, 3, 4, 6)), (2, (1, 2, 5, 5)), (3, (2, 1, 7, 8))])
def test_avgpool_forward_matches_loops(k, shape, rng):
    """Bug caught: windows other than PyTorch's (trailing rows/columns beyond the last window not dropped)."""
    x = rng.standard_normal(shape)
    expected = pool_by_loops(x, k, np.mean)
    assert_close(AvgPool2d(k)(asarray(x)), expected, EXACT, "avg-pool forward")


def convt_reference(x, weight, bias, stride, padding, output_padding):
    """Transposed convolution by its definition, element by element: x[c, h, w] W[c, o, u, t] added at
    (h s + u - p, w s + t - p) of the (H - 1) s - 2 p + k + output_padding output."""
    (sh, sw), (ph, pw), (oh, ow) = stride, padding, output_padding
    B, C, H, W = x.shape
    C_out, kh, kw = weight.shape[1:]
    Ho, Wo = (H - 1) * sh - 2 * ph + kh + oh, (W - 1) * sw - 2 * pw + kw + ow
    y = np.zeros((B, C_out, Ho, Wo)) + (0.0 if bias is None else bias[None, :, None, None])
    for b, c, h, w, o, u, t in np.ndindex(B, C, H, W, C_out, kh, kw):
        r, q = h * sh + u - ph, w * sw + t - pw
        if 0 <= r < Ho and 0 <= q < Wo:
            y[b, o, r, q] += x[b, c, h, w] * weight[c, o, u, t]
    return y


@pytest.mark.parametrize("cfg", CONVT_CONFIGS, ids=CONVT_IDS)
def test_conv_transpose_forward_matches_definition_and_is_the_adjoint_of_conv(cfg, rng):
    """Bug caught: a wrong output size (PyTorch's (H-1)s - 2p + k + output_padding), the crop on the wrong
    side, or the kernel read as (C_out, C_in) instead of PyTorch's (C_in, C_out, kh, kw) layout."""
    layer, x = make_convt(cfg, rng, batch=3)
    bias = to_numpy(layer.bias) if cfg[-1] else None
    y = layer(x)
    assert y.shape == (3,) + layer.out_shape(x.shape[1:])
    expected = convt_reference(to_numpy(x), to_numpy(layer.weight), bias, layer.stride, layer.padding,
                               layer.output_padding)
    assert_close(y, expected, EXACT, "conv-transpose forward")
    # <ConvT(x) - b, v> = <x, Conv2d(v)>: the same kernel read as Conv2d(C_out -> C_in), no bias
    conv = Conv2d(cfg[1], cfg[0], cfg[2], stride=cfg[3], padding=cfg[4], bias=False, rng=rng)
    conv.weight = layer.weight
    v = asarray(rng.standard_normal(y.shape))
    y0 = y - (layer.bias[None, :, None, None] if cfg[-1] else 0.0)
    assert conv(v).shape == x.shape
    assert_close((y0 * v).sum(), (x * conv(v)).sum(), EXACT, "adjoint of Conv2d")


@pytest.mark.parametrize("s", [1, 2, 3])
def test_upsample_forward_matches_repeat(s, rng):
    x = rng.standard_normal((2, 3, 2, 4))
    assert_close(Upsample(s)(asarray(x)), np.repeat(np.repeat(x, s, axis=2), s, axis=3), 0.0, "upsample")


def test_reshape_and_flatten_forward(rng):
    x = rng.standard_normal((3, 2, 3, 4))
    assert_close(Flatten()(asarray(x)), x.reshape(3, 24), 0.0, "flatten")
    assert_close(Reshape(4, 6)(asarray(x)), x.reshape(3, 4, 6), 0.0, "reshape")
    assert Reshape((4, 6)).out_shape((2, 3, 4)) == (4, 6)


# ---- every layer: Jacobians vs finite differences, products vs dense ----------------------------

def test_out_shape_matches_forward(case):
    layer, x = case
    assert layer(x).shape == (x.shape[0],) + tuple(layer.out_shape(x.shape[1:]))


def test_jac_input_matches_finite_differences(case):
    layer, x = case
    J = layer.jac_input(x)
    d_out = int(np.prod(layer.out_shape(x.shape[1:])))
    assert J.shape == (x.shape[0], d_out, x[0].size)
    assert_close(J, fd_jac_input(layer, x), RTOL, f"{layer!r} J_in")


@pytest.mark.parametrize("make", [lambda rng: (Linear(4, 3, rng=rng), (4,)),
                                  lambda rng: (Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), rng=rng), (2, 5, 4))],
                         ids=["linear", "conv2d"])
def test_input_rows_equal_the_products_with_unit_vectors(make):
    """Bug caught: a layer's own input_rows (W, or the convolution matrix, broadcast over the batch) that is not
    J_in: transposed, or a stride / padding misplaced; against Layer.input_rows, J_in^T on the unit vectors."""
    rng = np.random.default_rng(5)
    layer, in_shape = make(rng)
    layer(asarray(rng.standard_normal((3,) + in_shape)))
    assert_close(layer.input_rows(np.float64), Layer.input_rows(layer, np.float64), EXACT, f"{layer!r} rows")


def test_jac_params_matches_finite_differences(param_case):
    layer, x = param_case
    J = layer.jac_params(x)
    assert J.shape == (x.shape[0], layer(x)[0].size, layer.num_params)
    assert_close(J, fd_jac_params(layer, x), RTOL, f"{layer!r} J_p")


@pytest.mark.parametrize("name", FREE_CASES)
def test_parameter_free_layers_have_empty_jac_params(name, rng):
    layer, x = LAYER_CASES[name](rng)
    x = asarray(x)
    assert layer.num_params == 0
    J = layer.jac_params(x)
    assert J.shape == (x.shape[0], layer(x)[0].size, 0)
    assert layer.get_params().shape == (0,)
    assert layer.vjp_params(layer(x)).shape == (0,)


@pytest.mark.parametrize("K", [None, 3])
def test_vjp_input_matches_dense(case, K, rng):
    layer, x = case
    J = layer.jac_input(x)
    v = random_cotangent(rng, layer, x, K)
    layer.forward(x)
    g = layer.vjp_input(v)
    vk = v.reshape(x.shape[0], K or 1, -1)
    expected = xp().einsum("bko,boi->bki", vk, J).reshape((x.shape[0],) + ((K,) if K else ()) + x.shape[1:])
    assert g.shape == expected.shape
    assert_close(g, expected, EXACT, f"{layer!r} J_in^T v")


@pytest.mark.parametrize("K", [None, 3])
def test_vjp_params_matches_dense(param_case, K, rng):
    layer, x = param_case
    J = layer.jac_params(x)
    v = random_cotangent(rng, layer, x, K)
    layer.forward(x)
    vk = v.reshape(x.shape[0], K or 1, -1)
    per_sample = xp().einsum("bko,bop->bkp", vk, J)
    g = layer.vjp_params(v, per_sample=True)
    assert_close(g, per_sample if K else per_sample[:, 0], EXACT, f"{layer!r} per-sample J_p^T v")
    if K is None:
        assert_close(layer.vjp_params(v), per_sample.sum(axis=(0, 1)), EXACT, f"{layer!r} summed J_p^T v")


# ---- every layer: curvature rules (how M passes through) against the dense Jacobians ---------------

def curvature_inputs(layer, x, rng):
    """Dense J_in, J_p at x (host), a random PSD M = V^T V (B, d_out, d_out) from a factor V (B, 3, *out),
    a positive m (B, *out); the layer's caches left at x."""
    J_in, J_p = to_numpy(layer.jac_input(x)), to_numpy(layer.jac_params(x))
    layer.forward(x)
    B, out = x.shape[0], tuple(layer.out_shape(x.shape[1:]))
    V = rng.standard_normal((B, 3) + out)
    Vf = V.reshape(B, 3, -1)
    M = Vf.transpose(0, 2, 1) @ Vf + np.einsum("bi,ij->bij", rng.random((B, Vf.shape[2])), np.eye(Vf.shape[2]))
    m = rng.random((B,) + out) + 0.1
    return J_in, J_p, M, m, V


def close(actual, expected, what):
    """Two exact computations: round-off relative to the scale of the whole result."""
    assert_close(actual, expected, EXACT, what, atol=1e-13 * max(float(np.abs(expected).max()), 1.0))


def test_backprop_rules_match_dense(case, rng):
    """Bug caught: any layer's M_in = J^T M J, m_in = (J * J)^T m, diag(J^T M J) or J^T diag(m) J rule
    being wrong (e.g. an unsquared kernel in (J * J)^T m, a missing 1/k^2, a transposed W)."""
    layer, x = case
    J, _, M, m, _ = curvature_inputs(layer, x, rng)
    B, in_shape = x.shape[0], tuple(x.shape[1:])
    mf = m.reshape(B, -1)
    expected_full = np.einsum("boi,bop,bpj->bij", J, M, J)
    close(layer.backprop_full(asarray(M)), expected_full, f"{layer!r} J^T M J")
    close(layer.backprop_diag(asarray(m)), np.einsum("boi,bo->bi", J * J, mf).reshape((B,) + in_shape),
          f"{layer!r} (J * J)^T m")
    close(layer.diag_of_backprop(asarray(M)), np.einsum("bii->bi", expected_full).reshape((B,) + in_shape),
          f"{layer!r} diag(J^T M J)")
    close(layer.backprop_from_diag(asarray(m)), np.einsum("boi,bo,boj->bij", J, mf, J), f"{layer!r} J^T diag(m) J")


def test_param_rules_match_dense(param_case, rng):
    """Bug caught: a parameter block or diagonal read off M, diag(M) or the factor V wrongly (e.g. the
    un-squared im2col matrix or input, a bias summed over the wrong axis, a missing sum over k)."""
    layer, x = param_case
    _, Jp, M, m, V = curvature_inputs(layer, x, rng)
    B = x.shape[0]
    block = np.einsum("bop,boq,bqr->bpr", Jp, M, Jp)
    close(layer.param_block(asarray(M), per_sample=True), block, f"{layer!r} J_p^T M J_p")
    close(layer.param_block(asarray(M)), block.sum(axis=0), f"{layer!r} summed block")
    diag = np.einsum("bpp->bp", block)
    close(layer.param_diag(asarray(M), per_sample=True), diag, f"{layer!r} diag(J_p^T M J_p)")
    close(layer.param_diag(asarray(M)), diag.sum(axis=0), f"{layer!r} summed diag")
    from_diag = np.einsum("bop,bo->bp", Jp * Jp, m.reshape(B, -1))
    close(layer.param_diag_from_diag(asarray(m), per_sample=True), from_diag, f"{layer!r} (J_p * J_p)^T m")
    close(layer.param_diag_from_diag(asarray(m)), from_diag.sum(axis=0), f"{layer!r} summed (J_p * J_p)^T m")
    Vf = V.reshape(B, V.shape[1], -1)
    from_sqrt = np.einsum("bpp->bp", np.einsum("bop,bko,bkq,bqr->bpr", Jp, Vf, Vf, Jp))
    close(layer.param_diag_from_sqrt(asarray(V), per_sample=True), from_sqrt, f"{layer!r} sum_k (J_p^T v_k)^2")
    close(layer.param_diag_from_sqrt(asarray(V)), from_sqrt.sum(axis=0), f"{layer!r} summed sqrt diag")


def test_constant_rules_match_dense(case, rng):
    """m = c at every entry (a Gaussian likelihood's M_L = I / sigma^2): a layer's constant rules against the dense
    Jacobians. Bugs caught: Linear's weight diagonal summed over the outputs instead of the batch, the bias given
    c instead of c B, Linear's c W^T W as c W W^T, Conv2d's window sums without the padding or taken at stride 1
    on a strided layer, its m_in missing the border (the windows that cover a pixel), a reshape that loses the
    constant."""
    layer, x = case
    J, Jp, _, _, _ = curvature_inputs(layer, x, rng)
    B, in_shape = x.shape[0], tuple(x.shape[1:])
    y = layer.forward(x)
    m = ConstantDiag(0.7, tuple(y.shape), y)
    m_in = layer.backprop_constant_diag(m)
    if isinstance(m_in, ConstantDiag):
        assert m_in.value == m.value
        m_in = m_in.full()
    close(m_in, 0.7 * (J * J).sum(axis=1).reshape((B,) + in_shape), f"{layer!r} (J * J)^T c")
    close(layer.backprop_from_constant_diag(m), 0.7 * np.einsum("boi,boj->bij", J, J), f"{layer!r} J^T (c I) J")
    if layer.num_params:
        close(layer.param_diag_from_constant(m), 0.7 * (Jp * Jp).sum(axis=(0, 1)), f"{layer!r} summed (J_p * J_p)^T c")


EXACT_RULES = ["backprop_full", "diag_of_backprop", "backprop_from_diag"]
PARAM_RULES = ["param_block", "param_diag", "param_diag_from_diag"]


def test_base_defaults_agree_with_every_layer_s_own_rules(case, rng):
    """The Layer defaults (J_in^T on M's columns, the dense rows of J_in and J_p from the products) against
    each layer's specialised rule. Bug caught: a default that is right only for the layer shapes a
    custom-layer test happens to use (e.g. rows and columns of M swapped, images flattened in another order)."""
    layer, x = case
    _, _, M, m, V = curvature_inputs(layer, x, rng)
    args = {"backprop_full": M, "diag_of_backprop": M, "backprop_from_diag": m, "param_block": M, "param_diag": M,
            "param_diag_from_diag": m}
    for name in EXACT_RULES + (PARAM_RULES if layer.num_params else []):
        close(getattr(Layer, name)(layer, asarray(args[name])), getattr(layer, name)(asarray(args[name])),
              f"{layer!r} default {name}")
    if layer.num_params:
        close(Layer.param_diag_from_sqrt(layer, asarray(V)), layer.param_diag_from_sqrt(asarray(V)),
              f"{layer!r} default param_diag_from_sqrt")


def test_products_use_the_last_forward(rng):
    """After forward(x2) the products are taken at x2, not at an earlier input."""
    layer = Conv2d(1, 2, 3, padding=1, rng=rng)
    x1, x2 = asarray(rng.standard_normal((2, 2, 1, 4, 4)))
    v = asarray(rng.standard_normal((2, 2, 4, 4)))
    J2 = layer.jac_params(x2)
    layer.forward(x1)
    layer.forward(x2)
    assert_close(layer.vjp_params(v), xp().einsum("bo,bop->p", v.reshape(2, -1), J2), EXACT, "cache")


def test_float32_stays_float32(rng):
    """Training runs in float32: no silent promotion to float64 in forward or products."""
    set_default_dtype(np.float32)
    model = Sequential(Conv2d(1, 2, 3, padding=1, rng=rng), Tanh(), MaxPool2d(2), Upsample(2),
                       Flatten(), Linear(32, 3, rng=rng))
    x = asarray(rng.standard_normal((2, 1, 4, 4)), dtype=np.float32)
    y = model(x)
    v = xp().ones_like(y)
    assert y.dtype == np.float32
    assert model.vjp_input(v).dtype == np.float32
    assert model.vjp_params(v).dtype == np.float32
    assert model.get_params().dtype == np.float32
    assert get_default_dtype() == np.float32


def test_new_layers_stay_float32(rng):
    """Bug caught: a float64 constant or mask (np.where with Python floats, an eye of the default dtype)
    promoting float32 training arrays in the new layers' forward, products or diagonal rule."""
    set_default_dtype(np.float32)
    model = Sequential(ConvTranspose2d(1, 2, 3, stride=2, padding=1, output_padding=1, rng=rng), ELU(),
                       AvgPool2d(2), LeakyReLU(0.1), Softplus(), Flatten(), Linear(32, 3, rng=rng))
    x = asarray(rng.standard_normal((2, 1, 4, 4)), dtype=np.float32)
    y = model(x)
    v = xp().ones_like(y)
    assert y.dtype == np.float32
    assert model.vjp_input(v).dtype == np.float32
    assert model.vjp_params(v).dtype == np.float32
    for layer in model.layers[:-1]:
        m = xp().ones((2,) + tuple(layer.out_shape(layer.last_input.shape[1:])), dtype=np.float32)
        assert layer.backprop_diag(m).dtype == np.float32, layer
        if layer.num_params:
            assert layer.param_diag_from_diag(m).dtype == np.float32, layer


# ---- parameters ------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_factory, sizes", [
    (lambda r: Linear(3, 2, rng=r), [(2, 3), (2,)]),
    (lambda r: Conv2d(2, 3, (2, 1), rng=r), [(3, 2, 2, 1), (3,)]),
    (lambda r: Conv2d(2, 3, 2, bias=False, rng=r), [(3, 2, 2, 2)]),
])
def test_flat_params_round_trip_and_order(layer_factory, sizes, rng):
    layer = layer_factory(rng)
    assert [p.shape for p in layer.params] == sizes
    theta = layer.get_params()
    assert_close(theta, xp().concatenate([p.ravel() for p in layer.params]), 0.0, "order: weight (C order), bias")
    new = asarray(rng.standard_normal(theta.size))
    layer.set_params(new)
    assert_close(layer.get_params(), new, 0.0, "round trip")
    new[0] = 100.0  # set_params copies: later changes to the vector do not leak into the layer
    assert layer.params[0].ravel()[0] != 100.0
    parts = layer.split_params(xp().stack([new, 2 * new]))
    assert [p.shape for p in parts] == [(2,) + s for s in sizes]


def test_shared_params_are_views_that_a_new_call_refreshes(rng):
    """set_params(share=True): the layers' arrays become views of theta (no copy) and every call starts new caches.
    Catches a share that copies anyway (the write through theta would not show), and one that leaves the stamp, so
    the engines would take an f from before the change for the current parameters."""
    model = small_chain(rng)
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    theta = asarray(rng.standard_normal(model.num_params))
    model.set_params(theta, share=True)
    theta[0] = 100.0
    assert float(model[0].weight.ravel()[0]) == 100.0, "a view of theta"
    f = model.forward(x)
    assert model.last_output_is(f)
    theta *= 0.5
    model.set_params(theta, check_finite=False, share=True)
    assert not model.last_output_is(f), "a new call is a new set of parameters"
    fresh = small_chain(rng)
    fresh.set_params(theta)
    assert_close(model.forward(x), fresh.forward(x), 0.0, "the shared parameters compute as copied ones")
    model.set_params(2 * theta)  # a copy again: never written through into the caller's theta
    assert_close(model.get_params(), 2 * theta, 0.0, "copied")
    assert float(theta[0]) == 50.0
    with pytest.raises(TypeError, match="share=True needs theta in the parameters' dtype"):
        model.set_params(theta.astype(np.float32), share=True)


def test_linear_init_bounds(rng):
    """PyTorch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    layer = Linear(400, 300, rng=rng)
    bound = 1 / np.sqrt(400)
    for p in map(to_numpy, layer.params):
        assert np.abs(p).max() <= bound
        assert np.abs(p).max() > 0.95 * bound
    conv = Conv2d(4, 8, 3, rng=rng)
    assert np.abs(to_numpy(conv.weight)).max() <= 1 / np.sqrt(36)


# ---- Sequential: the chain rule --------------------------------------------------------------

def small_chain(rng):
    """Every layer type in one chain, (2, 6, 6) -> (2, 4, 4) images."""
    return Sequential(
        Conv2d(2, 3, 3, padding=1, rng=rng), Tanh(), MaxPool2d(2),
        Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(0, 1), rng=rng), Sigmoid(),
        Flatten(), Linear(8, 5, rng=rng), Tanh(), Dropout(0.3, seed=1).eval(), Linear(5, 8, rng=rng),
        Reshape(2, 2, 2), Upsample(2), Conv2d(2, 2, 1, rng=rng))


def test_sequential_shapes(rng):
    model = small_chain(rng)
    shapes = model.shapes((2, 6, 6))
    assert shapes[0] == (2, 6, 6) and shapes[-1] == (2, 4, 4) and len(shapes) == len(model) + 1
    x = asarray(rng.standard_normal((3, 2, 6, 6)))
    h = x
    for layer, s in zip(model, shapes[1:]):
        h = layer(h)
        assert h.shape[1:] == s
    assert_close(model(x), h, 0.0, "composition")


def test_sequential_jacobians_match_finite_differences(rng):
    model = small_chain(rng)
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    atol = 10 * fd_roundoff(float(abs(model(x)).max()))  # 10x the differences' absolute round-off
    assert_close(model.jac_input(x), fd_jac_input(model, x), RTOL, "chain J_in", atol=atol)
    assert_close(model.jac_params(x), fd_jac_params(model, x), RTOL, "chain J_p", atol=atol)


def test_sequential_products_match_dense(rng):
    model = small_chain(rng)
    x = asarray(rng.standard_normal((3, 2, 6, 6)))
    J_in, J_p = model.jac_input(x), model.jac_params(x)
    model.forward(x)
    v = asarray(rng.standard_normal((3, 4, 2, 4, 4)))  # K = 4 vectors per sample
    vk = v.reshape(3, 4, -1)
    einsum = xp().einsum
    assert_close(model.vjp_input(v), einsum("bko,boi->bki", vk, J_in).reshape(3, 4, 2, 6, 6), EXACT, "J_in^T V")
    expected = einsum("bko,bop->bkp", vk, J_p)
    # two summation orders: absolute round-off of about machine epsilon times the scale of the sums
    assert_close(model.vjp_params(v, per_sample=True), expected, EXACT, "J_p^T V",
                 atol=1e-15 * float(abs(expected).max()))
    assert_close(model.vjp_params(v[:, 0]), einsum("bo,bop->p", vk[:, 0], J_p), EXACT, "sum_b J_p^T v")


def test_sequential_dense_jacobian_is_the_product_of_layer_jacobians(rng):
    """J_in = J_in^L ... J_in^1 and the block of layer l is J_in^L ... J_in^{l+1} J_p^l (E.3)."""
    model = small_chain(rng)
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    h, J_in, J_p = x, [], []
    for layer in model:
        J_in.append(layer.jac_input(h))
        J_p.append(layer.jac_params(h))
        h = layer(h)
    full = J_in[0]
    for J in J_in[1:]:
        full = J @ full
    assert_close(model.jac_input(x), full, EXACT, "J_in chain")
    Jp = model.jac_params(x)
    for l, sl in enumerate(model.param_slices()):
        A = xp().eye(h[0].size)[None]
        for J in J_in[l + 1:][::-1]:
            A = A @ J
        assert_close(Jp[:, :, sl], A @ J_p[l], EXACT, f"block of layer {l}")


def test_sequential_params_are_the_layers_in_order(rng):
    model = small_chain(rng)
    theta = model.get_params()
    slices = model.param_slices()
    assert theta.size == model.num_params == sum(layer.num_params for layer in model)
    for layer, sl in zip(model, slices):
        assert_close(theta[sl], layer.get_params(), 0.0, f"slice of {layer!r}")
    assert slices[0].start == 0 and slices[-1].stop == theta.size
    new = asarray(rng.standard_normal(theta.size))
    model.set_params(new)
    assert_close(model.get_params(), new, 0.0, "round trip")
    assert_close(model[0].weight.ravel(), new[:model[0].weight.size], 0.0, "first layer's weight first")


def test_sequential_indexing_shares_layers(rng):
    model = small_chain(rng)
    head = model[:3]
    assert isinstance(head, Sequential) and len(head) == 3 and head[0] is model[0]
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    assert_close(model[3:](head(x)), model(x), 0.0, "split chain")


def test_nested_sequential_matches_flat(rng):
    flat = small_chain(rng)
    nested = Sequential(flat[:4], Sequential(*flat[4:8]), *flat[8:])
    x = asarray(rng.standard_normal((2, 2, 6, 6)))
    assert_close(nested.jac_params(x), flat.jac_params(x), EXACT, "nested J_p")
    assert_close(nested.jac_input(x), flat.jac_input(x), EXACT, "nested J_in")
    v = asarray(rng.standard_normal((2, 2, 4, 4)))
    nested.forward(x)
    g_nested = nested.vjp_params(v)
    flat.forward(x)
    assert_close(g_nested, flat.vjp_params(v), EXACT, "nested J_p^T v")


def test_parameter_free_chain(rng):
    model = Sequential(Tanh(), Flatten())
    x = asarray(rng.standard_normal((2, 3, 2)))
    y = model(x)
    assert model.num_params == 0 and model.get_params().shape == (0,)
    assert model.vjp_params(y).shape == (0,)
    assert model.vjp_params(xp().ones((2, 5, 6)), per_sample=True).shape == (2, 5, 0)
    assert model.jac_params(x).shape == (2, 6, 0)


# ---- Dropout ------------------------------------------------------------------------------------

def test_dropout_eval_is_identity(rng):
    x = asarray(rng.standard_normal((4, 10)))
    d = Dropout(0.5, seed=0)
    d.train()(x)  # a training mask exists ...
    d.eval()      # ... but evaluation mode ignores it, in the Jacobian as in forward
    assert not d.training
    assert_close(d.jac_input(x), np.broadcast_to(np.eye(10), (4, 10, 10)), 0.0, "eval J_in = I")
    assert_close(d(x), x, 0.0, "eval mode")
    assert_close(d.jac_input(x), np.broadcast_to(np.eye(10), (4, 10, 10)), 0.0, "eval J_in = I")


def test_dropout_train_mask_statistics(rng):
    p = 0.3
    d = Dropout(p, seed=123).train()
    x = xp().ones((50, 2000))
    y = d(x)
    scaled = 1 / (1 - p)
    assert ((y == 0) | (abs(y - scaled) < 1e-12)).all()
    # zero fraction ~ Binomial(1e5, p)/1e5: standard deviation 1.4e-3, so 0.01 is > 6 sigma
    assert abs(float((y == 0).mean()) - p) < 0.01
    assert abs(float(y.mean()) - 1.0) < 0.02  # inverted dropout keeps E[y] = x
    y2 = d(x)
    assert (y2 != y).any(), "a new mask per forward"
    again = Dropout(p, seed=123).train()(x)
    assert_close(again, y, 0.0, "same seed, same mask")


def test_dropout_p_zero_is_identity_in_training(rng):
    x = asarray(rng.standard_normal((2, 5)))
    d = Dropout(0.0, seed=0).train()
    assert_close(d(x), x, 0.0, "p = 0")


def test_dropout_jacobian_at_the_drawn_mask(rng):
    d = Dropout(0.5, seed=7).train()
    x = asarray(away_from_zero(rng, (3, 8)))
    y = d(x)
    J = d.jac_input(x)
    assert_close(J, np.stack([np.diag(row) for row in to_numpy(y / x)]), EXACT, "diag(m / (1 - p))")
    v = asarray(rng.standard_normal((3, 8)))
    assert_close(d.vjp_input(v), v * y / x, EXACT, "J_in^T v at the drawn mask")
    V = asarray(rng.standard_normal((3, 2, 8)))
    assert_close(d.vjp_input(V), V * (y / x)[:, None], EXACT, "K vectors per sample")
    assert d.jac_params(x).shape == (3, 8, 0)
    assert_close(d.vjp_input(v), v * y / x, EXACT, "jac_params drew no new mask")


def test_dropout_chain_jacobian_vs_fd_with_frozen_mask(rng):
    """In training mode the chain's dense Jacobians, its products and central differences all
    agree at one mask (frozen for the differences by re-seeding the dropout rng)."""
    drop = Dropout(0.4, seed=0)
    model = Sequential(Linear(5, 6, rng=rng), Tanh(), drop, Linear(6, 3, rng=rng)).train()
    x = asarray(rng.standard_normal((2, 5)))

    def frozen(z):
        drop.rng = xp().random.default_rng(99)
        return model.forward(z)

    expected_in = fd_jac_input(type("F", (), {"forward": staticmethod(frozen)})(), x)
    drop.rng = xp().random.default_rng(99)
    J_in = model.jac_input(x)
    assert drop.scale is not None and (drop.scale == 0).any()
    assert_close(J_in, expected_in, RTOL, "chain J_in at the mask")
    v = asarray(rng.standard_normal((2, 3)))
    assert_close(model.vjp_input(v), xp().einsum("bo,boi->bi", v, J_in), EXACT, "product after jac_input")
    J_p = model.jac_params(x)  # draws a new mask; its products must use that same mask
    assert_close(model.vjp_params(v, per_sample=True), xp().einsum("bo,bop->bp", v, J_p), EXACT,
                 "product after jac_params")


def test_dropout_in_a_nested_chain_uses_one_mask(rng):
    """A training-mode Dropout inside a nested Sequential: dense Jacobians and products agree."""
    model = Sequential(Linear(4, 6, rng=rng), Sequential(Dropout(0.5, seed=3), Tanh()), Linear(6, 2, rng=rng))
    model.train()
    x, v = asarray(rng.standard_normal((3, 4))), asarray(rng.standard_normal((3, 2)))
    J_in = model.jac_input(x)
    assert_close(model.vjp_input(v), xp().einsum("bo,boi->bi", v, J_in), EXACT, "nested J_in^T v")
    J_p = model.jac_params(x)
    assert_close(model.vjp_params(v, per_sample=True), xp().einsum("bo,bop->bp", v, J_p), EXACT, "nested J_p^T v")


# ---- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, x, match", [
    (Linear(4, 3), np.zeros((2, 5)), r"expects inputs of shape \(B, 4\)"),
    (Linear(4, 3), np.zeros((2, 2, 2)), r"expects inputs of shape \(B, 4\)"),
    (Conv2d(3, 2, 3), np.zeros((2, 1, 5, 5)), r"C=3"),
    (Conv2d(1, 2, 3), np.zeros((2, 5, 5)), r"NCHW"),
    (Conv2d(1, 2, 5, padding=1), np.zeros((2, 1, 2, 2)), r"smaller than the kernel"),
    (MaxPool2d(2), np.zeros((2, 4, 4)), r"NCHW"),
    (MaxPool2d(3), np.zeros((2, 1, 2, 5)), r"smaller than the window"),
    (Upsample(2), np.zeros((2, 4)), r"NCHW"),
    (AvgPool2d(2), np.zeros((2, 4, 4)), r"NCHW"),
    (AvgPool2d(3), np.zeros((2, 1, 5, 2)), r"smaller than the window"),
    (ConvTranspose2d(2, 1, 3), np.zeros((2, 1, 3, 3)), r"C=2"),
    (ConvTranspose2d(1, 1, 1, padding=1), np.zeros((2, 1, 1, 2)), r"empty output"),
    (Reshape(3, 3), np.zeros((2, 8)), r"cannot reshape"),
    (Linear(4, 3), np.zeros(4), r"batch axis"),
    (Sequential(Flatten(), Linear(4, 2)), np.zeros((2, 1, 2, 3)), r"expects inputs of shape \(B, 4\)"),
])
def test_wrong_input_shape_is_a_clear_value_error(layer, x, match):
    with pytest.raises(ValueError, match=match):
        layer(asarray(x))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("layer", [Linear(3, 2), Conv2d(1, 1, 1), Tanh(),
                                   Sequential(Linear(3, 3), Tanh())], ids=repr)
def test_non_finite_input_is_rejected(layer, bad):
    x = np.zeros((2, 3)) if not isinstance(layer, Conv2d) else np.zeros((2, 1, 3, 3))
    x.reshape(-1)[1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        layer(asarray(x))


@pytest.mark.parametrize("x, error, match", [
    (np.zeros((2, 3), dtype=np.int64), TypeError, "floating point"),
    ([[0.0, 1.0, 2.0]], TypeError, "must be an array"),
])
def test_wrong_input_type(x, error, match):
    with pytest.raises(error, match=match):
        Linear(3, 2)(x)


def test_product_errors(rng):
    layer = Conv2d(1, 2, 3, padding=1)
    with pytest.raises(RuntimeError, match="call forward"):
        layer.vjp_input(xp().zeros((2, 2, 4, 4)))
    layer(asarray(rng.standard_normal((2, 1, 4, 4))))
    with pytest.raises(ValueError, match=r"expected \(B=2, \*\(2, 4, 4\)\)"):
        layer.vjp_input(xp().zeros((2, 2, 4, 3)))
    with pytest.raises(ValueError, match="per_sample=True"):
        layer.vjp_params(xp().zeros((2, 3, 2, 4, 4)))


@pytest.mark.parametrize("theta, match", [
    (np.zeros(5), "flat vector of 8"),
    (np.zeros((2, 4)), "flat vector of 8"),
    ([0.0] * 8, "flat vector of 8"),
    (np.full(8, np.nan), "NaN or inf"),
])
def test_set_params_errors(theta, match):
    for model in (Linear(3, 2), Sequential(Linear(3, 2), Tanh())):
        before = model.get_params()
        with pytest.raises(ValueError, match=match):
            model.set_params(theta)
        assert_close(model.get_params(), before, 0.0, "unchanged after a rejected set_params")


@pytest.mark.parametrize("make, error, match", [
    (lambda: Linear(0, 3), ValueError, "positive sizes"),
    (lambda: Conv2d(1, 2, 3, stride=0), ValueError, "stride >= 1"),
    (lambda: Conv2d(1, 2, 3, padding=-1), ValueError, "padding >= 0"),
    (lambda: Conv2d(1, 2, (3, 3, 3)), ValueError, "pair of ints"),
    (lambda: Conv2d(1, 2, 2.5), ValueError, "pair of ints"),
    (lambda: Conv2d(0, 2, 3), ValueError, "positive channel"),
    (lambda: MaxPool2d(2, stride=1), ValueError, "stride == kernel_size"),
    (lambda: Upsample(1.5), ValueError, "integer scale_factor"),
    (lambda: AvgPool2d(2, stride=1), ValueError, "stride == kernel_size"),
    (lambda: AvgPool2d(0), ValueError, "stride == kernel_size >= 1"),
    (lambda: ConvTranspose2d(1, 2, 3, stride=2, output_padding=2), ValueError, "output_padding < stride"),
    (lambda: ConvTranspose2d(1, 2, 3, output_padding=-1), ValueError, "output_padding < stride"),
    (lambda: ConvTranspose2d(1, 2, 0), ValueError, "kernel >= 1"),
    (lambda: ConvTranspose2d(0, 2, 3), ValueError, "positive channel"),
    (lambda: LeakyReLU(-0.1), ValueError, "negative_slope >= 0"),
    (lambda: ELU(0.0), ValueError, "alpha > 0"),
    (lambda: Dropout(1.0), ValueError, r"\[0, 1\)"),
    (lambda: Dropout(-0.1), ValueError, r"\[0, 1\)"),
    (lambda: Sequential(Linear(2, 2), np.tanh), TypeError, "Layer objects"),
])
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_layer_base_is_abstract():
    with pytest.raises(NotImplementedError, match="Layer does not define _forward"):
        Layer()(xp().zeros((1, 2)))

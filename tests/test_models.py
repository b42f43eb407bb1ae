"""The two autoencoders: architecture, flat parameters, encode/decode, whole-model gradients
against finite differences, and a plain AE whose reconstruction loss falls under Adam."""
from __future__ import annotations

import numpy as np
import pytest

from minilae.backend import asarray, set_default_dtype, to_numpy, xp
from minilae.gradcheck import assert_close, fd_roundoff, numerical_gradient, numerical_jacobian
from minilae.layers import Conv2d, Flatten, Linear, MaxPool2d, Reshape, Tanh, Upsample
from minilae.losses import Gaussian
from minilae.models import Autoencoder, build_model, conv_autoencoder, mlp_autoencoder
from minilae.optim import Adam

RTOL = 1e-6


def linear_params(sizes):
    """Weights and biases of a chain of Linear layers through `sizes`."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def conv_params(c_in, c_out, k=3):
    return c_out * c_in * k * k + c_out


# ---- architecture --------------------------------------------------------------------------------

@pytest.mark.parametrize("input_shape, latent, hidden", [((1, 28, 28), 2, (512, 256)), ((3, 4, 5), 3, (7,))])
def test_mlp_autoencoder_architecture(input_shape, latent, hidden, rng):
    model = mlp_autoencoder(input_shape, latent, hidden, seed=0)
    d = int(np.prod(input_shape))
    sizes = [d, *hidden, latent]
    assert isinstance(model, Autoencoder) and model.input_shape == input_shape and model.latent_size == latent
    assert model.num_params == linear_params(sizes) + linear_params(sizes[::-1])
    linears = [layer for layer in model if isinstance(layer, Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == list(zip(sizes[:-1], sizes[1:])) + \
        list(zip(sizes[::-1][:-1], sizes[::-1][1:]))
    assert isinstance(model[0], Flatten) and isinstance(model[-1], Reshape)  # raw outputs, no squashing
    assert sum(isinstance(layer, Tanh) for layer in model) == 2 * len(hidden)
    x = asarray(rng.random((3,) + input_shape))
    assert model(x).shape == x.shape
    assert model.encode(x).shape == (3, latent)


@pytest.mark.parametrize("input_shape, channels, hidden", [((1, 28, 28), (16, 32), (128, 64)),
                                                           ((2, 8, 12), (3, 4), (6,))])
def test_conv_autoencoder_architecture(input_shape, channels, hidden, rng):
    model = conv_autoencoder(input_shape, 2, channels, hidden, seed=0)
    C, H, W = input_shape
    c1, c2 = channels
    feat = c2 * (H // 4) * (W // 4)
    sizes = [feat, *hidden, 2]
    expected = (conv_params(C, c1) + conv_params(c1, c2) + linear_params(sizes)
                + linear_params(sizes[::-1]) + conv_params(c2, c1) + conv_params(c1, C))
    assert model.num_params == expected
    kinds = [type(layer) for layer in model]
    assert kinds[:7] == [Conv2d, Tanh, MaxPool2d, Conv2d, Tanh, MaxPool2d, Flatten]
    assert kinds[-6:] == [Reshape, Upsample, Conv2d, Tanh, Upsample, Conv2d]
    convs = [layer for layer in model if isinstance(layer, Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(C, c1), (c1, c2), (c2, c1), (c1, C)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    shapes = model.shapes(input_shape)
    assert shapes[model.n_encoder] == (2,) and shapes[-1] == input_shape
    x = asarray(rng.random((2,) + input_shape))
    assert model(x).shape == x.shape


def test_paper_model_sizes():
    """The MNIST models of the paper's setup: 784-512-256-2 MLP, 16/32-channel conv."""
    assert mlp_autoencoder().num_params == 2 * (784 * 512 + 512 * 256 + 256 * 2) + 512 + 256 + 2 + 256 + 512 + 784
    assert conv_autoencoder().num_params == (160 + 4640 + 1568 * 128 + 128 + 128 * 64 + 64 + 64 * 2 + 2
                                             + 2 * 64 + 64 + 64 * 128 + 128 + 128 * 1568 + 1568 + 4624 + 145)


def test_build_model_and_errors(rng):
    assert build_model("mlp", (1, 8, 8), 3, seed=1).latent_size == 3
    conv = build_model("conv", (1, 8, 8), 2, seed=1)
    assert any(isinstance(layer, Conv2d) for layer in conv)
    with pytest.raises(ValueError, match="unknown model 'resnet'; choose one of mlp, conv"):
        build_model("resnet")
    with pytest.raises(ValueError, match="multiples of 4"):
        conv_autoencoder((1, 10, 12))


def test_seed_makes_models_reproducible():
    a, b, c = (conv_autoencoder((1, 8, 8), 2, (2, 3), (5,), seed=s) for s in (3, 3, 4))
    assert np.array_equal(a.get_params(), b.get_params())
    assert not np.array_equal(a.get_params(), c.get_params())


# ---- flat parameters ------------------------------------------------------------------------------

def test_flat_parameter_order(rng):
    """Layer by layer; within Linear the weight (out, in) row by row, then the bias."""
    model = mlp_autoencoder((1, 2, 3), 2, (4,), seed=0)
    theta = model.get_params()
    first = model[1]  # Flatten, then Linear(6, 4)
    assert_close(theta[:6], first.weight[0], 0.0, "row 0 of the first weight")
    assert_close(theta[6:12], first.weight[1], 0.0, "row 1 of the first weight")
    assert_close(theta[24:28], first.bias, 0.0, "first bias after its weight")
    start = 0
    for layer, sl in zip(model, model.param_slices()):
        assert sl.start == start
        for p in layer.params:
            assert_close(theta[start:start + p.size], p.ravel(), 0.0, repr(layer))
            start += p.size
    assert start == theta.size


def test_flat_parameter_round_trip(rng):
    model = conv_autoencoder((1, 8, 8), 2, (2, 3), (5,), seed=0)
    theta = model.get_params()
    theta[0] += 1.0  # get_params is a copy
    assert model.get_params()[0] != theta[0]
    new = asarray(rng.standard_normal(model.num_params))
    model.set_params(new)
    assert_close(model.get_params(), new, 0.0, "set then get")
    assert_close(model[0].weight.ravel(), new[:model[0].weight.size], 0.0, "first conv weight")
    assert_close(model[-1].bias, new[-1:], 0.0, "last conv bias ends the vector")


# ---- encode / decode ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_encode_decode_compose_to_the_model(kind, rng):
    model = build_model(kind, (1, 8, 8), 2, seed=0)
    x = asarray(rng.random((3, 1, 8, 8)))
    z = model.encode(x)
    assert z.shape == (3, 2)
    assert_close(model.decode(z), model(x), 0.0, "decode(encode(x))")
    assert model.encoder[0] is model[0] and model.decoder[0] is model[model.n_encoder]
    assert len(model.encoder) + len(model.decoder) == len(model)
    model.set_params(model.get_params() * 0.5)  # the halves share the layers (and parameters)
    assert_close(model.decode(model.encode(x)), model(x), 0.0, "after set_params")


# ---- whole-model derivatives ----------------------------------------------------------------------

SMALL_MODELS = {
    "mlp": lambda: mlp_autoencoder((1, 4, 4), 2, (5, 3), seed=0),
    "conv": lambda: conv_autoencoder((1, 8, 8), 2, (2, 3), (6, 4), seed=0),
    "conv_rgb_rect": lambda: conv_autoencoder((2, 4, 8), 3, (2, 2), (5,), seed=1),
}


@pytest.fixture(params=list(SMALL_MODELS), ids=list(SMALL_MODELS))
def small_model(request):
    return SMALL_MODELS[request.param]()


def test_loss_gradient_matches_finite_differences(small_model, rng):
    """grad_theta sum_b nll(f(x_b; theta), y_b) = sum_b J_p^T grad_f nll, by backprop."""
    lik = Gaussian(sigma=0.7)
    x = asarray(rng.random((3,) + small_model.input_shape))
    f = small_model(x)
    grad = small_model.vjp_params(lik.grad(f, x))
    theta0 = small_model.get_params()

    def loss(theta):
        small_model.set_params(theta)
        return lik.nll(small_model(x), x).sum()

    expected = numerical_gradient(loss, theta0.copy())
    small_model.set_params(theta0)
    assert grad.shape == theta0.shape
    # atol: 10x the differences' round-off floor, 1e-16 |L| / eps, absolute for every entry
    assert_close(grad, expected, RTOL, "whole-model gradient", atol=10 * fd_roundoff(loss(theta0)))


def test_input_gradient_matches_finite_differences(small_model, rng):
    """J_in^T v through the whole model against v^T (central-difference Jacobian). (Differencing the
    scalar nll instead would drown these small input gradients in the round-off of its constant.)"""
    lik = Gaussian()
    x = asarray(rng.random((2,) + small_model.input_shape))
    y = asarray(rng.random(x.shape))
    v = lik.grad(small_model(x), y)
    g = small_model.vjp_input(v)
    J = numerical_jacobian(lambda z: small_model(z), x.copy())  # (B d_out, B d_in)
    # atol: 10x the round-off of J's entries (floor for outputs of size |f|), summed in quadrature by v^T J
    atol = 10 * fd_roundoff(np.abs(small_model(x)).max()) * float(xp().linalg.norm(v))
    assert_close(g, (v.reshape(-1) @ J).reshape(x.shape), RTOL, "gradient w.r.t. the input", atol=atol)


def test_per_sample_gradients_sum_to_the_batch_gradient(small_model, rng):
    lik = Gaussian()
    x = asarray(rng.random((4,) + small_model.input_shape))
    f = small_model(x)
    v = lik.grad(f, x)
    per_sample = small_model.vjp_params(v, per_sample=True)
    assert per_sample.shape == (4, small_model.num_params)
    assert_close(per_sample.sum(axis=0), small_model.vjp_params(v), 1e-12, "sum of per-sample gradients")
    small_model(x[2:3])
    assert_close(per_sample[2], small_model.vjp_params(v[2:3]), 1e-12, "one sample alone")


def test_dense_model_jacobian_matches_finite_differences(rng):
    """The whole conv AE's parameter Jacobian by the chain rule, against differences, and its
    products with K vectors per sample."""
    model = SMALL_MODELS["conv"]()
    x = asarray(rng.random((2,) + model.input_shape))
    J = model.jac_params(x)
    theta0 = model.get_params()

    def f(theta):
        model.set_params(theta)
        return model(x)

    expected = numerical_jacobian(f, theta0.copy()).reshape(J.shape)
    model.set_params(theta0)
    assert_close(J, expected, RTOL, "model J_p", atol=10 * fd_roundoff(np.abs(model(x)).max()))  # 10x FD floor
    model(x)
    V = asarray(rng.standard_normal((2, 3) + model.input_shape))
    assert_close(model.vjp_params(V, per_sample=True), xp().einsum("bko,bop->bkp", V.reshape(2, 3, -1), J),
                 1e-12, "J_p^T V")


# ---- training -------------------------------------------------------------------------------------

def blob_images(n, size, rng):
    """Synthetic data with a 2-D latent: one Gaussian blob per image at a random position."""
    centres = rng.uniform(0.25 * size, 0.75 * size, (n, 2))
    grid = np.arange(size)
    d2 = (grid[None, :, None] - centres[:, 0, None, None]) ** 2 + (grid[None, None, :] - centres[:, 1, None, None]) ** 2
    return np.exp(-d2 / (2 * (size / 8) ** 2))[:, None]


def train(model, x, steps, lr, batch, rng):
    """Plain AE training on host images x: minimise sum_b nll(f(x_b), x_b) / B with Adam. Returns the mean squared
    reconstruction error of the whole set before and after."""
    lik = Gaussian()
    opt = Adam(lr=lr)
    theta = model.get_params()
    x_all = asarray(x, dtype=theta.dtype)

    def mse():
        return float(((model(x_all) - x_all) ** 2).mean())

    before = mse()
    for _ in range(steps):
        xb = asarray(x[rng.choice(len(x), batch, replace=False)], dtype=theta.dtype)
        f = model(xb)
        grad = model.vjp_params(lik.grad(f, xb)) / batch
        opt.step(theta, grad)
        model.set_params(theta)
    return before, mse()


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_plain_autoencoder_learns_synthetic_blobs(kind, rng):
    x = blob_images(256, 12, rng)
    model = (mlp_autoencoder((1, 12, 12), 2, (64, 32), seed=0) if kind == "mlp"
             else conv_autoencoder((1, 12, 12), 2, (4, 8), (32, 16), seed=0))
    before, after = train(model, x, steps=60, lr=1e-2 if kind == "mlp" else 5e-3, batch=32, rng=rng)
    assert after < 0.25 * before, f"reconstruction error only fell from {before:.4f} to {after:.4f}"
    assert after < 0.5 * float(np.var(x)), "not better than reconstructing the mean image"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_plain_autoencoder_learns_mnist(kind, rng, real_data_root):
    from minilae.data import load_dataset  # noqa: PLC0415
    set_default_dtype(np.float32)  # as training runs in practice (the fixture restores float64)
    images, _ = load_dataset("mnist", "train", root=real_data_root)
    x = images[rng.choice(len(images), 256, replace=False)]
    assert x.dtype == np.float32
    model = build_model(kind, (1, 28, 28), 2, seed=0)
    assert model.get_params().dtype == np.float32
    before, after = train(model, x, steps=30, lr=1e-3 if kind == "mlp" else 3e-3, batch=32, rng=rng)
    assert after < 0.7 * before, f"reconstruction error only fell from {before:.4f} to {after:.4f}"
    assert after < float(np.var(x)), "not better than a constant grey image"


# ---- caches after encode / decode, and images of the wrong shape (issue 8, items 3 and 15) ----------

@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("run_halves", ["encode", "decode", "encode_then_decode"])
def test_products_after_encode_or_decode_refuse_until_the_next_forward(kind, run_halves, rng):
    """Catches encode/decode leaving the model's caches inconsistent: model(x1); encode(x2) made a later
    model.vjp_params mix the encoder caches of x2 with the decoder caches of x1 without an error."""
    model = SMALL_MODELS[kind]()
    image = (3,) + model.input_shape
    x1, x2, v = asarray(rng.random(image)), asarray(rng.random(image)), asarray(rng.standard_normal(image))
    model(x1)
    if run_halves in ("encode", "encode_then_decode"):
        z = model.encode(x2)
    if run_halves in ("decode", "encode_then_decode"):
        model.decode(z if run_halves == "encode_then_decode" else asarray(rng.standard_normal((3, model.latent_size))))
    for product in (lambda: model.vjp_params(v), lambda: model.vjp_input(v),
                    lambda: model.vjp_params(v, per_sample=True)):
        with pytest.raises(RuntimeError, match=r"Autoencoder\(\d+ layers\): the layers' caches no longer belong"):
            product()
    model(x2)  # a forward makes the caches the model's again: the products are those at x2
    g = model.vjp_params(v)
    theta = model.get_params()

    def inner(th):
        model.set_params(th)
        return (model(x2) * v).sum().reshape(1)

    atol = 10 * fd_roundoff(np.abs(model(x2) * v).sum())  # 10x the differences' round-off floor
    assert_close(g, numerical_gradient(inner, theta.copy()), RTOL, "J_p^T v after the new forward", atol=atol)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 16, 4), (1, 64), (64,), (4, 4, 4), (1, 4, 4)])
def test_images_of_the_wrong_shape_are_refused_naming_the_expected_shape(kind, shape, rng):
    """Catches an MLP AE accepting any image with as many pixels, (1, 64) or (1, 16, 4) for (1, 8, 8),
    and the mismatch surfacing later as 'y must have the same shape as f' (blamed on the target)."""
    model = conv_autoencoder((1, 8, 8), 2, (2, 3), (5,)) if kind == "conv" else mlp_autoencoder((1, 8, 8), 2, (5,))
    x = asarray(rng.random((2,) + shape))
    expected = r"Autoencoder takes images of shape \(B, 1, 8, 8\); got per-sample shape " + \
        r"\(" + r", ".join(map(str, shape)) + r",?\)"
    for run in (model, model.encode, model.forward):
        with pytest.raises(ValueError, match=expected):
            run(x)


def test_error_messages_name_the_model_in_one_line(rng):
    """Catches messages that started with the model's whole multi-line repr (one line per layer)."""
    model = mlp_autoencoder((1, 2, 3), 2, (4,), seed=0)
    x = asarray(rng.random((2, 1, 2, 3)))
    x[0, 0, 0, 0] = np.nan
    cases = [(lambda: model(x), ValueError, "input contains NaN"),
             (lambda: model(xp().zeros((2, 1, 2, 3), dtype=int)), TypeError, "floating point"),
             (lambda: model(xp().zeros(6)), ValueError, "batch axis"),
             (lambda: model.vjp_params(xp().zeros((2, 1, 2, 3))), RuntimeError, "call forward")]
    for run, error, what in cases:
        with pytest.raises(error, match=what) as info:
            run()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"Autoencoder({len(model)} layers): "), message


# ---- the baselines' variants: mean-and-log-variance output, dropout between trainable layers --------

from minilae.layers import Dropout  # noqa: E402
from minilae.models import OUTPUTS  # noqa: E402

VARIANT_SHAPES = {"mlp": ((1, 4, 4), dict(hidden=(5, 3))), "conv": ((2, 4, 8), dict(channels=(2, 3), hidden=(5,)))}


def variant(kind, seed=0, **kw):
    shape, arch = VARIANT_SHAPES[kind]
    build = mlp_autoencoder if kind == "mlp" else conv_autoencoder
    return build(shape, 2, seed=seed, **arch, **kw)


def trainable(layer):
    return layer.num_params > 0


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_dropout_sits_after_every_trainable_layer_but_the_last(kind):
    """Catches a Dropout missing between two trainable layers (e.g. on the code z), one after the output layer
    (it would randomise the reconstruction itself), or dropout=p changing the weights' initialisation."""
    plain, model = variant(kind), variant(kind, dropout=0.2)
    layers = list(model)
    positions = [i for i, layer in enumerate(layers) if trainable(layer)]
    for a, b in zip(positions[:-1], positions[1:]):  # exactly one Dropout between consecutive trainable layers
        assert sum(isinstance(layer, Dropout) for layer in layers[a + 1:b]) == 1, layers[a:b + 1]
    assert not any(isinstance(layer, Dropout) for layer in layers[positions[-1]:])
    assert all(d.p == 0.2 for d in model.dropout_layers) and model.dropout == 0.2
    assert isinstance(layers[model.n_encoder], Dropout)  # the code's dropout belongs to the decoder: encode gives z
    assert [type(layer) for layer in layers if not isinstance(layer, Dropout)] == [type(layer) for layer in plain]
    np.testing.assert_array_equal(to_numpy(model.get_params()), to_numpy(plain.get_params()))
    assert plain.dropout_layers == [] and plain.dropout == 0.0


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_mean_logvar_output_doubles_the_channels(kind, rng):
    """Catches the log-variance channels missing or interleaved (f (B, 2C, H, W) must hold mu then s) and the
    encoder or the rest of the decoder changing."""
    plain, model = variant(kind), variant(kind, output="mean_logvar")
    C, H, W = model.input_shape
    assert model.output == "mean_logvar" and model.output_shape == (2 * C, H, W) and plain.output_shape == (C, H, W)
    x = asarray(rng.random((3,) + model.input_shape))
    f = model(x)
    assert f.shape == (3, 2 * C, H, W)
    last = [layer for layer in model if trainable(layer)][-1]
    half = last.weight.shape[0] // 2  # output units per half: d for the MLP's Linear, C for the conv's Conv2d
    assert half == (C * H * W if kind == "mlp" else C)
    assert model.num_params == plain.num_params + half * (last.weight[0].size + 1)
    # the encoder and all but the last layer are the plain model's (same seed)
    for a, b in zip([l for l in model if trainable(l)][:-1], [l for l in plain if trainable(l)][:-1]):
        np.testing.assert_array_equal(to_numpy(a.get_params()), to_numpy(b.get_params()))
    np.testing.assert_array_equal(to_numpy(model.encode(x)), to_numpy(plain.encode(x)))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_dropout_masks_are_redrawn_per_forward_and_reproducible_after_reseeding(kind, rng):
    """Catches a mask drawn once and reused (MC dropout would then have no variance), dropout acting in
    evaluation mode, and reseed_dropout not reaching every layer (the passes would not repeat)."""
    model = variant(kind, dropout=0.3).train()
    x = asarray(rng.random((2,) + model.input_shape))
    model.reseed_dropout(xp().random.default_rng(5))
    passes = [to_numpy(model(x)) for _ in range(3)]
    assert not np.allclose(passes[0], passes[1]) and not np.allclose(passes[1], passes[2])
    model.reseed_dropout(xp().random.default_rng(5))
    for expected in passes:
        np.testing.assert_array_equal(to_numpy(model(x)), expected)
    model.reseed_dropout(6)  # an int seed makes a backend generator
    assert not np.allclose(to_numpy(model(x)), passes[0])
    model.eval()
    np.testing.assert_array_equal(to_numpy(model(x)), to_numpy(variant(kind)(x)))  # evaluation: the plain network
    with pytest.raises(TypeError, match="backend Generator"):
        model.reseed_dropout("seed")


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_dropout_jacobians_with_a_held_mask_match_finite_differences(kind, output, rng):
    """J_p^T v and J_in^T v of a training-mode dropout model, its masks held by reseeding before every forward,
    against central differences. Catches a Dropout backprop that ignores its mask or the 1 / (1 - p) scale."""
    model = variant(kind, dropout=0.3, output=output).train()
    x = asarray(rng.random((2,) + model.input_shape))

    def held(z=x):
        model.reseed_dropout(xp().random.default_rng(11))
        return model(z)

    v = asarray(rng.standard_normal((2,) + model.output_shape))
    f = held()
    g_params, g_input = model.vjp_params(v), model.vjp_input(v)
    theta = model.get_params()

    def inner(th):
        model.set_params(th)
        return (held() * v).sum().reshape(1)

    atol = 10 * fd_roundoff(float(xp().abs(f * v).sum()))  # 10x the differences' round-off floor
    assert_close(g_params, numerical_gradient(inner, theta.copy()), RTOL, "J_p^T v with a held mask", atol=atol)
    model.set_params(theta)
    J = numerical_jacobian(lambda z: held(z), x.copy())
    assert_close(g_input, (v.reshape(-1) @ J).reshape(x.shape), RTOL, "J_in^T v with a held mask",
                 atol=atol * float(xp().linalg.norm(v)))
    # the mask really matters: the plain network's gradient differs
    model.eval()
    model(x)
    assert not np.allclose(to_numpy(model.vjp_params(v)), to_numpy(g_params))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, False, "0.2", None])
def test_dropout_outside_the_unit_interval_is_refused(p):
    """Catches p = 1 (division by zero in 1 / (1 - p)), a negative p or a non-number accepted silently."""
    for kind in ("mlp", "conv"):
        with pytest.raises(ValueError, match=r"dropout probability must be a number in \[0, 1\), got"):
            build_model(kind, (1, 8, 8), 2, dropout=p)


def test_unknown_output_is_refused():
    """Catches a misspelt output silently building the plain decoder."""
    with pytest.raises(ValueError, match="unknown output 'logvar'; choose one of mean, mean_logvar"):
        build_model("mlp", (1, 8, 8), 2, output="logvar")

"""The paper's two autoencoders (MLP and convolutional) as Sequential models.

An `Autoencoder` is one Sequential (encoder layers then decoder layers) so that the Hessian
engine and the Laplace posterior see a single flat parameter vector; `encode` and `decode`
run the two halves. They share the model's layers, so they overwrite those layers' caches: after
either, the model's own products (`vjp_params`, the Hessian engine with ``f=f``) refuse to run until
the next `model(x)` rather than mix caches of two batches.
"""
from __future__ import annotations

import numpy as np

from .layers import Conv2d, Flatten, Linear, MaxPool2d, Reshape, Sequential, Tanh, Upsample
from .layers.base import prod


class Autoencoder(Sequential):
    """x -> z = encoder(x) -> x_hat = decoder(z), as one chain of layers."""

    def __init__(self, encoder: Sequential, decoder: Sequential, input_shape):
        super().__init__(*(list(encoder.layers) + list(decoder.layers)))
        self.n_encoder = len(encoder.layers)
        self.input_shape = tuple(input_shape)
        self.latent_size = prod(encoder.out_shape(self.input_shape))

    @property
    def encoder(self) -> Sequential:
        """The first n_encoder layers (shares the layer objects)."""
        return Sequential(*self.layers[:self.n_encoder])

    @property
    def decoder(self) -> Sequential:
        """The remaining layers (shares the layer objects)."""
        return Sequential(*self.layers[self.n_encoder:])

    def out_shape(self, in_shape):
        """The image shape back; images of another shape are refused here, naming the expected shape
        (a flattening encoder would otherwise accept any image with as many pixels)."""
        self._check_images(in_shape)
        return super().out_shape(in_shape)

    def _check_images(self, in_shape):
        if tuple(in_shape) != self.input_shape:
            raise ValueError(f"{type(self).__name__} takes images of shape (B, {', '.join(map(str, self.input_shape))})"
                             f"; got per-sample shape {tuple(in_shape)}")

    def encode(self, x):
        """z = encoder(x)."""
        if hasattr(x, "shape"):
            self._check_images(tuple(x.shape[1:]))
        return self.encoder.forward(x)

    def decode(self, z):
        """x_hat = decoder(z)."""
        return self.decoder.forward(z)


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def mlp_autoencoder(input_shape=(1, 28, 28), latent_size=2, hidden=(512, 256), seed=0):
    """Encoder: Flatten, Linear, Tanh, Linear, Tanh, Linear; decoder mirrored, ending in Reshape."""
    rng = _rng(seed)
    d = prod(input_shape)
    sizes = [d, *hidden, latent_size]
    enc = [Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        enc.append(Linear(a, b, rng=rng))
        if i < len(sizes) - 2:
            enc.append(Tanh())
    dec = []
    back = sizes[::-1]
    for a, b in zip(back[:-1], back[1:]):
        dec += [Linear(a, b, rng=rng), Tanh()]
    dec[-1] = Reshape(*input_shape)  # no activation on the output: the likelihood reads raw outputs
    return Autoencoder(Sequential(*enc), Sequential(*dec), input_shape)


def conv_autoencoder(input_shape=(1, 28, 28), latent_size=2, channels=(16, 32), hidden=(128, 64), seed=0):
    """Conv2d, Tanh, MaxPool2d, Conv2d, Tanh, MaxPool2d, Linear, Tanh, Linear, Tanh, Linear; mirrored."""
    rng = _rng(seed)
    C, H, W = input_shape
    if H % 4 or W % 4:
        raise ValueError(f"conv_autoencoder pools twice by 2, so H and W must be multiples of 4; got {H}x{W}")
    c1, c2 = channels
    feat = (c2, H // 4, W // 4)
    enc = [Conv2d(C, c1, 3, padding=1, rng=rng), Tanh(), MaxPool2d(2),
           Conv2d(c1, c2, 3, padding=1, rng=rng), Tanh(), MaxPool2d(2), Flatten()]
    sizes = [prod(feat), *hidden, latent_size]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        enc.append(Linear(a, b, rng=rng))
        if i < len(sizes) - 2:
            enc.append(Tanh())
    back = sizes[::-1]
    dec = []
    for a, b in zip(back[:-1], back[1:]):
        dec += [Linear(a, b, rng=rng), Tanh()]
    dec += [Reshape(*feat), Upsample(2), Conv2d(c2, c1, 3, padding=1, rng=rng), Tanh(),
            Upsample(2), Conv2d(c1, C, 3, padding=1, rng=rng)]
    return Autoencoder(Sequential(*enc), Sequential(*dec), input_shape)


def build_model(name: str, input_shape=(1, 28, 28), latent_size=2, seed=0):
    """'mlp' or 'conv' autoencoder by name."""
    builders = {"mlp": mlp_autoencoder, "conv": conv_autoencoder}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(builders)}")
    return builders[name](input_shape=input_shape, latent_size=latent_size, seed=seed)

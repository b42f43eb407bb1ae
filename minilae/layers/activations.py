"""Element-wise activations y = sigma(x): J_in = diag(sigma'(x)), no parameters."""
from __future__ import annotations

from ..backend import array_module
from .base import Layer, diag_jacobian


class Elementwise(Layer):
    """y_i = sigma(x_i); the Jacobian is diagonal, diag(sigma'(x))."""

    def derivative(self, x):
        """sigma'(x), element-wise, same shape as x."""
        raise NotImplementedError

    def _vjp_input(self, v):
        """J_in^T v = sigma'(x) * v."""
        return v * self.derivative(self._x)[:, None]

    def jac_input(self, x):
        """diag(sigma'(x)) per sample: (B, d, d)."""
        self.forward(x)
        return diag_jacobian(self.derivative(x).reshape(x.shape[0], -1))


class Tanh(Elementwise):
    """y = tanh(x), sigma' = 1 - tanh(x)^2."""

    def _forward(self, x):
        return array_module(x).tanh(x)

    def derivative(self, x):
        return 1.0 - array_module(x).tanh(x) ** 2


class Sigmoid(Elementwise):
    """y = 1 / (1 + exp(-x)), sigma' = y (1 - y)."""

    def _forward(self, x):
        m = array_module(x)
        # tanh form is overflow-free for large |x|
        return 0.5 * (1.0 + m.tanh(0.5 * x))

    def derivative(self, x):
        s = self._forward(x)
        return s * (1.0 - s)


class ReLU(Elementwise):
    """y = max(x, 0), sigma' = 1[x > 0] (0 at the kink, as PyTorch)."""

    def _forward(self, x):
        return array_module(x).maximum(x, 0)

    def derivative(self, x):
        return (x > 0).astype(x.dtype)

"""Element-wise activations y = sigma(x): J_in = diag(sigma'(x)), no parameters.

A diagonal J_in makes every curvature rule a scaling by D = diag(sigma'(x)): M_in = D M D and
m_in = sigma'(x)^2 m, exact in both forms. A new activation needs only `_forward` and `derivative`.
"""
from __future__ import annotations

from ..backend import array_module
from .base import Layer, diag_jacobian, prod


class Elementwise(Layer):
    """y_i = sigma(x_i); the Jacobian is diagonal, diag(sigma'(x))."""

    one_input_per_output = one_output_per_input = True  # J_in is diagonal

    def derivative(self, x):
        """sigma'(x), element-wise, same shape as x."""
        raise NotImplementedError(f"{type(self).__name__} does not define derivative(x) = sigma'(x): "
                                  "an Elementwise layer needs _forward and derivative")

    def _slope(self):
        """sigma'(x) at the last forward input, (B, *in)."""
        return self.derivative(self._cached_input())

    def _vjp_input(self, v):
        """J_in^T v = sigma'(x) * v."""
        return v * self._slope()[:, None]

    def jac_input(self, x):
        """diag(sigma'(x)) per sample: (B, d, d)."""
        self.forward(x)
        return diag_jacobian(self.derivative(x).reshape(x.shape[0], -1))

    def backprop_full(self, M):
        """M_in = D M D with D = diag(sigma'(x))."""
        d = self._slope().reshape(M.shape[0], -1)
        return d[:, :, None] * M * d[:, None, :]

    def backprop_diag(self, m):
        """m_in = sigma'(x)^2 m."""
        return self._slope() ** 2 * m

    def cost_geometry(self, in_shape, out_shape):
        """One multiply per feature."""
        return dict(kind="pointwise", vjp_flops=prod(in_shape), vjp_work=prod(in_shape))


class Tanh(Elementwise):
    """y = tanh(x), sigma' = 1 - tanh(x)^2."""

    def _forward(self, x):
        self._y = array_module(x).tanh(x)
        return self._y

    def derivative(self, x):
        return 1.0 - array_module(x).tanh(x) ** 2

    def _slope(self):
        """1 - y^2 from the output of the last forward: no second tanh in every backward product."""
        self._cached_input()
        return 1.0 - self._y ** 2


class Sigmoid(Elementwise):
    """y = 1 / (1 + exp(-x)), sigma' = y (1 - y)."""

    def _forward(self, x):
        # tanh form is overflow-free for large |x|
        return 0.5 * (1.0 + array_module(x).tanh(0.5 * x))

    def derivative(self, x):
        s = self._forward(x)
        return s * (1.0 - s)


class ReLU(Elementwise):
    """y = max(x, 0), sigma' = 1[x > 0] (0 at the kink, as PyTorch)."""

    def _forward(self, x):
        return array_module(x).maximum(x, 0)

    def derivative(self, x):
        return (x > 0).astype(x.dtype)


class LeakyReLU(Elementwise):
    """y = x for x > 0, a x otherwise; sigma' = 1[x > 0] + a 1[x <= 0] (a at the kink, as PyTorch)."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        if not 0.0 <= negative_slope < float("inf"):
            raise ValueError(f"LeakyReLU needs a finite negative_slope >= 0, got {negative_slope}")
        self.negative_slope = float(negative_slope)

    def _forward(self, x):
        return array_module(x).where(x > 0, x, self.negative_slope * x)

    def derivative(self, x):
        return array_module(x).where(x > 0, 1.0, self.negative_slope).astype(x.dtype)

    def __repr__(self):
        return f"LeakyReLU(negative_slope={self.negative_slope})"


class ELU(Elementwise):
    """y = x for x > 0, alpha (exp(x) - 1) otherwise; sigma' = 1 or alpha exp(x) (alpha at 0, as PyTorch)."""

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"ELU needs alpha > 0, got {alpha}")
        self.alpha = float(alpha)

    def _forward(self, x):
        xp = array_module(x)
        return xp.where(x > 0, x, self.alpha * xp.expm1(xp.minimum(x, 0)))  # min: no overflow where unused

    def derivative(self, x):
        xp = array_module(x)
        return xp.where(x > 0, 1.0, self.alpha * xp.exp(xp.minimum(x, 0))).astype(x.dtype)

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"


class Softplus(Elementwise):
    """y = log(1 + exp(x)), sigma' = 1 / (1 + exp(-x)) (the sigmoid)."""

    def _forward(self, x):
        xp = array_module(x)
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))  # overflow-free for large |x|

    def derivative(self, x):
        return 0.5 * (1.0 + array_module(x).tanh(0.5 * x))

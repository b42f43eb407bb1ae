"""Dropout: y = mask * x / (1 - p) with a random 0/1 mask in training, identity in evaluation."""
from __future__ import annotations

from ..backend import array_module, xp
from .base import Layer, check_batch, diag_jacobian, identity_jacobian, prod


class Dropout(Layer):
    """y = mask * x / (1 - p), mask_i ~ Bernoulli(1 - p) when training; y = x otherwise.

    The Jacobians are those of the function actually applied: diag(mask / (1 - p)) at the mask
    drawn by the last training-mode forward (the identity in evaluation mode).
    """

    one_input_per_output = one_output_per_input = True  # J_in is diagonal

    def __init__(self, p: float = 0.5, seed=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = xp().random.default_rng(seed)
        self.scale = None

    def _forward(self, x):
        if not self.training or self.p == 0.0:
            self.scale = None
            return x
        keep = self.rng.random(x.shape) >= self.p
        self.scale = keep.astype(x.dtype) / (1.0 - self.p)
        return x * self.scale

    def _vjp_input(self, v):
        """J_in^T v = (mask / (1 - p)) * v."""
        return v if self.scale is None else v * self.scale[:, None]

    def backprop_full(self, M):
        """M_in = D M D with D = diag(mask / (1 - p)) (M itself in evaluation mode)."""
        if self.scale is None:
            return M
        d = self.scale.reshape(M.shape[0], -1)
        return d[:, :, None] * M * d[:, None, :]

    def backprop_diag(self, m):
        """m_in = (mask / (1 - p))^2 m (m itself in evaluation mode)."""
        return m if self.scale is None else self.scale ** 2 * m

    def cost_geometry(self, in_shape, out_shape):
        """One multiply per feature."""
        return dict(kind="pointwise", vjp_flops=prod(in_shape), vjp_work=prod(in_shape))

    def jac_input(self, x):
        """diag(mask / (1 - p)) at the mask of the last training-mode forward, or I in evaluation mode."""
        if self.training and self.scale is not None and self.scale.shape == x.shape:
            # keep the drawn mask: this is the Jacobian of the function the last forward applied
            check_batch(self, x)
            self._x = x
        else:  # evaluation mode, or no mask for this shape yet: run (and in training draw) one
            self.forward(x)
        if self.scale is None:
            return identity_jacobian(x, prod(x.shape[1:]))
        return diag_jacobian(self.scale.reshape(x.shape[0], -1))

    def jac_params(self, x):
        """No parameters: (B, d, 0); unlike the base class it does not run forward (no new mask)."""
        check_batch(self, x)
        return array_module(x).zeros((x.shape[0], prod(x.shape[1:]), 0), dtype=x.dtype)

    def __repr__(self):
        return f"Dropout(p={self.p})"

"""Layers that only rearrange elements: J_in is the identity (in flat coordinates)."""
from __future__ import annotations

from .base import Layer, identity_jacobian, prod


class Reshape(Layer):
    """y = x viewed with per-sample shape `shape` (same elements, C order)."""

    unit_jacobian = one_input_per_output = one_output_per_input = True  # J_in = I

    def __init__(self, *shape):
        super().__init__()
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        self.shape = tuple(int(s) for s in shape)

    def out_shape(self, in_shape):
        if prod(in_shape) != prod(self.shape):
            raise ValueError(f"{self!r} cannot reshape per-sample shape {tuple(in_shape)} "
                             f"({prod(in_shape)} elements) to {self.shape} ({prod(self.shape)})")
        return self.shape

    def _forward(self, x):
        return x.reshape((x.shape[0],) + self.shape)

    def _vjp_input(self, v):
        """J_in^T v = v reshaped back to the input shape."""
        return v.reshape(v.shape[:2] + tuple(self._x.shape[1:]))

    def backprop_full(self, M):
        """A reshape keeps the flat order, so J_in = I and M_in = M."""
        return M

    def backprop_constant_diag(self, m):
        """J_in = I: a constant m stays the same constant, on the input shape."""
        return m.reshape((m.shape[0],) + tuple(self._x.shape[1:]))

    def cost_geometry(self, in_shape, out_shape):
        """No arithmetic; one copy of the features at most."""
        return dict(kind="pointwise", vjp_flops=prod(in_shape), vjp_work=prod(in_shape))

    def jac_input(self, x):
        """The identity, (B, d, d)."""
        self.forward(x)
        return identity_jacobian(x, prod(x.shape[1:]))

    def __repr__(self):
        return f"{type(self).__name__}{self.shape}"


class Flatten(Reshape):
    """y = x reshaped to (B, d)."""

    def __init__(self):
        super().__init__(-1)

    def out_shape(self, in_shape):
        return (prod(in_shape),)

    def _forward(self, x):
        return x.reshape(x.shape[0], -1)

    def __repr__(self):
        return "Flatten()"

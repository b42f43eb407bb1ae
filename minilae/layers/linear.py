"""Linear layer y = W x + b (PyTorch layout: W has shape (out, in))."""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, init_uniform


class Linear(Layer):
    """y = W x + b, W of shape (out_features, in_features)."""

    param_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
        rng = rng if rng is not None else np.random.default_rng()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = init_uniform((out_features, in_features), in_features, rng)
        if bias:
            self.bias = init_uniform((out_features,), in_features, rng)
        else:
            self.param_names = ("weight",)

    def out_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"{self!r} expects inputs of shape (B, {self.in_features}); "
                             f"got per-sample shape {tuple(in_shape)}")
        return (self.out_features,)

    def _forward(self, x):
        y = x @ self.weight.T
        return y + self.bias if "bias" in self.param_names else y

    def _vjp_input(self, v):
        """J_in^T v = W^T v."""
        return v @ self.weight

    def _vjp_params(self, v):
        """J_p^T v = (v x^T, v) per sample, flattened."""
        m = array_module(v)
        B, K = v.shape[:2]
        gW = v[:, :, :, None] * self._x[:, None, None, :]
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(v)
        return m.concatenate(parts, axis=2)

    def _vjp_params_sum(self, v):
        """sum_b (v_b x_b^T, v_b): one matrix product for the batch."""
        m = array_module(v)
        parts = [(v.T @ self._x).ravel()]
        if "bias" in self.param_names:
            parts.append(v.sum(axis=0))
        return m.concatenate(parts)

    def jac_input(self, x):
        """J_in = W for every sample: (B, out, in)."""
        self.forward(x)
        m = array_module(x)
        return m.broadcast_to(self.weight, (x.shape[0],) + self.weight.shape).copy()

    def jac_params(self, x):
        """J_p[o, (o', i)] = delta_{o o'} x_i; bias block = I: (B, out, out*in [+ out])."""
        self.forward(x)
        m = array_module(x)
        B, n_in, n_out = x.shape[0], self.in_features, self.out_features
        eye = m.eye(n_out, dtype=x.dtype)
        JW = (eye[None, :, :, None] * x[:, None, None, :]).reshape(B, n_out, n_out * n_in)
        if "bias" not in self.param_names:
            return JW
        return m.concatenate([JW, m.broadcast_to(eye, (B, n_out, n_out))], axis=2)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"

"""Resampling layers: max- and average-pooling over non-overlapping windows, nearest up-sampling.

Their Jacobians are sparse and known in closed form, which gives the curvature rules directly:
max-pooling selects one input per output (entries 0/1, one non-zero per row and per column), nearest
up-sampling copies one input to s^2 outputs, average-pooling spreads 1/k^2 over a window.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, diag_of, prod


def _check_image(layer, in_shape):
    if len(in_shape) != 3:
        raise ValueError(f"{layer!r} expects NCHW inputs (B, C, H, W); got per-sample shape {tuple(in_shape)}")


def _selection_jacobian(x, in_index):
    """J[b, i, in_index[b, i]] = 1: the Jacobian of a layer that copies selected inputs."""
    xp = array_module(x)
    B = x.shape[0]
    d_out, d_in = in_index.shape[1], prod(x.shape[1:])
    J = xp.zeros((B, d_out, d_in), dtype=x.dtype)
    J[xp.arange(B)[:, None], xp.arange(d_out)[None, :], in_index] = 1.0
    return J


class _Pool2d(Layer):
    """The shared shape rule of the pooling layers: non-overlapping k x k windows, (C, H, W) -> (C, H//k, W//k)."""

    def __init__(self, kernel_size: int = 2, stride=None):
        super().__init__()
        stride = kernel_size if stride is None else stride
        if int(kernel_size) != kernel_size or kernel_size < 1 or stride != kernel_size:
            raise ValueError(f"{type(self).__name__} supports non-overlapping windows (stride == kernel_size >= 1); "
                             f"got kernel_size={kernel_size}, stride={stride}")
        self.k = int(kernel_size)

    def out_shape(self, in_shape):
        _check_image(self, in_shape)
        C, H, W = in_shape
        if H < self.k or W < self.k:
            raise ValueError(f"{self!r}: input {H}x{W} is smaller than the window {self.k}x{self.k}")
        return (C, H // self.k, W // self.k)


class MaxPool2d(_Pool2d):
    """y[c, i, j] = max over the k x k window (non-overlapping: stride = kernel_size).

    Tied maxima (constant windows, e.g. MNIST's black border) route the derivative to the first
    of them in row-major window order, as PyTorch and numpy.argmax do.
    """

    unit_jacobian = one_input_per_output = one_output_per_input = True  # J_in selects the arg-maxes


    def _offsets(self, H, W):
        """The k*k strided views' slices, one per window offset (u, v), in window order u*k + v."""
        k, Ho, Wo = self.k, H // self.k, W // self.k
        return [(slice(u, Ho * k, k), slice(v, Wo * k, k)) for u in range(k) for v in range(k)]

    def _forward(self, x):
        # k*k passes over strided views, never a window copy, and every pass in place: 5x faster than a running
        # np.where of values and int64 indices (conv AE, batch 64, 64 x 16 x 28 x 28 float32: 4.2 -> 0.8 ms)
        xp = array_module(x)
        views = [x[(Ellipsis,) + sl] for sl in self._offsets(*x.shape[2:])]
        best = views[0].copy()
        for view in views[1:]:
            xp.maximum(best, view, out=best)
        # the arg-max offset = the number of offsets before the first one that attains the max (ties go to the
        # first, as argmax): count the offsets passed while the max is not yet seen
        arg = xp.zeros(best.shape, dtype=np.min_scalar_type(len(views) - 1))
        seen = xp.zeros(best.shape, dtype=bool)
        for view in views[:-1]:
            seen |= view == best
            arg += ~seen
        self._argmax = arg
        return best

    def _vjp_input(self, v):
        """J_in^T v: each v lands on the arg-max of its window, zeros elsewhere."""
        xp = array_module(v)
        H, W = self._x.shape[2:]
        g = xp.zeros(v.shape[:3] + (H, W), dtype=v.dtype)  # rows/columns the pooling dropped stay 0
        hit_of = self._argmax[:, None]
        for i, sl in enumerate(self._offsets(H, W)):  # in place, into strided views of g: 3x faster than np.where
            xp.multiply(v, hit_of == i, out=g[(Ellipsis,) + sl])
        return g

    def cost_geometry(self, in_shape, out_shape):
        """One routed copy per feature."""
        return dict(kind="pointwise", vjp_flops=prod(in_shape), vjp_work=prod(in_shape))

    def input_index(self, x):
        """Flat input index of each output's arg-max: (B, d_out)."""
        xp = array_module(x)
        self.forward(x)
        B, C, H, W = x.shape
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        c, i, j = xp.ix_(xp.arange(C), xp.arange(Ho), xp.arange(Wo))
        r = i * self.k + self._argmax // self.k
        q = j * self.k + self._argmax % self.k
        return ((c * H + r) * W + q).reshape(B, -1)

    def jac_input(self, x):
        """One 1 per row, at the window's arg-max: (B, d_out, d_in)."""
        return _selection_jacobian(x, self.input_index(x))

    def __repr__(self):
        return f"MaxPool2d({self.k})"


class Upsample(Layer):
    """Nearest-neighbour up-sampling: y[c, i, j] = x[c, i // s, j // s]."""

    unit_jacobian = one_input_per_output = True  # each output copies one input; an input reaches s^2 outputs

    def __init__(self, scale_factor: int = 2):
        super().__init__()
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(f"Upsample needs an integer scale_factor >= 1, got {scale_factor}")
        self.s = int(scale_factor)

    def out_shape(self, in_shape):
        _check_image(self, in_shape)
        C, H, W = in_shape
        return (C, H * self.s, W * self.s)

    def _forward(self, x):
        B, C, H, W = x.shape
        s = self.s
        # s^2 strided writes of x: 5x faster than copying a broadcast view (64 x 16 x 14 x 14, float32)
        y = array_module(x).empty((B, C, H, s, W, s), dtype=x.dtype)
        for i in range(s):
            for j in range(s):
                y[:, :, :, i, :, j] = x
        return y.reshape(B, C, H * s, W * s)

    def _vjp_input(self, v):
        """J_in^T v: sum of v over each s x s block (s*s strided views added)."""
        s = self.s
        out = v[..., 0::s, 0::s].copy()
        for i in range(1, s * s):
            out += v[..., i // s::s, i % s::s]
        return out

    def diag_of_backprop(self, M):
        """m_in = diag(J_in^T M J_in): d_in < d_out, so forming J_in^T M J_in costs less than M itself."""
        return diag_of(self.backprop_full(M), tuple(self._x.shape[1:]))

    def cost_geometry(self, in_shape, out_shape):
        """A sum of s^2 strided views."""
        return dict(kind="upsample", vjp_flops=prod(out_shape), vjp_work=prod(out_shape))

    def input_index(self, x):
        """Flat input index that each output copies: (B, d_out)."""
        xp = array_module(x)
        B, C, H, W = x.shape
        c, i, j = xp.ix_(xp.arange(C), xp.arange(H * self.s), xp.arange(W * self.s))
        idx = (c * H + i // self.s) * W + j // self.s
        return xp.broadcast_to(idx.reshape(1, -1), (B, idx.size))

    def jac_input(self, x):
        """One 1 per row, at the copied input: (B, d_out, d_in)."""
        self.forward(x)
        return _selection_jacobian(x, self.input_index(x))

    def __repr__(self):
        return f"Upsample(scale_factor={self.s})"


class AvgPool2d(_Pool2d):
    """y[c, i, j] = mean of the k x k window (non-overlapping: stride = kernel_size), as PyTorch.

    J_in holds 1/k^2 at each output's window: one non-zero per column, k^2 per row, so
    (J_in * J_in)^T m = J_in^T m / k^2 and diag(J_in^T M J_in) needs only diag(M).
    """

    one_output_per_input = True


    def _forward(self, x):
        # rows and columns beyond the last whole window are dropped, as PyTorch does
        B, C, H, W = x.shape
        k, Ho, Wo = self.k, H // self.k, W // self.k
        return x[:, :, :Ho * k, :Wo * k].reshape(B, C, Ho, k, Wo, k).mean(axis=(3, 5))

    def _vjp_input(self, v):
        """J_in^T v: v / k^2 spread over each window, zeros on the dropped rows/columns."""
        xp = array_module(v)
        H, W = self._x.shape[2:]
        k, (Ho, Wo) = self.k, v.shape[-2:]
        g = xp.zeros(v.shape[:3] + (H, W), dtype=v.dtype)
        spread = xp.broadcast_to(v[..., :, None, :, None] / (k * k), v.shape[:3] + (Ho, k, Wo, k))
        g[..., :Ho * k, :Wo * k] = spread.reshape(v.shape[:3] + (Ho * k, Wo * k))
        return g

    def backprop_diag(self, m):
        """m_in = (J_in * J_in)^T m = J_in^T m / k^2 (every non-zero of J_in is 1/k^2)."""
        return self.vjp_input(m) / (self.k * self.k)

    def cost_geometry(self, in_shape, out_shape):
        """One spread copy per feature."""
        return dict(kind="generic", vjp_flops=prod(in_shape), vjp_work=prod(in_shape))

    def jac_input(self, x):
        """1/k^2 at (output, each input of its window): (B, d_out, d_in)."""
        xp = array_module(x)
        self.forward(x)
        B, C, H, W = x.shape
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        c, i, j, u, t = xp.ix_(*(xp.arange(n) for n in (C, Ho, Wo, self.k, self.k)))
        rows = xp.broadcast_to((c * Ho + i) * Wo + j, (C, Ho, Wo, self.k, self.k)).ravel()
        cols = ((c * H + i * self.k + u) * W + j * self.k + t).ravel()
        J = xp.zeros((B, C * Ho * Wo, C * H * W), dtype=x.dtype)
        J[:, rows, cols] = 1.0 / (self.k * self.k)
        return J

    def __repr__(self):
        return f"AvgPool2d({self.k})"

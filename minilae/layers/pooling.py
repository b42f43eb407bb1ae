"""Resampling layers: max-pooling (routes through the arg-max) and nearest up-sampling."""
from __future__ import annotations

from ..backend import array_module
from .base import Layer, prod


def _check_image(layer, in_shape):
    if len(in_shape) != 3:
        raise ValueError(f"{layer!r} expects NCHW inputs (B, C, H, W); got per-sample shape {tuple(in_shape)}")


def _selection_jacobian(x, in_index):
    """J[b, i, in_index[b, i]] = 1: the Jacobian of a layer that copies selected inputs."""
    m = array_module(x)
    B = x.shape[0]
    d_out, d_in = in_index.shape[1], prod(x.shape[1:])
    J = m.zeros((B, d_out, d_in), dtype=x.dtype)
    J[m.arange(B)[:, None], m.arange(d_out)[None, :], in_index] = 1.0
    return J


class MaxPool2d(Layer):
    """y[c, i, j] = max over the k x k window (non-overlapping: stride = kernel_size).

    Tied maxima (constant windows, e.g. MNIST's black border) route the derivative to the first
    of them in row-major window order, as PyTorch and numpy.argmax do.
    """

    def __init__(self, kernel_size: int = 2, stride=None):
        super().__init__()
        stride = kernel_size if stride is None else stride
        if int(kernel_size) < 1 or stride != kernel_size:
            raise ValueError(f"MaxPool2d supports non-overlapping windows (stride == kernel_size >= 1); "
                             f"got kernel_size={kernel_size}, stride={stride}")
        self.k = int(kernel_size)

    def out_shape(self, in_shape):
        _check_image(self, in_shape)
        C, H, W = in_shape
        if H < self.k or W < self.k:
            raise ValueError(f"{self!r}: input {H}x{W} is smaller than the window {self.k}x{self.k}")
        return (C, H // self.k, W // self.k)

    def _offsets(self, H, W):
        """The k*k strided views' slices, one per window offset (u, v), in window order u*k + v."""
        k, Ho, Wo = self.k, H // self.k, W // self.k
        return [(slice(u, Ho * k, k), slice(v, Wo * k, k)) for u in range(k) for v in range(k)]

    def _forward(self, x):
        # a running max over the k*k offsets: k*k passes over strided views, never a window copy
        m = array_module(x)
        offsets = self._offsets(*x.shape[2:])
        best = x[(Ellipsis,) + offsets[0]]
        arg = m.zeros(best.shape, dtype=m.int64)
        for i, sl in enumerate(offsets[1:], start=1):
            cand = x[(Ellipsis,) + sl]
            better = cand > best  # strict: ties keep the first offset, as argmax does
            best = m.where(better, cand, best)
            arg = m.where(better, i, arg)
        self._argmax = arg
        return best

    def _vjp_input(self, v):
        """J_in^T v: each v lands on the arg-max of its window, zeros elsewhere."""
        m = array_module(v)
        H, W = self._x.shape[2:]
        g = m.zeros(v.shape[:3] + (H, W), dtype=v.dtype)  # rows/columns the pooling dropped stay 0
        hit_of = self._argmax[:, None]
        for i, sl in enumerate(self._offsets(H, W)):
            g[(Ellipsis,) + sl] = m.where(hit_of == i, v, 0)
        return g

    def input_index(self, x):
        """Flat input index of each output's arg-max: (B, d_out)."""
        m = array_module(x)
        self.forward(x)
        B, C, H, W = x.shape
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        c, i, j = m.ix_(m.arange(C), m.arange(Ho), m.arange(Wo))
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
        m = array_module(x)
        B, C, H, W = x.shape
        s = self.s
        return m.broadcast_to(x[:, :, :, None, :, None], (B, C, H, s, W, s)).reshape(B, C, H * s, W * s)

    def _vjp_input(self, v):
        """J_in^T v: sum of v over each s x s block (s*s strided views added)."""
        s = self.s
        out = v[..., 0::s, 0::s].copy()
        for i in range(1, s * s):
            out += v[..., i // s::s, i % s::s]
        return out

    def input_index(self, x):
        """Flat input index that each output copies: (B, d_out)."""
        m = array_module(x)
        B, C, H, W = x.shape
        c, i, j = m.ix_(m.arange(C), m.arange(H * self.s), m.arange(W * self.s))
        idx = (c * H + i // self.s) * W + j // self.s
        return m.broadcast_to(idx.reshape(1, -1), (B, idx.size))

    def jac_input(self, x):
        """One 1 per row, at the copied input: (B, d_out, d_in)."""
        self.forward(x)
        return _selection_jacobian(x, self.input_index(x))

    def __repr__(self):
        return f"Upsample(scale_factor={self.s})"

"""2-D convolution (cross-correlation, as PyTorch): kernel (C_out, C_in, kh, kw), images NCHW.

The computation is im2col: every kh x kw window of the padded input becomes a row of a matrix
`cols` of shape (B, L, C_in*kh*kw), L = H_out*W_out, so the layer is one matrix product
y = cols W^T + b. The same matrix gives both Jacobians (appendix E of the paper):
J_p is `cols` itself (block-diagonal over output channels) and J_in^T scatters back ("col2im").
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, init_uniform, prod


def _pair(v, name):
    v = (v, v) if np.isscalar(v) else tuple(v)
    if len(v) != 2 or any(int(a) != a for a in v):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return int(v[0]), int(v[1])


class Conv2d(Layer):
    """y[o] = sum_c W[o, c] * x_pad[c] (strided cross-correlation) + b[o]."""

    param_names = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, rng=None):
        super().__init__()
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"Conv2d needs kernel >= 1, stride >= 1, padding >= 0; got "
                             f"{self.kernel_size}, {self.stride}, {self.padding}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError("Conv2d needs positive channel counts")
        rng = rng if rng is not None else np.random.default_rng()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        fan_in = in_channels * prod(self.kernel_size)
        self.weight = init_uniform((out_channels, in_channels) + self.kernel_size, fan_in, rng)
        if bias:
            self.bias = init_uniform((out_channels,), fan_in, rng)
        else:
            self.param_names = ("weight",)

    # ---- shapes -----------------------------------------------------------------------------
    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"{self!r} expects NCHW inputs with C={self.in_channels}; "
                             f"got per-sample shape {tuple(in_shape)}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, W = in_shape[1] + 2 * ph, in_shape[2] + 2 * pw
        if H < kh or W < kw:
            raise ValueError(f"{self!r}: padded input {H}x{W} is smaller than the kernel {kh}x{kw}")
        return (self.out_channels, (H - kh) // sh + 1, (W - kw) // sw + 1)

    # ---- im2col -----------------------------------------------------------------------------
    def _pad(self, x):
        ph, pw = self.padding
        if ph == pw == 0:
            return x
        m = array_module(x)
        return m.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))

    def im2col(self, x):
        """cols[b, l, (c, u, v)] = x_pad[b, c, h*s + u, w*s + v] with l = (h, w): (B, L, C*kh*kw)."""
        m = array_module(x)
        xp_ = self._pad(x)
        B, C = x.shape[:2]
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        sB, sC, sH, sW = xp_.strides
        windows = m.lib.stride_tricks.as_strided(
            xp_, shape=(B, Ho, Wo, C, kh, kw), strides=(sB, sH * sh, sW * sw, sC, sH, sW))
        return windows.reshape(B, Ho * Wo, C * kh * kw)

    def col2im(self, dcols, in_shape):
        """The adjoint of im2col: scatter-add (..., L, C*kh*kw) back onto (..., C, H, W)."""
        m = array_module(dcols)
        lead = dcols.shape[:-2]
        C, H, W = in_shape
        _, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        d = dcols.reshape(lead + (Ho, Wo, C, kh, kw))
        d = m.moveaxis(d, -3, -5)  # (..., C, Ho, Wo, kh, kw)
        out = m.zeros(lead + (C, H + 2 * ph, W + 2 * pw), dtype=dcols.dtype)
        # one strided add per kernel offset (kh*kw of them), never per pixel
        for u in range(kh):
            for v in range(kw):
                out[..., u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] += d[..., u, v]
        return out[..., ph:ph + H, pw:pw + W]

    # ---- forward and products ---------------------------------------------------------------
    def _forward(self, x):
        self._cols = self.im2col(x)
        B = x.shape[0]
        C_out, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        y = self._cols @ self.weight.reshape(C_out, -1).T  # (B, L, C_out)
        if "bias" in self.param_names:
            y = y + self.bias
        return y.transpose(0, 2, 1).reshape(B, C_out, Ho, Wo)

    def _vjp_input(self, v):
        """J_in^T v: col2im(v W) - a transposed convolution."""
        B, K, C_out = v.shape[:3]
        vl = v.reshape(B, K, C_out, -1).transpose(0, 1, 3, 2)  # (B, K, L, C_out)
        dcols = vl @ self.weight.reshape(C_out, -1)  # (B, K, L, C*kh*kw)
        return self.col2im(dcols, tuple(self._x.shape[1:]))

    def _vjp_params(self, v):
        """Per sample: dW[o, :] = sum_l v[o, l] cols[l, :], db[o] = sum_l v[o, l]."""
        m = array_module(v)
        B, K, C_out = v.shape[:3]
        vl = v.reshape(B, K, C_out, -1)
        gW = vl @ self._cols[:, None]  # (B, K, C_out, C*kh*kw)
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(vl.sum(axis=3))
        return m.concatenate(parts, axis=2)

    def _vjp_params_sum(self, v):
        """sum_b of the above as one matrix product over (batch, position)."""
        m = array_module(v)
        B, C_out = v.shape[:2]
        vl = v.reshape(B, C_out, -1).transpose(1, 0, 2).reshape(C_out, -1)  # (C_out, B*L)
        gW = vl @ self._cols.reshape(-1, self._cols.shape[-1])
        parts = [gW.ravel()]
        if "bias" in self.param_names:
            parts.append(vl.sum(axis=1))
        return m.concatenate(parts)

    # ---- dense Jacobians --------------------------------------------------------------------
    def conv_matrix(self, in_shape):
        """T with y_flat = T x_flat (+ b): T[(o,h,w), (c, h*s+u-p, w*s+v-p)] = W[o,c,u,v]."""
        m = array_module(self.weight)
        C, H, W = in_shape
        C_out, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        o, h, w, c, u, v = m.ix_(*(m.arange(n) for n in (C_out, Ho, Wo, C, kh, kw)))
        r, q = h * sh + u - ph, w * sw + v - pw
        valid = (r >= 0) & (r < H) & (q >= 0) & (q < W)
        shape = (C_out, Ho, Wo, C, kh, kw)
        row = m.broadcast_to((o * Ho + h) * Wo + w, shape)
        col = m.broadcast_to((c * H + r) * W + q, shape)
        val = m.broadcast_to(self.weight[:, None, None], shape)
        valid = m.broadcast_to(valid, shape)
        T = m.zeros((C_out * Ho * Wo, C * H * W), dtype=self.weight.dtype)
        # each (row, col) pair occurs at most once, so plain assignment is exact
        T[row[valid], col[valid]] = val[valid]
        return T

    def jac_input(self, x):
        """J_in = the convolution matrix T, the same for every sample: (B, d_out, d_in)."""
        self.forward(x)
        T = self.conv_matrix(tuple(x.shape[1:])).astype(x.dtype)
        return array_module(x).broadcast_to(T, (x.shape[0],) + T.shape).copy()

    def jac_params(self, x):
        """J_p[(o,l), (o',c,u,v)] = delta_{o o'} cols[l, (c,u,v)]; bias block delta_{o o'}."""
        self.forward(x)
        m = array_module(x)
        cols = self._cols
        B, L, CK = cols.shape
        C_out = self.out_channels
        eye = m.eye(C_out, dtype=x.dtype)
        JW = (eye[None, :, None, :, None] * cols[:, None, :, None, :]).reshape(B, C_out * L, C_out * CK)
        if "bias" not in self.param_names:
            return JW
        Jb = m.broadcast_to(eye[:, None, :], (C_out, L, C_out)).reshape(C_out * L, C_out)
        return m.concatenate([JW, m.broadcast_to(Jb, (B,) + Jb.shape)], axis=2)

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding})")

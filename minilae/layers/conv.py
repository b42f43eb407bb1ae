"""2-D convolution (cross-correlation, as PyTorch): kernel (C_out, C_in, kh, kw), images NCHW.

The computation is im2col: every kh x kw window of the padded input becomes a row of a matrix
`cols` of shape (B, L, C_in*kh*kw), L = H_out*W_out, so the layer is one matrix product
y = cols W^T + b. The same matrix gives both Jacobians (appendix E of the paper):
J_p is `cols` itself (block-diagonal over output channels) and J_in^T scatters back ("col2im").
At stride 1 the same J_in^T v is also a plain convolution of v with the flipped kernel; the layer
takes that route when it moves less memory (fewer output than input channels).
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


def _pad(x, ph, pw):
    """Zero-pad the two trailing (spatial) axes by ph rows and pw columns on each side."""
    if ph == pw == 0:
        return x
    return array_module(x).pad(x, ((0, 0),) * (x.ndim - 2) + ((ph, ph), (pw, pw)))


def _im2col_T(x_pad, kernel, stride, out_hw):
    """colsT[b, (c, u, v), (h, w)] = x_pad[b, c, h*s + u, w*s + v]: (B, C*kh*kw, Ho*Wo), one copy."""
    m = array_module(x_pad)
    B, C = x_pad.shape[:2]
    (kh, kw), (sh, sw), (Ho, Wo) = kernel, stride, out_hw
    sB, sC, sH, sW = x_pad.strides
    windows = m.lib.stride_tricks.as_strided(
        x_pad, shape=(B, C, kh, kw, Ho, Wo), strides=(sB, sC, sH, sW, sH * sh, sW * sw))
    return windows.reshape(B, C * kh * kw, Ho * Wo)


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
    # Internally the im2col matrix is kept transposed, colsT (B, C*kh*kw, L): building it copies
    # whole image rows, the forward product W colsT lands directly in NCHW order, and col2im adds
    # whole rows back. `im2col` and `layer._cols` expose the (B, L, C*kh*kw) layout of the paper as
    # a transposed view of the same memory.
    def _im2col_T(self, x):
        """colsT for this layer's kernel, stride and padding: (B, C*kh*kw, L)."""
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        return _im2col_T(_pad(x, *self.padding), self.kernel_size, self.stride, (Ho, Wo))

    def im2col(self, x):
        """cols[b, l, (c, u, v)] = x_pad[b, c, h*s + u, w*s + v] with l = (h, w): (B, L, C*kh*kw)."""
        return self._im2col_T(x).transpose(0, 2, 1)

    def _col2im_T(self, dcolsT, in_shape):
        """Adjoint of _im2col_T: scatter-add (..., C*kh*kw, L) back onto (..., C, H, W)."""
        m = array_module(dcolsT)
        lead = dcolsT.shape[:-2]
        C, H, W = in_shape
        _, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        d = dcolsT.reshape(lead + (C, kh, kw, Ho, Wo))
        out = m.zeros(lead + (C, H + 2 * ph, W + 2 * pw), dtype=dcolsT.dtype)
        # one strided add per kernel offset (kh*kw of them), never per pixel
        for u in range(kh):
            for v in range(kw):
                out[..., u:u + sh * (Ho - 1) + 1:sh, v:v + sw * (Wo - 1) + 1:sw] += d[..., u, v, :, :]
        if ph == pw == 0:
            return out
        return out[..., ph:ph + H, pw:pw + W]

    def col2im(self, dcols, in_shape):
        """The adjoint of im2col: scatter-add (..., L, C*kh*kw) back onto (..., C, H, W)."""
        return self._col2im_T(array_module(dcols).swapaxes(dcols, -1, -2), in_shape)

    # ---- forward and products ---------------------------------------------------------------
    def _forward(self, x):
        colsT = self._im2col_T(x)
        self._cols = colsT.transpose(0, 2, 1)  # (B, L, C*kh*kw), a view
        B = x.shape[0]
        C_out, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        y = self.weight.reshape(C_out, -1) @ colsT  # (B, C_out, L): already NCHW
        if "bias" in self.param_names:
            y += self.bias[:, None]
        return y.reshape(B, C_out, Ho, Wo)

    def _vjp_input(self, v):
        """J_in^T v: col2im(W^T v) - a transposed convolution."""
        if self._transpose_is_a_convolution():
            return self._vjp_input_as_convolution(v)
        B, K, C_out = v.shape[:3]
        dcolsT = self.weight.reshape(C_out, -1).T @ v.reshape(B, K, C_out, -1)  # (B, K, C*kh*kw, L)
        return self._col2im_T(dcolsT, tuple(self._x.shape[1:]))

    def _transpose_is_a_convolution(self):
        """True when J_in^T v is cheaper as the convolution below than through col2im: stride 1,
        padding < kernel, and the im2col matrix of v (C_out channels, H x W positions) is smaller
        than dcols (C_in channels, H_out x W_out positions)."""
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if self.stride != (1, 1) or ph >= kh or pw >= kw:
            return False
        H, W = self._x.shape[2:]
        _, Ho, Wo = self.out_shape(tuple(self._x.shape[1:]))
        return self.out_channels * H * W < self.in_channels * Ho * Wo

    def _vjp_input_as_convolution(self, v):
        """Stride 1: J_in^T v = v zero-padded by k - 1 - p, correlated with the kernel flipped in
        space and with input and output channels swapped: g[c, i, j] = sum_{o,u,t} W[o, c, u, t] v[o, i+p-u, j+p-t]."""
        B, K, C_out, Ho, Wo = v.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        C, H, W = self._x.shape[1:]
        v_pad = _pad(v.reshape(B * K, C_out, Ho, Wo), kh - 1 - ph, kw - 1 - pw)
        colsT = _im2col_T(v_pad, (kh, kw), (1, 1), (H, W))  # (B K, C_out*kh*kw, H*W)
        W_flip = self.weight[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, -1)  # (C, C_out*kh*kw)
        return (W_flip @ colsT).reshape(B, K, C, H, W)

    def _vjp_params(self, v):
        """Per sample: dW[o, :] = sum_l v[o, l] cols[l, :], db[o] = sum_l v[o, l]."""
        m = array_module(v)
        B, K, C_out = v.shape[:3]
        vl = v.reshape(B, K, C_out, -1)
        # the K vectors stacked into one (K*C_out, L) matrix: one product per sample, no broadcast copy
        gW = v.reshape(B, K * C_out, -1) @ self._cols  # (B, K*C_out, C*kh*kw)
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(vl.sum(axis=3))
        return m.concatenate(parts, axis=2)

    def _vjp_params_sum(self, v):
        """sum_b of the above: one product per sample, then the (small) results summed."""
        m = array_module(v)
        B, C_out = v.shape[:2]
        vl = v.reshape(B, C_out, -1)
        gW = (vl @ self._cols).sum(axis=0)  # (C_out, C*kh*kw)
        parts = [gW.ravel()]
        if "bias" in self.param_names:
            parts.append(vl.sum(axis=(0, 2)))
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

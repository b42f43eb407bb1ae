"""2-D convolution (cross-correlation, as PyTorch): kernel (C_out, C_in, kh, kw), images NCHW.

The computation is im2col: every kh x kw window of the padded input becomes a row of a matrix
`cols` of shape (B, L, C_in*kh*kw), L = H_out*W_out, so the layer is one matrix product
y = cols W^T + b. The same matrix gives both Jacobians (appendix E of the paper):
J_p is `cols` itself (block-diagonal over output channels) and J_in^T scatters back ("col2im").
At stride 1 the same J_in^T v is also a plain convolution of v with the flipped kernel; the layer
takes that route when it moves less memory (fewer output than input channels).

The curvature rules follow from the same two matrices: J_in * J_in is the convolution with the squared
kernel W * W, and J_p * J_p holds the squared im2col matrix, so the diagonal rules are the layer's own
products run with squared arrays; the exact rules for a full M read only the bands of M that one
kernel window couples. Names: (u, t) is a kernel offset, v a vector, m = diag(M), xp the array module.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import array_module
from .base import CHUNK_BYTES, Layer, flat_out, gram_with_ones, init_uniform, prod


def _pair(value, name):
    """An int or a pair of ints as a pair (rows, columns)."""
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(a) != a for a in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {pair}")
    return int(pair[0]), int(pair[1])


def _pad(x, ph, pw):
    """Zero-pad the two trailing (spatial) axes by ph rows and pw columns on each side."""
    if ph == pw == 0:
        return x
    return array_module(x).pad(x, ((0, 0),) * (x.ndim - 2) + ((ph, ph), (pw, pw)))


def _windows(x_pad, kernel, stride, out_hw):
    """windows[b, c, u, t, h, w] = x_pad[b, c, h*s + u, w*s + t]: a strided view (B, C, kh, kw, Ho, Wo), no copy."""
    xp = array_module(x_pad)
    B, C = x_pad.shape[:2]
    (kh, kw), (sh, sw), (Ho, Wo) = kernel, stride, out_hw
    sB, sC, sH, sW = x_pad.strides
    return xp.lib.stride_tricks.as_strided(
        x_pad, shape=(B, C, kh, kw, Ho, Wo), strides=(sB, sC, sH, sW, sH * sh, sW * sw))


def _im2col_T(x_pad, kernel, stride, out_hw):
    """colsT[b, (c, u, t), (h, w)] = x_pad[b, c, h*s + u, w*s + t]: (B, C*kh*kw, Ho*Wo), one copy."""
    B, C = x_pad.shape[:2]
    return _windows(x_pad, kernel, stride, out_hw).reshape(B, C * prod(kernel), prod(out_hw))


class _Grid(NamedTuple):
    """Where the channel-major products run. Output position (b, h, w) of n images is column
    b Gh Gw + h Gw + w of a (., n Gh Gw) matrix; h < Ho, w < Wo are the real outputs, the other columns are
    computed and dropped. A product needs only the first M columns, and `shifts` holds, at stride 1, the
    column offset u Gw + t of each kernel offset (u, t) in the padded image (None at other strides)."""
    n: int
    Gh: int
    Gw: int
    Ho: int
    Wo: int
    M: int
    shifts: tuple


def _stride1_grid(n, in_hw, kernel, padding):
    """At stride 1 the grid can be the zero-padded image itself (Gh, Gw = H + 2 p_h, W + 2 p_w): the window
    of kernel offset (u, t) is then the flat image shifted by u Gw + t, a plain slice, so the scatters below
    add contiguous rows (NumPy pays per row: 14 or 28 numbers in an image row here), for (Gh Gw) / (Ho Wo) =
    1.15-1.3x more columns."""
    (kh, kw), (ph, pw) = kernel, padding
    Gh, Gw = in_hw[0] + 2 * ph, in_hw[1] + 2 * pw
    shifts = tuple(u * Gw + t for u in range(kh) for t in range(kw))
    return _Grid(n, Gh, Gw, Gh - kh + 1, Gw - kw + 1, n * Gh * Gw - shifts[-1], shifts)


def _padded_grid(x, padding, kernel):
    """x (n, C, H, W) zero-padded and channel-major on its stride-1 grid: (C, n Gh Gw), one copy; and the grid."""
    n, C, H, W = x.shape
    (ph, pw), grid = padding, _stride1_grid(x.shape[0], x.shape[2:], kernel, padding)
    xg = array_module(x).zeros((C, n, grid.Gh, grid.Gw), dtype=x.dtype)
    xg[:, :, ph:ph + H, pw:pw + W] = x.transpose(1, 0, 2, 3)
    return xg.reshape(C, -1), grid


def _im2col_rows(x, kernel, stride, padding):
    """The im2col matrix of x, channel-major: rows[(c, u, t), (b, h, w)] = x_pad[b, c, h s + u, w s + t],
    (C kh kw, n Ho Wo), one copy; and its grid (the outputs). The batch runs inside the columns, so that a
    product with the kernel is ONE matrix product for the whole batch: NumPy runs a stacked (B, ., .) matmul
    as B small products on one thread, the single product uses every BLAS thread (conv AE, batch 64, float32,
    2 threads: 1.5-3.5x faster products)."""
    n, C = x.shape[:2]
    Ho, Wo = _out_hw(x.shape[2:], kernel, stride, padding)
    windows = _windows(_pad(x, *padding), kernel, stride, (Ho, Wo))
    return windows.transpose(1, 2, 3, 0, 4, 5).reshape(C * prod(kernel), n * Ho * Wo), _output_grid(n, Ho, Wo)


def _output_grid(n, Ho, Wo):
    """The grid of the outputs themselves (no dropped columns), for strides other than 1."""
    return _Grid(n, Ho, Wo, Ho, Wo, n * Ho * Wo, None)


def _out_hw(in_hw, kernel, stride, padding):
    """(H_out, W_out) = ((H + 2 p - k) // s + 1, ...)."""
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip(in_hw, kernel, stride, padding))


def _to_images(y, grid):
    """A result (C, n Gh Gw) on the grid as the images (n, C, Ho, Wo): the dropped columns cut, batch-major,
    contiguous (one copy)."""
    y = y.reshape(y.shape[0], grid.n, grid.Gh, grid.Gw)[:, :, :grid.Ho, :grid.Wo]
    return array_module(y).ascontiguousarray(y.transpose(1, 0, 2, 3))


def _to_grid(v, grid):
    """Images v (n, C, Ho, Wo) on the grid, (C, M), zeros at the dropped positions (so that they add nothing
    to a weight gradient or a scatter); one copy."""
    n, C = v.shape[:2]
    out = array_module(v).zeros((C, n, grid.Gh, grid.Gw), dtype=v.dtype)
    out[:, :, :grid.Ho, :grid.Wo] = v.transpose(1, 0, 2, 3)
    return out.reshape(C, -1)[:, :grid.M]


def set_geometry(layer, in_channels, out_channels, kernel_size, stride, padding):
    """Validated kernel_size, stride, padding pairs and channel counts on a convolution-like layer."""
    name = type(layer).__name__
    layer.kernel_size = _pair(kernel_size, "kernel_size")
    layer.stride = _pair(stride, "stride")
    layer.padding = _pair(padding, "padding")
    if min(layer.kernel_size) < 1 or min(layer.stride) < 1 or min(layer.padding) < 0:
        raise ValueError(f"{name} needs kernel >= 1, stride >= 1, padding >= 0; got "
                         f"{layer.kernel_size}, {layer.stride}, {layer.padding}")
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"{name} needs positive channel counts")
    layer.in_channels, layer.out_channels = int(in_channels), int(out_channels)


def init_params(layer, weight_shape, fan_in, bias, rng):
    """PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of weight, then bias (out_channels,) if bias."""
    rng = rng if rng is not None else np.random.default_rng()
    layer.weight = init_uniform(weight_shape, fan_in, rng)
    if bias:
        layer.bias = init_uniform((layer.out_channels,), fan_in, rng)
    else:
        layer.param_names = ("weight",)


class Conv2d(Layer):
    """y[o] = sum_c W[o, c] * x_pad[c] (strided cross-correlation) + b[o]."""

    param_names = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, rng=None):
        super().__init__()
        set_geometry(self, in_channels, out_channels, kernel_size, stride, padding)
        init_params(self, (out_channels, in_channels) + self.kernel_size, in_channels * prod(self.kernel_size),
                    bias, rng)

    # ---- shapes -----------------------------------------------------------------------------
    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"{self!r} expects NCHW inputs with C={self.in_channels}; "
                             f"got per-sample shape {tuple(in_shape)}")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        H, W = in_shape[1] + 2 * ph, in_shape[2] + 2 * pw
        if H < kh or W < kw:
            raise ValueError(f"{self!r}: padded input {H}x{W} is smaller than the kernel {kh}x{kw}")
        return (self.out_channels,) + _out_hw(in_shape[1:], self.kernel_size, self.stride, self.padding)

    # ---- im2col -----------------------------------------------------------------------------
    # The gradient and the approximate diagonal run channel-major on a grid (see _Grid, _im2col_rows), the
    # batch inside the columns. The forward keeps either the im2col matrix `_rows` (C*kh*kw, M), or, when it
    # scatters (stride 1, few output channels: `_scatters`), only the padded input `_xg` (C, n Gh Gw).
    # `im2col` and `layer._cols` give the (B, L, C*kh*kw) layout of the paper (the per-sample and full-M rules).
    def _im2col_T(self, x):
        """colsT for this layer's kernel, stride and padding: (B, C*kh*kw, L)."""
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        return _im2col_T(_pad(x, *self.padding), self.kernel_size, self.stride, (Ho, Wo))

    def im2col(self, x):
        """cols[b, l, (c, u, t)] = x_pad[b, c, h*s + u, w*s + t] with l = (h, w): (B, L, C*kh*kw)."""
        return self._im2col_T(x).transpose(0, 2, 1)

    def _col2im_T(self, dcolsT, in_shape):
        """Adjoint of _im2col_T: scatter-add (..., C*kh*kw, L) back onto (..., C, H, W)."""
        xp = array_module(dcolsT)
        lead = dcolsT.shape[:-2]
        C, H, W = in_shape
        _, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        d = dcolsT.reshape(lead + (C, kh, kw, Ho, Wo))
        out = xp.zeros(lead + (C, H + 2 * ph, W + 2 * pw), dtype=dcolsT.dtype)
        # one strided add per kernel offset (kh*kw of them), never per pixel
        for u in range(kh):
            for t in range(kw):
                out[..., u:u + sh * (Ho - 1) + 1:sh, t:t + sw * (Wo - 1) + 1:sw] += d[..., u, t, :, :]
        if ph == pw == 0:
            return out
        return out[..., ph:ph + H, pw:pw + W]

    def col2im(self, dcols, in_shape):
        """The adjoint of im2col: scatter-add (..., L, C*kh*kw) back onto (..., C, H, W)."""
        return self._col2im_T(array_module(dcols).swapaxes(dcols, -1, -2), in_shape)

    # ---- forward and products ---------------------------------------------------------------
    @property
    def _cols(self):
        """cols (B, L, C*kh*kw) of the last forward input: a view of `_rows`, made (once per forward) after a
        scattering forward that kept none."""
        if self._rows is None:
            self._rows = _im2col_rows(self._cached_input(), self.kernel_size, self.stride, self.padding)[0]
        B = self._x.shape[0]
        return self._rows.reshape(self._rows.shape[0], B, -1).transpose(1, 2, 0)

    def _forward(self, x):
        if self._scatters():
            self._rows, (self._xg, self._grid) = None, _padded_grid(x, self.padding, self.kernel_size)
            y = self._scatter(self._xg, self._grid, self.weight)
        else:
            self._xg, (self._rows, self._grid) = None, _im2col_rows(x, self.kernel_size, self.stride, self.padding)
            y = _to_images(self.weight.reshape(self.out_channels, -1) @ self._rows, self._grid)
        if "bias" in self.param_names:
            y += self.bias[:, None, None]
        return y

    def _scatters(self):
        """True when the forward is cheaper as a scatter of the kernel's products than through im2col: stride 1
        and few output channels (C_out <= C_in / 8, as a decoder's last layer), so the k_h k_w per-offset
        products (C_out rows each) hold far fewer numbers than the im2col matrix (C_in k_h k_w rows), and the
        weight gradient's per-offset products, with a C_out x C_in result, still run at BLAS speed. Measured on
        the conv AE, batch 64: 16 -> 1 channels 2x faster forward and weight gradient; 32 -> 16 channels would be
        1.6x slower (the 16 x 32 per-offset products run at a tenth of the speed of one im2col product)."""
        return self.stride == (1, 1) and 8 * self.out_channels <= self.in_channels

    @staticmethod
    def _scatter(xg, grid, kernel):
        """y[o, col] = sum_{(u, t)} Z_ut[o, col + shift_ut] with Z_ut = kernel[:, :, u, t] xg: one product for all
        offsets (C_out k_h k_w, C) @ (C, n Gh Gw), then k_h k_w shifted adds of contiguous rows."""
        C_out, C, kh, kw = kernel.shape
        Z = (kernel.transpose(2, 3, 0, 1).reshape(kh * kw * C_out, C) @ xg).reshape(kh * kw, C_out, -1)
        y = array_module(xg).zeros_like(Z[0])  # the columns from M on are dropped positions only
        for i, shift in enumerate(grid.shifts):  # a loop over kernel offsets, not pixels
            y[:, :grid.M] += Z[i, :, shift:shift + grid.M]
        return _to_images(y, grid)

    def _vjp_input(self, v):
        """J_in^T v: col2im(W^T v) - a transposed convolution."""
        return self._transposed(v, self.weight)

    def _transposed(self, v, kernel):
        """T(kernel)^T v for v (B, K, C_out, Ho, Wo): the transposed convolution with any kernel of W's shape."""
        if self._transpose_is_a_convolution():
            return self._vjp_input_as_convolution(v, kernel)
        return self._vjp_input_by_col2im(v, kernel)

    def _vjp_input_by_col2im(self, v, kernel):
        """T(kernel)^T v = col2im(kernel^T v): one product, then the scatter-add of the windows (at stride 1 on
        the padded grid: one add of contiguous rows per kernel offset)."""
        B, K, C_out = v.shape[:3]
        C, H, W = self._x.shape[1:]
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        v = v.reshape((B * K,) + v.shape[2:])
        if self.stride != (1, 1):
            v_cm = _to_grid(v, _output_grid(v.shape[0], *v.shape[2:]))  # (C_out, B K L)
            dcols = kernel.reshape(C_out, -1).T @ v_cm  # (C*kh*kw, B K L)
            dcolsT = dcols.reshape(dcols.shape[0], B, K, -1).transpose(1, 2, 0, 3)  # (B, K, C*kh*kw, L), a view
            return self._col2im_T(dcolsT, (C, H, W))
        grid = _stride1_grid(B * K, (H, W), self.kernel_size, self.padding)
        dcols = (kernel.reshape(C_out, -1).T @ _to_grid(v, grid)).reshape(C, kh * kw, grid.M)
        g = array_module(v).zeros((C, B * K * grid.Gh * grid.Gw), dtype=v.dtype)
        for i, shift in enumerate(grid.shifts):  # a loop over kernel offsets, not pixels
            g[:, shift:shift + grid.M] += dcols[:, i]
        g = g.reshape(C, B * K, grid.Gh, grid.Gw)[:, :, ph:ph + H, pw:pw + W]
        return array_module(v).ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(B, K, C, H, W)

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

    def _vjp_input_as_convolution(self, v, kernel=None):
        """Stride 1: J_in^T v = v zero-padded by k - 1 - p, correlated with the kernel flipped in
        space and with input and output channels swapped: g[c, i, j] = sum_{o,u,t} W[o, c, u, t] v[o, i+p-u, j+p-t]."""
        kernel = self.weight if kernel is None else kernel
        B, K, C_out, Ho, Wo = v.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        C, H, W = self._x.shape[1:]
        W_flip = kernel[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C, -1)  # (C, C_out*kh*kw)
        v = v.reshape(B * K, C_out, Ho, Wo)
        if K > 1:  # many vectors (an exact walk): the B K per-image products are large enough on their own, and
            # the channel-major product's transposing copy of its large result cost 15% of the conv AE's sqrt walk
            colsT = _im2col_T(_pad(v, kh - 1 - ph, kw - 1 - pw), (kh, kw), (1, 1), (H, W))  # (B K, C_out*kh*kw, H W)
            return (W_flip @ colsT).reshape(B, K, C, H, W)
        rows, grid = _im2col_rows(v, (kh, kw), (1, 1), (kh - 1 - ph, kw - 1 - pw))
        return _to_images(W_flip @ rows, grid).reshape(B, K, C, H, W)

    def _vjp_params(self, v, cols=None):
        """Per sample: dW[o, :] = sum_l v[o, l] cols[l, :], db[o] = sum_l v[o, l] (cols: the im2col matrix)."""
        xp = array_module(v)
        B, K, C_out = v.shape[:3]
        vl = v.reshape(B, K, C_out, -1)
        # the K vectors stacked into one (K*C_out, L) matrix: one product per sample, no broadcast copy
        gW = v.reshape(B, K * C_out, -1) @ (self._cols if cols is None else cols)  # (B, K*C_out, C*kh*kw)
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(vl.sum(axis=3))
        return xp.concatenate(parts, axis=2)

    def _vjp_params_sum(self, v, square=False, out=None):
        """sum_b of the above over the whole batch on the forward's grid, dW = v rows^T (v on the grid,
        (C_out, M)), or after a scattering forward one (C_out, M) @ (M, C) product per kernel offset with the
        shifted padded input; with `square`, of the squared input (J_p * J_p). Written into the views of out."""
        xp = array_module(v)
        out = flat_out(self, out, v.dtype)
        gW, *gb = self.split_params(out)
        vg = _to_grid(v, self._grid)
        if self._xg is None:  # the forward kept the im2col matrix, on the output grid
            xp.matmul(vg, (self._rows ** 2 if square else self._rows).T, out=gW.reshape(self.out_channels, -1))
        else:
            xg = self._xg ** 2 if square else self._xg
            kh, kw = self.kernel_size
            for i, shift in enumerate(self._grid.shifts):  # a loop over kernel offsets, not pixels
                gW[:, :, i // kw, i % kw] = vg @ xg[:, shift:shift + self._grid.M].T
        if gb:
            v.sum(axis=(0, 2, 3), out=gb[0])
        return out

    # ---- curvature rules ----------------------------------------------------------------------
    def backprop_diag(self, m):
        """m_in = (T * T)^T m: the transposed convolution of m with the squared kernel W * W
        (J_in is the convolution matrix T with entries W[o, c, u, t], so T * T convolves with W * W)."""
        return self._transposed(m[:, None], self.weight ** 2)[:, 0]

    def param_diag_from_diag(self, m, per_sample=False, out=None):
        """W[o, (c,u,t)]: sum_l m[o, l] cols[l, (c,u,t)]^2;  b[o]: sum_l m[o, l] (J_p * J_p holds cols^2)."""
        if per_sample:
            return self._vjp_params(m[:, None], self._cols ** 2)[:, 0]
        return self._vjp_params_sum(m, square=True, out=out)

    def backprop_constant_diag(self, m):
        """m_in[b, c, i, j] = c0 sum of W[o, c, u, t]^2 over the outputs o and the windows (u, t) that cover
        pixel (i, j): the same for every image, so one image's col2im of sum_o W^2, and no product with the batch."""
        xp = array_module(self.weight)
        in_shape = tuple(self._x.shape[1:])
        _, Ho, Wo = self.out_shape(in_shape)
        w2 = xp.einsum("ocut,ocut->cut", self.weight, self.weight).reshape(1, -1, 1)  # (1, C kh kw, 1)
        image = self._col2im_T(xp.broadcast_to(w2, (1, w2.shape[1], Ho * Wo)), in_shape)  # (1, C, H, W)
        m_in = xp.empty((m.shape[0],) + in_shape, dtype=m.dtype)
        m_in[...] = image * m.value
        return m_in

    def param_diag_from_constant(self, m, out=None):
        """W[o, c, u, t]: c0 sum_b sum_(h, w) x_pad[b, c, h s + u, w s + t]^2, the same for every o: window sums
        of the batch's summed squared input (C, H, W), no im2col;  b[o]: c0 B Ho Wo."""
        x = self._cached_input()
        xp = array_module(x)
        out = flat_out(self, out, m.dtype)
        gW, *gb = self.split_params(out)
        _, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        squares = xp.einsum("bchw,bchw->chw", x, x)[None]  # (1, C, H, W)
        windows = _windows(_pad(squares, *self.padding), self.kernel_size, self.stride, (Ho, Wo))
        gW[...] = windows.sum(axis=(0, 4, 5)) * m.value
        if gb:
            gb[0][...] = m.value * x.shape[0] * Ho * Wo
        return out

    def param_diag(self, M, per_sample=False):
        """W[o, k]: sum_{l, l'} cols[l, k] M[(o,l), (o,l')] cols[l', k];  b[o]: sum_{l, l'} M[(o,l), (o,l')].

        Only the C_out diagonal (L x L) blocks of M between positions of the same output channel enter.
        """
        xp = array_module(M)
        B, C_out, cols = M.shape[0], self.out_channels, self._cols  # cols (B, L, C k_h k_w)
        L = cols.shape[1]
        M_oo = xp.diagonal(M.reshape(B, C_out, L, C_out, L), axis1=1, axis2=3)  # (B, L, L, C_out)
        M_oo = xp.moveaxis(M_oo, 3, 1)  # (B, C_out, L, L)
        MC = M_oo @ cols[:, None]  # (B, C_out, L, C k_h k_w)
        parts = [(cols[:, None] * MC).sum(axis=2).reshape(B, -1)]
        if "bias" in self.param_names:
            parts.append(M_oo.sum(axis=(2, 3)))
        out = xp.concatenate(parts, axis=-1)
        return out if per_sample else out.sum(axis=0)

    def param_diag_from_sqrt(self, V, per_sample=False):
        """W[o, k']: sum_k (sum_l V[k, o, l] cols[l, k'])^2;  b[o]: sum_k (sum_l V[k, o, l])^2.

        One (K C_out x L) @ (L x C k_h k_w) product per sample and chunk of columns k.
        """
        xp = array_module(V)
        B, K, C_out = V.shape[:3]
        cols = self._cols  # (B, L, C k_h k_w)
        L, CK = cols.shape[1:]
        step = max(1, int(CHUNK_BYTES // max(1, B * C_out * (CK + L) * V.dtype.itemsize)))
        gW = xp.zeros((B, C_out, CK), dtype=V.dtype)
        gb = xp.zeros((B, C_out), dtype=V.dtype)
        for k in range(0, K, step):  # chunks of columns bound the (B, k, C_out, C k_h k_w) temporary
            Vk = V[:, k:k + step].reshape(B, -1, L)  # (B, k C_out, L)
            gW += ((Vk @ cols).reshape(B, -1, C_out, CK) ** 2).sum(axis=1)
            gb += (Vk.sum(axis=2).reshape(B, -1, C_out) ** 2).sum(axis=1)
        parts = [gW.reshape(B, -1)] + ([gb] if "bias" in self.param_names else [])
        out = xp.concatenate(parts, axis=1)
        return out if per_sample else out.sum(axis=0)

    def diag_of_backprop(self, M):
        """diag(T^T M T) from the bands of M that one input pixel sees.

        Input pixel (c, R) is read by output (o, h) through kernel offset u when R = h s + u. Two outputs
        (o, h) and (o', h') read it through offsets u and u' = u - s (h' - h), so only the bands
        M[(o, h), (o', h + dh)] with |dh| <= (k - 1) / s enter. For each shift (dh, dw):
            E[l, (c,u,t)] = sum_o W[o,c,u,t] sum_o' band[o, o', l] W[o', c, u - s dh, t - s dw],
        and the sum of E over shifts, scattered back like a gradient (col2im), is the diagonal.
        """
        xp = array_module(M)
        B = M.shape[0]
        in_shape = tuple(self._x.shape[1:])
        C_out, Ho, Wo = self.out_shape(in_shape)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        W = self.weight
        M7 = M.reshape(B, C_out, Ho, Wo, C_out, Ho, Wo)
        dcols = xp.zeros((B, Ho, Wo, C_out, W[0].size), dtype=M.dtype)
        for dh in range(-((kh - 1) // sh), (kh - 1) // sh + 1):  # loops over kernel shifts only
            for dw in range(-((kw - 1) // sw), (kw - 1) // sw + 1):
                band = _band(M7, dh, dw, xp)  # (B, Ho, Wo, C_out, C_out')
                W2 = _shift_kernel(W, sh * dh, sw * dw, xp).reshape(C_out, -1)
                dcols += band @ W2  # (B, Ho, Wo, C_out, C k_h k_w)
        E = (dcols * W.reshape(C_out, -1)).sum(axis=3)  # (B, Ho, Wo, C k_h k_w)
        return self.col2im(E.reshape(B, Ho * Wo, -1), in_shape)

    def backprop_from_diag(self, m):
        """M_in[(c,R), (c',R')] = sum_{o,h} m[o,h] W[o,c,R - h s] W[o,c',R' - h s] (2-D positions).

        For each kernel offset (u, t) of the row pixel, one product gives
            G[l, c, (c',u',t')] = sum_o m[o, l] W[o,c,u,t] W[o,c',u',t'],
        added at row (c, h s + u, w s + t) and column (c', h s + u', w s + t') of the padded M_in:
        distinct positions l hit distinct rows, so the indexed add has no collisions.
        """
        xp = array_module(m)
        B = m.shape[0]
        C, H, Wd = self._x.shape[1:]
        C_out, Ho, Wo = self.out_shape((C, H, Wd))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Hp, Wp = H + 2 * ph, Wd + 2 * pw
        W = self.weight
        ml = m.reshape(B, C_out, Ho * Wo).transpose(0, 2, 1)  # (B, L, C_out)
        R = xp.zeros((B, C, Hp, Wp, C, Hp, Wp), dtype=m.dtype)
        h = (xp.arange(Ho) * sh)[:, None, None, None]
        w = (xp.arange(Wo) * sw)[None, :, None, None]
        col_r = h + xp.arange(kh)[None, None, :, None]  # (Ho, 1, kh, 1): column pixel rows h s + u'
        col_q = w + xp.arange(kw)[None, None, None, :]
        for u in range(kh):  # loops over kernel offsets only
            for t in range(kw):
                WW = (W[:, :, u, t][:, :, None] * W.reshape(C_out, 1, -1)).reshape(C_out, -1)  # (C_out, C C k_h k_w)
                G = (ml @ WW).reshape(B, Ho, Wo, C, C, kh, kw)
                R[:, :, h + u, w + t, :, col_r, col_q] += G.transpose(1, 2, 5, 6, 0, 3, 4)
        R = R[:, :, ph:ph + H, pw:pw + Wd, :, ph:ph + H, pw:pw + Wd]
        return R.reshape(B, C * H * Wd, C * H * Wd)

    def cost_geometry(self, in_shape, out_shape):
        """im2col sizes: L positions, C_out x (C k_h k_w) kernel, and the (2k-1)^2 band shifts of diag_of_backprop."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        L, Co, C = prod(out_shape[1:]), self.out_channels, self.in_channels
        CK = C * kh * kw
        shifts = (2 * ((kh - 1) // sh) + 1) * (2 * ((kw - 1) // sw) + 1)
        return dict(kind="conv", L=L, Co=Co, C=C, CK=CK, kk=kh * kw, shifts=shifts,
                    vjp_flops=2 * L * Co * CK + L * CK, vjp_work=L * CK)

    # ---- dense Jacobians --------------------------------------------------------------------
    def input_rows(self, dtype):
        """The rows of J_in = T for every sample, a broadcast view (B, d_out, d_in): one scatter instead of
        d_out transposed convolutions per sample (the engine's default, from unit vectors)."""
        x = self._cached_input()
        T = self.conv_matrix(tuple(x.shape[1:])).astype(dtype, copy=False)
        return array_module(x).broadcast_to(T, (x.shape[0],) + T.shape)

    def conv_matrix(self, in_shape):
        """T with y_flat = T x_flat (+ b): T[(o,h,w), (c, h*s+u-p, w*s+t-p)] = W[o,c,u,t]."""
        xp = array_module(self.weight)
        C, H, W = in_shape
        C_out, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        o, h, w, c, u, t = xp.ix_(*(xp.arange(n) for n in (C_out, Ho, Wo, C, kh, kw)))
        r, q = h * sh + u - ph, w * sw + t - pw
        valid = (r >= 0) & (r < H) & (q >= 0) & (q < W)
        shape = (C_out, Ho, Wo, C, kh, kw)
        row = xp.broadcast_to((o * Ho + h) * Wo + w, shape)
        col = xp.broadcast_to((c * H + r) * W + q, shape)
        val = xp.broadcast_to(self.weight[:, None, None], shape)
        valid = xp.broadcast_to(valid, shape)
        T = xp.zeros((C_out * Ho * Wo, C * H * W), dtype=self.weight.dtype)
        # each (row, col) pair occurs at most once, so plain assignment is exact
        T[row[valid], col[valid]] = val[valid]
        return T

    def jac_input(self, x):
        """J_in = the convolution matrix T, the same for every sample: (B, d_out, d_in)."""
        self.forward(x)
        T = self.conv_matrix(tuple(x.shape[1:])).astype(x.dtype)
        return array_module(x).broadcast_to(T, (x.shape[0],) + T.shape).copy()

    def jac_params(self, x):
        """J_p[(o,l), (o',c,u,t)] = delta_{o o'} cols[l, (c,u,t)]; bias block delta_{o o'}."""
        self.forward(x)
        xp = array_module(x)
        cols = self._cols
        B, L, CK = cols.shape
        C_out = self.out_channels
        eye = xp.eye(C_out, dtype=x.dtype)
        JW = (eye[None, :, None, :, None] * cols[:, None, :, None, :]).reshape(B, C_out * L, C_out * CK)
        if "bias" not in self.param_names:
            return JW
        Jb = xp.broadcast_to(eye[:, None, :], (C_out, L, C_out)).reshape(C_out * L, C_out)
        return xp.concatenate([JW, xp.broadcast_to(Jb, (B,) + Jb.shape)], axis=2)

    # ---- Kronecker factors (KFC, Grosse & Martens 2016; minilae.kfac) -----------------------------
    # The flat layout is W (C_out, C k_h k_w) row by row, then b: the rows of W~ = [W | b]. At output
    # position l, J_p = I_Cout (x) c_l^T with c_l = (cols[l], 1), so the exact block of one sample is
    # sum_{l, l'} kron(M[(., l), (., l')], c_l c_l'^T); KFC keeps the l = l' terms (spatially
    # uncorrelated derivatives) and factors their sum over the N T terms as kron(G, A) / (N T).
    def kfac_positions(self, out_shape):
        """T = H_out W_out, the number of positions summed in each factor per sample."""
        return prod(out_shape[1:])

    def kfac_input_factor(self):
        """A = sum_{b, l} c_bl c_bl^T with c_bl = (cols[b, l], 1) (the 1 only with a bias): (C k_h k_w [+1], same)."""
        return gram_with_ones(self._cols.reshape(-1, self._cols.shape[2]), "bias" in self.param_names)  # (B L) rows

    def kfac_output_factor(self, M):
        """G[o, o'] = sum_{b, l} M_b[(o, l), (o', l)] from full M (B, C_out L, C_out L): the same-position entries."""
        xp = array_module(M)
        B, C_out = M.shape[0], self.out_channels
        L = M.shape[1] // C_out
        same = xp.diagonal(M.reshape(B, C_out, L, C_out, L), axis1=2, axis2=4)  # (B, C_out, C_out, L)
        return same.sum(axis=(0, 3))

    def kfac_output_factor_from_diag(self, m):
        """G = diag(sum_{b, l} m_b[o, l]) from the diagonal m (B, C_out, H_out, W_out) alone."""
        return array_module(m).diag(m.sum(axis=(0, 2, 3)))

    def kfac_output_factor_from_sqrt(self, V):
        """G = sum_{b, k, l} V[b, k, :, l] V[b, k, :, l]^T from a square-root factor V (B, k, C_out, H_out, W_out)."""
        Vt = array_module(V).moveaxis(V.reshape(V.shape[:3] + (-1,)), 2, 3).reshape(-1, V.shape[2])
        return Vt.T @ Vt

    def __repr__(self):
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding})")


def _band(M7, dh, dw, xp):
    """band[b, h, w, o, o'] = M[b, (o, h, w), (o', h + dh, w + dw)], zero where h + dh or w + dw is outside."""
    B, C_out, Ho, Wo = M7.shape[:4]
    h0, h1, w0, w1 = max(0, -dh), min(Ho, Ho - dh), max(0, -dw), min(Wo, Wo - dw)
    band = xp.zeros((B, Ho, Wo, C_out, C_out), dtype=M7.dtype)
    if h1 <= h0 or w1 <= w0:
        return band
    sub = M7[:, :, h0:h1, w0:w1, :, h0 + dh:h1 + dh, w0 + dw:w1 + dw]
    sub = xp.diagonal(xp.diagonal(sub, axis1=2, axis2=5), axis1=2, axis2=4)  # (B, C_out, C_out', h, w)
    band[:, h0:h1, w0:w1] = sub.transpose(0, 3, 4, 1, 2)
    return band


def _shift_kernel(W, du, dt, xp):
    """W2[o, c, u, t] = W[o, c, u - du, t - dt], zero where u - du or t - dt leaves the kernel."""
    kh, kw = W.shape[2:]
    W2 = xp.zeros_like(W)
    if abs(du) < kh and abs(dt) < kw:
        W2[:, :, max(0, du):kh + min(0, du), max(0, dt):kw + min(0, dt)] = \
            W[:, :, max(0, -du):kh - max(0, du), max(0, -dt):kw - max(0, dt)]
    return W2

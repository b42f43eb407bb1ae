"""2-D transposed convolution (PyTorch's ConvTranspose2d): weight (C_in, C_out, kh, kw), images NCHW.

The layer is the adjoint of a Conv2d with the same kernel, stride and padding, used to up-sample in
decoders: every input pixel x[c, h, w] adds x[c, h, w] W[c, o, u, t] at the output position
(h s + u - p, w s + t - p), so y = col2im(W^T x) + b, cropped by the padding, with `output_padding`
extra rows/columns at the bottom/right; H_out = (H - 1) s - 2 p + k + output_padding.

Its products are plain convolutions: J_in^T v = W im2col(v) (each input pixel reads the k x k window
of v it wrote to) and J_p^T v = x im2col(v)^T. The curvature rules follow as for Conv2d: J_in * J_in
is the same map with the squared kernel and J_p * J_p holds x^2, so the diagonal rules are the layer's
own products run with squared arrays; the full-M rules are the exact defaults of Layer.
Names: (u, t) is a kernel offset, v a vector, m = diag(M), xp the array module.
"""
from __future__ import annotations


from ..backend import array_module
from .base import Layer, into, prod
from .conv import _im2col_T, _pair, init_params, set_geometry


class ConvTranspose2d(Layer):
    """y[o] = sum_c (x[c] scattered through W[c, o]) cropped by p, + b[o]; weight (C_in, C_out, kh, kw)."""

    param_names = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, bias=True,
                 rng=None):
        super().__init__()
        set_geometry(self, in_channels, out_channels, kernel_size, stride, padding)
        self.output_padding = _pair(output_padding, "output_padding")
        if any(not 0 <= op < s for op, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"ConvTranspose2d needs 0 <= output_padding < stride (as PyTorch); got "
                             f"output_padding={self.output_padding}, stride={self.stride}")
        # PyTorch's fan_in of a transposed convolution: weight.size(1) * k_h * k_w
        init_params(self, (in_channels, out_channels) + self.kernel_size, out_channels * prod(self.kernel_size),
                    bias, rng)

    def out_shape(self, in_shape):
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"{self!r} expects NCHW inputs with C={self.in_channels}; "
                             f"got per-sample shape {tuple(in_shape)}")
        Ho = self._full(in_shape[1], 0) - 2 * self.padding[0]
        Wo = self._full(in_shape[2], 1) - 2 * self.padding[1]
        if Ho < 1 or Wo < 1:
            raise ValueError(f"{self!r}: input {in_shape[1]}x{in_shape[2]} gives an empty output ({Ho}x{Wo})")
        return (self.out_channels, Ho, Wo)

    def _full(self, n, axis):
        """Rows (axis 0) or columns (1) of the uncropped output: (n - 1) s + k + output_padding."""
        return (n - 1) * self.stride[axis] + self.kernel_size[axis] + self.output_padding[axis]

    # ---- im2col of an output-shaped array ------------------------------------------------------
    def _windows_T(self, v):
        """colsT[..., (o, u, t), (h, w)] = v_full[..., o, h s + u, w s + t], v_full = v placed at offset p in
        the uncropped output (the adjoint of the crop): (..., C_out k_h k_w, H W)."""
        xp = array_module(v)
        lead, (C_out, Ho, Wo) = v.shape[:-3], v.shape[-3:]
        H, W = self._x.shape[2:]
        (ph, pw) = self.padding
        Hf, Wf = self._full(H, 0), self._full(W, 1)
        flat = v.reshape((-1, C_out, Ho, Wo))
        full = xp.zeros((flat.shape[0], C_out, Hf, Wf), dtype=v.dtype)
        full[:, :, ph:ph + Ho, pw:pw + Wo] = flat
        colsT = _im2col_T(full, self.kernel_size, self.stride, (H, W))
        return colsT.reshape(lead + colsT.shape[1:])

    # ---- forward and products ---------------------------------------------------------------
    def _forward(self, x):
        xp = array_module(x)
        B, C, H, W = x.shape
        C_out, Ho, Wo = self.out_shape(tuple(x.shape[1:]))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        d = (self.weight.reshape(C, -1).T @ x.reshape(B, C, H * W)).reshape(B, C_out, kh, kw, H, W)
        full = xp.zeros((B, C_out, self._full(H, 0), self._full(W, 1)), dtype=x.dtype)
        for u in range(kh):  # one strided add per kernel offset, never per pixel
            for t in range(kw):
                full[:, :, u:u + sh * (H - 1) + 1:sh, t:t + sw * (W - 1) + 1:sw] += d[:, :, u, t]
        y = full[:, :, ph:ph + Ho, pw:pw + Wo]
        if "bias" in self.param_names:
            y = y + self.bias[:, None, None]
        return xp.ascontiguousarray(y)

    def _vjp_input(self, v):
        """J_in^T v = W im2col(v): a strided convolution of v, (B, K, C_out, Ho, Wo) -> (B, K, C_in, H, W)."""
        return self._adjoint(v, self.weight)

    def _adjoint(self, v, kernel):
        """g[c, (h, w)] = sum_{(o,u,t)} kernel[c, o, u, t] v_full[o, h s + u, w s + t]."""
        B, K = v.shape[:2]
        C, H, W = self._x.shape[1:]
        return (kernel.reshape(C, -1) @ self._windows_T(v)).reshape(B, K, C, H, W)

    def _vjp_params(self, v, x=None):
        """Per sample: dW[c, (o,u,t)] = sum_l x[c, l] im2col(v)[(o,u,t), l],  db[o] = sum of v[o] (x: the input)."""
        xp = array_module(v)
        x = self._x if x is None else x
        B, K, C_out = v.shape[:3]
        colsT = self._windows_T(v)  # (B, K, C_out k_h k_w, L)
        gW = x.reshape(B, 1, self.in_channels, -1) @ colsT.swapaxes(-1, -2)  # (B, K, C_in, C_out k_h k_w)
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(v.reshape(B, K, C_out, -1).sum(axis=3))
        return xp.concatenate(parts, axis=2)

    # ---- curvature rules ----------------------------------------------------------------------
    def backprop_diag(self, m):
        """m_in = (J_in * J_in)^T m: the same strided convolution of m with the squared kernel W * W."""
        return self._adjoint(m[:, None], self.weight ** 2)[:, 0]

    def param_diag_from_diag(self, m, per_sample=False, out=None):
        """W[c, (o,u,t)]: sum_l x[c, l]^2 im2col(m)[(o,u,t), l];  b[o]: sum of m[o] (J_p * J_p holds x^2)."""
        d = self._vjp_params(m[:, None], self._x ** 2)[:, 0]
        return d if per_sample else into(out, d.sum(axis=0))

    def cost_geometry(self, in_shape, out_shape):
        """The products are convolutions over the L = H W input positions with C_out k_h k_w windows."""
        L, C, OK = prod(in_shape[1:]), self.in_channels, self.out_channels * prod(self.kernel_size)
        return dict(kind="conv_transpose", L=L, Co=C, CK=OK, vjp_flops=2 * L * C * OK + L * OK, vjp_work=L * OK)

    # ---- dense Jacobians --------------------------------------------------------------------
    def _scatter_index(self, in_shape):
        """For every (c, h, w, o, u, t) that lands inside the output: the flat output row (o, r, q) with
        r = h s + u - p, q = w s + t - p, and the (c, o, u, t) and (c, h, w) it comes from - flat index arrays."""
        xp = array_module(self.weight)
        C, H, W = in_shape
        C_out, Ho, Wo = self.out_shape(tuple(in_shape))
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        c, h, w, o, u, t = xp.ix_(*(xp.arange(n) for n in (C, H, W, C_out, kh, kw)))
        r, q = h * sh + u - ph, w * sw + t - pw
        shape = (C, H, W, C_out, kh, kw)
        valid = xp.broadcast_to((r >= 0) & (r < Ho) & (q >= 0) & (q < Wo), shape)
        row = xp.broadcast_to((o * Ho + r) * Wo + q, shape)[valid]
        weight = xp.broadcast_to(((c * C_out + o) * kh + u) * kw + t, shape)[valid]
        pixel = xp.broadcast_to((c * H + h) * W + w, shape)[valid]
        return row, weight, pixel

    def jac_input(self, x):
        """J_in[(o, r, q), (c, h, w)] = W[c, o, u, t] with (r, q) = (h s + u - p, w s + t - p): (B, d_out, d_in)."""
        xp = array_module(x)
        self.forward(x)
        row, weight, pixel = self._scatter_index(tuple(x.shape[1:]))
        T = xp.zeros((prod(self.out_shape(tuple(x.shape[1:]))), prod(x.shape[1:])), dtype=x.dtype)
        T[row, pixel] = self.weight.ravel()[weight]  # each (row, pixel) pair occurs at most once
        return xp.broadcast_to(T, (x.shape[0],) + T.shape).copy()

    def jac_params(self, x):
        """J_p[(o, r, q), (c, o, u, t)] = x[c, h, w] with (r, q) = (h s + u - p, w s + t - p); bias block 1."""
        xp = array_module(x)
        self.forward(x)
        B, d_out = x.shape[0], prod(self.out_shape(tuple(x.shape[1:])))
        row, weight, pixel = self._scatter_index(tuple(x.shape[1:]))
        J = xp.zeros((B, d_out, self.num_params), dtype=x.dtype)
        J[:, row, weight] = x.reshape(B, -1)[:, pixel]  # each (row, weight) pair occurs at most once
        if "bias" in self.param_names:
            o = xp.arange(d_out) // (d_out // self.out_channels)
            J[:, xp.arange(d_out), self.weight.size + o] = 1.0
        return J

    def __repr__(self):
        return (f"ConvTranspose2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, output_padding={self.output_padding})")

"""Linear layer y = W x + b (PyTorch layout: W has shape (out, in)).

J_in = W for every sample and J_p[o, (o', i)] = delta_{o o'} x_i (bias: I), so every curvature rule is
a small matrix product: M_in = W^T M W, m_in = (W * W)^T m, and a weight's diagonal M_oo x_i^2 needs only
diag(M), whatever form M is held in.
"""
from __future__ import annotations

import numpy as np

from ..backend import array_module
from .base import Layer, diag_of, flat_out, gram_with_ones, init_uniform


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
        # as one (B K x out) @ (out x in) product: NumPy's stacked matmul of (B, 1, out) would run B vector
        # products, each reading all of W (MLP AE, 784 x 512: 1.32 ms against 0.31 ms)
        B, K = v.shape[:2]
        return (v.reshape(B * K, self.out_features) @ self.weight).reshape(B, K, self.in_features)

    def _vjp_params(self, v):
        """J_p^T v = (v x^T, v) per sample, flattened."""
        xp = array_module(v)
        B, K = v.shape[:2]
        gW = v[:, :, :, None] * self._x[:, None, None, :]
        parts = [gW.reshape(B, K, -1)]
        if "bias" in self.param_names:
            parts.append(v)
        return xp.concatenate(parts, axis=2)

    def _vjp_params_sum(self, v, out=None):
        """sum_b (v_b x_b^T, v_b): one matrix product for the batch, written into the flat vector's views."""
        return self._weight_and_bias_sums(v, self._x, out)

    def _weight_and_bias_sums(self, v, x, out):
        """(v^T x, sum_b v_b) written into the weight and bias views of the flat out (a new one if None): no
        per-layer concatenation, and out may be the layer's slice of the chain's flat vector."""
        out = flat_out(self, out, v.dtype)
        gW, *gb = self.split_params(out)
        array_module(v).matmul(v.T, x, out=gW)
        if gb:
            v.sum(axis=0, out=gb[0])
        return out

    # ---- curvature rules ----------------------------------------------------------------------
    def backprop_full(self, M):
        """M_in = W^T M W."""
        return self.weight.T @ (M @ self.weight)

    def backprop_diag(self, m):
        """m_in = (W * W)^T m."""
        return m @ self.weight ** 2

    def backprop_constant_diag(self, m):
        """m_in[b, i] = c sum_o W[o, i]^2, the same for every image: no product with the batch."""
        xp = array_module(self.weight)
        m_in = xp.empty((m.shape[0], self.in_features), dtype=m.dtype)
        m_in[...] = xp.einsum("oi,oi->i", self.weight, self.weight) * m.value
        return m_in

    def diag_of_backprop(self, M):
        """m_in[i] = sum_o W[o, i] (M W)[o, i]."""
        return ((M @ self.weight) * self.weight).sum(axis=1)

    def backprop_from_diag(self, m):
        """M_in = W^T diag(m) W."""
        return (self.weight.T * m[:, None, :]) @ self.weight

    def backprop_from_constant_diag(self, m):
        """M_in = c W^T W, the same for every image: one product instead of B (the MLP AE's exact diagonal
        starts here, 512 x 784 x 512 multiply-adds per image)."""
        xp = array_module(self.weight)
        M_in = xp.empty((m.shape[0], self.in_features, self.in_features), dtype=m.dtype)
        M_in[...] = (self.weight.T * m.value) @ self.weight
        return M_in

    def param_diag_from_diag(self, m, per_sample=False, out=None):
        """W[o, i]: m_o x_i^2;  b[o]: m_o (the batch sum into out if given)."""
        xp = array_module(m)
        x2 = self._cached_input() ** 2
        if not per_sample:
            return self._weight_and_bias_sums(m, x2, out)
        parts = [(m[:, :, None] * x2[:, None, :]).reshape(m.shape[0], -1)]
        if "bias" in self.param_names:
            parts.append(m)
        return xp.concatenate(parts, axis=-1)

    def param_diag_from_constant(self, m, out=None):
        """W[o, i]: c sum_b x_bi^2, the same in every row o;  b[o]: c B. No product with the batch."""
        x = self._cached_input()
        out = flat_out(self, out, m.dtype)
        gW, *gb = self.split_params(out)
        gW[...] = array_module(x).einsum("bi,bi->i", x, x) * m.value
        if gb:
            gb[0][...] = m.value * x.shape[0]
        return out

    def param_diag(self, M, per_sample=False):
        """J_p touches one output per weight, so only diag(M) enters: W[o, i]: M_oo x_i^2;  b[o]: M_oo."""
        return self.param_diag_from_diag(diag_of(M, (self.out_features,)), per_sample)

    def param_diag_from_sqrt(self, V, per_sample=False):
        """As param_diag, with diag(M) = sum_k v_k^2."""
        return self.param_diag_from_diag((V ** 2).sum(axis=1), per_sample)

    def cost_geometry(self, in_shape, out_shape):
        """J_in^T v = W^T v: a dense (out x in) product."""
        return dict(kind="linear", vjp_flops=2 * self.in_features * self.out_features, vjp_work=self.in_features)

    # ---- dense Jacobians --------------------------------------------------------------------
    def input_rows(self, dtype):
        """The rows of J_in = W for every sample, a broadcast view (B, out, in): no product with unit vectors."""
        W = self.weight.astype(dtype, copy=False)
        return array_module(W).broadcast_to(W, (self._cached_input().shape[0],) + W.shape)

    def jac_input(self, x):
        """J_in = W for every sample: (B, out, in)."""
        self.forward(x)
        xp = array_module(x)
        return xp.broadcast_to(self.weight, (x.shape[0],) + self.weight.shape).copy()

    def jac_params(self, x):
        """J_p[o, (o', i)] = delta_{o o'} x_i; bias block = I: (B, out, out*in [+ out])."""
        self.forward(x)
        xp = array_module(x)
        B, n_in, n_out = x.shape[0], self.in_features, self.out_features
        eye = xp.eye(n_out, dtype=x.dtype)
        JW = (eye[None, :, :, None] * x[:, None, None, :]).reshape(B, n_out, n_out * n_in)
        if "bias" not in self.param_names:
            return JW
        return xp.concatenate([JW, xp.broadcast_to(eye, (B, n_out, n_out))], axis=2)

    # ---- Kronecker factors (KFAC, minilae.kfac) -------------------------------------------------
    # The flat layout is W (out, in) row by row, then b: the rows of W~ = [W | b], so J_p = I_out (x) a^T with
    # a = (x, 1), and the block J_p^T M J_p of one sample is exactly kron(M, a a^T).
    def kfac_positions(self, out_shape):
        """T = 1: one term per sample in each factor (one input vector per sample)."""
        return 1

    def kfac_input_factor(self):
        """A = sum_b a_b a_b^T with a_b = (x_b, 1) (the 1 only with a bias): (in [+1], in [+1])."""
        return gram_with_ones(self._cached_input(), "bias" in self.param_names)

    def kfac_output_factor(self, M):
        """G = sum_b M_b, the output curvature summed over the batch, from full M (B, out, out)."""
        return M.sum(axis=0)

    def kfac_output_factor_from_diag(self, m):
        """G = diag(sum_b m_b) from the diagonal m (B, out) alone (approximate where M is not diagonal)."""
        return array_module(m).diag(m.sum(axis=0))

    def kfac_output_factor_from_sqrt(self, V):
        """G = sum_b V_b^T V_b from a square-root factor V (B, k, out) of M."""
        Vf = V.reshape(-1, V.shape[-1])
        return Vf.T @ Vf

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features})"

"""Exact GGN by Algorithm 1 (appendix E.4) with the full M, per sample (B, d, d).

    M_L = H_out(f, y),   M_{l-1} = J_in^T M_l J_in,   H_{theta_l} = J_p^T M_l J_p.

Pushing M through J_in needs J_in^T applied to M's d_out rows and then to the d_in columns of the
result, so the cost is B d_out d_in (d_out + d_in) for a dense layer and the memory B d^2: quadratic in
the number of features. That is why this form is for small networks (or for the layers near the
bottleneck, see `mixed`). Two things are read off M at a parametric layer:
  * the block J_p^T M J_p (P x P; `param_block`), or
  * only its diagonal (`param_diag_from_full`), computed without ever forming the block.
"""
from __future__ import annotations

from functools import singledispatch

from ..backend import array_module
from ..layers import Conv2d, Dropout, Elementwise, Linear, Reshape
from .approx import param_diag_from_diag, unsupported
from .chain import check_memory, concat_parts, diag_of, rows_as_features, size, vjp_rows
from .cost import geometry, step_cost


# ---- M_in = J_in^T M J_in ---------------------------------------------------------------------

@singledispatch
def propagate_full(layer, M):
    """M_in = J_in^T M J_in, (B, d_out, d_out) -> (B, d_in, d_in), with the layer's own J_in^T products.

    Rows first: J_in^T applied to row k of M is row k of M J_in, giving A = M J_in (B, d_out, d_in).
    Then J_in^T applied to column j of A is column j of J_in^T M J_in, which is symmetric.
    """
    B, d_out = M.shape[:2]
    in_shape, out_shape = tuple(layer._x.shape[1:]), layer.out_shape(tuple(layer._x.shape[1:]))
    work = geometry(layer, in_shape, out_shape)["vjp_work"]
    A = vjp_rows(layer, rows_as_features(M, out_shape), work).reshape(B, d_out, -1)  # M J_in
    A_t = A.transpose(0, 2, 1).reshape((B, A.shape[2]) + tuple(out_shape))  # columns of M J_in
    del A
    return vjp_rows(layer, A_t, work).reshape(B, size(in_shape), size(in_shape))


@propagate_full.register
def _(layer: Linear, M):
    """M_in = W^T M W."""
    return layer.weight.T @ (M @ layer.weight)


@propagate_full.register
def _(layer: Elementwise, M):
    """M_in = D M D with D = diag(sigma'(x))."""
    d = layer.derivative(layer._x).reshape(M.shape[0], -1)
    return d[:, :, None] * M * d[:, None, :]


@propagate_full.register
def _(layer: Dropout, M):
    """M_in = D M D with D = diag(mask / (1 - p)) (M itself in evaluation mode)."""
    if layer.scale is None:
        return M
    d = layer.scale.reshape(M.shape[0], -1)
    return d[:, :, None] * M * d[:, None, :]


@propagate_full.register
def _(layer: Reshape, M):
    """A reshape keeps the flat order, so J_in = I and M_in = M."""
    return M


# ---- diag(J_p^T M J_p), never forming the block -------------------------------------------------

@singledispatch
def param_diag_from_full(layer, M, per_sample=False):
    """diag(J_p^T M J_p): summed over the batch (P,) or per sample (B, P)."""
    raise unsupported(layer, "param_diag_from_full")


@param_diag_from_full.register
def _(layer: Linear, M, per_sample=False):
    """J_p[o, (o', i)] = delta_{o o'} x_i touches one output per weight, so only diag(M) enters: M_oo x_i^2."""
    return param_diag_from_diag(layer, diag_of(M, (layer.out_features,)), per_sample)


@param_diag_from_full.register
def _(layer: Conv2d, M, per_sample=False):
    """W[o, k]: sum_{l, l'} cols[l, k] M[(o,l), (o,l')] cols[l', k];  b[o]: sum_{l, l'} M[(o,l), (o,l')].

    Only the C_out diagonal (L x L) blocks of M between positions of the same output channel enter.
    """
    xp = array_module(M)
    B, C_out, cols = M.shape[0], layer.out_channels, layer._cols  # cols (B, L, C k_h k_w)
    L = cols.shape[1]
    M_oo = xp.diagonal(M.reshape(B, C_out, L, C_out, L), axis1=1, axis2=3)  # (B, L, L, C_out)
    M_oo = xp.moveaxis(M_oo, 3, 1)  # (B, C_out, L, L)
    MC = M_oo @ cols[:, None]  # (B, C_out, L, C k_h k_w)
    parts = [(cols[:, None] * MC).sum(axis=2).reshape(B, -1)]
    if "bias" in layer.param_names:
        parts.append(M_oo.sum(axis=(2, 3)))
    out = xp.concatenate(parts, axis=-1)
    return out if per_sample else out.sum(axis=0)


# ---- the block J_p^T M J_p ----------------------------------------------------------------------

def dense_param_jacobian(layer, batch, dtype, xp):
    """J_p per sample, (B, d_out, P), as J_p^T applied to the d_out unit vectors."""
    out_shape = layer.out_shape(tuple(layer._x.shape[1:]))
    d_out = size(out_shape)
    eye = xp.broadcast_to(xp.eye(d_out, dtype=dtype), (batch, d_out, d_out))
    return layer.vjp_params(eye.reshape((batch, d_out) + tuple(out_shape)), per_sample=True)


def param_block(layer, M, per_sample=False):
    """H_theta = J_p^T M J_p: summed over the batch (P, P) or per sample (B, P, P)."""
    xp = array_module(M)
    B, d_out = M.shape[:2]
    J = dense_param_jacobian(layer, B, M.dtype, xp)  # (B, d_out, P)
    MJ = M @ J
    if per_sample:
        return J.transpose(0, 2, 1) @ MJ
    P = J.shape[2]
    return J.reshape(B * d_out, P).T @ MJ.reshape(B * d_out, P)  # one product sums over the batch


# ---- the walks --------------------------------------------------------------------------------

def _walk(layers, shapes, M, budget, read_off, block):
    """Algorithm 1 with full M: read each parametric layer's part off M_l, then M_{l-1} = J_in^T M_l J_in."""
    parts, B = [], M.shape[0]
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, ("full", None), ("full", None) if i > 0 else None,
                         M.dtype.itemsize, index=i, block=block)
        check_memory(cost.peak_bytes, budget, f"the exact GGN at layer {i} ({layer!r}), full M of "
                                              f"{cost.d_out} x {cost.d_out} per sample, batch {B},")
        if layer.num_params:
            parts.append(read_off(layer, M))
        if i > 0:
            M = propagate_full(layer, M)
    return parts[::-1]


def exact_diagonal(layers, shapes, M, budget, per_sample=False):
    """Exact diagonal of the GGN: full M propagated, only the diagonal of each block computed."""
    xp = array_module(M)
    parts = _walk(layers, shapes, M, budget, lambda layer, M_l: param_diag_from_full(layer, M_l, per_sample),
                  block=False)
    return concat_parts(parts, per_sample, M.shape[0], M.dtype, xp)


def exact_blocks(layers, shapes, M, budget, per_sample=False):
    """Exact block-diagonal GGN: one dense J_p^T M J_p per parametric layer, in layer order."""
    return _walk(layers, shapes, M, budget, lambda layer, M_l: param_block(layer, M_l, per_sample), block=True)

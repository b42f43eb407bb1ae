"""Mixed diagonal GGN: full M where a feature is small (near the bottleneck), diagonal M elsewhere.

Walking back through a layer, M changes form exactly at that layer:
  full -> full   M_in = J_in^T M J_in                      (exact.propagate_full)
  diag -> diag   m_in = (J_in * J_in)^T m                  (approx.propagate_diag)
  full -> diag   m_in = diag(J_in^T M J_in), exact, without the d_in x d_in matrix  (`diag_of_propagated`)
  diag -> full   M_in = J_in^T diag(m) J_in, exact                                  (`full_from_diag`)
so the only approximation is dropping off-diagonal terms where M is held as a diagonal.
"""
from __future__ import annotations

from functools import singledispatch

from ..backend import array_module
from ..layers import Conv2d, Dropout, Elementwise, Linear, MaxPool2d, Reshape, Upsample
from .approx import param_diag_from_diag, propagate_diag, unsupported
from .chain import check_memory, concat_parts, diag_matrix, diag_of, size
from .cost import plan_forms, step_cost
from .exact import param_diag_from_full, propagate_full


# ---- full -> diag -------------------------------------------------------------------------------

@singledispatch
def diag_of_propagated(layer, M):
    """m_in = diag(J_in^T M J_in) for full M (B, d_out, d_out) -> (B, *in)."""
    raise unsupported(layer, "diag_of_propagated")


@diag_of_propagated.register(Elementwise)
@diag_of_propagated.register(Dropout)
@diag_of_propagated.register(Reshape)
@diag_of_propagated.register(MaxPool2d)
def _(layer, M):
    """Each input reaches at most one output (column of J_in with one non-zero), so only diag(M) enters."""
    return propagate_diag(layer, diag_of(M, layer.out_shape(tuple(layer._x.shape[1:]))))


@diag_of_propagated.register
def _(layer: Upsample, M):
    """An input is copied to s^2 outputs; d_in < d_out, so forming J_in^T M J_in costs less than M itself."""
    return diag_of(propagate_full(layer, M), tuple(layer._x.shape[1:]))


@diag_of_propagated.register
def _(layer: Linear, M):
    """m_in[i] = sum_o W[o, i] (M W)[o, i]."""
    W = layer.weight
    return ((M @ W) * W).sum(axis=1)


@diag_of_propagated.register
def _(layer: Conv2d, M):
    """diag(T^T M T) from the bands of M that one input pixel sees.

    Input pixel (c, R) is read by output (o, h) through kernel offset u when R = h s + u. Two outputs
    (o, h) and (o', h') read it through offsets u and u' = u - s (h' - h), so only the bands
    M[(o, h), (o', h + dh)] with |dh| <= (k - 1) / s enter. For each shift (dh, dw):
        E[l, (c,u,v)] = sum_o W[o,c,u,v] sum_o' band[o, o', l] W[o', c, u - s dh, v - s dw],
    and the sum of E over shifts, scattered back like a gradient (col2im), is the diagonal.
    """
    xp = array_module(M)
    B = M.shape[0]
    in_shape = tuple(layer._x.shape[1:])
    C_out, Ho, Wo = layer.out_shape(in_shape)
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    W = layer.weight
    M7 = M.reshape(B, C_out, Ho, Wo, C_out, Ho, Wo)
    dcols = xp.zeros((B, Ho, Wo, C_out, W[0].size), dtype=M.dtype)
    for dh in range(-((kh - 1) // sh), (kh - 1) // sh + 1):  # loops over kernel shifts only
        for dw in range(-((kw - 1) // sw), (kw - 1) // sw + 1):
            band = _band(M7, dh, dw, xp)  # (B, Ho, Wo, C_out, C_out')
            W2 = _shift_kernel(W, sh * dh, sw * dw, xp).reshape(C_out, -1)
            dcols += band @ W2  # (B, Ho, Wo, C_out, C k_h k_w)
    E = (dcols * W.reshape(C_out, -1)).sum(axis=3)  # (B, Ho, Wo, C k_h k_w)
    return layer.col2im(E.reshape(B, Ho * Wo, -1), in_shape)


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


def _shift_kernel(W, du, dv, xp):
    """W2[o, c, u, v] = W[o, c, u - du, v - dv], zero where u - du or v - dv leaves the kernel."""
    kh, kw = W.shape[2:]
    W2 = xp.zeros_like(W)
    if abs(du) < kh and abs(dv) < kw:
        W2[:, :, max(0, du):kh + min(0, du), max(0, dv):kw + min(0, dv)] = \
            W[:, :, max(0, -du):kh - max(0, du), max(0, -dv):kw - max(0, dv)]
    return W2


# ---- diag -> full -------------------------------------------------------------------------------

@singledispatch
def full_from_diag(layer, m):
    """M_in = J_in^T diag(m) J_in for m (B, *out) -> (B, d_in, d_in)."""
    raise unsupported(layer, "full_from_diag")


@full_from_diag.register(Elementwise)
@full_from_diag.register(Dropout)
@full_from_diag.register(Reshape)
@full_from_diag.register(MaxPool2d)
@full_from_diag.register(Upsample)
def _(layer, m):
    """Each output reads one input (row of J_in with one non-zero), so J_in^T diag(m) J_in is diagonal."""
    return diag_matrix(propagate_diag(layer, m))


@full_from_diag.register
def _(layer: Linear, m):
    """M_in = W^T diag(m) W."""
    W = layer.weight
    return (W.T * m[:, None, :]) @ W


@full_from_diag.register
def _(layer: Conv2d, m):
    """M_in[(c,R), (c',R')] = sum_{o,h} m[o,h] W[o,c,R - h s] W[o,c',R' - h s] (2-D positions).

    For each kernel offset (u, v) of the row pixel, one product gives
        G[l, c, (c',u',v')] = sum_o m[o, l] W[o,c,u,v] W[o,c',u',v'],
    added at row (c, h s + u, w s + v) and column (c', h s + u', w s + v') of the padded M_in:
    distinct positions l hit distinct rows, so the indexed add has no collisions.
    """
    xp = array_module(m)
    B = m.shape[0]
    C, H, Wd = layer._x.shape[1:]
    C_out, Ho, Wo = layer.out_shape((C, H, Wd))
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    Hp, Wp = H + 2 * ph, Wd + 2 * pw
    W = layer.weight
    ml = m.reshape(B, C_out, Ho * Wo).transpose(0, 2, 1)  # (B, L, C_out)
    R = xp.zeros((B, C, Hp, Wp, C, Hp, Wp), dtype=m.dtype)
    h = (xp.arange(Ho) * sh)[:, None, None, None]
    w = (xp.arange(Wo) * sw)[None, :, None, None]
    col_r = h + xp.arange(kh)[None, None, :, None]  # (Ho, 1, kh, 1): column pixel rows h s + u'
    col_q = w + xp.arange(kw)[None, None, None, :]
    for u in range(kh):  # loops over kernel offsets only
        for v in range(kw):
            WW = (W[:, :, u, v][:, :, None] * W.reshape(C_out, 1, -1)).reshape(C_out, -1)  # (C_out, C C k_h k_w)
            G = (ml @ WW).reshape(B, Ho, Wo, C, C, kh, kw)
            R[:, :, h + u, w + v, :, col_r, col_q] += G.transpose(1, 2, 5, 6, 0, 3, 4)
    R = R[:, :, ph:ph + H, pw:pw + Wd, :, ph:ph + H, pw:pw + Wd]
    return R.reshape(B, C * H * Wd, C * H * Wd)


# ---- the walk ---------------------------------------------------------------------------------

STEPS = {("full", "full"): propagate_full, ("full", "diag"): diag_of_propagated,
         ("diag", "full"): full_from_diag, ("diag", "diag"): propagate_diag}


def mixed_diagonal(layers, shapes, M, threshold, budget, per_sample=False):
    """Algorithm 1 with M full at features of size <= threshold and diagonal elsewhere.

    M is the output Hessian in the form `plan_forms('mixed', ...)` gives the output feature.
    """
    xp = array_module(M)
    forms = plan_forms("mixed", [size(s) for s in shapes], threshold)
    parts, B = [], M.shape[0]
    for i in range(len(layers) - 1, -1, -1):
        layer, form = layers[i], forms[i + 1][0]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if i > 0 else None,
                         M.dtype.itemsize, index=i)
        check_memory(cost.peak_bytes, budget, f"the mixed GGN at layer {i} ({layer!r}, M {cost.form_out} -> "
                                              f"{cost.form_in}), batch {B},")
        if layer.num_params:
            read_off = param_diag_from_full if form == "full" else param_diag_from_diag
            parts.append(read_off(layer, M, per_sample))
        if i > 0:
            M = STEPS[(form, forms[i][0])](layer, M)
    return concat_parts(parts[::-1], per_sample, B, M.dtype, xp)

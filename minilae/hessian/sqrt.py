"""Exact diagonal GGN through a square-root factor M = S S^T, chosen per layer when it is smaller.

With H_out = S S^T (S of size d x k per sample, `likelihood.hess_sqrt`), every M_l factors as
    M_l = S_l S_l^T,   S_{l-1} = J_in^T S_l,
so pushing M back is k ordinary backprops (memory B k d instead of B d^2), and
    diag(J_p^T M J_p) = sum_k (J_p^T s_k)^2            (each layer's `param_diag_from_sqrt`).
We hold the factor transposed, V = S^T of shape (B, k, *features), which is exactly the batch of k
vectors a layer's `vjp_input` takes. Per feature the smaller form wins (`plan_forms('sqrt', ...)`): a
factor with more columns than rows is multiplied out (M = V^T V), and a full M in front of a widening
layer is factored by its eigendecomposition, M = U diag(lambda) U^T = V^T V with V = sqrt(lambda) U^T.
Through an autoencoder this means the encoder sees a factor with k = latent size columns.
"""
from __future__ import annotations

from ..backend import array_module
from ..layers.base import ConstantDiag
from .chain import (check_memory, concat_parts, diag_read_off, diag_step, full_from_diag_step, lowest_parametric,
                    size)
from .cost import plan_forms, sqrt_forms_below, step_cost


def factor_of(M, shape):
    """V (B, d, *shape) with V^T V = M, from the eigendecomposition (M is PSD; round-off negatives -> 0)."""
    xp = array_module(M)
    lam, U = xp.linalg.eigh(M)
    V = xp.sqrt(xp.maximum(lam, 0))[:, :, None] * U.transpose(0, 2, 1)
    return V.reshape(V.shape[:2] + tuple(shape))


def full_of(V):
    """M = V^T V for V (B, k, *shape): (B, d, d)."""
    Vf = V.reshape(V.shape[0], V.shape[1], -1)
    return Vf.transpose(0, 2, 1) @ Vf


def _diagonal_head(layers, shapes, m, budget, per_sample, planned):
    """The top of the walk while M = diag(m) exactly: a layer with one input per output keeps M diagonal,
    m_in = (J_in * J_in)^T m; the first layer without that structure gets M_in = J_in^T diag(m) J_in, or its
    factor diag(sqrt(m)) J_in when d_out < d_in (M_in would be larger). Parameters are read off diag(m) exactly.
    m may be a ConstantDiag (a Gaussian's I / sigma^2): then the MLP AE's last Linear forms c W^T W once for
    the batch instead of W^T diag(m_b) W per image (60% of its exact diagonal at batch 16).

    Returns (parts, i, M, form): the parameter diagonals from the top, the feature x_i that M belongs to, M
    there and its form (('full', None): (B, d, d); ('sqrt', k): a factor (B, k, *shape)). Why: a Gaussian's
    H_out = I pushed as a factor costs d_out GEMM columns per sample at the last Linear, 40 of the MLP AE's
    80 GFLOP at batch 64; from diag(m) that layer's M_in = W^T diag(m) W costs 26."""
    parts, B, stop = [], m.shape[0], lowest_parametric(layers)
    for i in range(len(layers) - 1, stop - 1, -1):
        layer = layers[i]
        _check_step(layers, shapes, planned, i, B, m.dtype.itemsize, budget)
        if layer.num_params:
            parts.append(diag_read_off(layer, m, per_sample))
        if i == stop:
            return parts, stop, None, ("full", None)
        if not layer.one_input_per_output:
            d_out, d_in = size(shapes[i + 1]), size(shapes[i])
            if d_out < d_in:  # the factor (d_out columns) is smaller than M_in (d_in^2)
                m = m.full() if isinstance(m, ConstantDiag) else m
                sqrt_m = array_module(m).sqrt(m).reshape(B, d_out, 1)
                V = (sqrt_m * layer.input_rows(m.dtype)).reshape((B, d_out) + tuple(shapes[i]))
                return parts, i, V, ("sqrt", d_out)
            return parts, i, full_from_diag_step(layer, m), ("full", None)
        m = diag_step(layer, m)


def _check_step(layers, shapes, forms, i, B, itemsize, budget):
    """Refuse layer i's step (MemoryBudgetError) when its row of the plan exceeds the budget."""
    below = i > lowest_parametric(layers)
    cost = step_cost(layers[i], shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if below else None, itemsize,
                     index=i)
    check_memory(cost.peak_bytes, budget, f"the square-root GGN at layer {i} ({layers[i]!r}, M {cost.form_out} "
                                          f"-> {cost.form_in}), batch {B},")


def sqrt_diagonal(layers, shapes, likelihood, f, y, budget, per_sample=False):
    """Exact diagonal GGN, walking back with V (B, k, *out) = S^T or a full M, whichever is smaller.

    Starts from diag(H_out) where the likelihood's Hessian is diagonal (Gaussian, Bernoulli), else from its
    factor S of H_out (k = d columns for Categorical) or H_out itself where the plan starts with a full M.
    """
    xp = array_module(f)
    B, d = f.shape[0], size(f.shape[1:])
    sizes = [size(s) for s in shapes]
    forms = plan_forms("sqrt", sizes, k_out=d)
    planned = list(forms)  # the memory checks follow estimate_cost's plan, so estimate and refusal agree
    check_memory(B * d * d * f.dtype.itemsize, budget, f"the output Hessian ({d} x {d} per sample, batch {B})")
    if likelihood.diagonal_hessian:  # M stays diagonal down to the first mixing layer: no factor of I to push
        c = likelihood.hess_diag_value(f, y)
        m = likelihood.hess_diag(f, y) if c is None else ConstantDiag(c, tuple(f.shape), f)
        parts, top, M, forms[top] = _diagonal_head(layers, shapes, m, budget, per_sample, planned)
        sqrt_forms_below(forms, sizes, top)
    else:
        parts, top = [], len(layers)
        if forms[-1][0] == "full":
            M = likelihood.output_curvature(f, y)
        else:
            S = likelihood.hess_sqrt(f, y)  # (B, d, k)
            M = S.transpose(0, 2, 1).reshape((B, S.shape[2]) + tuple(f.shape[1:]))
            if S.shape[2] != d:  # a factor with other than d columns: plan again with its k
                forms = plan_forms("sqrt", sizes, k_out=S.shape[2])
                planned = list(forms)
                M = full_of(M) if forms[-1][0] == "full" else M
    stop = lowest_parametric(layers)
    for i in range(top - 1, stop - 1, -1):
        layer, (form, _) = layers[i], forms[i + 1]
        _check_step(layers, shapes, planned, i, B, M.dtype.itemsize, budget)
        if layer.num_params:
            read_off = layer.param_diag if form == "full" else layer.param_diag_from_sqrt
            parts.append(read_off(M, per_sample))
        if i == stop:
            break
        if form == "full" and forms[i][0] == "full":
            M = layer.backprop_full(M)
        elif form == "full":  # the chain widens: factor, then push the d_out columns
            M = layer.vjp_input_chunked(factor_of(M, shapes[i + 1]))
        else:
            M = layer.vjp_input_chunked(M)
            if forms[i][0] == "full":
                M = full_of(M)
    return concat_parts(parts[::-1], per_sample, B, f.dtype, xp)

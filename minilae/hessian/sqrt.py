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
from .chain import check_memory, concat_parts, diagonal_head, lowest_parametric, output_diagonal, size
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


def _check_step(layers, shapes, forms, i, B, itemsize, budget, stop):
    """Refuse layer i's step (MemoryBudgetError) when its row of the plan exceeds the budget (stop: where the
    walk ends, `lowest_parametric`)."""
    cost = step_cost(layers[i], shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if i > stop else None, itemsize,
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
    stop = lowest_parametric(layers)
    check_memory(B * d * d * f.dtype.itemsize, budget, f"the output Hessian ({d} x {d} per sample, batch {B})")
    if likelihood.diagonal_hessian:  # M stays diagonal down to the first mixing layer: no factor of I to push
        m = output_diagonal(likelihood, f, y)
        parts, top, M, forms[top] = diagonal_head(
            layers, shapes, m, per_sample,
            lambda i: _check_step(layers, shapes, planned, i, B, m.dtype.itemsize, budget, stop))
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
    for i in range(top - 1, stop - 1, -1):
        layer, (form, _) = layers[i], forms[i + 1]
        _check_step(layers, shapes, planned, i, B, M.dtype.itemsize, budget, stop)
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

"""Exact diagonal GGN through a square-root factor M = S S^T, chosen per layer when it is smaller.

With H_out = S S^T (S of size d x k per sample, `likelihood.hess_sqrt`), every M_l factors as
    M_l = S_l S_l^T,   S_{l-1} = J_in^T S_l,
so pushing M back is k ordinary backprops (memory B k d instead of B d^2), and
    diag(J_p^T M J_p) = sum_k (J_p^T s_k)^2.
We hold the factor transposed, V = S^T of shape (B, k, *features), which is exactly the batch of k
vectors a layer's `vjp_input` takes. Per feature the smaller form wins (`plan_forms('sqrt', ...)`): a
factor with more columns than rows is multiplied out (M = V^T V), and a full M in front of a widening
layer is factored by its eigendecomposition, M = U diag(lambda) U^T = V^T V with V = sqrt(lambda) U^T.
Through an autoencoder this means the encoder sees a factor with k = latent size columns.
"""
from __future__ import annotations

from functools import singledispatch

from ..backend import array_module
from ..layers import Conv2d, Linear
from .approx import param_diag_from_diag
from .chain import CHUNK_BYTES, check_memory, concat_parts, size, vjp_rows
from .cost import geometry, plan_forms, step_cost
from .exact import param_diag_from_full, propagate_full


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


@singledispatch
def param_diag_from_sqrt(layer, V, per_sample=False):
    """diag(J_p^T V^T V J_p) = sum_k (J_p^T v_k)^2, in chunks of k: (P,) or (B, P)."""
    xp = array_module(V)
    B, K = V.shape[:2]
    step = max(1, int(CHUNK_BYTES // max(1, B * layer.num_params * V.dtype.itemsize)))
    out = xp.zeros((B, layer.num_params), dtype=V.dtype)
    for k in range(0, K, step):  # chunks of columns bound the (B, k, P) temporary
        out += (layer.vjp_params(V[:, k:k + step], per_sample=True) ** 2).sum(axis=1)
    return out if per_sample else out.sum(axis=0)


@param_diag_from_sqrt.register
def _(layer: Linear, V, per_sample=False):
    """A Linear layer needs only diag(M) = sum_k v_k^2 (see exact.param_diag_from_full)."""
    return param_diag_from_diag(layer, (V ** 2).sum(axis=1), per_sample)


@param_diag_from_sqrt.register
def _(layer: Conv2d, V, per_sample=False):
    """W[o, k']: sum_k (sum_l V[k, o, l] cols[l, k'])^2;  b[o]: sum_k (sum_l V[k, o, l])^2.

    One (K C_out x L) @ (L x C k_h k_w) product per sample and chunk of columns k.
    """
    xp = array_module(V)
    B, K, C_out = V.shape[:3]
    cols = layer._cols  # (B, L, C k_h k_w)
    L, CK = cols.shape[1:]
    step = max(1, int(CHUNK_BYTES // max(1, B * C_out * (CK + L) * V.dtype.itemsize)))
    gW = xp.zeros((B, C_out, CK), dtype=V.dtype)
    gb = xp.zeros((B, C_out), dtype=V.dtype)
    for k in range(0, K, step):  # chunks of columns bound the (B, k, C_out, C k_h k_w) temporary
        Vk = V[:, k:k + step].reshape(B, -1, L)  # (B, k C_out, L)
        gW += ((Vk @ cols).reshape(B, -1, C_out, CK) ** 2).sum(axis=1)
        gb += (Vk.sum(axis=2).reshape(B, -1, C_out) ** 2).sum(axis=1)
    parts = [gW.reshape(B, -1)] + ([gb] if "bias" in layer.param_names else [])
    out = xp.concatenate(parts, axis=1)
    return out if per_sample else out.sum(axis=0)


def sqrt_diagonal(layers, shapes, likelihood, f, y, budget, per_sample=False):
    """Exact diagonal GGN, walking back with V (B, k, *out) = S^T or a full M, whichever is smaller.

    Starts from the likelihood's factor S of H_out (k = d columns for Gaussian, Bernoulli, Categorical),
    or from H_out itself where the plan starts with a full M.
    """
    xp = array_module(f)
    B, d = f.shape[0], size(f.shape[1:])
    forms = plan_forms("sqrt", [size(s) for s in shapes], k_out=d)
    check_memory(B * d * d * f.dtype.itemsize, budget, f"the output Hessian ({d} x {d} per sample, batch {B})")
    if forms[-1][0] == "full":
        M = likelihood.hess(f, y)
    else:
        S = likelihood.hess_sqrt(f, y)  # (B, d, k)
        M = S.transpose(0, 2, 1).reshape((B, S.shape[2]) + tuple(f.shape[1:]))
        if S.shape[2] != d:  # a factor with other than d columns: plan again with its k
            forms = plan_forms("sqrt", [size(s) for s in shapes], k_out=S.shape[2])
            M = full_of(M) if forms[-1][0] == "full" else M
    parts = []
    for i in range(len(layers) - 1, -1, -1):
        layer, (form, _) = layers[i], forms[i + 1]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if i > 0 else None,
                         M.dtype.itemsize, index=i)
        check_memory(cost.peak_bytes, budget, f"the square-root GGN at layer {i} ({layer!r}, M {cost.form_out} "
                                              f"-> {cost.form_in}), batch {B},")
        if layer.num_params:
            read_off = param_diag_from_full if form == "full" else param_diag_from_sqrt
            parts.append(read_off(layer, M, per_sample))
        if i == 0:
            break
        work = geometry(layer, shapes[i], shapes[i + 1])["vjp_work"]
        if form == "full" and forms[i][0] == "full":
            M = propagate_full(layer, M)
        elif form == "full":  # the chain widens: factor, then push the d_out columns
            M = vjp_rows(layer, factor_of(M, shapes[i + 1]), work)
        else:
            M = vjp_rows(layer, M, work)
            if forms[i][0] == "full":
                M = full_of(M)
    return concat_parts(parts[::-1], per_sample, B, f.dtype, xp)

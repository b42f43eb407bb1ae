"""The Hessian engine: the GGN of the loss w.r.t. all parameters by backpropagating M (Algorithm 1, app. E.4).

    M_L = H_out(f, y) = d^2 l / d f^2,   M_{l-1} = J_in^T M_l J_in,   G_{theta_l} = J_p^T M_l J_p,

summed over the batch (or per sample), aligned with `model.get_params()`. Structures:
  * `ggn_blocks`                       exact block-diagonal (full M, dense per-layer blocks; small nets);
  * `ggn_diagonal(method='exact')`     full M, only the diagonal of each block;
  * `ggn_diagonal(method='approx')`    only diag(M) travels (E.4.1): one squared backprop (from a constant
                                       under a Gaussian, `ConstantDiag`);
  * `ggn_diagonal(method='mixed')`     full M where a feature size <= threshold, diagonal elsewhere;
  * `ggn_diagonal(method='sqrt')`      exact, through M = S S^T where the factor is smaller;
  * `ggn_kfac(method='kfac')`          Kronecker factors A, G per Linear / Conv2d (minilae.kfac);
  * `estimate_cost`                    per-layer memory and FLOPs before running.

How M passes through one layer is that layer's own rule (`Layer.backprop_full`, `backprop_diag`, ...,
in minilae/layers/); this package holds the algorithms: the walks, the mixed switch, the square-root
factor, the memory checks and the cost estimates.
"""
from __future__ import annotations

from ..backend import array_module
from ..kfac import KFAC_METHODS
from ..losses import get_likelihood
from ..validation import positive
from .approx import approx_diagonal
from .chain import (MemoryBudgetError, check_memory, constant_output, feature_shapes, forward_once, leaf_layers,
                    output_diagonal, resolve_budget, scaled, size)
from .cost import DEFAULT_THRESHOLD, METHODS, CostTable, LayerCost, estimate_cost, plan_forms
from .exact import exact_blocks, exact_diagonal
from .kfac import kfac_factors
from .mixed import mixed_diagonal
from .sqrt import sqrt_diagonal

__all__ = ["ggn_diagonal", "ggn_blocks", "ggn_kfac", "estimate_cost", "CostTable", "LayerCost", "MemoryBudgetError",
           "METHODS", "DEFAULT_THRESHOLD", "propagate_full", "propagate_diag", "diag_of_propagated", "full_from_diag",
           "param_diag_from_full", "param_diag_from_diag", "param_block"]


# ---- one layer's step, as functions (the rules themselves are the layer's methods) ------------------

def propagate_full(layer, M):
    """M_in = J_in^T M J_in (`layer.backprop_full`)."""
    return layer.backprop_full(M)


def propagate_diag(layer, m):
    """m_in = (J_in * J_in)^T m (`layer.backprop_diag`)."""
    return layer.backprop_diag(m)


def diag_of_propagated(layer, M):
    """m_in = diag(J_in^T M J_in) (`layer.diag_of_backprop`)."""
    return layer.diag_of_backprop(M)


def full_from_diag(layer, m):
    """M_in = J_in^T diag(m) J_in (`layer.backprop_from_diag`)."""
    return layer.backprop_from_diag(m)


def param_diag_from_full(layer, M, per_sample=False):
    """diag(J_p^T M J_p) (`layer.param_diag`)."""
    return layer.param_diag(M, per_sample)


def param_diag_from_diag(layer, m, per_sample=False):
    """(J_p * J_p)^T m (`layer.param_diag_from_diag`)."""
    return layer.param_diag_from_diag(m, per_sample)


def param_block(layer, M, per_sample=False):
    """J_p^T M J_p (`layer.param_block`)."""
    return layer.param_block(M, per_sample)


def _prepare(model, likelihood, x, f):
    layers = leaf_layers(model)
    if not hasattr(x, "shape") or len(x.shape) < 2:
        raise ValueError(f"x must be a batch (B, *in_shape); got {getattr(x, 'shape', type(x).__name__)}")
    f = forward_once(model, x, f)
    return layers, feature_shapes(layers, tuple(x.shape[1:])), get_likelihood(likelihood), f


def _check_output(what, need_elements, f, budget):
    check_memory(need_elements * f.dtype.itemsize, budget, what)


def ggn_diagonal(model, likelihood, x, y, method="approx", threshold=None, per_sample=False, f=None,
                 memory_budget=None, scale=1.0):
    """scale diag(G) with G = sum_b J_b^T H_out(f_b, y_b) J_b: flat (P,), or (B, P) per sample.

    method: 'approx' (diagonal M), 'exact' (full M), 'mixed' (full M where the feature size is
    <= threshold, default DEFAULT_THRESHOLD = 512), 'sqrt' (exact, through a square-root factor).
    f: the output of the model's last forward on x (then the model is not run again); refused
    (ValueError) if any layer ran a forward or had its parameters set since - run f = model(x) again.
    memory_budget: bytes (default: 80% of free memory); a step that would exceed it raises
    MemoryBudgetError before allocating.
    scale: a factor > 0 on the result, e.g. N / B for the data set's GGN from a batch of B of N images. It
    multiplies H_out, which costs nothing next to the walk (a pass over the P-long result saved).
    """
    if method not in ("approx", "exact", "mixed", "sqrt"):
        raise ValueError(f"unknown method {method!r}; choose 'approx', 'exact', 'mixed' or 'sqrt'")
    scale = positive(scale, "scale")
    layers, shapes, lik, f = _prepare(model, likelihood, x, f)
    xp = array_module(f)
    budget = resolve_budget(memory_budget, xp)
    B, d = f.shape[0], size(f.shape[1:])
    if method == "approx":
        return approx_diagonal(layers, shapes, output_diagonal(lik, f, y, scale), budget, per_sample)
    if method == "mixed":
        form = plan_forms("mixed", [d], threshold)[0][0]
        if form == "diag":
            return mixed_diagonal(layers, shapes, output_diagonal(lik, f, y, scale), threshold, budget, per_sample)
        _check_output(f"the output Hessian M_L ({d} x {d} per sample, batch {B})", B * d * d, f, budget)
        return mixed_diagonal(layers, shapes, scaled(lik.output_curvature(f, y), scale), threshold, budget,
                              per_sample)
    if method == "sqrt":  # the factor is built inside: scale the (P,) or (B, P) result, the walk's own array
        G = sqrt_diagonal(layers, shapes, lik, f, y, budget, per_sample)
        if scale != 1.0:
            G *= scale
        return G
    constant = constant_output(lik, f, y, scale)
    if constant is not None:  # M_L = c I: diagonal down to the first layer that mixes, no (B, d, d) output matrix
        return exact_diagonal(layers, shapes, constant, budget, per_sample)
    _check_output(f"the output Hessian M_L ({d} x {d} per sample, batch {B})", B * d * d, f, budget)
    return exact_diagonal(layers, shapes, scaled(lik.output_curvature(f, y), scale), budget, per_sample)


def ggn_blocks(model, likelihood, x, y, memory_budget=None, per_sample=False, f=None):
    """Exact block-diagonal GGN: [J_p^T M_l J_p for each parametric layer l], each (P_l, P_l) or (B, P_l, P_l)."""
    layers, shapes, lik, f = _prepare(model, likelihood, x, f)
    budget = resolve_budget(memory_budget, array_module(f))
    B, d = f.shape[0], size(f.shape[1:])
    _check_output(f"the output Hessian M_L ({d} x {d} per sample, batch {B})", B * d * d, f, budget)
    return exact_blocks(layers, shapes, lik.output_curvature(f, y), budget, per_sample)


def ggn_kfac(model, likelihood, x, y, method="kfac", f=None, memory_budget=None):
    """KFAC factors of the batch: [KronBlock(A, G, n, offset, bias)] per parametric layer, the GGN block of
    each ~ kron(G, A) / n (minilae.kfac). method: 'kfac' (G from the exact M) or 'kfac-approx' (from diag M).
    f and memory_budget as in ggn_diagonal."""
    if method not in KFAC_METHODS:
        raise ValueError(f"unknown KFAC method {method!r}; choose 'kfac' or 'kfac-approx'")
    layers, shapes, lik, f = _prepare(model, likelihood, x, f)
    return kfac_factors(layers, shapes, lik, f, y, resolve_budget(memory_budget, array_module(f)), method)

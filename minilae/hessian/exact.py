"""Exact GGN by Algorithm 1 (appendix E.4) with the full M, per sample (B, d, d).

    M_L = H_out(f, y),   M_{l-1} = J_in^T M_l J_in,   H_{theta_l} = J_p^T M_l J_p.

Each layer pushes M back itself (`backprop_full`; by default J_in^T on M's d_out rows and then on the
d_in columns of the result), so the cost is B d_out d_in (d_out + d_in) for a dense layer and the
memory B d^2: quadratic in the number of features. That is why this form is for small networks (or for
the layers near the bottleneck, see `mixed`). Two things are read off M at a parametric layer:
  * the block J_p^T M J_p (P x P; the layer's `param_block`), or
  * only its diagonal (`param_diag`), computed without ever forming the block.
"""
from __future__ import annotations

from ..layers.base import ConstantDiag
from .chain import backend_of, check_memory, concat_parts, diagonal_head, lowest_parametric
from .cost import step_cost


def _check_step(layers, shapes, i, B, itemsize, budget, block, stop):
    """Refuse layer i's step with full M (MemoryBudgetError) when its estimate_cost row exceeds the budget (stop:
    where the walk ends, `lowest_parametric`)."""
    cost = step_cost(layers[i], shapes[i], shapes[i + 1], B, ("full", None), ("full", None) if i > stop else None,
                     itemsize, index=i, block=block)
    check_memory(cost.peak_bytes, budget, f"the exact GGN at layer {i} ({layers[i]!r}), full M of "
                                          f"{cost.d_out} x {cost.d_out} per sample, batch {B},")


def _walk(layers, shapes, M, budget, read_off, block, top=None):
    """Algorithm 1 with full M: read each parametric layer's part off M_l, then M_{l-1} = J_in^T M_l J_in;
    M belongs to the input of layer `top` (default: the output), so the walk starts at layer top - 1."""
    parts, B, stop = [], M.shape[0], lowest_parametric(layers)
    for i in range((len(layers) if top is None else top) - 1, stop - 1, -1):
        layer = layers[i]
        _check_step(layers, shapes, i, B, M.dtype.itemsize, budget, block, stop)
        if layer.num_params:
            parts.append(read_off(layer, M))
        if i > stop:
            M = layer.backprop_full(M)
    return parts[::-1]


def exact_diagonal(layers, shapes, M, budget, per_sample=False):
    """Exact diagonal of the GGN: full M propagated, only the diagonal of each block computed. M may be a
    ConstantDiag (M_L = c I): it stays diagonal down to the first layer that mixes its inputs (`diagonal_head`),
    where the full M starts."""
    B, dtype, stop = M.shape[0], M.dtype, lowest_parametric(layers)
    xp = backend_of(M)
    head, top = [], None
    if isinstance(M, ConstantDiag):
        def check(i):
            _check_step(layers, shapes, i, B, dtype.itemsize, budget, False, stop)
        head, top, M, _ = diagonal_head(layers, shapes, M, per_sample, check, factor=False)
    parts = [] if M is None else _walk(layers, shapes, M, budget, lambda layer, M_l: layer.param_diag(M_l, per_sample),
                                       block=False, top=top)
    return concat_parts(parts + head[::-1], per_sample, B, dtype, xp)


def exact_blocks(layers, shapes, M, budget, per_sample=False):
    """Exact block-diagonal GGN: one dense J_p^T M J_p per parametric layer, in layer order."""
    return _walk(layers, shapes, M, budget, lambda layer, M_l: layer.param_block(M_l, per_sample), block=True)

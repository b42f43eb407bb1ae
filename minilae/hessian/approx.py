"""Approximate diagonal GGN (appendix E.4.1): only diag(M) travels backwards.

Replacing M by its diagonal m at every layer turns each step into one ordinary backprop with squared
Jacobian entries:
    m_in = diag(J_in^T diag(m) J_in) = (J_in * J_in)^T m      (each layer's `backprop_diag`),
    diag(J_p^T diag(m) J_p) = (J_p * J_p)^T m                   (each layer's `param_diag_from_diag`).
The result is exact wherever M really is diagonal, e.g. for a single Linear layer under a Gaussian
likelihood; elsewhere the off-diagonal terms of M are dropped.
"""
from __future__ import annotations

import itertools

from .chain import backend_of, check_memory, concat_parts, diag_read_off, diag_step, lowest_parametric
from .cost import step_cost


def approx_diagonal(layers, shapes, m, budget, per_sample=False):
    """Algorithm 1 with diagonal M: m_L = diag(H_out), then per layer read off the parameter diagonal
    and push m back. m is (B, *out), or a ConstantDiag (M_L = c I); returns the flat (P,) or (B, P) diagonal.

    While m is one constant c (from a Gaussian likelihood down to the first layer that mixes its inputs),
    the steps take the layers' constant rules: the last Linear reads c sum_b x_b^2 off its input instead of
    the product m^T (x * x), and pushes back c sum_o W[o, :]^2 instead of m (W * W), so the walk's largest
    layer needs no product with the batch (the MLP and conv AEs' output layers).

    Each step is checked against the memory budget first (the estimate_cost row of that step), as in
    the other walkers: the per-sample diagonals (B, P) and Conv2d's squared im2col can be large.
    """
    xp = backend_of(m)
    parts, B = [], m.shape[0]
    # the batch sums are written into each layer's slice of one flat vector, never concatenated
    ends = list(itertools.accumulate(layer.num_params for layer in layers))
    flat = None if per_sample else xp.empty(ends[-1] if ends else 0, dtype=m.dtype)
    stop = lowest_parametric(layers)
    for i in range(len(layers) - 1, stop - 1, -1):
        layer = layers[i]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, ("diag", None), ("diag", None) if i > stop else None,
                         m.dtype.itemsize, index=i)
        check_memory(cost.peak_bytes, budget, f"the approximate GGN at layer {i} ({layer!r}), diagonal M, "
                                              f"batch {B},")
        if layer.num_params and per_sample:
            parts.append(diag_read_off(layer, m, per_sample=True))
        elif layer.num_params:
            diag_read_off(layer, m, out=flat[ends[i] - layer.num_params:ends[i]])
        if i > stop:  # the layers below the first parametric one need no curvature
            m = diag_step(layer, m)
    return flat if not per_sample else concat_parts(parts[::-1], per_sample, m.shape[0], m.dtype, xp)

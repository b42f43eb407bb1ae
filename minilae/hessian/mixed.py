"""Mixed diagonal GGN: full M where a feature is small (near the bottleneck), diagonal M elsewhere.

Walking back through a layer, M changes form exactly at that layer, by the layer's own rule:
  full -> full   M_in = J_in^T M J_in                      (`backprop_full`)
  diag -> diag   m_in = (J_in * J_in)^T m                  (`backprop_diag`)
  full -> diag   m_in = diag(J_in^T M J_in), exact, without the d_in x d_in matrix  (`diag_of_backprop`)
  diag -> full   M_in = J_in^T diag(m) J_in, exact                                  (`backprop_from_diag`)
so the only approximation is dropping off-diagonal terms where M is held as a diagonal.
"""
from __future__ import annotations

from .chain import (backend_of, check_memory, concat_parts, diag_read_off, diag_step, full_from_diag_step,
                    lowest_parametric, size)
from .cost import plan_forms, step_cost

STEPS = {("full", "full"): "backprop_full", ("full", "diag"): "diag_of_backprop",
         ("diag", "full"): "backprop_from_diag", ("diag", "diag"): "backprop_diag"}
"""(form at the layer output, form at its input) -> the layer method that makes the step."""


def _step(layer, M, form_out, form_in):
    """M_{l-1} from M_l by the layer method of STEPS; a diagonal M may still be the output's ConstantDiag."""
    if form_out == "diag":
        return diag_step(layer, M) if form_in == "diag" else full_from_diag_step(layer, M)
    return getattr(layer, STEPS[(form_out, form_in)])(M)


def mixed_diagonal(layers, shapes, M, threshold, budget, per_sample=False):
    """Algorithm 1 with M full at features of size <= threshold and diagonal elsewhere.

    M is the output Hessian in the form `plan_forms('mixed', ...)` gives the output feature (a diagonal may be
    a ConstantDiag).
    """
    xp = backend_of(M)
    forms = plan_forms("mixed", [size(s) for s in shapes], threshold)
    parts, B, stop = [], M.shape[0], lowest_parametric(layers)
    for i in range(len(layers) - 1, stop - 1, -1):
        layer, form = layers[i], forms[i + 1][0]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if i > stop else None,
                         M.dtype.itemsize, index=i)
        check_memory(cost.peak_bytes, budget, f"the mixed GGN at layer {i} ({layer!r}, M {cost.form_out} -> "
                                              f"{cost.form_in}), batch {B},")
        if layer.num_params:
            parts.append(layer.param_diag(M, per_sample) if form == "full" else diag_read_off(layer, M, per_sample))
        if i > stop:
            M = _step(layer, M, form, forms[i][0])
    return concat_parts(parts[::-1], per_sample, B, M.dtype, xp)

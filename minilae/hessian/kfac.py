"""KFAC factors by Algorithm 1: the input factor A from each layer's forward cache, the output factor G read
off the backpropagated M (the algebra and the posterior are in minilae.kfac).

Which M travels decides what G is (the paper's Table 1, one more column):

  structure     M at each feature                        G = sum_{b,t} M_b[t, t]     memory of M
  kfac          full, or its square-root factor V         exact                       as 'sqrt'
                (M = V^T V), whichever is smaller
  kfac-approx   diagonal only                             its diagonal                as 'approx'

Either way A = sum_{b,t} a_bt a_bt^T is exact (the layer inputs). Layers without parameters pass M on by
their usual rules; a parametric layer without Kronecker rules (e.g. ConvTranspose2d) is refused with
a MissingRuleError naming it, never silently approximated by something else.
"""
from __future__ import annotations

from ..kfac import KronBlock
from .chain import check_memory, lowest_parametric, size
from .cost import check_kfac_layers, plan_forms, step_cost
from .sqrt import factor_of, full_of

READ_OFF = {"full": "kfac_output_factor", "diag": "kfac_output_factor_from_diag", "sqrt": "kfac_output_factor_from_sqrt"}
"""Form of M at a layer's output -> the layer method that reads G off it."""


def _output_curvature(likelihood, f, y, forms, shapes):
    """M_L in the plan's form at the output: diagonal, full, or the factor V = S^T (B, k, *out)."""
    form = forms[-1][0]
    if form == "diag":
        return likelihood.hess_diag(f, y), forms
    if form == "full":
        return likelihood.output_curvature(f, y), forms
    S = likelihood.hess_sqrt(f, y)  # (B, d, k)
    V = S.transpose(0, 2, 1).reshape((f.shape[0], S.shape[2]) + tuple(f.shape[1:]))
    if S.shape[2] != size(f.shape[1:]):  # another number of columns: plan again with its k
        forms = plan_forms("sqrt", [size(s) for s in shapes], k_out=S.shape[2])
        V = full_of(V) if forms[-1][0] == "full" else V
    return V, forms


def _push(layer, M, form_out, form_in, out_shape):
    """M_{l-1} from M_l through J_in, changing form where the plan says (rules of 'approx' and 'sqrt')."""
    if form_out == "diag":
        return layer.backprop_diag(M)
    if form_out == "full":
        return layer.backprop_full(M) if form_in == "full" else layer.vjp_input_chunked(factor_of(M, out_shape))
    V = layer.vjp_input_chunked(M)
    return full_of(V) if form_in == "full" else V


def kfac_factors(layers, shapes, likelihood, f, y, budget, method="kfac"):
    """[KronBlock(A, G, n = B T, offset, bias) per parametric layer], walking M back from the output."""
    check_kfac_layers(layers)
    B = f.shape[0]
    forms = plan_forms(method, [size(s) for s in shapes], k_out=size(f.shape[1:]))
    if forms[-1][0] != "diag":
        d = size(f.shape[1:])
        check_memory(B * d * d * f.dtype.itemsize, budget, f"the output Hessian ({d} x {d} per sample, batch {B})")
    M, forms = _output_curvature(likelihood, f, y, forms, shapes)
    offsets, start = [], 0
    for layer in layers:
        offsets.append(start)
        start += layer.num_params
    blocks, stop = [], lowest_parametric(layers)
    for i in range(len(layers) - 1, stop - 1, -1):
        layer, form = layers[i], forms[i + 1][0]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, forms[i + 1], forms[i] if i > stop else None,
                         M.dtype.itemsize, index=i, kfac=True)
        check_memory(cost.peak_bytes, budget, f"the KFAC factors at layer {i} ({layer!r}, M {cost.form_out} -> "
                                              f"{cost.form_in}), batch {B},")
        if layer.num_params:
            G = getattr(layer, READ_OFF[form])(M)
            blocks.append(KronBlock(layer.kfac_input_factor(), G, B * layer.kfac_positions(shapes[i + 1]),
                                    offsets[i], "bias" in layer.param_names))
        if i > stop:
            M = _push(layer, M, form, forms[i][0], shapes[i + 1])
    return blocks[::-1]

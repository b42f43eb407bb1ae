"""Approximate diagonal GGN (appendix E.4.1): only diag(M) travels backwards.

Replacing M by its diagonal at every layer turns each step into one ordinary backprop with squared
Jacobian entries:
    m_in = diag(J_in^T diag(m) J_in) = (J_in * J_in)^T m,
    diag(J_p^T diag(m) J_p) = (J_p * J_p)^T m.
For a Conv2d the first is a transposed convolution with the element-wise squared kernel, the second the
usual weight gradient with squared inputs. Layers whose Jacobian entries are 0 or 1 (max-pooling routes
through the arg-max, nearest up-sampling copies) push m with their own J_in^T; element-wise layers scale
by sigma'(x)^2. The result is exact wherever M really is diagonal, e.g. for a single Linear layer under a
Gaussian likelihood; elsewhere the off-diagonal terms of M are dropped.
"""
from __future__ import annotations

import copy
from functools import singledispatch

from ..backend import array_module
from ..layers import Conv2d, Dropout, Elementwise, Linear, MaxPool2d, Reshape, Upsample
from .chain import check_memory, concat_parts
from .cost import step_cost


def unsupported(layer, what):
    return TypeError(f"{what}: no rule for {type(layer).__name__}; supported layers are Linear, Conv2d, Tanh, "
                     "ReLU, Sigmoid, MaxPool2d, Upsample, Flatten, Reshape, Dropout (and Sequential of them)")


# ---- m_in = (J_in * J_in)^T m ------------------------------------------------------------------

@singledispatch
def propagate_diag(layer, m):
    """m_in = diag(J_in^T diag(m) J_in) for m shaped like the layer output (B, *out) -> (B, *in)."""
    raise unsupported(layer, "propagate_diag")


@propagate_diag.register
def _(layer: Linear, m):
    """m_in = (W * W)^T m."""
    return m @ layer.weight ** 2


@propagate_diag.register
def _(layer: Conv2d, m):
    """m_in = transposed convolution of m with the squared kernel W * W.

    J_in is the convolution matrix T with entries W[o, c, u, v], so T * T is the convolution with
    W * W: the layer's own J_in^T product, run with the squared kernel, is exactly (T * T)^T m.
    """
    return twin(layer, weight=layer.weight ** 2).vjp_input(m)


@propagate_diag.register
def _(layer: Elementwise, m):
    """m_in = sigma'(x)^2 m."""
    return layer.derivative(layer._x) ** 2 * m


@propagate_diag.register
def _(layer: Dropout, m):
    """m_in = (mask / (1 - p))^2 m (m itself in evaluation mode)."""
    return m if layer.scale is None else layer.scale ** 2 * m


@propagate_diag.register(Reshape)
@propagate_diag.register(MaxPool2d)
@propagate_diag.register(Upsample)
def _(layer, m):
    """J_in has entries 0 and 1, so J_in * J_in = J_in: route (arg-max) / block-sum / reshape m."""
    return layer.vjp_input(m)


def twin(layer, **replace):
    """A shallow copy of the layer (sharing its forward caches) with some arrays replaced."""
    other = copy.copy(layer)
    other.__dict__.update(replace)
    return other


# ---- diag(J_p^T diag(m) J_p) = (J_p * J_p)^T m --------------------------------------------------

@singledispatch
def param_diag_from_diag(layer, m, per_sample=False):
    """diag(J_p^T diag(m) J_p): summed over the batch (P,) or per sample (B, P)."""
    raise unsupported(layer, "param_diag_from_diag")


@param_diag_from_diag.register
def _(layer: Linear, m, per_sample=False):
    """W[o, i]: m_o x_i^2;  b[o]: m_o."""
    xp = array_module(m)
    x2 = layer._x ** 2
    if per_sample:
        parts = [(m[:, :, None] * x2[:, None, :]).reshape(m.shape[0], -1)]
    else:
        parts = [(m.T @ x2).ravel()]
    if "bias" in layer.param_names:
        parts.append(m if per_sample else m.sum(axis=0))
    return xp.concatenate(parts, axis=-1)


@param_diag_from_diag.register
def _(layer: Conv2d, m, per_sample=False):
    """W[o, (c,u,v)]: sum_l m[o, l] cols[l, (c,u,v)]^2;  b[o]: sum_l m[o, l].

    J_p holds the im2col matrix `cols` (and ones for the bias), so J_p * J_p holds cols^2: the layer's
    weight-gradient product run on the squared im2col matrix.
    """
    return twin(layer, _cols=layer._cols ** 2).vjp_params(m, per_sample=per_sample)


# ---- the walk ---------------------------------------------------------------------------------

def approx_diagonal(layers, shapes, m, budget, per_sample=False):
    """Algorithm 1 with diagonal M: m_L = diag(H_out), then per layer read off the parameter diagonal
    and push m back. m is (B, *out); returns the flat (P,) or (B, P) diagonal.

    Each step is checked against the memory budget first (the estimate_cost row of that step), as in
    the other walkers: the per-sample diagonals (B, P) and Conv2d's squared im2col can be large.
    """
    xp = array_module(m)
    parts, B = [], m.shape[0]
    for i in range(len(layers) - 1, -1, -1):
        layer = layers[i]
        cost = step_cost(layer, shapes[i], shapes[i + 1], B, ("diag", None), ("diag", None) if i > 0 else None,
                         m.dtype.itemsize, index=i)
        check_memory(cost.peak_bytes, budget, f"the approximate GGN at layer {i} ({layer!r}), diagonal M, "
                                              f"batch {B},")
        if layer.num_params:
            parts.append(param_diag_from_diag(layer, m, per_sample))
        if i > 0:  # the network input needs no curvature
            m = propagate_diag(layer, m)
    return concat_parts(parts[::-1], per_sample, m.shape[0], m.dtype, xp)

"""What the backward pass of M will cost, per layer, before running it (the paper's Table 1 made concrete).

Walking back through layer l (input x_{l-1} with d_in features, output x_l with d_out) does two things:
read the parameter diagonal (or block) off M_l, and push M_l to M_{l-1} = J_in^T M_l J_in. Their cost
depends on the *form* of M on each side:

  full   (B, d, d)     exact; memory B d^2, and a product through J_in costs B d_out d_in (d_out + d_in)
                       for a dense layer - quadratic in the number of features;
  diag   (B, d)        approximate (appendix E.4.1); memory B d, cost of one ordinary backprop;
  sqrt   (B, k, d)     exact, M = S S^T with k columns; memory B k d, cost k backprops.

The walkers in this package call `step_cost` before each step and refuse (MemoryBudgetError) when
`peak_bytes` exceeds the budget, so the estimate below and the refusal always agree.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from ..backend import get_default_dtype, xp
from ..layers.base import missing_rule
from .chain import CHUNK_BYTES, feature_shapes, format_bytes, leaf_layers, lowest_parametric, size

METHODS = ("approx", "exact", "mixed", "sqrt", "block")

KFAC_PLANS = {"kfac": "sqrt", "kfac-approx": "approx"}
"""The KFAC structures (estimate_cost takes them too) walk M in the forms of these diagonal methods
(see minilae.hessian.kfac); they need Kronecker rules on every parametric layer."""


# ---- which form M takes at each feature ------------------------------------------------------

def plan_forms(method: str, sizes, threshold=None, k_out=None):
    """Form of M at each feature x_0..x_L (with k for 'sqrt'), for the given method.

    mixed: full where d <= threshold, diag elsewhere.
    sqrt:  walking back, a full M is factored (k = d_out) when the chain widens, and a factor with
           more columns than rows (k > d) is multiplied out into a full M: the smaller form wins.
           k_out is the number of columns of the likelihood's factor S of H_out.
    """
    L = len(sizes) - 1
    method = KFAC_PLANS.get(method, method)
    if method in ("exact", "block"):
        return [("full", None)] * (L + 1)
    if method == "approx":
        return [("diag", None)] * (L + 1)
    if method == "mixed":
        threshold = check_threshold(threshold)
        return [("full" if d <= threshold else "diag", None) for d in sizes]
    if method == "sqrt":
        k = sizes[-1] if k_out is None else int(k_out)
        forms = [None] * (L + 1)
        # the likelihood hands us a factor: keep it if it is smaller, or if the last layer widens
        keep = k < sizes[-1] or (L > 0 and sizes[-2] > sizes[-1])
        forms[L] = ("sqrt", k) if keep else ("full", None)
        return sqrt_forms_below(forms, sizes, L)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS + tuple(KFAC_PLANS))}")


def sqrt_forms_below(forms, sizes, top):
    """Fill forms[:top] walking back from the form at feature `top`, the smaller form winning at each
    feature: a full M is factored (k = d_out) where the chain widens, a factor with k > d is multiplied out."""
    for i in range(top, 0, -1):
        form, k = forms[i]
        d_out, d_in = sizes[i], sizes[i - 1]
        if form == "full":
            forms[i - 1] = ("sqrt", d_out) if d_in > d_out else ("full", None)
        else:
            forms[i - 1] = ("full", None) if k > d_in else ("sqrt", k)
    return forms


DEFAULT_THRESHOLD = 512
"""Default feature size up to which 'mixed' keeps M full: the MLP layers around an autoencoder's
bottleneck (512, 256, ..., latent) but none of its image-sized features (784 and up)."""


def check_threshold(threshold):
    """A feature-size threshold for 'mixed': a number >= 0 (inf allowed); None gives DEFAULT_THRESHOLD."""
    if threshold is None:
        return float(DEFAULT_THRESHOLD)
    try:
        threshold = float(threshold)
    except (TypeError, ValueError) as err:
        raise TypeError(f"threshold must be a number (a feature size), got {threshold!r}") from err
    if not threshold >= 0:
        raise ValueError(f"threshold must be a feature size >= 0 (0 gives 'approx', inf gives 'exact'), "
                         f"got {threshold}")
    return threshold


# ---- geometry of one layer --------------------------------------------------------------------

def geometry(layer, in_shape, out_shape):
    """Sizes the cost formulas need: the layer's `cost_geometry` (its kind, and vjp_flops / vjp_work per
    vector pushed through J_in^T), with d_in, d_out, P and the structure flags of its J_in."""
    g = dict(d_in=size(in_shape), d_out=size(out_shape), P=layer.num_params, one_input_per_output=
             layer.one_input_per_output, one_output_per_input=layer.one_output_per_input)
    g.update(layer.cost_geometry(tuple(in_shape), tuple(out_shape)))
    return g


def _m_elements(form, k, d, B):
    """Number of stored entries of M in a form."""
    return {"full": B * d * d, "diag": B * d, "sqrt": B * (k or 0) * d}[form]


# ---- cost of one step -------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerCost:
    """One row of the table: layer l's step with M in form_out at its output and form_in passed back."""

    index: int
    layer: str
    d_in: int
    d_out: int
    params: int
    form_out: str
    form_in: str
    m_bytes: int
    peak_bytes: int
    flops: float
    order: str


def _param_cost(g, form, k, B, block, itemsize):
    """(flops, temporaries, order) of reading layer parameters' diagonal / block off M."""
    P, d_out = g["P"], g["d_out"]
    if P == 0:
        return 0.0, 0, ""
    if block:
        return 2.0 * B * d_out * P * (P + d_out), P * P + 2 * B * d_out * P, "B d_out P^2"
    if g["kind"] == "linear":  # only diag(M) enters a Linear layer's parameter diagonal
        extra = B * (k or 1) * d_out if form == "sqrt" else 0
        return 2.0 * B * P + extra, B * P, "B P"
    if g["kind"] == "conv_transpose" and form == "diag":  # x^2 against im2col(m): a weight gradient
        L, Co, CK = g["L"], g["Co"], g["CK"]
        return 2.0 * B * L * Co * CK + B * L * CK, B * L * CK + B * Co * CK + B * Co * L, "B L C_in C_out k^2"
    if g["kind"] != "conv":  # Layer's defaults: the dense J_p from d_out products, or k products for sqrt
        if form == "sqrt":
            chunk = min(B * k * P, CHUNK_BYTES // itemsize) + B * k * g["vjp_work"]
            return 2.0 * B * k * P * d_out, chunk + B * P, "B k d_out P"
        flops = 2.0 * B * d_out * P * (d_out if form == "full" else 1)
        return flops, 2 * B * d_out * P + B * P, "B d_out^2 P" if form == "full" else "B d_out P"
    L, Co, CK = g["L"], g["Co"], g["CK"]
    if form == "diag":
        return 2.0 * B * L * Co * CK + B * L * CK, B * L * CK + B * Co * CK, "B L C_out C_in k^2"
    if form == "full":
        return 2.0 * B * Co * L * L * CK, B * Co * L * (L + CK), "B C_out L^2 C_in k^2"
    return 2.0 * B * k * L * Co * CK, B * Co * CK, "B k L C_out C_in k^2"


def check_kfac_layers(layers):
    """Refuse (MissingRuleError) a parametric layer without Kronecker factors, naming it."""
    for layer in layers:
        if layer.num_params and not hasattr(layer, "kfac_input_factor"):
            raise missing_rule(layer, "kfac_input_factor() and kfac_output_factor(M)",
                               "for the Kronecker factors A and G that 'kfac' needs")


def _kfac_param_cost(layer, g, form, k, B, out_shape):
    """(flops, temporaries, order) of the factors A = sum a a^T (n_in^2 per term) and G read off M."""
    if g["P"] == 0:
        return 0.0, 0, ""
    check_kfac_layers([layer])
    T = layer.kfac_positions(tuple(out_shape))
    n_out = g["d_out"] // T
    n_in = g["P"] // n_out
    flops_a, temp_a = 2.0 * B * T * n_in * n_in, B * T * n_in + n_in * n_in
    if form == "full":  # the same-position blocks of M, summed
        flops_g, temp_g, order_g = float(B * T * n_out * n_out), B * T * n_out * n_out, "B T n_out^2"
    elif form == "sqrt":
        flops_g, temp_g, order_g = 2.0 * B * k * T * n_out * n_out, B * k * g["d_out"], "B k T n_out^2"
    else:
        flops_g, temp_g, order_g = float(B * g["d_out"]), n_out * n_out, "B d_out"
    return flops_a + flops_g, max(temp_a, temp_g) + n_out * n_out, f"B T n_in^2 + {order_g}"


def _propagation_cost(g, form_out, k_out, form_in, k_in, B, itemsize):
    """(flops, temporaries, order) of M_out -> M_in through J_in."""
    d_in, d_out, kind = g["d_in"], g["d_out"], g["kind"]
    vf = g["vjp_flops"]
    chunk = CHUNK_BYTES // itemsize
    if form_out == "diag" and form_in == "diag":
        return B * vf, B * g["vjp_work"], "B (one backprop)"
    if form_out == "full" and form_in == "full":
        if kind == "pointwise":
            return 2.0 * B * d_out * d_out, B * d_out * d_out, "B d^2"
        temp = 0 if kind == "linear" else min(B * d_out * g["vjp_work"], chunk)  # vjp_rows chunks
        return B * (d_out + d_in) * vf, 2 * B * d_out * d_in + temp, _sandwich_order(kind)
    if form_out == "full" and form_in == "diag":
        if kind not in ("linear", "conv", "upsample") and not g["one_output_per_input"]:
            return _rows_cost(g, B, d_in * d_out), 2 * B * d_out * d_in, "B d_out^2 d_in"
        if kind == "linear":
            return B * d_out * vf, B * d_out * d_in, "B d_out^2 d_in"
        if kind == "conv":
            L, Co, CK = g["L"], g["Co"], g["CK"]
            return (2.0 * g["shifts"] * B * L * Co * Co * CK, B * L * (Co * Co + Co * CK + CK),
                    "B L C_out^2 C_in k^2 (2k-1)^2")
        if kind == "upsample":
            return B * (d_out + d_in) * vf, 2 * B * d_out * d_in + B * d_in * d_in, "B d_out d_in"
        return float(B * d_out), B * d_in, "B d"
    if form_out == "diag" and form_in == "full":
        if kind not in ("linear", "conv") and not g["one_input_per_output"]:
            return _rows_cost(g, B, d_in * d_in), 2 * B * d_out * d_in + B * d_in * d_in, "B d_out d_in^2"
        if kind == "linear":
            return B * d_in * vf, B * d_in * d_out, "B d_out d_in^2"
        if kind == "conv":
            L, Co, C, CK = g["L"], g["Co"], g["C"], g["CK"]
            return 2.0 * g["kk"] * B * L * Co * C * CK, B * L * C * CK + 2 * B * d_in * d_in, "B L C_out C_in^2 k^4"
        return float(B * d_in), B * d_in * d_in, "B d"
    # the square-root factor
    if form_out == "sqrt" and form_in == "sqrt":
        return B * k_out * vf, min(B * k_out * g["vjp_work"], chunk), "B k (one backprop)"
    if form_out == "sqrt" and form_in == "full":
        temp = B * k_out * d_in + min(B * k_out * g["vjp_work"], chunk)
        return B * k_out * vf + 2.0 * B * k_out * d_in * d_in, temp, "B k d_in^2"
    if form_out == "full" and form_in == "sqrt":  # eigendecomposition M = U L U^T, then k = d_out backprops
        return (10.0 * B * d_out ** 3 + B * d_out * vf, 2 * B * d_out * d_out + min(B * d_out * g["vjp_work"], chunk),
                "B d_out^3 + B d_out (backprop)")
    raise ValueError(f"no rule from form {form_out!r} to {form_in!r}")


def _rows_cost(g, B, per_row):
    """FLOPs of the default mixed steps: the d_out rows of J_in from d_out products, then one product
    with M or m costing 2 per_row multiply-adds per row."""
    return B * g["d_out"] * (g["vjp_flops"] + 2.0 * per_row)


def _sandwich_order(kind):
    return {"linear": "B d_out d_in (d_out + d_in)", "conv": "B (d_out + d_in) L C_out C_in k^2",
            "upsample": "B d_out (d_out + d_in)"}.get(kind, "B d_out d_in (d_out + d_in)")


_STEP_COSTS = weakref.WeakKeyDictionary()
"""layer -> {arguments: LayerCost}: a row depends only on the layer's structure and the arguments, and the walks
ask for it at every step of every call (80-120 us per autoencoder walk, 3% of the MLP AE's approx diagonal)."""


def step_cost(layer, in_shape, out_shape, batch, form_out, form_in, itemsize, index=0, block=False, kfac=False):
    """LayerCost of one backward step; form_* are (form, k) pairs, form_in None where the walk ends (the first
    parametric layer); kfac: the parameters' part is the Kronecker factors instead of a diagonal (or block).
    Computed once per layer and arguments."""
    args = (layer, in_shape, out_shape, batch, form_out, form_in, itemsize, index, block, kfac)
    try:
        rows = _STEP_COSTS.setdefault(layer, {})
    except TypeError:  # a user's layer that is not hashable (an __eq__ without __hash__): no memo
        return _step_cost(*args)
    key = (tuple(in_shape), tuple(out_shape), batch, form_out, form_in, itemsize, index, block, kfac)
    if key not in rows:
        rows[key] = _step_cost(*args)
    return rows[key]


def _step_cost(layer, in_shape, out_shape, batch, form_out, form_in, itemsize, index, block, kfac):
    g = geometry(layer, in_shape, out_shape)
    (fo, ko) = form_out
    m_out = _m_elements(fo, ko, g["d_out"], batch)
    if kfac:
        flops, work, order = _kfac_param_cost(layer, g, fo, ko, batch, out_shape)
    else:
        flops, work, order = _param_cost(g, fo, ko, batch, block, itemsize)
    m_in, name_in = 0, "-"
    if form_in is not None:
        fi, ki = form_in
        m_in = _m_elements(fi, ki, g["d_in"], batch)
        pf, pw, porder = _propagation_cost(g, fo, ko, fi, ki, batch, itemsize)
        flops += pf
        work = max(work, pw)
        order = porder if not order else f"{order}; {porder}"
        name_in = _form_name(fi, ki)
    return LayerCost(index=index, layer=repr(layer), d_in=g["d_in"], d_out=g["d_out"], params=g["P"],
                     form_out=_form_name(fo, ko), form_in=name_in, m_bytes=m_out * itemsize,
                     peak_bytes=(m_out + m_in + work) * itemsize, flops=float(flops), order=order)


def _form_name(form, k):
    return f"sqrt(k={k})" if form == "sqrt" else form


# ---- the whole table --------------------------------------------------------------------------

@dataclass
class CostTable:
    """Per-layer memory and time of one GGN computation; str() prints the table."""

    method: str
    batch_size: int
    itemsize: int
    rows: list = field(default_factory=list)
    output_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        """Largest single step (M on both sides plus temporaries)."""
        return max([self.output_bytes] + [r.peak_bytes for r in self.rows])

    @property
    def total_flops(self) -> float:
        """Sum of the steps' floating-point operations."""
        return sum(r.flops for r in self.rows)

    def __str__(self):
        head = (f"GGN cost, method={self.method}, batch={self.batch_size}, {self.itemsize}-byte floats "
                f"(layers from the output back to the input)")
        cols = f"{'#':>3} {'layer':<34} {'d_in':>8} {'d_out':>8} {'M at out':>12} {'M bytes':>10} " \
               f"{'peak':>10} {'FLOPs':>9}  order"
        lines = [head, cols, "-" * len(cols)]
        for r in self.rows:
            lines.append(f"{r.index:>3} {r.layer[:34]:<34} {r.d_in:>8} {r.d_out:>8} {r.form_out:>12} "
                         f"{format_bytes(r.m_bytes):>10} {format_bytes(r.peak_bytes):>10} {r.flops:>9.2e}  {r.order}")
        lines.append(f"peak {format_bytes(self.peak_bytes)}, total {self.total_flops:.2e} FLOPs")
        return "\n".join(lines)

    def __repr__(self):
        return str(self)


def estimate_cost(model, input_shape, batch_size, method, threshold=None, dtype=None) -> CostTable:
    """Per-layer bytes and FLOPs of ggn_diagonal (or 'block' for ggn_blocks, 'kfac' / 'kfac-approx' for
    ggn_kfac), without running anything."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    layers = leaf_layers(model)
    shapes = feature_shapes(layers, tuple(input_shape))
    sizes = [size(s) for s in shapes]
    forms = plan_forms(method, sizes, threshold)
    itemsize = int(xp().dtype(dtype or get_default_dtype()).itemsize)
    fo, ko = forms[-1]
    table = CostTable(method=method, batch_size=int(batch_size), itemsize=itemsize,
                      output_bytes=_m_elements(fo, ko, sizes[-1], int(batch_size)) * itemsize)
    stop = lowest_parametric(layers)  # the walks end at the first parametric layer: no rows below it
    for i in range(len(layers) - 1, stop - 1, -1):
        table.rows.append(step_cost(layers[i], shapes[i], shapes[i + 1], int(batch_size), forms[i + 1],
                                    forms[i] if i > stop else None, itemsize, index=i, block=method == "block",
                                    kfac=method in KFAC_PLANS))
    return table


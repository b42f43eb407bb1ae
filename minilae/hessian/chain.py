"""Shared pieces of the backward walk (Algorithm 1): the chain of layers, M's two forms, the memory budget.

M is the Hessian of the loss w.r.t. one layer's output, per sample. It is held in one of two forms:
  * full  (B, d, d)       in flattened-feature coordinates (d = number of features of the layer output);
  * diag  (B, *shape)     only its diagonal, shaped like the features, so that a layer's own
                           `vjp_input` can act on it directly.
How M passes through a layer in each form is the layer's own rule (minilae.layers.Layer); this module
holds what the walks share: the chain, the input check, the memory budget.
"""
from __future__ import annotations

import math
import os

from ..backend import array_module
from ..layers import Layer, Sequential
from ..layers.sequential import lowest_parametric  # noqa: F401 - where every walk ends
from ..layers.base import CHUNK_BYTES  # noqa: F401 - the engine's chunk size, shared with the layers' products
from ..layers.base import ConstantDiag

BUDGET_FRACTION = 0.8
"""Share of the free memory the default budget allows, leaving room for the rest of the program."""


class MemoryBudgetError(MemoryError):
    """Raised *before* allocating when a step of the computation would exceed the memory budget."""


def leaf_layers(model) -> list:
    """The chain x_0 -> x_1 -> ... -> x_L as a flat list of layers (nested Sequentials unrolled)."""
    if isinstance(model, Sequential):
        return [leaf for layer in model.layers for leaf in leaf_layers(layer)]
    if isinstance(model, Layer):
        return [model]
    raise TypeError(f"model must be a minilae Layer or Sequential, got {type(model).__name__}")


# ---- steps with a diagonal M, which may still be the output's constant (a Gaussian's I / sigma^2) ------------

def diag_read_off(layer, m, per_sample=False, out=None):
    """(J_p * J_p)^T m: the batch sum (P,), into out if given, or (B, P) per sample; a ConstantDiag by the
    layer's constant rule (per sample through the materialised m)."""
    if not isinstance(m, ConstantDiag):
        return layer.param_diag_from_diag(m, per_sample, out=out)
    return layer.param_diag_from_diag(m.full(), per_sample=True) if per_sample else \
        layer.param_diag_from_constant(m, out=out)


def diag_step(layer, m):
    """m_in = (J_in * J_in)^T m; a ConstantDiag by the layer's constant rule (which may keep it constant)."""
    return layer.backprop_constant_diag(m) if isinstance(m, ConstantDiag) else layer.backprop_diag(m)


def full_from_diag_step(layer, m):
    """M_in = J_in^T diag(m) J_in; a ConstantDiag by the layer's constant rule."""
    return layer.backprop_from_constant_diag(m) if isinstance(m, ConstantDiag) else layer.backprop_from_diag(m)


def constant_output(likelihood, f, y, scale=1.0):
    """scale diag(H_out) as a ConstantDiag where the likelihood's diagonal is one value (a Gaussian), else None."""
    c = likelihood.hess_diag_value(f, y)
    return None if c is None else ConstantDiag(c * scale, tuple(f.shape), f)


def output_diagonal(likelihood, f, y, scale=1.0):
    """scale diag(H_out), where every diagonal walk starts: a ConstantDiag where the likelihood's diagonal is one
    value (a Gaussian), else an array shaped like f."""
    constant = constant_output(likelihood, f, y, scale)
    return scaled(likelihood.hess_diag(f, y), scale) if constant is None else constant


def scaled(H_out, scale):
    """The likelihood's H_out (or its diagonal) times scale, as a new array (the likelihood may hold on to its own)."""
    return H_out if scale == 1.0 else H_out * scale


def backend_of(m):
    """The array module of m, an array or a ConstantDiag."""
    return array_module(m.like if isinstance(m, ConstantDiag) else m)


def diagonal_head(layers, shapes, m, per_sample, check_step, factor=True):
    """The top of an exact walk while M = diag(m) exactly: a layer with one input per output keeps M diagonal,
    m_in = (J_in * J_in)^T m; the first layer without that structure gets M_in = J_in^T diag(m) J_in, or (with
    `factor`) its factor diag(sqrt(m)) J_in when d_out < d_in (M_in would be larger). Parameters are read off
    diag(m) exactly. check_step(i) refuses layer i's step before it runs (the caller's plan).
    m may be a ConstantDiag (a Gaussian's I / sigma^2): then the MLP AE's last Linear forms c W^T W once for
    the batch instead of W^T diag(m_b) W per image (60% of its 'sqrt' diagonal at batch 16), and the full-M
    walk never holds the (B, 784, 784) M_L.

    Returns (parts, i, M, form): the parameter diagonals from the top, the feature x_i that M belongs to, M
    there and its form (('full', None): (B, d, d); ('sqrt', k): a factor (B, k, *shape)). Why: a Gaussian's
    H_out = I pushed as a factor costs d_out GEMM columns per sample at the last Linear, 40 of the MLP AE's
    80 GFLOP at batch 64; from diag(m) that layer's M_in = W^T diag(m) W costs 26."""
    parts, B, stop = [], m.shape[0], lowest_parametric(layers)
    for i in range(len(layers) - 1, stop - 1, -1):
        layer = layers[i]
        check_step(i)
        if layer.num_params:
            parts.append(diag_read_off(layer, m, per_sample))
        if i == stop:
            return parts, stop, None, ("full", None)
        if not layer.one_input_per_output:
            d_out, d_in = size(shapes[i + 1]), size(shapes[i])
            if factor and d_out < d_in:  # the factor (d_out columns) is smaller than M_in (d_in^2)
                m = m.full() if isinstance(m, ConstantDiag) else m
                sqrt_m = array_module(m).sqrt(m).reshape(B, d_out, 1)
                V = (sqrt_m * layer.input_rows(m.dtype)).reshape((B, d_out) + tuple(shapes[i]))
                return parts, i, V, ("sqrt", d_out)
            return parts, i, full_from_diag_step(layer, m), ("full", None)
        m = diag_step(layer, m)


def forward_once(model, x, f=None):
    """f = model(x), or the given f, checked to be the output of the model's last forward on x.

    The layer caches the engine reads must belong to f: f must be the very array that forward returned,
    with no forward of any of its layers (a second batch, encode/decode, predict's sampled networks) and
    no set_params since (`Layer.last_output_is`, an identity test of stamps); and x must be that
    forward's input. Anything else raises instead of silently giving the GGN of another batch or network.
    """
    if f is None:
        return model.forward(x)
    if not model.last_output_is(f):
        raise ValueError("f is not the output of the model's last forward at its current parameters (a layer "
                         "ran another forward, or set_params was called, since f was computed): run "
                         "f = model(x) again just before, or pass f=None to recompute")
    seen = model.last_input
    if seen is not x and (tuple(seen.shape) != tuple(x.shape) or not bool((seen == x).all())):
        raise ValueError(f"f came from a forward on another input than x (shape {tuple(seen.shape)} vs "
                         f"{tuple(x.shape)}, or other values): pass the x of f = model(x), or f=None")
    return f


def feature_shapes(layers, in_shape) -> list:
    """Per-sample shapes of x_0, x_1, ..., x_L along the chain."""
    shapes = [tuple(in_shape)]
    for layer in layers:
        shapes.append(tuple(layer.out_shape(shapes[-1])))
    return shapes


def size(shape) -> int:
    """d = number of features of a per-sample shape."""
    return int(math.prod(shape))


def concat_parts(parts, per_sample: bool, batch: int, dtype, xp):
    """Concatenate per-layer parameter diagonals in layer order into the flat (P,) or (B, P) vector."""
    if not parts:
        return xp.zeros((batch, 0) if per_sample else (0,), dtype=dtype)
    return xp.concatenate(parts, axis=-1)


# ---- memory budget ----------------------------------------------------------------------------

def free_memory(xp) -> int:
    """Bytes free now: on a device, its free memory plus what CuPy's pool holds unused; else the host's."""
    if hasattr(xp, "cuda"):  # CuPy, or the guard's emulated device
        # freed arrays stay in CuPy's memory pool, which memGetInfo counts as used
        return int(xp.cuda.runtime.memGetInfo()[0]) + int(xp.get_default_memory_pool().free_bytes())
    return host_free_memory()


def host_free_memory() -> int:
    """MemAvailable (or the free pages) of the host, in bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resolve_budget(memory_budget, xp) -> float:
    """The budget in bytes: as given, or BUDGET_FRACTION of the free memory; inf disables the check."""
    if memory_budget is None:
        return BUDGET_FRACTION * free_memory(xp)
    budget = float(memory_budget)
    if not budget > 0:
        raise ValueError(f"memory_budget must be a positive number of bytes (or None), got {memory_budget!r}")
    return budget


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_memory(need_bytes: float, budget: float, what: str):
    """Refuse (MemoryBudgetError) before a step whose arrays would need more than the budget."""
    if need_bytes > budget:
        raise MemoryBudgetError(
            f"{what} would need {format_bytes(need_bytes)} ({int(need_bytes)} bytes), more than the memory "
            f"budget of {format_bytes(budget)}. Use method='approx' or 'mixed' (or 'sqrt'), a smaller batch, "
            f"or pass a larger memory_budget.")

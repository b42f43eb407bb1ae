"""The layer contract: a function y = f(x; theta) with its two Jacobians.

Every layer maps a batch x of shape (B, *in_shape) to y of shape (B, *out_shape) and offers
  * `forward(x)`                     y = f(x; theta); remembers what backprop needs;
  * `jac_input(x)`, `jac_params(x)`  dense per-sample Jacobians J_in = dy/dx, shape (B, d_out, d_in),
                                     and J_p = dy/dtheta, shape (B, d_out, P) - small sizes only;
  * `vjp_input(v)`, `vjp_params(v)`  the structured products J_in^T v and J_p^T v at the input of the
                                     last `forward`, which backprop and the Hessian engine use.
A product accepts v of shape (B, *out_shape) or (B, K, *out_shape): K vectors per sample, so the
Hessian engine can push the K columns of a per-sample matrix M through in one call.

Parameters are read and written as one flat vector: the layer's arrays in `param_names` order,
each raveled in C order (Linear: weight (out, in) row by row, then bias).

Which state the caches belong to: every `forward` and every `set_params` gives the layer a new
*stamp* (a counter value, no copying or hashing of arrays), and a forward records its output with the
stamps of the layers it ran (`last_output_is`). A cache written by another forward of a shared layer
(a sub-model such as the encoder, a second model) or parameters set since are then detected, not used.
"""
from __future__ import annotations

import itertools
import math

from ..backend import array_module, get_default_dtype, xp


class Layer:
    """Base class: y = f(x; theta), with dense and structured Jacobians."""

    param_names: tuple[str, ...] = ()
    _stamp = 0  # new value at every forward and set_params (see the module docstring)
    _trace = None  # (output, leaf stamps) recorded by the last forward

    def __init__(self):
        self.training = False
        self._x = None

    # ---- parameters -------------------------------------------------------------------------
    @property
    def params(self):
        """The parameter arrays, in flat-vector order."""
        return [getattr(self, name) for name in self.param_names]

    @property
    def num_params(self) -> int:
        """P, the length of this layer's slice of the flat parameter vector."""
        return sum(int(p.size) for p in self.params)

    def get_params(self):
        """theta as one flat vector (a copy)."""
        if not self.param_names:
            return xp().zeros(0, dtype=get_default_dtype())
        return xp().concatenate([p.ravel() for p in self.params])

    def set_params(self, theta):
        """Write the flat vector theta into the parameter arrays (copies)."""
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"{label(self)}: expected a flat vector of {self.num_params} parameters, "
                             f"got shape {tuple(getattr(theta, 'shape', ()))}")
        if not bool(array_module(theta).isfinite(theta).all()):
            raise ValueError(f"{label(self)}: parameter vector contains NaN or inf")
        if array_module(theta) is not xp():
            raise TypeError(f"{label(self)}: theta lives on {array_module(theta).__name__} but the backend is "
                            f"{xp().__name__}; move it with minilae.backend.asarray")
        start = 0
        for name in self.param_names:
            p = getattr(self, name)
            setattr(self, name, theta[start:start + p.size].reshape(p.shape).astype(p.dtype, copy=True))
            start += p.size
        self._stamp = next(_STAMPS)  # the caches were taken with the old parameters

    def split_params(self, flat):
        """Split a flat per-layer vector (..., P) into arrays shaped like the parameters."""
        out, start = [], 0
        for p in self.params:
            out.append(flat[..., start:start + p.size].reshape(flat.shape[:-1] + p.shape))
            start += p.size
        return out

    # ---- shapes -----------------------------------------------------------------------------
    def out_shape(self, in_shape: tuple) -> tuple:
        """Per-sample output shape for a per-sample input shape (raises on a bad shape)."""
        return tuple(in_shape)

    def train(self, mode: bool = True):
        """Switch training behaviour (only Dropout differs)."""
        self.training = mode
        return self

    def eval(self):
        """Switch to evaluation behaviour."""
        return self.train(False)

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, x, check_finite: bool = True):
        """y = f(x; theta) for a batch; caches what the vector-Jacobian products need."""
        check_batch(self, x, check_finite)
        self.out_shape(tuple(x.shape[1:]))
        self._x = x
        self._stamp = next(_STAMPS)
        y = self._forward(x)
        self._record(y)
        return y

    __call__ = forward

    # ---- which forward the caches belong to ----------------------------------------------------
    def leaf_stamps(self) -> tuple:
        """The stamps of the leaf layers, in chain order (a leaf: its own)."""
        return (self._stamp,)

    def _record(self, y):
        self._trace = (y, self.leaf_stamps())

    def last_output_is(self, f) -> bool:
        """True when f is the very output of this layer's last forward and no layer in it has run a forward
        or had its parameters set since: then the caches belong to f (an identity test, no array work)."""
        return self._trace is not None and self._trace[0] is f and self._trace[1] == self.leaf_stamps()

    def _forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} does not define _forward(x): subclass Layer and implement it")

    def _cached_input(self):
        if self._x is None:
            raise RuntimeError(f"{label(self)}: call forward(x) before a vector-Jacobian product")
        return self._x

    # ---- structured products (backprop) ------------------------------------------------------
    def vjp_input(self, v):
        """J_in^T v at the last forward input: (B, [K,] *out) -> (B, [K,] *in)."""
        x = self._cached_input()
        vk, squeeze = as_bk(v, x.shape[0], self._out_shape_cached())
        g = self._vjp_input(vk)
        return g[:, 0] if squeeze else g

    def vjp_params(self, v, per_sample: bool = False):
        """J_p^T v: summed over the batch -> (P,), or per sample -> (B, [K,] P)."""
        x = self._cached_input()
        vk, squeeze = as_bk(v, x.shape[0], self._out_shape_cached())
        if not per_sample:
            if not squeeze:
                raise ValueError("a batch-summed parameter product takes v of shape (B, *out); "
                                 "pass per_sample=True for (B, K, *out)")
            return self._vjp_params_sum(vk[:, 0])
        g = self._vjp_params(vk)
        return g[:, 0] if squeeze else g

    def _out_shape_cached(self):
        return self.out_shape(tuple(self._x.shape[1:]))

    def _vjp_input(self, v):
        raise NotImplementedError

    def _vjp_params(self, v):
        """Per-sample J_p^T v for v of shape (B, K, *out) -> (B, K, P)."""
        B, K = v.shape[:2]
        return xp().zeros((B, K, 0), dtype=v.dtype)

    def _vjp_params_sum(self, v):
        """sum_b J_p(x_b)^T v_b for v of shape (B, *out) -> (P,)."""
        return self._vjp_params(v[:, None]).sum(axis=(0, 1))

    # ---- dense Jacobians (small sizes: tests and tutorials) ----------------------------------
    def jac_input(self, x):
        """Dense J_in = dy/dx per sample, shape (B, d_out, d_in)."""
        raise NotImplementedError

    def jac_params(self, x):
        """Dense J_p = dy/dtheta per sample, shape (B, d_out, P)."""
        self.forward(x)
        B, d_out = x.shape[0], prod(self.out_shape(tuple(x.shape[1:])))
        return array_module(x).zeros((B, d_out, 0), dtype=x.dtype)

    def __repr__(self):
        return f"{type(self).__name__}()"


_STAMPS = itertools.count(1)


def label(layer) -> str:
    """A one-line name for messages: the repr of a leaf, 'Name(n layers)' for a chain."""
    inner = getattr(layer, "layers", None)
    return f"{type(layer).__name__}({len(inner)} layers)" if inner is not None else repr(layer)


def prod(shape) -> int:
    """Number of elements of a per-sample shape."""
    return int(math.prod(shape))


def as_bk(v, batch: int, out_shape: tuple):
    """View v as (B, K, *out_shape); also say whether the K axis was absent (K = 1)."""
    out_shape = tuple(out_shape)
    if tuple(v.shape[1:]) == out_shape and v.shape[0] == batch:
        return v[:, None], True
    if v.shape[0] == batch and tuple(v.shape[2:]) == out_shape:
        return v, False
    raise ValueError(f"vector has shape {tuple(v.shape)}; expected (B={batch}, *{out_shape}) "
                     f"or (B={batch}, K, *{out_shape})")


def check_batch(layer, x, check_finite: bool = True):
    """Reject non-arrays, missing batch axis and non-finite values with a clear message."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{label(layer)}: input must be an array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{label(layer)}: input needs a batch axis, shape (B, ...); got {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{label(layer)}: input must be floating point, got {x.dtype}")
    if array_module(x) is not xp():
        raise TypeError(f"{label(layer)}: input lives on {array_module(x).__name__} but the backend is {xp().__name__}; "
                        "move it with minilae.backend.asarray")
    if check_finite and not bool(array_module(x).isfinite(x).all()):
        raise ValueError(f"{label(layer)}: input contains NaN or inf; it would poison every gradient")


def identity_jacobian(x, d: int):
    """I_d broadcast to (B, d, d): the Jacobian of a reshape."""
    m = array_module(x)
    return m.broadcast_to(m.eye(d, dtype=x.dtype), (x.shape[0], d, d)).copy()


def diag_jacobian(diag):
    """diag(d_b) for a batch of vectors (B, d) -> (B, d, d)."""
    m = array_module(diag)
    B, d = diag.shape
    J = m.zeros((B, d, d), dtype=diag.dtype)
    idx = m.arange(d)
    J[:, idx, idx] = diag
    return J


def init_uniform(shape, fan_in: int, rng):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch initialises Linear and Conv2d."""
    bound = 1.0 / math.sqrt(fan_in)
    dtype = get_default_dtype()
    return xp().asarray(rng.uniform(-bound, bound, size=shape), dtype=dtype)

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

How curvature passes through the layer (Algorithm 1, appendix E.4) is told here too, next to the
Jacobians: `backprop_full` (M_in = J_in^T M J_in), `backprop_diag` (m_in = (J_in * J_in)^T m for the
diagonal m = diag(M)), the two mixed steps `diag_of_backprop` and `backprop_from_diag`, and the parameter
parts `param_block`, `param_diag`, `param_diag_from_diag`, `param_diag_from_sqrt`. A full M is
(B, d_out, d_out) in flat feature coordinates, a diagonal m is shaped like the output (B, *out_shape),
a square-root factor V (M = V^T V) is (B, k, *out_shape), and a diagonal holding one value everywhere (a
Gaussian likelihood's M_L = I / sigma^2) may come as a `ConstantDiag`, for `backprop_constant_diag` and
`param_diag_from_constant`. The base class derives every exact rule from
`vjp_input` / `vjp_params` (the columns of M pushed as an extra batch axis); `backprop_diag` has no
general form, so a layer gives it, or declares the structure that implies it (`unit_jacobian`), or the
engine says which method to implement (`MissingRuleError`). `cost_geometry` feeds `estimate_cost`.

Which state the caches belong to: every `forward` and every `set_params` gives the layer a new
*stamp* (a counter value, no copying or hashing of arrays), and a forward records its output with the
stamps of the layers it ran (`last_output_is`). A cache written by another forward of a shared layer
(a sub-model such as the encoder, a second model) or parameters set since are then detected, not used.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple

from .. import backend
from ..backend import array_module, get_default_dtype
from ..validation import all_finite

CHUNK_BYTES = 64 * 2**20
"""Largest temporary a chunked product may allocate (the M itself is budgeted separately)."""


class MissingRuleError(NotImplementedError, TypeError):
    """A layer lacks a rule a computation needs; the message names the method to implement."""


def missing_rule(layer, method: str, equation: str) -> MissingRuleError:
    """The error for a layer without `method`: names the class, the method and its equation."""
    name = type(layer).__name__
    return MissingRuleError(f"{name} has no rule {equation}: define {name}.{method} (see minilae.layers.Layer), "
                            f"or use a Hessian method that does not need it")


class Layer:
    """Base class: y = f(x; theta), with dense and structured Jacobians."""

    param_names: tuple[str, ...] = ()
    # Structure of J_in that gives curvature rules for free (each False unless the layer declares it):
    unit_jacobian = False  # every entry of J_in is 0 or 1, so J_in * J_in = J_in
    one_input_per_output = False  # a row of J_in has one non-zero: J_in^T diag(m) J_in is diagonal
    one_output_per_input = False  # a column of J_in has one non-zero: diag(J_in^T M J_in) needs only diag(M)
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
            return backend.xp().zeros(0, dtype=get_default_dtype())
        return backend.xp().concatenate([p.ravel() for p in self.params])

    def set_params(self, theta, check_finite: bool = True, share: bool = False):
        """Write the flat vector theta into the parameter arrays (copies); check_finite=False for a caller that
        has just checked theta (a P-long pass each).

        share=True makes the arrays views of theta instead, with no copy (a P-long pass saved in a trainer's
        step): the caller then owns theta, and calls set_params again after changing it, so that the layers'
        caches see the change."""
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"{label(self)}: expected a flat vector of {self.num_params} parameters, "
                             f"got shape {tuple(getattr(theta, 'shape', ()))}")
        if check_finite and not all_finite(theta):
            raise ValueError(f"{label(self)}: parameter vector contains NaN or inf")
        if array_module(theta) is not backend.xp():
            raise TypeError(f"{label(self)}: theta lives on {array_module(theta).__name__} but the backend is "
                            f"{backend.xp().__name__}; move it with minilae.backend.asarray")
        if share and self.param_names and theta.dtype != self.params[0].dtype:
            raise TypeError(f"{label(self)}: share=True needs theta in the parameters' dtype "
                            f"{self.params[0].dtype}, got {theta.dtype}")
        start = 0
        for name in self.param_names:
            p = getattr(self, name)
            new = theta[start:start + p.size].reshape(p.shape)
            if share:
                setattr(self, name, new)
            # the layer's own array is written into, as a fresh one would cost its page faults at every step of a
            # trainer (CuPy's arrays have no writeable flag: all of them are)
            elif getattr(p, "base", p) is None and getattr(p.flags, "writeable", True):
                p[...] = new
            else:  # a view into another array is replaced, never written through
                setattr(self, name, new.astype(p.dtype, copy=True))
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

    @property
    def last_input(self):
        """x of the last forward (None before any): the point every product and rule is taken at."""
        return self._x

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

    def vjp_params(self, v, per_sample: bool = False, out=None):
        """J_p^T v: summed over the batch -> (P,), or per sample -> (B, [K,] P).

        out: a (P,) array that receives the batch sum (a chain hands each layer its slice of one flat vector)."""
        x = self._cached_input()
        vk, squeeze = as_bk(v, x.shape[0], self._out_shape_cached())
        if not per_sample:
            if not squeeze:
                raise ValueError("a batch-summed parameter product takes v of shape (B, *out); "
                                 "pass per_sample=True for (B, K, *out)")
            return self._vjp_params_sum(vk[:, 0], out=check_out(self, out, v.dtype))
        if out is not None:
            raise ValueError("out receives the batch sum only; per_sample=True returns a new array")
        g = self._vjp_params(vk)
        return g[:, 0] if squeeze else g

    def _out_shape_cached(self):
        return self.out_shape(tuple(self._x.shape[1:]))

    def _vjp_input(self, v):
        raise missing_rule(self, "_vjp_input(v)", "for J_in^T v (v of shape (B, K, *out) -> (B, K, *in))")

    def _vjp_params(self, v):
        """Per-sample J_p^T v for v of shape (B, K, *out) -> (B, K, P)."""
        B, K = v.shape[:2]
        return backend.xp().zeros((B, K, 0), dtype=v.dtype)

    def _vjp_params_sum(self, v, out=None):
        """sum_b J_p(x_b)^T v_b for v of shape (B, *out) -> (P,), into out when given."""
        return into(out, self._vjp_params(v[:, None]).sum(axis=(0, 1)))

    def vjp_input_chunked(self, V):
        """J_in^T v for each of the K vectors in V (B, K, *out), in chunks of K so that the product's
        temporaries (`cost_geometry`'s vjp_work elements per vector) stay under CHUNK_BYTES."""
        B, K = V.shape[:2]
        work = self.cost_geometry(*self._shapes())["vjp_work"]
        step = max(1, int(CHUNK_BYTES // max(1, B * work * V.dtype.itemsize)))
        if step >= K or work <= prod(V.shape[2:]):  # no temporary larger than V itself: one call
            return self.vjp_input(V)
        first = self.vjp_input(V[:, :step])
        out = array_module(V).empty((B, K) + first.shape[2:], dtype=first.dtype)
        out[:, :step] = first
        for k in range(step, K, step):  # a loop over memory-sized chunks, not over elements
            out[:, k:k + step] = self.vjp_input(V[:, k:k + step])
        return out

    def _shapes(self):
        """(in_shape, out_shape) per sample at the last forward."""
        in_shape = tuple(self._cached_input().shape[1:])
        return in_shape, tuple(self.out_shape(in_shape))

    def input_rows(self, dtype):
        """The rows of J_in per sample, R (B, d_out, d_in), as J_in^T applied to the d_out unit vectors."""
        out_shape = self._shapes()[1]
        return self.vjp_input_chunked(unit_vectors(self._x.shape[0], out_shape, dtype)).reshape(
            self._x.shape[0], prod(out_shape), -1)

    def param_rows(self, dtype):
        """J_p per sample (B, d_out, P), as J_p^T applied to the d_out unit vectors."""
        out_shape = self._shapes()[1]
        return self.vjp_params(unit_vectors(self._x.shape[0], out_shape, dtype), per_sample=True)

    # ---- curvature rules: M, the loss Hessian w.r.t. the output, passed to the input ---------
    def backprop_full(self, M):
        """M_in = J_in^T M J_in: (B, d_out, d_out) -> (B, d_in, d_in). J_in^T on M's rows gives M J_in,
        then on the columns of M J_in gives J_in^T M J_in (symmetric)."""
        B, d_out = M.shape[:2]
        in_shape, out_shape = self._shapes()
        A = self.vjp_input_chunked(M.reshape((B, d_out) + out_shape)).reshape(B, d_out, -1)  # M J_in
        A_t = A.transpose(0, 2, 1).reshape((B, A.shape[2]) + out_shape)  # the columns of M J_in
        del A
        return self.vjp_input_chunked(A_t).reshape(B, prod(in_shape), prod(in_shape))

    def backprop_diag(self, m):
        """m_in = (J_in * J_in)^T m = diag(J_in^T diag(m) J_in): (B, *out) -> (B, *in).

        No general form from the products; with `unit_jacobian` (entries 0/1) it is J_in^T m itself."""
        if self.unit_jacobian:
            return self.vjp_input(m)
        raise missing_rule(self, "backprop_diag(m)", "for the diagonal M (m_in = (J_in * J_in)^T m) that 'approx' "
                                                     "and 'mixed' need")

    def backprop_constant_diag(self, m):
        """m_in = (J_in * J_in)^T m for m = c at every entry (a ConstantDiag): an array (B, *in), or a
        ConstantDiag where it stays constant. By default through the materialised m."""
        return self.backprop_diag(m.full())

    def diag_of_backprop(self, M):
        """m_in = diag(J_in^T M J_in) for full M (B, d_out, d_out) -> (B, *in), without the d_in x d_in matrix:
        sum_o R[o, i] (M R)[o, i] with R = J_in (or (J_in * J_in)^T diag(M) with `one_output_per_input`)."""
        in_shape, out_shape = self._shapes()
        if self.one_output_per_input:
            return self.backprop_diag(diag_of(M, out_shape))
        R = self.input_rows(M.dtype)
        return ((M @ R) * R).sum(axis=1).reshape((M.shape[0],) + in_shape)

    def backprop_from_diag(self, m):
        """M_in = J_in^T diag(m) J_in for m (B, *out) -> (B, d_in, d_in): R^T (m * R) with R = J_in
        (diagonal, diag((J_in * J_in)^T m), with `one_input_per_output`)."""
        if self.one_input_per_output:
            return diag_matrix(self.backprop_diag(m))
        R = self.input_rows(m.dtype)
        return R.transpose(0, 2, 1) @ (m.reshape(m.shape[0], -1, 1) * R)

    def backprop_from_constant_diag(self, m):
        """M_in = J_in^T diag(m) J_in for m = c at every entry (a ConstantDiag): (B, d_in, d_in). By default
        through the materialised m."""
        return self.backprop_from_diag(m.full())

    # ---- curvature rules: the parameters' part, read off M --------------------------------------
    def param_block(self, M, per_sample=False):
        """H_theta = J_p^T M J_p: summed over the batch (P, P) or per sample (B, P, P)."""
        B, d_out = M.shape[:2]
        J = self.param_rows(M.dtype)  # (B, d_out, P)
        MJ = M @ J
        if per_sample:
            return J.transpose(0, 2, 1) @ MJ
        P = J.shape[2]
        return J.reshape(B * d_out, P).T @ MJ.reshape(B * d_out, P)  # one product sums over the batch

    def param_diag(self, M, per_sample=False):
        """diag(J_p^T M J_p) for full M: sum_o J_p[o, p] (M J_p)[o, p], (P,) or (B, P)."""
        J = self.param_rows(M.dtype)
        out = ((M @ J) * J).sum(axis=1)
        return out if per_sample else out.sum(axis=0)

    def param_diag_from_diag(self, m, per_sample=False, out=None):
        """diag(J_p^T diag(m) J_p) = (J_p * J_p)^T m for m (B, *out): (P,) or (B, P); the sum into out if given."""
        J = self.param_rows(m.dtype)
        d = (m.reshape(m.shape[0], 1, -1) @ (J * J))[:, 0]
        return d if per_sample else into(out, d.sum(axis=0))

    def param_diag_from_constant(self, m, out=None):
        """(J_p * J_p)^T m summed over the batch for m = c at every entry (a ConstantDiag): (P,), into out if
        given. By default through the materialised m."""
        return self.param_diag_from_diag(m.full(), out=out)

    def param_diag_from_sqrt(self, V, per_sample=False):
        """diag(J_p^T V^T V J_p) = sum_k (J_p^T v_k)^2 for V (B, k, *out), in chunks of k: (P,) or (B, P)."""
        B, K = V.shape[:2]
        step = max(1, int(CHUNK_BYTES // max(1, B * self.num_params * V.dtype.itemsize)))
        out = array_module(V).zeros((B, self.num_params), dtype=V.dtype)
        for k in range(0, K, step):  # chunks of columns bound the (B, k, P) temporary
            out += (self.vjp_params(V[:, k:k + step], per_sample=True) ** 2).sum(axis=1)
        return out if per_sample else out.sum(axis=0)

    def cost_geometry(self, in_shape, out_shape) -> dict:
        """What `estimate_cost` needs: the cost kind and, per vector pushed through J_in^T, its FLOPs and
        temporary elements. Default 'generic': a dense d_out x d_in product, the rules above."""
        d_in, d_out = prod(in_shape), prod(out_shape)
        return dict(kind="generic", vjp_flops=2 * d_in * d_out, vjp_work=d_in)

    # ---- dense Jacobians (small sizes: tests and tutorials) ----------------------------------
    def jac_input(self, x):
        """Dense J_in = dy/dx per sample, shape (B, d_out, d_in); default: J_in^T on the d_out unit vectors."""
        self.forward(x)
        return self.input_rows(x.dtype)

    def jac_params(self, x):
        """Dense J_p = dy/dtheta per sample, shape (B, d_out, P); default: J_p^T on the d_out unit vectors."""
        self.forward(x)
        if self.num_params:
            return self.param_rows(x.dtype)
        B, d_out = x.shape[0], prod(self.out_shape(tuple(x.shape[1:])))
        return array_module(x).zeros((B, d_out, 0), dtype=x.dtype)

    def __repr__(self):
        return f"{type(self).__name__}()"


_STAMPS = itertools.count(1)


class ConstantDiag(NamedTuple):
    """A diagonal m = diag(M) that holds one value c at every entry, of shape (B, *features): a Gaussian
    likelihood's M_L = I / sigma^2. Where m is constant, a layer's step needs no product with the batch:
    Linear's weight diagonal is c sum_b x_b^2 in every row, and its m_in = c sum_o W[o, :]^2 in every image."""

    value: float
    shape: tuple  # (B, *features)
    like: object  # an array of the backend and dtype that m.full() takes

    @property
    def dtype(self):
        return self.like.dtype

    def full(self):
        """m materialised: an array of the given shape holding value everywhere."""
        return array_module(self.like).full(self.shape, self.value, dtype=self.like.dtype)

    def reshape(self, shape):
        """The same constant on another shape (B, *features)."""
        return self._replace(shape=tuple(shape))


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


def check_out(layer, out, dtype):
    """out, the (P,) array a batch-summed product writes into (None: a new one is made), checked."""
    if out is not None and (tuple(out.shape) != (layer.num_params,) or out.dtype != dtype):
        raise ValueError(f"{label(layer)}: out must be a ({layer.num_params},) array of {dtype}; "
                         f"got {out.dtype} {tuple(out.shape)}")
    return out


def flat_out(layer, out, dtype):
    """The (P,) array to write a batch sum into: out, or a new one."""
    return array_module(layer.params[0]).empty(layer.num_params, dtype=dtype) if out is None else out


def into(out, value):
    """value written into out (which is returned), or value itself when out is None."""
    if out is None:
        return value
    out[...] = value
    return out


def check_batch(layer, x, check_finite: bool = True):
    """Reject non-arrays, missing batch axis and non-finite values with a clear message."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{label(layer)}: input must be an array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{label(layer)}: input needs a batch axis, shape (B, ...); got {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"{label(layer)}: input must be floating point, got {x.dtype}")
    if array_module(x) is not backend.xp():
        raise TypeError(f"{label(layer)}: input lives on {array_module(x).__name__} but the backend is "
                        f"{backend.xp().__name__}; "
                        "move it with minilae.backend.asarray")
    if check_finite and not bool(array_module(x).isfinite(x).all()):
        raise ValueError(f"{label(layer)}: input contains NaN or inf; it would poison every gradient")


def unit_vectors(batch: int, shape: tuple, dtype):
    """The d unit vectors of a feature shape, per sample: (B, d, *shape), a broadcast view of I_d."""
    d = prod(shape)
    eye = backend.xp().eye(d, dtype=dtype).reshape((d,) + tuple(shape))
    return backend.xp().broadcast_to(eye, (batch,) + eye.shape)


def diag_of(M, shape):
    """diag(M) for M (B, d, d), returned shaped (B, *shape)."""
    return array_module(M).diagonal(M, axis1=1, axis2=2).reshape((M.shape[0],) + tuple(shape))


def diag_matrix(m):
    """diag(m) as a full (B, d, d) matrix, for m of shape (B, *shape)."""
    return diag_jacobian(m.reshape(m.shape[0], -1))


def identity_jacobian(x, d: int):
    """I_d broadcast to (B, d, d): the Jacobian of a reshape."""
    xp = array_module(x)
    return xp.broadcast_to(xp.eye(d, dtype=x.dtype), (x.shape[0], d, d)).copy()


def diag_jacobian(diag):
    """diag(d_b) for a batch of vectors (B, d) -> (B, d, d)."""
    xp = array_module(diag)
    B, d = diag.shape
    J = xp.zeros((B, d, d), dtype=diag.dtype)
    idx = xp.arange(d)
    J[:, idx, idx] = diag
    return J


def init_uniform(shape, fan_in: int, rng):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch initialises Linear and Conv2d."""
    bound = 1.0 / math.sqrt(fan_in)
    dtype = get_default_dtype()
    return backend.xp().asarray(rng.uniform(-bound, bound, size=shape), dtype=dtype)


def gram_with_ones(rows, ones: bool):
    """[R | 1]^T [R | 1] for rows R (n, d), the column of ones only if `ones`: (d [+1], d [+1]), without
    copying R (the KFAC input factor of a layer with a bias)."""
    gram = rows.T @ rows
    if not ones:
        return gram
    xp = array_module(rows)
    s = rows.sum(axis=0)
    top = xp.concatenate([gram, s[:, None]], axis=1)
    return xp.concatenate([top, xp.concatenate([s, xp.full(1, rows.shape[0], dtype=rows.dtype)])[None]], axis=0)

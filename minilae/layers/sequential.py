"""Sequential: a chain of layers, composed by the chain rule (appendix E.1-E.3).

For f = f_L o ... o f_1 with x_0 = x and x_l = f_l(x_{l-1}):
  J_in(f)       = J_in^L ... J_in^1,
  J_{theta_l}(f) = J_in^L ... J_in^{l+1} J_p^l,
and backprop evaluates the transposed products right to left, one layer at a time.
The flat parameter vector is the layers' flat vectors concatenated in layer order.
"""
from __future__ import annotations

from .. import backend
from ..backend import array_module
from ..validation import all_finite
from .base import Layer, check_batch, identity_jacobian, label, prod


def lowest_parametric(layers) -> int:
    """Index of the first layer with parameters (0 if none): every backward walk ends there, as nothing below
    it needs a gradient or curvature (the MLP AE's first Linear would push 784 features into its Flatten)."""
    return next((i for i, layer in enumerate(layers) if layer.num_params), 0)


class Sequential(Layer):
    """f(x) = f_L(... f_1(x)); parameters ordered layer by layer."""

    def __init__(self, *layers):
        super().__init__()
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for layer in layers:
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential takes Layer objects, got {type(layer).__name__}")
        self.layers = list(layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Sequential(*self.layers[i])
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"{type(self).__name__}(\n  {inner}\n)"

    def train(self, mode: bool = True):
        self.training = mode
        for layer in self.layers:
            layer.train(mode)
        return self

    # ---- parameters -------------------------------------------------------------------------
    @property
    def params(self):
        return [p for layer in self.layers for p in layer.params]

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    def param_slices(self):
        """slice of the flat vector owned by each layer (empty slices for parameter-free layers)."""
        out, start = [], 0
        for layer in self.layers:
            out.append(slice(start, start + layer.num_params))
            start += layer.num_params
        return out

    def get_params(self):
        """theta = concat(theta_1, ..., theta_L) (a copy)."""
        parts = [layer.get_params() for layer in self.layers if layer.num_params]
        return backend.xp().concatenate(parts) if parts else backend.xp().zeros(0)

    def set_params(self, theta, check_finite: bool = True, share: bool = False):
        """Write theta into every layer (checked once here, not again per layer); share: views, see Layer's."""
        if getattr(theta, "ndim", None) != 1 or theta.shape[0] != self.num_params:
            raise ValueError(f"expected a flat vector of {self.num_params} parameters, "
                             f"got shape {tuple(getattr(theta, 'shape', ()))}")
        if check_finite and not all_finite(theta):  # check before any layer is written
            raise ValueError("parameter vector contains NaN or inf")
        for layer, sl in zip(self.layers, self.param_slices()):
            if layer.num_params:
                layer.set_params(theta[sl], check_finite=False, share=share)

    # ---- shapes and forward -----------------------------------------------------------------
    def out_shape(self, in_shape):
        shape = tuple(in_shape)
        for layer in self.layers:
            shape = layer.out_shape(shape)
        return shape

    def shapes(self, in_shape):
        """Per-sample shapes x_0, x_1, ..., x_L along the chain."""
        out = [tuple(in_shape)]
        for layer in self.layers:
            out.append(layer.out_shape(out[-1]))
        return out

    def forward(self, x, check_finite: bool = True):
        """x_L = f_L(... f_1(x_0)); each layer caches its input."""
        check_batch(self, x, check_finite)
        self.out_shape(tuple(x.shape[1:]))
        self._x = x
        for layer in self.layers:
            x = layer.forward(x, check_finite=False)
        self._record(x)
        return x

    __call__ = forward

    def leaf_stamps(self) -> tuple:
        """The leaves' stamps: any forward of a shared layer or set_params since changes them."""
        return tuple(stamp for layer in self.layers for stamp in layer.leaf_stamps())

    def _cached_input(self):
        """x_0 of the last forward, provided the layers' caches all still belong to that forward."""
        x = super()._cached_input()
        if self._trace is None or self._trace[1] != self.leaf_stamps():
            raise RuntimeError(f"{label(self)}: the layers' caches no longer belong to its last forward (a layer "
                               "ran a forward on its own since, e.g. encode/decode or a shared sub-model, or "
                               "set_params was called); call forward(x) before a vector-Jacobian product")
        return x

    def _out_shape_cached(self):
        return self.out_shape(tuple(self._x.shape[1:]))

    # ---- backprop ---------------------------------------------------------------------------
    def _vjp_input(self, v):
        """J_in^T v = J_in^1^T (... J_in^L^T v)."""
        for layer in reversed(self.layers):
            v = layer.vjp_input(v)
        return v

    def _backprop_params(self, v, per_sample, out=None):
        """Walk the chain backwards collecting J_p^l^T v_l, with v_{l-1} = J_in^l^T v_l. The batch sums are
        written into the layers' slices of one flat vector (out, or a new one): a chain of large layers would
        otherwise copy every gradient twice (into the layer's flat part, then into the concatenation)."""
        xp = array_module(v)
        if not per_sample and out is None:
            out = xp.empty(self.num_params, dtype=v.dtype)
        grads, slices = [], self.param_slices()
        stop = lowest_parametric(self.layers)
        for i in range(len(self.layers) - 1, stop - 1, -1):
            layer = self.layers[i]
            if layer.num_params and per_sample:
                grads.append(layer.vjp_params(v, per_sample=True))
            elif layer.num_params:
                layer.vjp_params(v, out=out[slices[i]])
            if i > stop:
                v = layer.vjp_input(v)
        if not per_sample:
            return out
        if not grads:  # a chain without parameters
            return xp.zeros(v.shape[:2] + (0,), dtype=v.dtype)
        return xp.concatenate(grads[::-1], axis=-1)

    def _vjp_params(self, v):
        return self._backprop_params(v, per_sample=True)

    def _vjp_params_sum(self, v, out=None):
        return self._backprop_params(v, per_sample=False, out=out)

    # ---- dense Jacobians by the chain rule -----------------------------------------------------
    def jac_input(self, x):
        """J_in = J_in^L ... J_in^1: (B, d_out, d_in)."""
        return self._dense(x, with_params=False)[0]

    def jac_params(self, x):
        """[J_in^L...J_in^2 J_p^1, ..., J_p^L]: (B, d_out, P)."""
        return self._dense(x, with_params=True)[1]

    def _dense(self, x, with_params):
        """(J_in, J_p or None, output) from ONE forward through the chain, so that every factor is
        taken at the same point (a training-mode Dropout draws its mask once and all factors use it)."""
        xp = array_module(x)
        check_batch(self, x)
        self.out_shape(tuple(x.shape[1:]))
        J_in, J_p, h = [], [], x
        for layer in self.layers:
            if isinstance(layer, Sequential):  # nested chain: its own single forward
                Ji, Jp, h_next = layer._dense(h, with_params)
            else:
                h_next = layer.forward(h)  # first: a Dropout's Jacobians then reuse this mask
                Ji = layer.jac_input(h)
                Jp = layer.jac_params(h) if with_params else None
            J_in.append(Ji)
            J_p.append(Jp)
            h = h_next
        # right to left: A = J_in^L ... J_in^{l+1} multiplies J_p^l; at the end A is the full J_in
        A = identity_jacobian(h, prod(h.shape[1:]))
        blocks = []
        for Ji, Jp in zip(reversed(J_in), reversed(J_p)):
            if with_params:
                blocks.append(A @ Jp)
            A = A @ Ji
        self._x = x
        self._record(h)  # the factors were taken at one forward, so its caches are consistent
        return A, (xp.concatenate(blocks[::-1], axis=2) if with_params else None), h

"""The guard backend: NumPy dressed up as a GPU, so that CI catches host/device slips without one.

A testing tool, not a user backend: ``MINILAE_BACKEND=guard`` or ``set_backend('guard')``. Then
``xp()`` is :data:`namespace`, whose functions unwrap their arguments, run NumPy and wrap every
array result in a :class:`GuardArray`. A GuardArray computes like a ``cupy.ndarray`` and refuses
what CuPy refuses (checked against CuPy 13):

  * ``numpy.asarray(g)``, ``numpy.array(g)``, anything that asks for ``__array__``: TypeError
    "Implicit conversion to a NumPy array is not allowed" (CuPy's words);
  * one operation mixing a GuardArray with a host ``numpy.ndarray`` (or a list): operators, NumPy
    ufuncs and functions (``np.tanh(g)`` itself is fine, CuPy dispatches it), ``xp.<function>``:
    TypeError "Unsupported type <class 'numpy.ndarray'>";
  * ``g[key] = host_array`` (CuPy allows only ``g[:] = host_array``): ValueError;
  * NumPy API that CuPy lacks: ``xp.<name>`` in :data:`MISSING`, Generator methods other than
    CuPy's (no ``normal``, ``permutation``, ``choice``, ``shuffle``), the legacy ``xp.random.*``,
    array flags other than CuPy's three (``g.flags.writeable``: AttributeError).

Allowed, as in CuPy: ``xp.asarray`` / ``xp.array`` of host data (the host -> device copy; it
copies, so later changes to the host array do not leak through), host index arrays, Python and
NumPy scalars, and ``float`` / ``int`` / ``bool`` / ``.item()`` / formatting of one element: a
device sync each. Reductions return 0-d GuardArrays (CuPy's do), never NumPy scalars.
:data:`stats` counts the syncs, the transfers each way and the largest array created, so a test
can assert e.g. that a training step makes no host copies other than its logged scalars.

What it cannot catch: slowness (syncs are counted, not refused), numerical differences of
CuPy's kernels (cuBLAS, cuRAND streams: the guard's random numbers are NumPy's), NumPy functions
that CuPy has under the same name with other defaults, and device memory exhaustion (the
emulated device reports the host's free memory; tests patch ``namespace.cuda.runtime.memGetInfo``).
"""
from __future__ import annotations

import operator
import types
from contextlib import contextmanager

import numpy

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")

MISSING = frozenset({
    # NumPy API that CuPy 13 does not provide (a short list of the sure cases, not an inventory)
    "nditer", "nested_iters", "ma", "rec", "char", "matrix", "asmatrix", "recarray", "memmap", "ctypeslib",
    "frompyfunc", "busday_count", "busday_offset", "is_busday", "datetime_as_string",
})
"""Names of the NumPy namespace that the guard refuses because CuPy has no such function."""

_GENERATOR = frozenset({"random", "uniform", "integers", "standard_normal", "standard_exponential",
                        "exponential", "standard_gamma", "gamma", "beta", "binomial", "poisson",
                        "geometric", "chisquare", "dirichlet", "f", "logseries", "power", "hypergeometric"})
"""Methods of cupy.random.Generator (CuPy 13); NumPy's Generator has more."""

stats = {"syncs": 0, "to_device": 0, "to_host": 0, "largest": 0}
"""Counters: device syncs (float/int/bool/item/format), transfers each way, largest array (elements)."""


@contextmanager
def watch():
    """Yield a dict that, after the block, holds what the block did (the keys of :data:`stats`)."""
    saved, seen = dict(stats), {}
    stats.update(syncs=0, to_device=0, to_host=0, largest=0)
    try:
        yield seen
    finally:
        seen.update(stats)
        for key in ("syncs", "to_device", "to_host"):
            stats[key] += saved[key]
        stats["largest"] = max(stats["largest"], saved["largest"])


def _refuse_host(value):
    raise TypeError(f"Unsupported type {type(value)} (minilae guard: a host array met a device array; "
                    "move it with minilae.backend.asarray)")


def _unwrap(value, allow_host=False):
    """GuardArray -> its NumPy data, recursively through tuples, lists and dicts; refuse host arrays."""
    if isinstance(value, GuardArray):
        return value._a
    if isinstance(value, numpy.ndarray) and not allow_host:
        _refuse_host(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_unwrap(v, allow_host) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v, allow_host) for k, v in value.items()}
    return value


def _wrap(value):
    """NumPy results -> GuardArrays (NumPy scalars become 0-d arrays, as CuPy returns them)."""
    if isinstance(value, numpy.ndarray):
        return GuardArray(value)
    if isinstance(value, numpy.generic) and not isinstance(value, (numpy.str_, numpy.bytes_)):
        return GuardArray(numpy.asarray(value))
    if isinstance(value, tuple):
        items = [_wrap(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _call(func, *args, **kwargs):
    return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))


def _sync(value):
    stats["syncs"] += 1
    return value


class _Flags(types.SimpleNamespace):
    """cupy.ndarray.flags: the three flags CuPy keeps."""

    def __getitem__(self, name):
        return getattr(self, name.lower())


class GuardArray:
    """A NumPy array that behaves as if it lived on a device (see the module docstring)."""

    __slots__ = ("_a",)

    def __init__(self, a):
        self._a = a
        stats["largest"] = max(stats["largest"], a.size)

    # ---- the boundary ----------------------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def get(self):
        """Device -> host copy (cupy.ndarray.get): the one explicit way out."""
        stats["to_host"] += 1
        return self._a.copy()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for v in (inputs[:1] + inputs[2:] if method == "at" else inputs):  # ufunc.at takes host indices
            if isinstance(v, (numpy.ndarray, list)):
                _refuse_host(v)
        return _call(getattr(ufunc, method), *inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ in MISSING:
            raise TypeError(f"no implementation found for 'numpy.{func.__name__}' on types that implement "
                            "__array_function__ (minilae guard: CuPy has no such function)")
        return _call(func, *args, **kwargs)

    # ---- attributes and methods: NumPy's, with results wrapped ---------------------------------
    @property
    def flags(self):
        """CuPy's flags: c_contiguous, f_contiguous and owndata only (no writeable, aligned...)."""
        f = self._a.flags
        return _Flags(c_contiguous=f.c_contiguous, f_contiguous=f.f_contiguous, owndata=f.owndata)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("ctypes", "data", "tobytes", "tofile", "tostring", "byteswap"):
            raise AttributeError(f"'GuardArray' object has no attribute {name!r} (not on a device array)")
        value = getattr(self._a, name)
        if callable(value):
            return lambda *args, **kwargs: _call(value, *args, **kwargs)
        return _wrap(value)

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key, allow_host=True)])

    def __setitem__(self, key, value):
        if isinstance(value, numpy.ndarray) and value.ndim and not (isinstance(key, slice) and key == slice(None)):
            raise ValueError("non-scalar numpy.ndarray cannot be used for fill (minilae guard: move it with "
                             "minilae.backend.asarray)")
        self._a[_unwrap(key, allow_host=True)] = _unwrap(value, allow_host=True)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(row) for row in self._a)

    # ---- one element to Python: a sync -------------------------------------------------------
    def __bool__(self):
        return _sync(bool(self._a))

    def __float__(self):
        return _sync(float(self._a))

    def __int__(self):
        return _sync(int(self._a))

    def __index__(self):
        return _sync(operator.index(self._a))

    def __complex__(self):
        return _sync(complex(self._a))

    def item(self, *args):
        return _sync(self._a.item(*args))

    def tolist(self):
        return _sync(self._a.tolist())

    def __format__(self, spec):
        return _sync(format(self._a.item() if self._a.ndim == 0 else self._a, spec))

    def __repr__(self):
        return f"guard({self._a!r})"

    __hash__ = None


def _operator(op, reflected=False):
    def method(self, other):
        if isinstance(other, list):  # host ndarrays are refused by _unwrap
            _refuse_host(other)
        a, b = (other, self) if reflected else (self, other)
        return _call(op, a, b)
    return method


def _inplace(op):
    def method(self, other):
        if isinstance(other, (numpy.ndarray, list)):
            _refuse_host(other)
        op(self._a, _unwrap(other))
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
              "lshift", "rshift"):
    _op = getattr(operator, _name + "_" if _name in ("and", "or") else _name)
    setattr(GuardArray, f"__{_name}__", _operator(_op))
    setattr(GuardArray, f"__r{_name}__", _operator(_op, reflected=True))
    setattr(GuardArray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(GuardArray, f"__{_name}__", _operator(getattr(operator, _name)))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(GuardArray, f"__{_name}__", (lambda op: lambda self: _wrap(op(self._a)))(getattr(operator, _name)))


# ---- the namespace that xp() returns ----------------------------------------------------------

class _Ufunc:
    """A NumPy ufunc on device arrays: calls and its methods (at, outer, reduce, accumulate)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        for v in args:
            if isinstance(v, (numpy.ndarray, list)):
                _refuse_host(v)
        return _call(self._ufunc, *args, **kwargs)

    def __getattr__(self, name):
        value = getattr(self._ufunc, name)
        return (lambda *a, **k: _call(value, *a, **k)) if callable(value) else value


class _Generator:
    """cupy.random.Generator's methods over a NumPy Generator; others (normal, permutation...) refused."""

    def __init__(self, seed):
        self._rng = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        if name not in _GENERATOR:
            raise AttributeError(f"'Generator' object has no attribute {name!r} (minilae guard: "
                                 "cupy.random.Generator has no such method)")
        method = getattr(self._rng, name)
        return lambda *args, **kwargs: _call(method, *args, **kwargs)


def _default_rng(seed=None):
    """cupy.random.default_rng: None, an int (or ints) or a SeedSequence; a Generator passes through."""
    if isinstance(seed, _Generator):
        return seed
    if isinstance(seed, (numpy.random.Generator, numpy.random.BitGenerator)):
        raise TypeError("a NumPy Generator cannot seed a device generator (minilae guard)")
    return _Generator(_unwrap(seed))


def _asarray(a, dtype=None, copy=None, order=None):
    """Host data -> a device array (a copy, as a transfer is); a device array comes back as it is."""
    if isinstance(a, GuardArray):
        return a if dtype is None or a.dtype == dtype else GuardArray(a._a.astype(dtype))
    stats["to_device"] += 1
    return GuardArray(numpy.array(_unwrap(a, allow_host=True), dtype=dtype, copy=True, order=order))


def _array(a, dtype=None, copy=True, order="K", ndmin=0):
    """cupy.array: always a new device array."""
    if isinstance(a, GuardArray):
        return GuardArray(numpy.array(a._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    stats["to_device"] += 1
    return GuardArray(numpy.array(_unwrap(a, allow_host=True), dtype=dtype, copy=True, order=order, ndmin=ndmin))


class _Namespace(types.SimpleNamespace):
    """NumPy's functions on GuardArrays; a thin stand-in for the ``cupy`` module."""

    def __getattr__(self, name):
        if name.startswith("__") or name in MISSING:
            raise AttributeError(f"module 'cupy' has no attribute {name!r} (minilae guard)")
        value = getattr(numpy, name)
        if isinstance(value, numpy.ufunc):
            return _Ufunc(value)
        if isinstance(value, type) or not callable(value):
            return value  # dtypes, finfo, constants: the same objects in CuPy
        return lambda *args, **kwargs: _call(value, *args, **kwargs)


def _mem_info():
    """(free, total) bytes of the emulated device: the host's free memory (tests may patch this)."""
    from .hessian.chain import host_free_memory  # noqa: PLC0415 - avoids an import cycle
    free = host_free_memory()
    return free, free


namespace = _Namespace(
    __name__="minilae._guard", ndarray=GuardArray, asarray=_asarray, array=_array,
    random=types.SimpleNamespace(default_rng=_default_rng, Generator=_Generator),
    lib=types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
        as_strided=lambda x, shape=None, strides=None: _call(numpy.lib.stride_tricks.as_strided, x, shape, strides))),
    linalg=types.SimpleNamespace(**{n: (lambda f: lambda *a, **k: _call(f, *a, **k))(getattr(numpy.linalg, n))
                                    for n in ("eigh", "eigvalsh", "cholesky", "solve", "inv", "norm", "qr", "svd",
                                              "det", "slogdet")}),
    cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=_mem_info)),
    get_default_memory_pool=lambda: types.SimpleNamespace(free_bytes=lambda: 0),
)
"""What ``xp()`` returns under the guard backend."""

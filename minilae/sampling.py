"""Standard normal noise eps ~ N(0, I) for the posteriors' samples theta = mean + eps / sqrt(precision).

One sample of the weights takes P normals. NumPy's Generator draws them one at a time (its ziggurat): for the
MLP autoencoder's 1.07M float32 weights that is 9-11 ms on the 2-core CI machine, about a whole plain-AE step.
For float32 noise we use the Box-Muller transform instead: two independent uniforms give two independent
exact normals,

    z1 = r cos(phi),  z2 = r sin(phi),  r = sqrt(-2 log(1 - u1)),  phi = 2 pi u2,

and every step is one vectorised ufunc over the whole array (3.7-5.1 ms for the same 1.07M numbers into a
reused buffer, against 9.2-10.8 ms for the ziggurat, timed by hand; ``benchmarks/bench_vs_pytorch.py`` times
it inside an online step). The radius is computed from a float64 uniform, so the largest |z| is
sqrt(2 log 2^53) = 8.6 rather than the 5.8 that a 24-bit float32 uniform would allow; the angle needs no more
than float32. Every number comes from the
caller's generator, so the noise is a function of its state alone (the same on every rank of a
data-parallel run holding the same generator), and every backend runs the same arithmetic, so the guard
backend reproduces NumPy's noise exactly. float64 noise is the generator's own ``standard_normal`` (NumPy's
float64 sine and cosine are not vectorised).
"""
from __future__ import annotations

import math

import numpy as np

from . import backend

__all__ = ["standard_normal", "box_muller"]


def standard_normal(rng, shape, dtype, out=None):
    """eps ~ N(0, I) of the given shape and dtype from rng (a Generator of the current backend): Box-Muller for
    float32, else rng's own. out: an array of that shape and dtype to draw into (a trainer reuses one: each
    fresh array of a million numbers costs its page faults), or None for a new one."""
    shape = tuple(shape)
    if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {shape}; got {out.dtype} {out.shape}")
    if np.dtype(dtype) == np.float32:
        return box_muller(rng, shape, out)
    if out is None:
        return rng.standard_normal(shape, dtype=dtype)
    out[...] = rng.standard_normal(shape, dtype=dtype)
    return out


def box_muller(rng, shape, out=None):
    """float32 normals (z1, z2) = r (cos phi, sin phi), r = sqrt(-2 log(1 - u1)) (u1 float64), phi = 2 pi u2."""
    xp = np if isinstance(rng, np.random.Generator) else backend.xp()  # the noise lives where rng draws
    shape = tuple(shape)
    n = math.prod(shape)
    half = (n + 1) // 2
    direct = out is not None and n % 2 == 0  # an odd count needs one number more than out holds
    z = out.reshape(-1) if direct else xp.empty(2 * half, dtype=xp.float32)
    # the half float64 uniforms u1 fill z's memory first: in [0, 1) on a grid of 2^-53, so 1 - u1 in (0, 1] is
    # exact and its log finite; rounded to float32, 1 - u1 keeps its relative precision down to 2^-53, hence
    # the tail up to |z| = 8.6, and float32's log is vectorised (float64's log1p(-u1) is 10x slower)
    u1 = _uniform(rng, z.view(xp.float64))
    r = xp.subtract(1.0, u1, out=u1).astype(xp.float32)
    xp.log(r, out=r)
    r *= xp.float32(-2)
    xp.sqrt(r, out=r)
    phi = _uniform(rng, z[half:])
    phi *= xp.float32(2 * math.pi)
    xp.cos(phi, out=z[:half])
    xp.sin(phi, out=phi)
    z[:half] *= r
    z[half:] *= r
    if out is None:
        return z[:n].reshape(shape)
    if not direct:
        out.reshape(-1)[...] = z[:n]
    return out


def _uniform(rng, out):
    """out (1-D) filled with uniforms in [0, 1) of its dtype, drawn by rng (in place with NumPy's Generator)."""
    if isinstance(rng, np.random.Generator):
        return rng.random(out.shape[0], dtype=out.dtype, out=out)
    out[...] = rng.random(out.shape[0], dtype=out.dtype)
    return out

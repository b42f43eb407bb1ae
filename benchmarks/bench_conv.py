"""Benchmark: forward+backward time of the convolutional autoencoder, and the FLOP rate its
Conv2d layers reach compared with a plain matrix product of the same size, in one run.

For each Conv2d layer the work is three matrix products of the same size (im2col):
  forward      y      = cols W^T          (M x K) (K x N)
  input grad   dcols  = v W               (M x N) (N x K), then col2im
  param grad   dW     = v^T cols          (N x M) (M x K)
with M = B * H_out * W_out, K = C_in * kh * kw, N = C_out, so 3 * 2 M N K FLOPs per layer.
The reference is a plain `A @ B` with A (M, K) and B (K, N), timed in the same run, so the ratio
says how much of the machine's matmul speed the layer keeps after im2col/col2im and reshapes.
At stride 1 the input product has two code paths (col2im, or a convolution of v with the flipped
kernel, which Conv2d picks when C_out H W < C_in H_out W_out); both are timed in the same run and
the factor col2im / convolution printed, the measurement that keeps the second path.

    python benchmarks/bench_conv.py                  # batch 64, 28x28, float32 and float64
    python benchmarks/bench_conv.py --repeats 20 --dtypes float32

Results are printed as a table and written as JSON to benchmarks/results/ (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from minilae.backend import get_backend, set_backend, set_default_dtype, to_numpy, xp
from minilae.layers import Conv2d
from minilae.models import conv_autoencoder

RESULTS = Path(__file__).resolve().parent / "results"


def sync():
    """Wait for queued GPU work so that wall-clock times are honest (no-op on NumPy)."""
    if get_backend() == "cupy":
        xp().cuda.Stream.null.synchronize()


def median_times(fns, repeats, warmup):
    """Median wall-clock seconds of each fn() over `repeats` rounds after `warmup` untimed rounds.
    The functions take turns within a round, so a change in machine load hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            sync()
            t.append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times]


def median_time(fn, repeats, warmup):
    """Median wall-clock seconds of one function."""
    return median_times([fn], repeats, warmup)[0]


def time_by_layer_type(model, x, rng, repeats, warmup):
    """Seconds of forward + both products per layer type (where the rest of the model's time goes)."""
    totals, h = {}, x
    for layer in model.layers:
        y = layer.forward(h)
        v = xp().asarray(rng.standard_normal(y.shape), dtype=y.dtype)
        fns = [lambda layer=layer, h=h: layer.forward(h), lambda layer=layer, v=v: layer.vjp_input(v)]
        if layer.num_params:
            fns.append(lambda layer=layer, v=v: layer.vjp_params(v))
        name = type(layer).__name__
        totals[name] = totals.get(name, 0.0) + sum(median_times(fns, repeats, warmup))
        h = y
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def conv_shapes(model, x):
    """(layer, its input) for every Conv2d, from one forward through the chain."""
    pairs, h = [], x
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            pairs.append((layer, h))
        h = layer.forward(h)
    return pairs


def bench_dtype(dtype, batch, repeats, warmup, seed):
    """All timings for one dtype: whole model, each conv layer, and the matching plain matmuls."""
    set_default_dtype(dtype)
    rng = np.random.default_rng(seed)
    model = conv_autoencoder(input_shape=(1, 28, 28), seed=seed)
    x = xp().asarray(rng.random((batch, 1, 28, 28)), dtype=dtype)

    def forward_backward():
        f = model.forward(x)
        return model.vjp_params(f - x)  # Gaussian likelihood gradient with sigma = 1

    t_model = median_time(forward_backward, repeats, warmup)
    by_type = time_by_layer_type(model, x, rng, repeats, warmup)

    rows = []
    for layer, h in conv_shapes(model, x):
        y = layer.forward(h)
        v = xp().asarray(rng.standard_normal(y.shape), dtype=dtype)
        B, L = h.shape[0], y.shape[2] * y.shape[3]
        M, K, N = B * L, layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1], layer.out_channels
        A = xp().asarray(rng.standard_normal((M, K)), dtype=dtype)
        Bm = xp().asarray(rng.standard_normal((K, N)), dtype=dtype)
        # the layer's products run at the input of its last forward, so forward goes first
        t_fwd, t_in, t_par, t_mm = median_times(
            [lambda: layer.forward(h), lambda: layer.vjp_input(v), lambda: layer.vjp_params(v), lambda: A @ Bm],
            repeats, warmup)
        row = dict(layer=repr(layer), M=M, K=K, N=N, flops=3 * 2 * M * N * K,
                   t_forward=t_fwd, t_vjp_input=t_in, t_vjp_params=t_par,
                   t_conv=t_fwd + t_in + t_par, t_matmul_x3=3 * t_mm)
        row.update(input_product_paths(layer, v, repeats, warmup))
        rows.append(row)
    conv_flops = sum(r["flops"] for r in rows)
    t_conv = sum(r["t_conv"] for r in rows)
    t_mm = sum(r["t_matmul_x3"] for r in rows)

    n = 1024  # a large square product: the machine's matmul ceiling, for context only
    P = xp().asarray(rng.standard_normal((n, n)), dtype=dtype)
    t_peak = median_time(lambda: P @ P, max(3, repeats // 2), 1)

    # keep the result alive so nothing is optimised away, and check it is sane
    assert np.isfinite(to_numpy(forward_backward())).all()
    return dict(dtype=np.dtype(dtype).name, batch=batch, t_forward_backward=t_model, conv_layers=rows,
                conv_flops=conv_flops, t_conv=t_conv, t_matmul=t_mm,
                conv_gflops=conv_flops / t_conv / 1e9, matmul_gflops=conv_flops / t_mm / 1e9,
                ratio=t_mm / t_conv, peak_matmul_gflops=2 * n**3 / t_peak / 1e9,
                conv_share_of_model=t_conv / t_model, t_by_layer_type=by_type)


def input_product_paths(layer, v, repeats, warmup):
    """Seconds of J_in^T v by col2im and by the flipped-kernel convolution (stride 1 only), in one run,
    and which one the layer picks: the measurement that justifies keeping the second code path."""
    if layer.stride != (1, 1):
        return dict(path="col2im")
    vk = v[:, None]
    t_col2im, t_conv = median_times([lambda: layer._vjp_input_by_col2im(vk, layer.weight),
                                     lambda: layer._vjp_input_as_convolution(vk, layer.weight)], repeats, warmup)
    path = "convolution" if layer._transpose_is_a_convolution() else "col2im"
    return dict(path=path, t_in_col2im=t_col2im, t_in_convolution=t_conv, col2im_over_convolution=t_col2im / t_conv)


def other_runnable_tasks(samples=10, interval=0.05):
    """Mean number of runnable tasks besides this one (Linux /proc/loadavg, field 4), sampled
    while this process is idle: a busy machine makes every timing here unreliable."""
    counts = []
    for _ in range(samples):
        try:
            with open("/proc/loadavg") as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        except (OSError, ValueError, IndexError):
            return None
        time.sleep(interval)
    return float(np.mean(counts))


def machine_info():
    info = dict(python=platform.python_version(), numpy=np.__version__, machine=platform.machine(),
                cpu_count=os.cpu_count(), backend=get_backend(), other_runnable_before=other_runnable_tasks(),
                env={k: v for k, v in os.environ.items()
                     if k.startswith(("OPENBLAS", "OMP_", "MKL_")) or k == "MINILAE_BACKEND"})
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older NumPy: no dict mode
        info["blas"] = "unknown"
    return info


def print_report(res):
    print(f"\n== {res['dtype']}, batch {res['batch']}: conv AE forward+backward "
          f"{res['t_forward_backward'] * 1e3:.1f} ms (median)")
    print(f"{'layer':<66} {'M':>6} {'K':>4} {'N':>3} {'fwd ms':>7} {'in ms':>7} {'par ms':>7} "
          f"{'conv GF/s':>9} {'mm GF/s':>8}")
    for r in res["conv_layers"]:
        print(f"{r['layer']:<66} {r['M']:>6} {r['K']:>4} {r['N']:>3} {r['t_forward'] * 1e3:7.2f} "
              f"{r['t_vjp_input'] * 1e3:7.2f} {r['t_vjp_params'] * 1e3:7.2f} "
              f"{r['flops'] / r['t_conv'] / 1e9:9.1f} {r['flops'] / r['t_matmul_x3'] / 1e9:8.1f}")
    for r in res["conv_layers"]:
        if "t_in_col2im" in r:
            print(f"J_in^T v of {r['layer'][:40]}: col2im {r['t_in_col2im'] * 1e3:.2f} ms, convolution "
                  f"{r['t_in_convolution'] * 1e3:.2f} ms (col2im / convolution = {r['col2im_over_convolution']:.2f}); "
                  f"the layer uses {r['path']}")
    print(f"conv layers: {res['conv_flops'] / 1e6:.0f} MFLOP in {res['t_conv'] * 1e3:.1f} ms = "
          f"{res['conv_gflops']:.1f} GFLOP/s; same-size plain matmuls {res['matmul_gflops']:.1f} GFLOP/s; "
          f"ratio {res['ratio']:.0%} (target >= 25%)")
    print("forward + both products by layer type: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res["t_by_layer_type"].items()))
    print(f"conv layers are {res['conv_share_of_model']:.0%} of the model's forward+backward time; "
          f"1024^3 matmul: {res['peak_matmul_gflops']:.1f} GFLOP/s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs per measurement; the median is kept")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_conv.json", help="JSON output file")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--batch and --repeats must be >= 1, --warmup >= 0")
    set_backend(args.backend)

    info = machine_info()
    print(f"numpy {info['numpy']} ({info['blas']}), {info['cpu_count']} CPUs, backend {info['backend']}, "
          f"env {info['env'] or '{}'}")
    results = [bench_dtype(np.dtype(d).type, args.batch, args.repeats, args.warmup, args.seed)
               for d in args.dtypes]
    info["other_runnable_after"] = other_runnable_tasks()
    busy = max(info["other_runnable_before"] or 0.0, info["other_runnable_after"] or 0.0)
    if busy >= 0.5:
        print(f"WARNING: about {busy:.1f} other processes were running on {os.cpu_count()} CPUs; "
              "these times are unreliable (BLAS threads suffer most). Re-run on a quiet machine.")
    for res in results:
        print_report(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(machine=info, results=results), indent=2))
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()

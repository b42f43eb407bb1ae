"""Benchmark of the Hessian engine: the paper's Fig. 7 and Table 1, measured.

Part 1 - resolution sweep. A 5-layer convolutional net that keeps channels (3) and size (3x3 kernels,
padding 1, Tanh between) on square images; for each side length and each structure, the time and peak
memory of one GGN diagonal (block: all blocks) at the given batch size, with the model's forward pass
done beforehand (f given). A step the memory budget cannot hold is refused by the engine before it
allocates and recorded as "does not fit"; a run predicted (from the previous size and the FLOP estimate)
to take longer than --max-seconds is recorded as "skipped". Log-log slopes of time and memory against
the number of pixels are fitted over the largest measured sizes: ~1 for approx, ~2 for exact.
KFAC (``kfac``: factors A, G with G from the exact M, walked as 'sqrt' walks it; ``kfac-approx``: G from
diag M, walked as 'approx') is timed the same way, one call of ggn_kfac.
On this net every feature has the same size 3 s^2, so 'mixed' is exact while 3 s^2 <= threshold and
approximate above it.

Part 2 - the autoencoders at batch 64 on 28x28: one approximate-diagonal GGN (forward included, and
with f given) against one gradient computation (forward + backward) in the same run, and the relative
error of approx, mixed and the KFAC diagonal (diag(G)_i diag(A)_j / n) against the exact diagonal
(computed with full M or by the square-root method, whichever the cost estimate says is cheaper and fits).

Run:  python benchmarks/bench_hessian.py             (about 7 minutes on 2 cores)
      python benchmarks/bench_hessian.py --quick     (seconds; small sizes)
Writes benchmarks/results/bench_hessian.{json,png} and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

from minilae import backend
from minilae.gradcheck import relative_error
from minilae.hessian import MemoryBudgetError, estimate_cost, ggn_blocks, ggn_diagonal, ggn_kfac
from minilae.hessian.chain import format_bytes, resolve_budget
from minilae.kfac import KFAC_METHODS, kron_diagonal
from minilae.layers import Conv2d, Sequential, Tanh
from minilae.losses import Gaussian
from minilae.models import conv_autoencoder, mlp_autoencoder

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def five_conv_net(channels=3, seed=0):
    """Five 3x3 convolutions with padding 1 (channels and size preserved), Tanh between them."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(5):
        layers += [Conv2d(channels, channels, 3, padding=1, rng=rng), Tanh()]
    return Sequential(*layers[:-1])


# ---- measuring --------------------------------------------------------------------------------

def synchronize():
    xp = backend.xp()
    if backend.get_backend() == "cupy":
        xp.cuda.Stream.null.synchronize()


def peak_memory(fn):
    """Peak bytes allocated while fn runs: tracemalloc for NumPy, the memory pool's growth for CuPy."""
    if backend.get_backend() == "cupy":
        pool = backend.xp().get_default_memory_pool()
        pool.free_all_blocks()
        before = pool.total_bytes()
        fn()
        synchronize()
        return pool.total_bytes() - before
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def best_time(fn, repeats, min_total=0.5, max_runs=50):
    """Fastest of at least `repeats` runs, repeating quick functions until min_total seconds were spent:
    the minimum is robust to other processes stealing the CPU now and then."""
    times = []
    while len(times) < repeats or (sum(times) < min_total and len(times) < max_runs):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_times(fns, rounds):
    """Fastest time of each function, running them in turn so background load hits all alike."""
    best = [math.inf] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], best_time(fn, 1))
    return best


# ---- part 1: resolution sweep -----------------------------------------------------------------

def sweep(args, budget):
    model, lik = five_conv_net(), Gaussian()
    dtype = backend.get_default_dtype()
    rows = []
    for method in args.methods:
        prev = None  # (seconds, flops) of the last measured size, to predict the next
        for s in args.sizes:
            shape = (3, s, s)
            est = estimate_cost(model, shape, args.batch, "block" if method == "block" else method,
                                threshold=args.threshold, dtype=dtype)
            row = dict(method=method, side=s, pixels=s * s, features=3 * s * s, est_peak_bytes=est.peak_bytes,
                       est_flops=est.total_flops)
            x = backend.asarray(np.random.default_rng(s).random((args.batch,) + shape), dtype=dtype)
            f = model(x)

            def run():
                if method == "block":
                    return ggn_blocks(model, lik, x, x, memory_budget=budget, f=f)
                if method in KFAC_METHODS:
                    return ggn_kfac(model, lik, x, x, method=method, f=f, memory_budget=budget)
                return ggn_diagonal(model, lik, x, x, method=method, threshold=args.threshold, f=f,
                                    memory_budget=budget)

            predicted = prev[0] * est.total_flops / prev[1] if prev else 0.0
            if est.peak_bytes <= budget and predicted > args.max_seconds:
                row.update(status="skipped", predicted_seconds=predicted)
            else:
                try:
                    row["peak_bytes"] = peak_memory(run)
                    row["seconds"] = best_time(run, args.repeats if predicted < 1 else 1)
                    row["status"] = "ok"
                    prev = (row["seconds"], est.total_flops)
                except MemoryBudgetError as err:  # refused before allocating
                    row.update(status="does not fit", message=str(err))
            rows.append(row)
            print(f"  {method:>11} {s:>4}x{s:<4} {_cell(row)}", flush=True)
    return rows


def _cell(row):
    if row["status"] == "ok":
        return f"{row['seconds']:9.4f} s {format_bytes(row['peak_bytes']):>10}"
    if row["status"] == "skipped":
        return f"skipped (~{row['predicted_seconds']:.0f} s predicted, needs {format_bytes(row['est_peak_bytes'])})"
    return f"does not fit (needs {format_bytes(row['est_peak_bytes'])})"


def fit_slopes(rows, methods, threshold, n_points=3, min_seconds=1e-3):
    """Log-log slopes against pixels over the largest measured sizes: time, measured peak memory, and
    the estimated memory over all sizes (also those not run). For 'mixed' only the sizes on the
    approximate side of the threshold are fitted (the two regimes have different laws)."""
    slopes = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if method == "mixed":
            mine = [r for r in mine if r["features"] > threshold]
        ok = [r for r in mine if r["status"] == "ok"]
        timed = [r for r in ok if r["seconds"] >= min_seconds][-n_points:]
        entry = {}
        if len(timed) >= 2:
            entry["time"] = _slope(timed, "seconds")
        if len(ok) >= 2:
            entry["memory"] = _slope(ok[-n_points:], "peak_bytes")
            entry["sides"] = [ok[-n_points:][0]["side"], ok[-1]["side"]]
        if len(mine) >= 2:
            entry["estimated_memory"] = _slope(mine[-n_points:], "est_peak_bytes")
        slopes[method] = entry
    return slopes


def _slope(rows, key):
    return float(np.polyfit(np.log([r["pixels"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def sweep_table(rows, args, slopes):
    lines = [f"{'side':>9} " + "".join(f"{m:>34}" for m in args.methods)]
    for s in args.sizes:
        cells = []
        for m in args.methods:
            r = next(r for r in rows if r["method"] == m and r["side"] == s)
            if r["status"] == "ok":
                cells.append(f"{r['seconds']:.4f} s / {format_bytes(r['peak_bytes'])}")
            elif r["status"] == "skipped":
                cells.append(f"skip (~{r['predicted_seconds']:.0f} s, {format_bytes(r['est_peak_bytes'])})")
            else:
                cells.append(f"no fit ({format_bytes(r['est_peak_bytes'])})")
        lines.append(f"{s:>4}x{s:<4} " + "".join(f"{c:>34}" for c in cells))
    lines.append("log-log slopes vs pixels (largest sizes; mixed: its approximate regime):")
    for m, e in slopes.items():
        nan = float("nan")
        lines.append(f"  {m:>11}: time {e.get('time', nan):.2f}, measured memory {e.get('memory', nan):.2f}, "
                     f"estimated memory {e.get('estimated_memory', nan):.2f}")
    return "\n".join(lines)


def plot(rows, args, slopes, budget, path):
    import matplotlib  # noqa: PLC0415 - plotting only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in args.methods:
        ok = [r for r in rows if r["method"] == m and r["status"] == "ok"]
        nofit = [r for r in rows if r["method"] == m and r["status"] != "ok"]
        label = f"{m} (slope {slopes[m].get('time', float('nan')):.2f})"
        line, = axes[0].loglog([r["pixels"] for r in ok], [r["seconds"] for r in ok], "o-", label=label)
        axes[1].loglog([r["pixels"] for r in ok], [r["peak_bytes"] for r in ok], "o-", color=line.get_color(),
                       label=f"{m} (slope {slopes[m].get('memory', float('nan')):.2f})")
        if nofit:  # estimated memory of what was refused or skipped
            axes[1].loglog([r["pixels"] for r in nofit], [r["est_peak_bytes"] for r in nofit], "x--",
                           color=line.get_color(), alpha=0.6)
    axes[1].axhline(budget, color="k", lw=0.8, ls=":", label=f"budget {format_bytes(budget)}")
    axes[0].set(xlabel="pixels per channel (s^2)", ylabel="seconds", title="time of one GGN")
    axes[1].set(xlabel="pixels per channel (s^2)", ylabel="bytes", title="peak memory (x: estimate, not run)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"5-layer conv net, 3 channels, batch {args.batch}, {np.dtype(backend.get_default_dtype()).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- part 2: the autoencoders -----------------------------------------------------------------

def autoencoder_report(args, budget):
    rows = []
    dtype = backend.get_default_dtype()
    for name, build in (("conv", conv_autoencoder), ("mlp", mlp_autoencoder)):
        model, lik = build(seed=0), Gaussian()
        x = backend.asarray(np.random.default_rng(1).random((args.ae_batch, 1, 28, 28)), dtype=dtype)

        def gradient():
            f = model(x)
            return model.vjp_params(lik.grad(f, x))

        def approx():
            return ggn_diagonal(model, lik, x, x, method="approx")

        f = model(x)
        t_grad, t_approx = interleaved_times([gradient, approx], 2 + 2 * args.repeats)
        f = model(x)  # the timed runs did forwards of their own: f must come from the last one
        t_given = best_time(lambda: ggn_diagonal(model, lik, x, x, method="approx", f=f), 1 + args.repeats)
        row = dict(model=name, batch=args.ae_batch, grad_seconds=t_grad, approx_seconds=t_approx,
                   approx_f_given_seconds=t_given, ratio=t_approx / t_grad, ratio_f_given=t_given / t_grad)
        # the exact reference: full M, or the square-root factor where that is cheaper (or M does not fit)
        costs = {m: estimate_cost(model, (1, 28, 28), args.ae_batch, m, dtype=dtype) for m in ("exact", "sqrt")}
        row["exact_full_M_peak_bytes"] = costs["exact"].peak_bytes
        fits = [m for m in costs if costs[m].peak_bytes <= budget]
        exact_method = min(fits, key=lambda m: costs[m].total_flops)
        f = model(x)
        t0 = time.perf_counter()
        exact = ggn_diagonal(model, lik, x, x, method=exact_method, f=f, memory_budget=budget)
        synchronize()
        row.update(exact_method=exact_method, exact_seconds=time.perf_counter() - t0)
        approx_diag = ggn_diagonal(model, lik, x, x, method="approx", f=f)
        row["approx_rel_err"] = relative_error(approx_diag, exact)
        row["approx_rel_err_l2"] = _l2(approx_diag, exact)
        row["approx_per_layer"] = per_layer_errors(model, approx_diag, exact)
        for threshold in args.ae_thresholds:
            def mixed_run(t=threshold):
                return ggn_diagonal(model, lik, x, x, method="mixed", threshold=t, f=f, memory_budget=budget)
            try:
                mixed = mixed_run()
            except MemoryBudgetError:
                row[f"mixed_{threshold}"] = dict(status="does not fit")
                continue
            row[f"mixed_{threshold}"] = dict(status="ok", seconds=best_time(mixed_run, args.repeats),
                                             rel_err=relative_error(mixed, exact), rel_err_l2=_l2(mixed, exact),
                                             per_layer=per_layer_errors(model, mixed, exact))
        for method in args.ae_kfac:
            def kfac_run(m=method):
                return ggn_kfac(model, lik, x, x, method=m, f=f, memory_budget=budget)
            try:
                diag = kron_diagonal(kfac_run(), exact)
            except MemoryBudgetError:
                row[method] = dict(status="does not fit")
                continue
            row[method] = dict(status="ok", seconds=best_time(kfac_run, args.repeats),
                               rel_err=relative_error(diag, exact), rel_err_l2=_l2(diag, exact),
                               per_layer=per_layer_errors(model, diag, exact))
        rows.append(row)
    return rows


def per_layer_errors(model, approx, exact):
    """relative_error of each parametric layer's slice (max-norm within the layer), input to output."""
    return [round(relative_error(approx[sl], exact[sl]), 4)
            for layer, sl in zip(model.layers, model.param_slices()) if layer.num_params]


def _l2(a, b):
    a, b = backend.to_numpy(a).astype(float), backend.to_numpy(b).astype(float)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ae_table(rows, thresholds, kfac_methods=()):
    lines = []
    for r in rows:
        lines.append(f"{r['model']} AE, batch {r['batch']}, 28x28: gradient {r['grad_seconds'] * 1e3:.1f} ms, "
                     f"approx GGN {r['approx_seconds'] * 1e3:.1f} ms (ratio {r['ratio']:.2f}; with f given "
                     f"{r['approx_f_given_seconds'] * 1e3:.1f} ms, ratio {r['ratio_f_given']:.2f})")
        lines.append(f"    exact diagonal by '{r['exact_method']}': {r['exact_seconds']:.2f} s (full M would need "
                     f"{format_bytes(r['exact_full_M_peak_bytes'])})")
        lines.append(f"    rel. error vs exact (max-norm / l2): approx {r['approx_rel_err']:.3f} / "
                     f"{r['approx_rel_err_l2']:.3f}; per layer (input -> output) {r['approx_per_layer']}")
        for t in thresholds:
            m = r[f"mixed_{t}"]
            if m["status"] != "ok":
                lines.append(f"    mixed(threshold={t}): does not fit")
                continue
            lines.append(f"    mixed(threshold={t}): {m['seconds']:.2f} s, rel. error {m['rel_err']:.3f} / "
                         f"{m['rel_err_l2']:.3f}; per layer {m['per_layer']}")
        for method in kfac_methods:
            m = r[method]
            if m["status"] != "ok":
                lines.append(f"    {method} diagonal: does not fit")
                continue
            lines.append(f"    {method} diagonal (factors {m['seconds']:.2f} s): rel. error {m['rel_err']:.3f} / "
                         f"{m['rel_err_l2']:.3f}; per layer {m['per_layer']}")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="8,16,24,32,48,64,96,128,192,256", help="image side lengths")
    p.add_argument("--methods", default="approx,mixed,exact,block,kfac,kfac-approx",
                   help="approx, mixed, exact, sqrt, block, kfac, kfac-approx")
    p.add_argument("--threshold", type=int, default=4096, help="feature-size threshold of 'mixed' in the sweep")
    p.add_argument("--batch", type=int, default=1, help="batch size of the sweep")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--max-seconds", type=float, default=120.0, help="skip runs predicted to take longer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=None, help="memory budget (default: 80%% of free memory)")
    p.add_argument("--ae-batch", type=int, default=64)
    p.add_argument("--ae-thresholds", default="512,1568", help="thresholds of 'mixed' on the autoencoders")
    p.add_argument("--ae-kfac", default="kfac,kfac-approx", help="KFAC structures on the autoencoders ('' for none)")
    p.add_argument("--skip-ae", action="store_true")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--quick", action="store_true", help="small sizes and batch (a smoke run)")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.ae_batch, args.repeats, args.max_seconds = "8,16,24,32", 8, 1, 5.0
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.ae_thresholds = [int(t) for t in args.ae_thresholds.split(",")]
    args.ae_kfac = [m.strip() for m in args.ae_kfac.split(",") if m.strip()]
    return args


def main(argv=None):
    args = parse(argv)
    backend.set_backend(args.backend)
    backend.set_default_dtype(np.dtype(args.dtype))
    budget = args.budget_gib * 2**30 if args.budget_gib else resolve_budget(None, backend.xp())
    print(f"backend {args.backend}, {args.dtype}, memory budget {format_bytes(budget)}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f}")
    print(f"part 1: 5-layer conv net, batch {args.batch}, sizes {args.sizes}")
    rows = sweep(args, budget)
    slopes = fit_slopes(rows, args.methods, args.threshold)
    print(sweep_table(rows, args, slopes))
    ae_rows = []
    if not args.skip_ae:
        print(f"part 2: autoencoders, batch {args.ae_batch}")
        ae_rows = autoencoder_report(args, budget)
        print(ae_table(ae_rows, args.ae_thresholds, args.ae_kfac))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "bench_hessian.png")
    plot(rows, args, slopes, budget, png)
    with open(os.path.join(args.out, "bench_hessian.json"), "w") as fh:
        json.dump(dict(argv=sys.argv[1:], backend=args.backend, dtype=args.dtype, budget_bytes=budget,
                       sweep=rows, slopes=slopes, autoencoders=ae_rows), fh, indent=1,
                  default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes on the machine inflate the times)")
    print(f"wrote {png} and bench_hessian.json")


if __name__ == "__main__":
    main()

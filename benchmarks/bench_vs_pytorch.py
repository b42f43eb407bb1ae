#!/usr/bin/env python
"""minilae against PyTorch (and BackPACK) on the same CPU: the same autoencoders, the same weights, one run.

For the MLP and the conv autoencoder (batch 64 of MNIST, float32) the script times, in interleaved rounds
(every configuration once per round, medians over rounds, so a change of machine load hits all alike):

  gradient      minilae forward + `vjp_params`            vs  torch forward + autograd backward
  approx diag   minilae `ggn_diagonal(method='approx')`   vs  BackPACK DiagGGNMC(mc_samples=1)
  exact diag    minilae `ggn_diagonal(method='sqrt')`     vs  BackPACK DiagGGNExact
  online step   minilae OnlineLaplace.step ('approx')     vs  a torch step: sample, backward with DiagGGNMC, Adam
  AE step       minilae MAPTrainer.step                   vs  a torch Adam step

and prints a markdown table of the ratios minilae / torch (below 1: minilae is faster), plus minilae's own
ratios (approx diagonal / gradient, online step / AE step). Before timing, both libraries run the same
weights in float64 on a small batch and must agree: outputs, gradients and exact diagonals to ~1e-12
(relative, max-norm), and the float32 outputs and gradients to ~1e-4.

The loss is the Gaussian likelihood with sigma = 1 averaged over the batch, 0.5 ||f - x||^2 / B (+ const):
torch's gradient is that of the same expression. BackPACK reads the curvature off MSELoss(reduction='sum'),
whose Hessian is 2 I, so its diagonals are halved to compare them with minilae's sum_b J_b^T J_b.

Threads are pinned before numpy and torch are imported (OMP/OPENBLAS/MKL_NUM_THREADS, torch.set_num_threads)
and printed. Needs the `bench` extra (`pip install -e '.[bench]'`, see the README for the CPU-only torch).

    python benchmarks/bench_vs_pytorch.py                    # both models, 2 threads, ~4 min on 2 cores
    python benchmarks/bench_vs_pytorch.py --models mlp --rounds 9 --threads 1
    python benchmarks/bench_vs_pytorch.py --json benchmarks/results/vs_pytorch.json
"""
from __future__ import annotations

import argparse
import os
import sys


def _threads_from_argv(argv):
    """--threads N from the command line, before argparse: the environment must be set before numpy loads."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
if __name__ == "__main__":
    for _var in THREAD_VARS:
        os.environ[_var] = _threads_from_argv(sys.argv[1:])

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import warnings  # noqa: E402

import numpy as np  # noqa: E402

try:
    import torch  # noqa: E402
    from backpack import backpack, extend, extensions  # noqa: E402
    from backpack.core.derivatives.basederivatives import BaseDerivatives  # noqa: E402
    from backpack.core.derivatives.flatten import FlattenDerivatives  # noqa: E402
    from backpack.extensions.secondorder.diag_ggn.diag_ggn_base import DiagGGNBaseModule  # noqa: E402
except ImportError as err:  # pragma: no cover - an optional dependency
    raise SystemExit(f"bench_vs_pytorch needs torch and BackPACK (pip install -e '.[bench]'): {err}")

from minilae import backend  # noqa: E402
from minilae.hessian import ggn_diagonal  # noqa: E402
from minilae.layers import Conv2d, Flatten, Linear, MaxPool2d, Reshape, Tanh, Upsample  # noqa: E402
from minilae.losses import Gaussian  # noqa: E402
from minilae.models import build_model  # noqa: E402
from minilae.online import OnlineLaplace  # noqa: E402
from minilae.optim import Adam  # noqa: E402
from minilae.training import MAPTrainer  # noqa: E402


# ---- the same network in torch ------------------------------------------------------------------

class UpsampleDerivatives(BaseDerivatives):
    """Nearest up-sampling for BackPACK: J^T sums each s x s block of the output (BackPACK has no rule)."""

    def hessian_is_zero(self, module):
        return True

    def _jac_t_mat_prod(self, module, g_inp, g_out, mat, subsampling=None):
        s = int(module.scale_factor)
        V, N, C, H, W = mat.shape
        return mat.reshape(V, N, C, H // s, s, W // s, s).sum(dim=(4, 6))


def torch_layer(layer):
    """The torch module computing the same function as a minilae leaf layer, with its weights copied."""
    if isinstance(layer, Linear):
        mod = torch.nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.param_names,
                              dtype=torch.float64)
    elif isinstance(layer, Conv2d):
        mod = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, bias="bias" in layer.param_names, dtype=torch.float64)
    elif isinstance(layer, Tanh):
        return torch.nn.Tanh()
    elif isinstance(layer, MaxPool2d):
        return torch.nn.MaxPool2d(layer.k)
    elif isinstance(layer, Upsample):
        return torch.nn.Upsample(scale_factor=layer.s, mode="nearest")
    elif isinstance(layer, Flatten):
        return torch.nn.Flatten()
    elif isinstance(layer, Reshape):
        return torch.nn.Unflatten(1, layer.shape)
    else:
        raise TypeError(f"no torch counterpart for {layer!r}")
    with torch.no_grad():  # float64 first, so a float64 model's weights are copied exactly
        for name in layer.param_names:
            getattr(mod, name).copy_(torch.from_numpy(np.array(backend.to_numpy(getattr(layer, name)))))
    return mod


def torch_model(model, dtype):
    """nn.Sequential of the model's layers with its current weights, extended for BackPACK; its output is
    flattened to (B, d) (BackPACK's MSELoss takes 2-D inputs only), so the targets are flattened images."""
    net = torch.nn.Sequential(*[torch_layer(layer) for layer in model.layers], torch.nn.Flatten()).to(dtype)
    return extend(net)


def backpack_extension(kind):
    """DiagGGNMC(1) or DiagGGNExact, taught the two modules BackPACK lacks (Upsample; Unflatten = a reshape)."""
    ext = extensions.DiagGGNMC(mc_samples=1) if kind == "mc" else extensions.DiagGGNExact()
    ext.set_module_extension(torch.nn.Upsample, DiagGGNBaseModule(derivatives=UpsampleDerivatives()))
    ext.set_module_extension(torch.nn.Unflatten, DiagGGNBaseModule(derivatives=FlattenDerivatives()))
    return ext


def torch_params(net):
    """The parameters in minilae's flat order: layer by layer, weight then bias."""
    return [p for m in net for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]).detach().numpy()


# ---- the timed steps ------------------------------------------------------------------------------

class TorchOnline:
    """The online LAE's step in torch: theta_s ~ N(theta, (H + lambda)^-1), backward with BackPACK's MC
    diagonal at theta_s, Adam on theta (with the prior's weight decay lambda / N), H <- (1 - a) H + (N / B) G."""

    def __init__(self, net, n_data, alpha=1e-3, prior_precision=1.0):
        self.net, self.params = net, torch_params(net)
        self.theta = [p.detach().clone() for p in self.params]
        self.H = [torch.zeros_like(p) for p in self.params]
        self.opt = torch.optim.Adam(self.theta, lr=1e-3)
        self.n_data, self.alpha, self.lam = n_data, alpha, prior_precision
        self.loss = extend(torch.nn.MSELoss(reduction="sum"))
        self.ext = backpack_extension("mc")

    def step(self, x):
        B = x.shape[0]
        with torch.no_grad():
            for p, th, h in zip(self.params, self.theta, self.H):
                p.copy_(th + torch.randn_like(th) / torch.sqrt(h + self.lam))
                p.grad = None
        with backpack(self.ext):  # backward on the loss module's own output, as BackPACK requires
            self.loss(self.net(x), x.flatten(1)).backward()
        with torch.no_grad():  # MSELoss(sum) is 2 x the nll summed over the batch: gradient times 0.5 / B
            for p, th, h in zip(self.params, self.theta, self.H):
                th.grad = p.grad * (0.5 / B) + (self.lam / self.n_data) * th
                h.mul_(1 - self.alpha).add_(p.diag_ggn_mc, alpha=0.5 * self.n_data / B)
        self.opt.step()


def steps(model_name, x_np, n_train, exact_batch):
    """{step name: (minilae callable, torch callable)} for one model, at float32 (the exact diagonals on the
    first exact_batch images)."""
    lik = Gaussian(1.0)
    x = backend.asarray(x_np)
    xt = torch.from_numpy(x_np)
    xf = xt.flatten(1)
    B = x_np.shape[0]
    m = build_model(model_name, (1, 28, 28), latent_size=2, seed=0)
    net = torch_model(m, torch.float32)
    mse = extend(torch.nn.MSELoss(reduction="sum"))
    mc, exact = backpack_extension("mc"), backpack_extension("exact")

    def ml_grad():
        f = m(x)
        return m.vjp_params(lik.grad(f, x) / B)

    def th_grad():
        net.zero_grad(set_to_none=True)
        (0.5 * ((net(xt) - xf) ** 2).sum() / B).backward()

    def th_diag(ext, n=B):
        def run():
            net.zero_grad(set_to_none=True)
            with backpack(ext):
                mse(net(xt[:n]), xf[:n]).backward()
        return run

    ae = MAPTrainer(build_model(model_name, (1, 28, 28), latent_size=2, seed=0), Adam(lr=1e-3))
    online = OnlineLaplace(build_model(model_name, (1, 28, 28), latent_size=2, seed=0), n_train, hessian="approx")
    online_rng = backend.xp().random.default_rng(0)
    net_ae = torch_model(m, torch.float32)
    opt_ae = torch.optim.Adam(net_ae.parameters(), lr=1e-3)
    torch_online = TorchOnline(torch_model(m, torch.float32), n_train)

    def th_ae():
        opt_ae.zero_grad(set_to_none=True)
        (0.5 * ((net_ae(xt) - xf) ** 2).sum() / B).backward()
        opt_ae.step()

    return {
        "gradient": (ml_grad, th_grad),
        "approx diag": (lambda: ggn_diagonal(m, lik, x, x, method="approx"), th_diag(mc)),
        "exact diag": (lambda: ggn_diagonal(m, lik, x[:exact_batch], x[:exact_batch], method="sqrt"),
                       th_diag(exact, exact_batch)),
        "AE step": (lambda: ae.step(x), th_ae),
        "online step": (lambda: online.step(x, online_rng), lambda: torch_online.step(xt)),
    }


# ---- agreement --------------------------------------------------------------------------------------

def rel(a, b):
    """Relative max-norm difference |a - b|_max / |b|_max."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def agreement(model_name, x_np, dtype):
    """{quantity: relative difference} between minilae and torch on the same weights at dtype."""
    backend.set_default_dtype(dtype)
    try:
        m = build_model(model_name, (1, 28, 28), latent_size=2, seed=0)
    finally:
        backend.set_default_dtype("float32")
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    net = torch_model(m, tdtype)
    x_np = x_np.astype(dtype)
    x, xt = backend.asarray(x_np), torch.from_numpy(x_np)
    lik, B = Gaussian(1.0), x_np.shape[0]
    f = m(x)
    g = m.vjp_params(lik.grad(f, x) / B)
    xf = xt.flatten(1)
    ft = net(xt)
    (0.5 * ((ft - xf) ** 2).sum() / B).backward()
    out = {"output": rel(backend.to_numpy(f).reshape(B, -1), ft.detach().numpy()),
           "gradient": rel(backend.to_numpy(g), flat(p.grad for p in torch_params(net)))}
    if dtype == "float64":
        d = ggn_diagonal(m, lik, x, x, method="sqrt")
        net.zero_grad(set_to_none=True)
        with backpack(backpack_extension("exact")):
            extend(torch.nn.MSELoss(reduction="sum"))(net(xt), xf).backward()
        out["exact diag"] = rel(backend.to_numpy(d), 0.5 * flat(p.diag_ggn_exact for p in torch_params(net)))
    return out


# ---- timing -------------------------------------------------------------------------------------------

def timed(fn, min_seconds):
    """Seconds per call: calls repeated until min_seconds have passed (at least one)."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n


def load_images(n, data_root, seed=0):
    """n MNIST training images (float32, (n, 1, 28, 28)); uniform noise if MNIST is not there."""
    try:
        from minilae.data import load_dataset  # noqa: PLC0415
        x_all, _ = load_dataset("mnist", "train", root=data_root)
        source = "MNIST"
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"MNIST not found ({err}); timing on uniform noise images", file=sys.stderr)
        x_all, source = np.random.default_rng(seed).random((n, 1, 28, 28)), "uniform noise"
    idx = np.random.default_rng(seed).permutation(len(x_all))[:n]
    return np.ascontiguousarray(x_all[idx], dtype=np.float32), source


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"])
    p.add_argument("--steps", nargs="+", default=["gradient", "approx diag", "exact diag", "AE step", "online step"],
                   help="which of: gradient, 'approx diag', 'exact diag', 'AE step', 'online step'")
    p.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP threads of both libraries")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--exact-batch", type=int, default=16,
                   help="batch of the exact diagonals (seconds per call at 64 on the conv AE; the ratio hardly depends on it)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    p.add_argument("--min-seconds", type=float, default=0.3, help="time per configuration and round (at least one call)")
    p.add_argument("--check-batch", type=int, default=8, help="batch of the float64 agreement check")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    # BackPACK's module hooks fire on outputs when the input needs no gradient, as here: expected
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backend.set_backend("numpy")
    threads = {v: os.environ.get(v, "(unset)") for v in THREAD_VARS}
    print(f"threads: torch {torch.get_num_threads()}, " + ", ".join(f"{k}={v}" for k, v in threads.items()))
    print(f"numpy {np.__version__}, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs")
    x_np, source = load_images(max(args.batch_size, args.check_batch), args.data_root)
    n_train = 55000

    checks = {}
    for name in args.models:
        for dtype in ("float64", "float32"):
            checks[(name, dtype)] = agreement(name, x_np[:args.check_batch], dtype)
            print(f"agreement {name} {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in checks[(name, dtype)].items()))
    bad = [(k, q, v) for k, d in checks.items() for q, v in d.items() if v > (1e-10 if k[1] == "float64" else 1e-3)]
    if bad:
        raise SystemExit(f"minilae and torch disagree: {bad}")

    configs = {}
    for name in args.models:
        for step, fns in steps(name, x_np[:args.batch_size], n_train, args.exact_batch).items():
            if step in args.steps:
                configs[(name, step)] = fns
    for fns in configs.values():  # warm-up: first calls allocate, and the online trainers set H_0
        for fn in fns:
            fn()
    times = {key: ([], []) for key in configs}
    for r in range(args.rounds):
        for key, fns in configs.items():
            for fn, ts in zip(fns, times[key]):
                ts.append(timed(fn, args.min_seconds))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    rows = []
    for (name, step), (ml, th) in times.items():
        rows.append({"model": name, "step": step, "minilae_s": statistics.median(ml), "torch_s": statistics.median(th),
                     "ratio": statistics.median(ml) / statistics.median(th),
                     "ratio_range": [min(a / b for a, b in zip(ml, th)), max(a / b for a, b in zip(ml, th))]})
    peer = {"gradient": "torch autograd", "approx diag": "BackPACK DiagGGNMC (1 sample)",
            "exact diag": "BackPACK DiagGGNExact", "AE step": "torch + Adam",
            "online step": "torch + BackPACK DiagGGNMC + Adam"}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nminilae vs PyTorch on {platform.machine()} ({os.cpu_count()} CPUs, load average {load:.1f} at the end), "
          f"{args.threads} threads each, float32, batch {args.batch_size} of {source}, median of {args.rounds} "
          f"interleaved rounds (exact diagonals: batch {args.exact_batch}):\n")
    print("| model | step | minilae ms | peer | peer ms | minilae / peer (range over rounds) |")
    print("|---|---|---:|---|---:|---:|")
    for row in rows:
        lo, hi = row["ratio_range"]
        print(f"| {row['model']} | {row['step']} | {row['minilae_s'] * 1e3:.1f} | {peer[row['step']]} | "
              f"{row['torch_s'] * 1e3:.1f} | {row['ratio']:.2f} ({lo:.2f}-{hi:.2f}) |")
    own = [(n, a, b) for n in args.models for a, b in (("approx diag", "gradient"), ("online step", "AE step"))
           if (n, a) in times and (n, b) in times]
    if own:
        print("\nminilae's own ratios (targets: approx diag <= 1.0x gradient, online step <= 2x AE step), the\n"
              "ratio of the medians and the range of the per-round ratios (the two steps timed one after the "
              "other):\n")
        print("| model | ratio | value | range over rounds |")
        print("|---|---|---:|---:|")
        for n, a, b in own:
            num, den = times[(n, a)][0], times[(n, b)][0]
            ratio = statistics.median(num) / statistics.median(den)
            per_round = [x / y for x, y in zip(num, den)]
            print(f"| {n} | {a} / {b} | {ratio:.2f} | {min(per_round):.2f}-{max(per_round):.2f} |")
    print("\ncommand: python benchmarks/bench_vs_pytorch.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": threads, "load_average": load,
                                               "agreement": {f"{k[0]} {k[1]}": v for k, v in checks.items()},
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

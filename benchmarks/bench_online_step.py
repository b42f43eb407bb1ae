#!/usr/bin/env python
"""Where an online-LAE step's time goes, piece by piece, against the plain AE step of the same model.

The online step (minilae.online.OnlineLaplace.step, eq. 10-11) is the AE step (forward, backward, Adam, the
finite checks) plus the pieces only it has: the normals of one weight sample, the passes that turn them into
theta_s = theta_t + eps / sqrt(H_t + lambda), the approximate GGN walk, the prior's gradient, the precision
update and its checks. Each piece is timed on its own, in interleaved rounds with both whole steps (one
process, real MNIST batches, float32), so that the table shows which pieces hold the ratio of the two steps
up. The pieces run on copies of the trainers' state (theta, H, the optimiser's moments), which moves only
through the trainers' steps.

    python benchmarks/bench_online_step.py                  # the MLP AE, batch 64
    python benchmarks/bench_online_step.py --model conv --steps 5

Needs MNIST under $MINILAE_DATA (or --data-root).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

from minilae import backend
from minilae.data import N_TRAIN_FILE, N_VAL, load_dataset
from minilae.hessian import ggn_diagonal
from minilae.laplace import in_dtype, sample_diagonal
from minilae.models import build_model
from minilae.online import OnlineLaplace
from minilae.optim import Adam
from minilae.sampling import standard_normal
from minilae.training import MAPTrainer
from minilae.validation import all_finite

SAMPLE = "theta_s from the normals (4 passes)"


def pieces(online, ae, x, rng):
    """name -> (callable, where): each callable runs its piece once; where is True for a piece of the online step
    alone, False for one that both steps have, None for a whole step."""
    model, lik, B = online.model, online.likelihood, x.shape[0]
    theta, H = online.theta.copy(), online.H.copy()
    buf = backend.xp().empty((1,) + theta.shape, theta.dtype)  # the trainer's sample buffer
    lam = in_dtype(online.prior_precision, theta)
    state = {"f": model.forward(x)}
    grad = model.vjp_params(lik.grad(state["f"], x) / B)
    G = online.batch_ggn(x, state["f"])
    adam = Adam(lr=1e-3)
    xp = backend.xp()

    def forward():
        state["f"] = model.forward(x)

    def walk():  # at the last forward, as the step runs it (f given, N / B on H_out)
        ggn_diagonal(model, lik, x, x, method=online.hessian, f=state["f"], scale=online.n_data / B)

    def precision_update():  # eq. 11 in place, as the step
        xp.multiply(H, 1 - online.alpha, out=H)
        xp.add(H, G, out=H)

    # in this order within a round: backward and walk need the caches of the forward just before them
    return {
        "AE step (MAPTrainer.step)": (lambda: ae.step(x), None),
        "online step (OnlineLaplace.step)": (lambda: online.step(x, rng), None),
        "forward": (forward, False),
        "backward (gradient)": (lambda: model.vjp_params(lik.grad(state["f"], x) / B), False),
        f"{online.hessian} GGN walk": (walk, True),
        "Adam step": (lambda: adam.step(theta, grad), False),
        "finite check of a P-long vector": (lambda: all_finite(theta), False),
        "set_params, copying": (lambda: model.set_params(theta, check_finite=False), False),
        "set_params, sharing (the trainers)": (lambda: model.set_params(theta, check_finite=False, share=True), False),
        "normals (minilae.sampling)": (lambda: standard_normal(rng, buf.shape, buf.dtype, out=buf), True),
        SAMPLE: (lambda: sample_diagonal(theta, H, lam, 1, rng, out=buf), True),  # less the normals, below
        "G's check (its min)": (lambda: G.min(), True),
        "prior gradient (2 passes)": (lambda: online._add_prior_grad(grad), True),  # scratch: the sample buffer
        "precision update (2 passes)": (precision_update, True),
        "precision's finite check": (lambda: all_finite(H), True),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--hessian", choices=("approx", "exact", "mixed", "sqrt"), default="approx")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="calls of each piece per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)

    backend.set_backend(args.backend)
    x_all, _ = load_dataset("mnist", "train", root=args.data_root)
    x = backend.asarray(x_all[np.random.default_rng(0).permutation(len(x_all))[:args.batch_size]])
    rng = backend.xp().random.default_rng(0)
    online = OnlineLaplace(build_model(args.model, (1, 28, 28), latent_size=2, seed=0), N_TRAIN_FILE - N_VAL,
                           hessian=args.hessian, optimizer=Adam(lr=1e-3))
    ae = MAPTrainer(build_model(args.model, (1, 28, 28), latent_size=2, seed=0), Adam(lr=1e-3))
    online.step(x, rng)  # warm-up, and H_0
    ae.step(x)
    table = pieces(online, ae, x, rng)
    times = {name: [] for name in table}
    for r in range(args.rounds):
        for name, (run, _) in table.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    ms[SAMPLE] -= ms["normals (minilae.sampling)"]
    ae_ms = ms["AE step (MAPTrainer.step)"]
    extra = sum(ms[name] for name, (_, only) in table.items() if only)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nOne online-LAE step by piece: {args.model} AE, {args.hessian} GGN, batch {args.batch_size}, "
          f"{args.backend} on {platform.machine()} ({os.cpu_count()} CPUs, load average {load:.1f} at the end), "
          f"float32, median of {args.rounds} interleaved rounds of {args.steps} calls:\n")
    print("| piece | in | ms | / AE step |")
    print("|---|---|---:|---:|")
    for name, (_, only) in table.items():
        where = {False: "both", True: "online", None: "-"}[only]
        print(f"| {name} | {where} | {ms[name]:.2f} | {ms[name] / ae_ms:.2f} |")
    print(f"\nthe online-only pieces: {extra:.2f} ms = {extra / ae_ms:.2f} AE steps, so the online step takes about "
          f"{1 + extra / ae_ms:.2f}x the AE step; measured {ms['online step (OnlineLaplace.step)'] / ae_ms:.2f}x")
    print("\ncommand: python benchmarks/bench_online_step.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

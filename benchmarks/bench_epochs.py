#!/usr/bin/env python
"""Epoch time of the online LAE against plain AE training on MNIST, as ratios measured in one run.

For each model (MLP, conv) and trainer (plain AE; online LAE with the approximate and the exact
diagonal GGN) the script times minibatch steps on real MNIST batches (B = 64 by default) and
reports the time per step, the implied time of one epoch of 55000 images, and the ratio to the AE
of the same model, with the range of the ratios within each round. Configurations are timed in
interleaved rounds (AE, LAE approx, LAE exact, AE, ...), and the median over rounds is kept, so a
slow-down of the machine hits all of them alike.

Where the engine's 'exact' method would need more memory than its budget (full M per sample at a
conv layer with 16 x 28 x 28 features), the exact diagonal is timed through 'sqrt', the engine's
other exact method, and the table says so.

    python benchmarks/bench_epochs.py                       # both models, approx and exact
    python benchmarks/bench_epochs.py --models mlp --steps 20 --rounds 5
    python benchmarks/bench_epochs.py --json benchmarks/results/epochs.json

Needs MNIST under $MINILAE_DATA (or --data-root).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from minilae import backend
from minilae.data import N_TRAIN_FILE, N_VAL, load_dataset
from minilae.hessian import MemoryBudgetError
from minilae.models import build_model
from minilae.online import OnlineLaplace
from minilae.optim import Adam
from minilae.training import MAPTrainer

N_TRAIN = N_TRAIN_FILE - N_VAL


def make_trainer(kind, model_name, hessian, n_train):
    model = build_model(model_name, (1, 28, 28), latent_size=2, seed=0)
    if kind == "ae":
        return MAPTrainer(model, Adam(lr=1e-3))
    return OnlineLaplace(model, n_train, hessian=hessian, optimizer=Adam(lr=1e-3))


def time_steps(trainer, batches, rng):
    """Seconds per step, over the given batches (already on the backend)."""
    start = time.perf_counter()
    for x in batches:
        trainer.step(x, rng)
    return (time.perf_counter() - start) / len(batches)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"])
    p.add_argument("--hessians", nargs="+", choices=("approx", "exact", "mixed", "sqrt"), default=["approx", "exact"])
    p.add_argument("--threshold", type=int, default=None, help="feature-size threshold for 'mixed'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration and round (cheap ones)")
    p.add_argument("--slow-steps", type=int, default=1,
                   help="timed steps per round for configurations slower than --slow-after seconds per step")
    p.add_argument("--slow-after", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", choices=backend.BACKENDS, default="numpy")
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)

    backend.set_backend(args.backend)
    x_all, _ = load_dataset("mnist", "train", root=args.data_root)
    host_rng = np.random.default_rng(0)
    n_batches = max(args.steps, args.slow_steps) + 1
    images = x_all[host_rng.permutation(len(x_all))[: n_batches * args.batch_size]]
    batches = [backend.asarray(b) for b in np.split(images, n_batches)]
    steps_per_epoch = -(-N_TRAIN // args.batch_size)

    configs = [(m, "ae", None) for m in args.models] + [(m, "online", h) for m in args.models for h in args.hessians]
    trainers, notes = {}, {}
    for model_name, kind, hessian in configs:
        key = (model_name, kind, hessian)
        trainer = make_trainer(kind, model_name, hessian, N_TRAIN)
        try:
            trainer.step(batches[0], backend.xp().random.default_rng(0))  # warm-up (and H_0 for the LAE)
        except MemoryBudgetError as err:
            need = re.search(r"would need ([\d.]+ \w+)", str(err))
            notes[key] = (f"'exact' (full M per sample) would need {need.group(1) if need else 'more memory'}, "
                          "over the engine's memory budget; timed 'sqrt', the engine's other exact method")
            print(f"{model_name} {hessian}: {notes[key]}", file=sys.stderr, flush=True)
            trainer = make_trainer(kind, model_name, "sqrt", N_TRAIN)
            trainer.step(batches[0], backend.xp().random.default_rng(0))
        trainers[key] = trainer

    times = {key: [] for key in trainers}
    for r in range(args.rounds):
        for key, trainer in trainers.items():
            t_probe = times[key][-1] if times[key] else 0.0
            n = args.slow_steps if t_probe > args.slow_after else args.steps
            times[key].append(time_steps(trainer, batches[1:1 + n], backend.xp().random.default_rng(r + 1)))
            print(f"round {r + 1}: {key[0]:4s} {key[1]:6s} {key[2] or '':6s} {times[key][-1] * 1e3:9.1f} ms/step",
                  file=sys.stderr, flush=True)

    rows = []
    for key, ts in times.items():
        model_name, kind, hessian = key
        step = statistics.median(ts)
        ae_ts = times[(model_name, "ae", None)]
        # the ratio within each round as well: the machine's speed drifts between rounds, less within one
        per_round = [t / a for t, a in zip(ts, ae_ts)]
        rows.append({"model": model_name, "method": kind, "hessian": hessian, "s_per_step": step,
                     "epoch_s": step * steps_per_epoch, "ratio_to_ae": step / statistics.median(ae_ts),
                     "ratio_range": (min(per_round), max(per_round)), "note": notes.get(key, "")})

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nEpoch time on {args.backend} ({platform.machine()}, {os.cpu_count()} CPUs, load average {load:.1f} "
          f"at the end), MNIST, batch {args.batch_size}, {steps_per_epoch} steps/epoch, median of "
          f"{args.rounds} rounds:\n")
    print("| model | method | GGN diagonal | s / step | s / epoch (implied) | x plain AE (range over rounds) |")
    print("|---|---|---|---:|---:|---:|")
    for row in rows:
        name = "plain AE" if row["method"] == "ae" else "online LAE"
        ggn = "-" if row["hessian"] is None else row["hessian"] + (" (via sqrt)" if row["note"] else "")
        low, high = row["ratio_range"]
        spread = "" if row["method"] == "ae" else f" ({low:.1f}-{high:.1f})"
        print(f"| {row['model']} | {name} | {ggn} | {row['s_per_step']:.4f} | {row['epoch_s']:.1f} | "
              f"{row['ratio_to_ae']:.1f}{spread} |")
    for row in rows:
        if row["note"]:
            print(f"\nNote ({row['model']}, {row['hessian']}): {row['note']}")
    print("\ncommand: python benchmarks/bench_epochs.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "load_average": load, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

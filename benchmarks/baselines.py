#!/usr/bin/env python
"""The baselines table: every method of ``python -m minilae.train`` on MNIST and FashionMNIST, MLP and conv AE.

For each (dataset, model) every method is one run of the command with the same flags (2-D latent
space, seed, schedule, caps), in its own folder under ``--out``; the script then reads each run's
metrics.json and writes one Markdown table (``baselines.md``, also printed) and the same numbers as
JSON (``baselines.json``):

* validation MSE of the mean reconstruction (per pixel) and log p(x) (nats per image:
  1/K sum_k log p(x | draw k), unit Gaussian, except ae-var's learned variance),
* the mean output variance on validation images and on the other dataset's test images,
* the time per training epoch (median over epochs; an ensemble's epoch is one epoch of every member,
  the sum of the members' medians) as a ratio to the plain AE's, measured in this one invocation on
  the same machine. The post-hoc LAE's one-off GGN pass after training is not part of an epoch.

    python benchmarks/baselines.py --out benchmarks/results/baselines          # the README's table
    python benchmarks/baselines.py --epochs 20 --limit-train 0 --out runs/baselines-full

An existing --out folder is never overwritten: the script refuses to start (choose a new folder).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from minilae import train

NAMES = {"ae": "AE", "posthoc": "post-hoc LAE", "online": "online LAE", "ae-var": "AE + learned variance",
         "vae": "VAE", "mc-dropout": "MC-dropout AE", "ensemble": "AE ensemble"}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", choices=train.DATASETS, default=list(train.DATASETS))
    p.add_argument("--models", nargs="+", choices=("mlp", "conv"), default=["mlp", "conv"])
    p.add_argument("--methods", nargs="+", choices=train.METHODS, default=list(train.METHODS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=500, help="training images (0: all 55000)")
    p.add_argument("--limit-val", type=int, default=200, help="validation (and out-of-distribution) images")
    p.add_argument("--samples", type=int, default=10, help="stochastic passes of the predictive")
    p.add_argument("--ensemble-size", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="passed on to the command (default: its own choice)")
    p.add_argument("--out", required=True, help="a new folder for the runs and the table")
    return p.parse_args(argv)


def run_flags(args, dataset, model, method, folder):
    flags = ["--method", method, "--dataset", dataset, "--model", model, "--latent-size", "2",
             "--epochs", str(args.epochs), "--limit-val", str(args.limit_val), "--samples", str(args.samples),
             "--ensemble-size", str(args.ensemble_size), "--seed", str(args.seed), "--out", str(folder), "--quiet"]
    if args.limit_train:
        flags += ["--limit-train", str(args.limit_train)]
    if model == "conv" and method in ("online", "posthoc"):
        flags += ["--hessian", "mixed", "--hessian-threshold", "512"]  # the README's conv set-up
    if args.backend:
        flags += ["--backend", args.backend]
    return flags


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def epoch_time(metrics):
    """Median seconds of one training epoch; an ensemble's: the sum over members of each member's median."""
    if metrics["config"]["method"] == "ensemble":
        return sum(median([r["epoch_time_s"] for r in m["history"]]) for m in metrics["members"])
    return median([r["epoch_time_s"] for r in metrics["history"]])


def row(metrics, ae_time):
    v, o = metrics["val"], metrics["ood"] or {}
    t = epoch_time(metrics)
    return {"method": metrics["config"]["method"], "val_mse": v["mse"], "val_log_px": v["log_px"],
            "val_x_var": v["x_var"], "ood_x_var": o.get("x_var"), "n_samples": v["n_samples"],
            "epoch_time_s": t, "epoch_time_ratio": t / ae_time if ae_time else None,
            "epochs": metrics["epochs_trained"],
            "command": metrics["command"]}


def table(results, args, wall):
    lines = ["| dataset | model | method | val MSE / pixel | val log p(x) | val output var | OOD output var | "
             "K | time / epoch vs AE |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (dataset, model), rows in results.items():
        for r in rows:
            ood = "-" if r["ood_x_var"] is None else f"{r['ood_x_var']:.3g}"
            ratio = "-" if r["epoch_time_ratio"] is None else f"{r['epoch_time_ratio']:.2f}"
            lines.append(f"| {dataset} | {model} | {NAMES[r['method']]} | {r['val_mse']:.5f} | "
                         f"{r['val_log_px']:.1f} | {r['val_x_var']:.3g} | {ood} | {r['n_samples']} | {ratio} |")
    train_images = args.limit_train or 55000
    lines += ["", f"{args.epochs} epochs on the first {train_images} training images, {args.limit_val} validation "
              f"images (and as many test images of the other dataset, OOD), 2-D latent space, seed {args.seed}, "
              f"K stochastic passes ({args.samples}; an ensemble: its {args.ensemble_size} members; ae, ae-var: one "
              "network). log p(x) in nats per image. Time per epoch: median epoch of the run (an ensemble: "
              "of all its members) over the plain AE's of the same dataset and model, measured in this "
              f"invocation ({wall / 60:.1f} min in all); conv post-hoc / online LAE: --hessian mixed "
              "--hessian-threshold 512.",
              "", "command: python benchmarks/baselines.py " + " ".join(sys.argv[1:] if args.argv is None
                                                                      else args.argv)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse(argv)
    args.argv = argv
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} already exists; the benchmark never overwrites a folder - choose a new --out",
              file=sys.stderr)
        return 2
    start, results = time.perf_counter(), {}
    methods = ["ae"] + [m for m in args.methods if m != "ae"]  # the reference of the time ratio first
    for dataset in args.datasets:
        for model in args.models:
            rows, ae_time = [], None
            for method in methods:
                folder = out / "runs" / f"{dataset}-{model}" / method
                flags = run_flags(args, dataset, model, method, folder)
                print(f"== python -m minilae.train {' '.join(flags)}", flush=True)
                if train.main(flags) != 0:
                    return 1
                metrics = json.loads((folder / train.METRICS).read_text())
                if method == "ae":
                    ae_time = epoch_time(metrics)
                if method in args.methods:
                    rows.append(row(metrics, ae_time))
            results[(dataset, model)] = rows
    text = table(results, args, time.perf_counter() - start)
    print("\n" + text)
    (out / "baselines.md").write_text(text)
    (out / "baselines.json").write_text(json.dumps(
        [{"dataset": d, "model": m, **r} for (d, m), rows in results.items() for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The paper's Table 2 shape: validation MSE and log p(x) of the AE, the post-hoc LAE and the online LAE.

Each method is one run of ``python -m minilae.train`` (same model, data, seed and schedule) in its
own folder under --out; the script then reads every run's metrics.json and prints one Markdown
table: MSE of the mean reconstruction (per pixel), log p(x) (mean over images of
1/K sum_k log N(x | x_k, I), nats per image, K sampled networks), the mean predictive variance of
the reconstructions on MNIST validation images and on FashionMNIST test images, and training time.

    python benchmarks/table2.py --epochs 20                      # ae, posthoc, online on MNIST
    python benchmarks/table2.py --methods online --alphas 1 0.1 0.01 0.001 --epochs 5 --limit-train 10000
    python benchmarks/table2.py --reuse                          # only re-print finished runs
    python benchmarks/table2.py --kfac kfac kfac-approx          # + post-hoc KFAC rows on the same MAP network

With --alphas the online LAE is run once per forgetting rate alpha (the tempering study of
:mod:`minilae.online`). Existing finished runs are re-used with --reuse; otherwise a run folder that
already holds a run is resumed (so an interrupted benchmark continues where it stopped).

With --kfac each listed KFAC structure gets a post-hoc row of its own: the finished post-hoc run is copied
into ``posthoc-<structure>`` and resumed with ``--hessian <structure>``, which recomputes only the
posterior, so the rows differ in the posterior alone. There is no online KFAC row: the online recursion
is refused for KFAC (see ``python -m minilae.train --method online --hessian kfac``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from minilae import train
from minilae.kfac import KFAC_METHODS


def run_dir(out, method, alpha, hessian=None):
    if hessian is not None:
        return Path(out) / f"{method}-{hessian}"
    return Path(out) / (method if alpha is None else f"{method}-alpha{alpha:g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=("ae", "posthoc", "online"), default=["ae", "posthoc", "online"])
    p.add_argument("--alphas", nargs="+", type=float, default=None, help="online: one run per alpha")
    p.add_argument("--model", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--hessian", default="approx")
    p.add_argument("--kfac", nargs="*", choices=KFAC_METHODS, default=[],
                   help="post-hoc KFAC rows (on the post-hoc run's MAP network)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-val", type=int, default=None)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/table2")
    p.add_argument("--reuse", action="store_true", help="do not train; tabulate the runs already in --out")
    args = p.parse_args(argv)

    if args.kfac and "posthoc" not in args.methods:
        p.error("--kfac needs the post-hoc run: include posthoc in --methods")
    # (method, alpha, KFAC structure or None): the KFAC rows last, as they start from the post-hoc run
    runs = [(m, a, None) for m in args.methods for a in (args.alphas if m == "online" and args.alphas else [None])]
    runs += [("posthoc", None, structure) for structure in args.kfac]
    for method, alpha, structure in [] if args.reuse else runs:
        folder = run_dir(args.out, method, alpha, structure)
        if structure is not None and not (folder / train.CHECKPOINT).exists():
            shutil.copytree(run_dir(args.out, "posthoc", None), folder, dirs_exist_ok=True)
        if run_method(args, method, alpha, folder, structure or args.hessian) != 0:
            return 1
    print_table(args, runs, argv)
    return 0


def run_method(args, method, alpha, folder, hessian):
    """One `python -m minilae.train` run (resumed where its folder holds one); its exit status."""
    flags = ["--method", method, "--model", args.model, "--hessian", hessian, "--epochs", str(args.epochs),
             "--samples", str(args.samples), "--seed", str(args.seed), "--out", str(folder), "--quiet"]
    if alpha is not None:
        flags += ["--alpha", str(alpha)]
    if args.limit_train:
        flags += ["--limit-train", str(args.limit_train)]
    if args.limit_val:
        flags += ["--limit-val", str(args.limit_val)]
    if (folder / train.CHECKPOINT).exists():
        flags += ["--resume"]
    print(f"== python -m minilae.train {' '.join(flags)}", flush=True)
    return train.main(flags)


def print_table(args, runs, argv):
    """The Markdown table of the finished runs (method, alpha[, KFAC structure])."""
    print("\n| method | alpha | epochs (best) | val MSE / pixel | val log p(x) | val output var | "
          "FashionMNIST output var | var ratio | epoch time (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for method, alpha, structure in runs:
        path = run_dir(args.out, method, alpha, structure) / train.METRICS
        if not path.exists():
            print(f"| {method} | missing: {path} |")
            continue
        m = json.loads(path.read_text())
        v, o = m["val"], m["ood"] or {}
        a = m["config"]["alpha"] if method == "online" else None
        ratio = f"{o.get('x_var', float('nan')) / v['x_var']:.2f}" if v["x_var"] > 0 else "-"
        # median over epochs: robust to a resumed run (train_time_s counts only the last process)
        epoch_time = sorted(r["epoch_time_s"] for r in m["history"])[len(m["history"]) // 2]
        name = {"ae": "AE", "posthoc": "post-hoc LAE", "online": "online LAE"}[method]
        name += f" ({m['config']['hessian']})" if method != "ae" else ""
        print(f"| {name} | {'-' if a is None else f'{a:g}'} | {m['epochs_trained']} ({m['best_epoch']}) | "
              f"{v['mse']:.5f} | {v['log_px']:.2f} | {v['x_var']:.3g} | {o.get('x_var', float('nan')):.3g} | "
              f"{ratio} | {epoch_time:.0f} |")
        table.append({"method": method, "alpha": a, "hessian": m["config"]["hessian"], "metrics": path.as_posix(),
                      "val": v, "ood": o, "epochs": m["epochs_trained"], "best_epoch": m["best_epoch"], "median_epoch_time_s": epoch_time,
                      "command": m["command"]})
    n_images = max((t["val"]["n_images"] for t in table), default=0)
    n_samples = max((t["val"]["n_samples"] for t in table), default=0)
    print(f"\n{n_images} validation images, {n_samples} sampled networks for the LAEs (the AE is one network); "
          "log p(x) in nats per image under N(x | x_k, I); epoch time: median over epochs (wall clock, "
          "shared machine - see benchmarks/bench_epochs.py for controlled timings).")
    print("command: python benchmarks/table2.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table2.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    sys.exit(main())

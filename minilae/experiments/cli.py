"""python -m minilae.experiments TASK: the paper's downstream experiments, one command each.

  ood         out-of-distribution detection (A.2, Fig. 9, 10): conv AE, 2-D latent, FashionMNIST vs MNIST
  imputation  missing-data imputation and generation (A.3, Fig. 11, Table 3): MLP AE on MNIST
  knn         semi-supervised KNN on latent codes (A.4, Fig. 12): MLP AE on MNIST

Each trains the runs it needs into --runs/<task>-<dataset>-<model>/<method>/ (reusing finished runs,
resuming interrupted ones), evaluates every method of --methods, prints the table and writes
table.json, table.md and the figures into --out (a folder holding files is refused without
--overwrite). Exit status: 0 done; 1 runtime error (data, a failed run, a runs folder of another
experiment); 2 usage error (unknown task or method, impossible sizes, an occupied --out).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np  # host side: data subsets

from .. import backend, train
from ..backend import BackendError
from ..data import DataError, load_dataset
from ..training import CheckpointError
from . import imputation, knn, ood
from .classifier import load_or_train
from .report import prepare_out, write_table
from .runs import ExperimentError, RunSpec, check_methods, ensure_runs

__all__ = ["main", "build_parser", "TASKS"]

TASKS = ("ood", "imputation", "knn")


class UsageError(ValueError):
    """Flags that cannot work together (exit status 2)."""


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(p):
    g = p.add_argument_group("runs and output")
    g.add_argument("--methods", default=",".join(train.METHODS),
                   help=f"comma-separated methods to compare, of {', '.join(train.METHODS)} (default: all)")
    g.add_argument("--runs", default="runs/experiments", help="folder of the trained runs (reused across calls)")
    g.add_argument("--out", default=None, help="output folder for the table and figures (default: results/TASK)")
    g.add_argument("--overwrite", action="store_true", help="replace the table and figures in an existing --out")
    g.add_argument("--data-root", default=None, help="data folder (default: $MINILAE_DATA)")
    g.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend of training and evaluation (default: $MINILAE_BACKEND, else numpy)")
    g.add_argument("--seed", type=int, default=0, help="seed of the runs and of every draw of the experiment")
    g.add_argument("--quiet", action="store_true", help="only the table and errors (without it, each training run shows its progress)")
    g = p.add_argument_group("training size of new runs (python -m minilae.train flags)")
    g.add_argument("--epochs", type=_positive, default=None, help="--epochs of the runs (default: train's)")
    g.add_argument("--limit-train", type=_positive, default=None, help="--limit-train of the runs")
    g.add_argument("--limit-val", type=_positive, default=None, help="--limit-val of the runs' validation")
    g.add_argument("--latent-size", type=_positive, default=2, help="latent size of the runs")
    g.add_argument("--samples", type=_positive, default=100,
                   help="sampled networks for the runs' evaluation and the experiment's predictions")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m minilae.experiments", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True, help=", ".join(TASKS))
    t = sub.add_parser("ood", help="out-of-distribution detection (Fig. 9, 10)")
    _common(t)
    t.add_argument("--reverse", action="store_true", help="train on MNIST, FashionMNIST out of distribution")
    t.add_argument("--limit-test", type=_positive, default=None,
                   help="images of each test set (in and out) and of the held-out set (default: all)")
    t = sub.add_parser("imputation", help="missing-data imputation and generation (Fig. 11, Table 3)")
    _common(t)
    t.add_argument("--limit-test", type=_positive, default=1000, help="MNIST test images to impute")
    t.add_argument("--steps", type=_positive, default=5, help="encode-decode steps of each first-stage chain")
    t.add_argument("--chains", type=_positive, default=5, help="first-stage chains (imputations per image)")
    t.add_argument("--refine", type=_positive, default=5, help="second-stage passes averaged per imputation")
    t.add_argument("--classifier-epochs", type=_positive, default=5, help="epochs of the cached classifier")
    t = sub.add_parser("knn", help="semi-supervised KNN on the latent codes (Fig. 12)")
    _common(t)
    t.add_argument("--labels", type=_int_list, default=list(knn.LABELS), help="labels per class, comma-separated")
    t.add_argument("--repetitions", type=_positive, default=5, help="labelled draws per number of labels")
    return p


def _spec(args, task, dataset, model):
    return RunSpec(task=task, dataset=dataset, model=model, latent_size=args.latent_size, seed=args.seed,
                   epochs=args.epochs, limit_train=args.limit_train, limit_val=args.limit_val,
                   samples=args.samples, backend=args.backend, quiet=args.quiet)


def _images(name, split, limit, root):
    x, y = load_dataset(name, split, root=root)
    return (x, y) if limit is None else (x[:limit], y[:limit])


def run_ood(args, methods, log):
    in_name, out_name = ood.datasets(args.reverse)
    x_in = _images(in_name, "test", args.limit_test, args.data_root)[0]
    x_out = _images(out_name, "test", args.limit_test, args.data_root)[0]
    x_held = _images(in_name, "val", args.limit_test, args.data_root)[0]
    predictors = ensure_runs(_spec(args, "ood", in_name, "conv"), methods, args.runs, log)
    results = {}
    for m, p in predictors.items():
        log(f"ood: scoring {len(x_in)} + {len(x_out)} + {len(x_held)} images with {m}")
        results[m] = ood.evaluate(p, x_in, x_out, x_held, args.samples, args.seed)
    table = {"task": "ood", "in": in_name, "out": out_name, "n_in": len(x_in), "n_out": len(x_out),
             "metrics": {m: r["metrics"] for m, r in results.items()}}
    return table, ood.table_markdown(results, in_name, out_name), lambda o: ood.figures(results, o, in_name, out_name)


def run_imputation(args, methods, log):
    x, y = _images("mnist", "test", args.limit_test, args.data_root)
    predictors = ensure_runs(_spec(args, "imputation", "mnist", "mlp"), methods, args.runs, log)
    clf, clf_config = load_or_train(Path(args.runs) / "imputation-mnist-mlp", epochs=args.classifier_epochs,
                                    limit_train=args.limit_train, seed=args.seed, data_root=args.data_root, log=log)
    mask = imputation.lower_half_mask(x.shape[1:])
    rng = backend.xp().random.default_rng(args.seed)
    chain = {"chains": args.chains, "steps": args.steps, "refine": args.refine}
    rows, imputations, generations, start = {}, {}, {}, None
    for m, p in predictors.items():
        log(f"imputation: {args.chains} chains of {args.steps} steps on {len(x)} images with {m}")
        rows[m], imputations[m], start = imputation.evaluate(p, clf, x, y, mask, rng, noise_seed=args.seed, **chain)
        generations[m] = imputation.impute(p, np.zeros_like(x[:8]), np.zeros_like(mask), rng,
                                           noise_seed=args.seed + 1, **chain)[0]
    rows = {"classifier": imputation.classifier_alone(clf, start, y), **rows}
    table = {"task": "imputation", "n_images": len(x), **chain, "classifier": clf_config, "rows": rows}
    return (table, imputation.table_markdown(rows, len(x), args.chains),
            lambda o: imputation.figures(o, x, start, imputations, generations))


def run_knn(args, methods, log):
    x, y = _images("mnist", "val", args.limit_val, args.data_root)
    knn.check_labels(y, args.labels)
    predictors = ensure_runs(_spec(args, "knn", "mnist", "mlp"), methods, args.runs, log)
    results = {}
    for m, p in predictors.items():
        log(f"knn: {args.repetitions} draws of {args.labels} labels per class with {m}")
        results[m] = knn.evaluate(knn.embed(p, x, args.samples, args.seed), y, args.labels, args.repetitions,
                                  args.seed)
    table = {"task": "knn", "n_val": len(x), "repetitions": args.repetitions, "embedding_samples": args.samples,
             "results": {m: {str(n): v for n, v in r.items()} for m, r in results.items()}}
    return table, knn.table_markdown(results, len(x)), lambda o: knn.figure(results, o)


RUNNERS = {"ood": run_ood, "imputation": run_imputation, "knn": run_knn}


def run(args, log=print):
    """Run one parsed task; returns the table dict written to table.json."""
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    if not methods:
        raise UsageError("--methods names no method")
    if args.backend:
        backend.set_backend(args.backend)
    out = prepare_out(args.out or Path("results") / args.task, args.overwrite)
    start = time.perf_counter()
    table, markdown, draw = RUNNERS[args.task](args, methods, log)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m minilae.experiments " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    table.update(figures=draw(out), command=command, seconds=time.perf_counter() - start, methods=methods)
    write_table(out, table, markdown, log=print)
    return table


def main(argv=None):
    """Entry point; returns the exit status (0 ok, 1 runtime error, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as err:
        return int(err.code or 0)
    args.argv = None if argv is None else list(argv)
    log = (lambda *a, **k: None) if args.quiet else print
    try:
        run(args, log)
    except (ExperimentError, DataError, CheckpointError, BackendError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the same command continues: finished runs are reused, an interrupted one resumed",
              file=sys.stderr)
        return 130
    except ValueError as err:  # bad input: checked before anything is trained or written
        print(f"python -m minilae.experiments {args.task}: error: {err}", file=sys.stderr)
        return 2
    return 0

"""python -m minilae.train - train an autoencoder (plain, post-hoc or online LAE, or a baseline), evaluate, plot.

Run with no flags to train the paper's online LAE (MLP, 2-D latent space, approximate diagonal
GGN) on MNIST; ``--help`` lists every flag. A run writes into its output folder:

  checkpoint.npz       weights, precision, optimiser/schedule state and config; rewritten
                       (atomically) after every epoch, so ``--out DIR --resume`` continues a run
  metrics.json         config, per-epoch history, final validation and out-of-distribution metrics
  reconstructions.png  inputs / mean / variance of reconstructions (paper Fig. 8)
  latent.png           latent codes over the decoder-variance heat-map (Fig. 1; 2-D latent only)

The methods (``--method``): ``ae`` trains the mean network only (MAP); ``posthoc`` trains the same
MAP network, then fits a diagonal Laplace posterior (KFAC with ``--hessian kfac``, see minilae.kfac)
with the GGN over the whole training set (in batches of ``--posthoc-batch-size``, default
``--batch-size``) and chooses the prior precision by
the Laplace marginal likelihood; ``online`` is the LAE of the paper (eq. 10-11, see
:mod:`minilae.online`). The paper's baselines (appendix A): ``ae-var``, an AE whose decoder also
outputs a per-pixel log-variance (heteroscedastic Gaussian likelihood); ``vae``, a VAE with KL
weight ``--beta``; ``mc-dropout``, an AE with dropout ``--dropout`` between its trainable layers,
kept on at test time; ``ensemble``, ``--ensemble-size`` AEs from seeds derived from (--seed, m).
Every method is evaluated through the same :class:`minilae.methods.Predictor` and
:func:`load_run` gives it back.

Ensembles: the members are trained one after another in the same run. ``checkpoint.npz`` holds
every finished member and the member in training; that member's own epoch checkpoint is
``member.npz`` (written by the epoch loop, atomically), merged into ``checkpoint.npz`` after each
epoch and removed when the member finishes. An interrupted ensemble continues inside the member
it was in; a finished member is never retrained (with a larger ``--epochs`` it trains on).

The output folder:
  * a folder that already holds a run (checkpoint.npz or metrics.json) is refused unless
    ``--resume`` (continue it) or ``--overwrite`` (delete that run's files, once the new run has
    loaded its data and passed its checks, then start afresh);
  * it is checked to be a writable folder before any data are loaded, and a run holds an exclusive
    lock on it (``flock`` on the folder) until it ends: a second run into it fails at once;
  * temporary files a killed run left (``.checkpoint.npz.*.tmp``, ``.metrics.json.*.tmp``) are
    removed at the start; a run that fails before saving anything removes the folder it created.

Resuming (``--out DIR --resume``): the flags that define the model must match the checkpoint;
omitted ones are taken from it. An interrupted run continues from its last finished epoch. A
finished run is evaluated again; with a larger ``--epochs N`` it trains on to epoch N, exactly as
an uninterrupted N-epoch run, unless early stopping had ended it (then, like an ``--epochs`` below
the epochs already trained, the command is refused). For ``--method posthoc`` the Hessian
structure (``--hessian``, ``--hessian-threshold``) and ``--fix-prior`` do not define the MAP
network: giving other values recomputes the posterior of the finished run into the same folder.
(``--prior-precision`` does: the MAP is trained under the prior, weight decay lambda / N.) Before the first step, the memory of every Hessian pass the run will make
(the online step at ``--batch-size``, the post-hoc pass at ``--posthoc-batch-size``, which a
resumed run may change) is checked against the engine's budget, so an impossible run is refused
before it trains.

The backend: ``--backend``, else ``$MINILAE_BACKEND``, else (on ``--resume``) the checkpoint's, else
numpy; it does not define the model, so a GPU run can be continued on a CPU with ``--backend numpy``.

Data parallel (``mpiexec -n R python -m minilae.train ...``, :mod:`minilae.distributed`): every rank holds the
model and steps on its shard of each global batch, with the sums all-reduced, so the run is the one-process
computation; rank 0 alone owns the folder (creates, locks, cleans it), reads the checkpoint for all ranks, writes
checkpoints, metrics and figures and prints. A rank that fails aborts the job. Methods: ae, posthoc, online, ae-var.

Exit status: 0 done; 1 runtime error (a short message on stderr, no traceback: data, checkpoint,
folder, memory, divergence, a failed write such as a full disk); 2 usage error; 130 after Ctrl-C
(SIGINT) and 143 after SIGTERM, both keeping the checkpoint of the last finished epoch and printing
how to resume.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np  # host-side: data subsets, metrics and plots

from . import backend, distributed
from .backend import BackendError, to_numpy
from .data import DataError, load_dataset
from .files import atomic_write, is_writable, stale_temp_files
from .hessian import MemoryBudgetError, estimate_cost
from .hessian.chain import BUDGET_FRACTION, format_bytes, resolve_budget
from .kfac import KFAC_METHODS, KroneckerLaplace
from .methods import (CHECKPOINT, METHODS, build_network, load_run, make_predictor, member_seed, method_likelihood,
                      stored_posterior)
from .online import DEFAULT_ALPHA, HESSIAN_METHODS, OnlineLaplace
from .optim import Adam
from .posthoc import fit_posthoc
from .training import (DIVERGENCE_HINT, CheckpointError, MAPTrainer, TrainingDivergedError, check_signature, fit,
                       load_checkpoint, model_signature, save_checkpoint)

__all__ = ["main", "build_parser", "load_run", "METHODS", "DEFAULTS", "RUN_KEYS", "POSTHOC_KEYS"]

DATASETS = ("mnist", "fashionmnist")
MEMBER = "member.npz"  # the epoch checkpoint of the ensemble member in training
METRICS = "metrics.json"
FIGURES = ("reconstructions.png", "latent.png")

DEFAULTS = {
    "backend": None, "dataset": "mnist", "model": "mlp",
    "method": "online", "hessian": "approx", "threshold": None, "latent_size": 2, "epochs": 10,
    "batch_size": 64, "lr": 1e-3, "alpha": DEFAULT_ALPHA, "prior_precision": 1.0, "fix_prior": False,
    "train_samples": 1, "samples": 100, "seed": 0, "out": None, "resume": False, "limit_train": None,
    "limit_val": None, "ood_dataset": "auto", "dtype": "float32", "data_root": None, "lr_patience": 5,
    "stop_patience": 8, "quiet": False, "no_plots": False, "overwrite": False,
    "posthoc_batch_size": None, "beta": 1e-3, "dropout": 0.2, "ensemble_size": 5, "distributed": None,
}
# flags that define the trained model: a resumed run must keep them (the checkpoint's value is used)
RUN_KEYS = ("dataset", "model", "method", "hessian", "threshold", "latent_size", "batch_size", "lr", "alpha",
            "prior_precision", "fix_prior", "train_samples", "seed", "limit_train", "limit_val", "dtype",
            "lr_patience", "stop_patience", "beta", "dropout", "ensemble_size")
# ... except, for --method posthoc, the posterior's flags: they do not define the MAP network, and a finished
# post-hoc run resumed with other values gets its posterior recomputed
POSTHOC_KEYS = ("hessian", "threshold", "fix_prior")
# methods that run data parallel (more than one rank): their steps are sums over images (no per-image noise)
# and they write one checkpoint; vae and mc-dropout draw per-image noise, an ensemble juggles member files
PARALLEL_METHODS = ("ae", "posthoc", "online", "ae-var")


# ----------------------------------------------------------------------------------------------
# argument types with clear messages

def _typed(parse, accept, expected):
    """An argparse type: parse the text, then accept(value) or fail with 'expected ...'."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return convert


_positive_int = _typed(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _typed(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _typed(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_alpha = _typed(float, lambda v: 0 < v <= 1, "a forgetting rate (alpha must lie in (0, 1])")
_beta = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a KL weight beta >= 0")
_dropout = _typed(float, lambda v: 0 <= v < 1, "a dropout probability p in [0, 1)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' unless the help already says what happens by default or there is none."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser(suppress_defaults=False):
    """The command-line interface; with suppress_defaults only explicitly given flags appear in the result."""
    def d(key):
        """The default shown and used for a flag (SUPPRESS: absent unless given)."""
        return argparse.SUPPRESS if suppress_defaults else DEFAULTS[key]

    p = argparse.ArgumentParser(
        prog="python -m minilae.train",
        description="Train a Laplacian autoencoder (Miani, Warburg et al., NeurIPS 2022) or its baselines on "
                    "MNIST / FashionMNIST, then report validation MSE, log p(x) and predictive variances and "
                    "save the paper's figures. With no flags: the online LAE (MLP, 2-D latent, approximate "
                    "diagonal GGN) on MNIST for 10 epochs, about 4 minutes in all (training, evaluation, figures) on "
                    "2 idle CPU cores.",
        epilog="Data are read from --data-root, else $MINILAE_DATA, else ~/.cache/minilae/data "
               "(fetch them with `python datasets.py --root DIR`). Quick check: "
               "python -m minilae.train --epochs 2 --limit-train 2000 --limit-val 500 --samples 20",
        formatter_class=_HelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=METHODS, default=d("method"),
                   help="ae: plain autoencoder (MAP); posthoc: MAP then a diagonal Laplace posterior with the prior "
                        "precision from the marginal likelihood; online: the online LAE (eq. 10-11); baselines: "
                        "ae-var: AE with a learned per-pixel variance; vae: VAE (--beta); mc-dropout: AE with "
                        "dropout kept on at test time (--dropout); ensemble: --ensemble-size AEs of different seeds")
    g.add_argument("--dataset", type=str.lower, choices=DATASETS, default=d("dataset"), help="training data")
    g.add_argument("--model", choices=("mlp", "conv"), default=d("model"),
                   help="mlp: 784-512-256-latent MLP; conv: two conv+pool blocks and an MLP (mirrored decoders)")
    g.add_argument("--latent-size", type=_positive_int, default=d("latent_size"),
                   help="size of the latent code z (2 also draws the paper's Fig. 1)")
    g.add_argument("--hessian", choices=HESSIAN_METHODS + KFAC_METHODS, default=d("hessian"),
                   help="diagonal GGN of the Hessian engine (online and posthoc): exact (full M backpropagated), "
                        "approx (only diag M), mixed (full M where the feature size <= --hessian-threshold), "
                        "sqrt (exact through a square-root factor of M: slower, but fits where exact does not); "
                        "posthoc only: kfac (Kronecker factors A (x) G per layer, G from the exact M) or "
                        "kfac-approx (G from diag M)")
    g.add_argument("--hessian-threshold", dest="threshold", type=_positive_int, default=d("threshold"),
                   help="feature size up to which 'mixed' backpropagates the full matrix "
                        "(required with --hessian mixed)")
    g.add_argument("--beta", type=_beta, default=d("beta"),
                   help="vae: weight beta of the KL term in the loss NLL + beta KL(q(z|x) || N(0, I))")
    g.add_argument("--dropout", type=_dropout, default=d("dropout"),
                   help="mc-dropout: dropout probability p between all trainable layers (kept on at test time)")
    g.add_argument("--ensemble-size", type=_positive_int, default=d("ensemble_size"),
                   help="ensemble: number of AEs, trained one after another with seeds derived from (--seed, m)")
    g = p.add_argument_group("optimisation (the paper's schedule: Adam, lr halved on a 5-epoch plateau, "
                             "early stop after 8)")
    g.add_argument("--epochs", type=_positive_int, default=d("epochs"),
                   help="maximum number of epochs (with --resume: train a finished run on to this many)")
    g.add_argument("--batch-size", type=_positive_int, default=d("batch_size"),
                   help="images per minibatch")
    g.add_argument("--lr", type=_positive_float, default=d("lr"), help="Adam learning rate")
    g.add_argument("--lr-patience", type=_positive_int, default=d("lr_patience"),
                   help="halve the lr after this many epochs without validation improvement")
    g.add_argument("--stop-patience", type=_positive_int, default=d("stop_patience"),
                   help="stop after this many epochs without validation improvement")
    g.add_argument("--seed", type=_nonneg_int, default=d("seed"),
                   help="seed of the initial weights, the shuffling and the weight samples")
    g = p.add_argument_group("Laplace posterior")
    g.add_argument("--alpha", type=_alpha, default=d("alpha"),
                   help="online: forgetting rate of H_{t+1} = (1 - alpha) H_t + (N/B) GGN(batch). H settles at "
                        "GGN(all data) / alpha, a posterior tempered by alpha with a memory of ~1/alpha steps; "
                        "the paper sets alpha to the learning rate (1e-3); 1 = current batch only, untempered")
    g.add_argument("--prior-precision", type=_positive_float, default=d("prior_precision"),
                   help="precision lambda of the prior N(0, 1/lambda); online and posthoc: the mean is trained under it "
                        "(weight decay lambda/N); posthoc: also the starting value of the marginal-likelihood "
                        "optimisation")
    g.add_argument("--fix-prior", action="store_true", default=d("fix_prior"),
                   help="posthoc: keep --prior-precision instead of optimising it")
    g.add_argument("--posthoc-batch-size", type=_positive_int, default=d("posthoc_batch_size"),
                   help="posthoc: images per batch of the GGN pass over the training set (default: --batch-size); "
                        "only its memory and speed depend on it")
    g.add_argument("--train-samples", type=_positive_int, default=d("train_samples"),
                   help="online: weight samples per minibatch (Monte Carlo size of eq. 10-11)")
    g.add_argument("--samples", type=_positive_int, default=d("samples"),
                   help="stochastic passes (sampled networks, dropout masks, latent codes) for the predictive "
                        "mean/variance and log p(x); an ensemble uses each member once")
    g = p.add_argument_group("data, output and running")
    g.add_argument("--limit-train", type=_positive_int, default=d("limit_train"),
                   help="use only the first N training images (quick runs, CI)")
    g.add_argument("--limit-val", type=_positive_int, default=d("limit_val"),
                   help="use only the first N of the 5000 validation images (and N out-of-distribution images)")
    g.add_argument("--ood-dataset", type=str.lower, choices=("auto", "none") + DATASETS, default=d("ood_dataset"),
                   help="out-of-distribution test images for the final evaluation; auto: the other dataset")
    g.add_argument("--data-root", default=d("data_root"), help="data folder (default: $MINILAE_DATA, else "
                                                             "~/.cache/minilae/data)")
    g.add_argument("--backend", choices=backend.BACKENDS, default=d("backend"),
                   help="array backend: numpy (CPU) or cupy (GPU); default: $MINILAE_BACKEND, else the "
                        "checkpoint's with --resume, else numpy")
    g.add_argument("--dtype", choices=("float32", "float64"), default=d("dtype"), help="parameter dtype")
    g.add_argument("--distributed", choices=distributed.KINDS, default=d("distributed"),
                   help="data parallel over the ranks of `mpiexec -n R python -m minilae.train ...`: mpi (host "
                        "buffers) or nccl (CuPy arrays on one GPU per rank); by default mpi when started by "
                        "mpiexec with more than one rank, else one process. Methods: " + ", ".join(PARALLEL_METHODS))
    g.add_argument("--out", default=d("out"),
                   help="output folder (default: runs/<dataset>-<model>-<method>-<time>); a run locks it, and "
                        "a folder that holds a run is refused without --resume or --overwrite")
    g.add_argument("--resume", action="store_true", default=d("resume"),
                   help="continue the run in --out from its checkpoint; flags that define the model must match "
                        "the checkpoint (omitted ones are taken from it). A finished run is evaluated again, "
                        "trained on to a larger --epochs, or (posthoc) given a new posterior with other "
                        "--hessian, --hessian-threshold, --prior-precision or --fix-prior")
    g.add_argument("--overwrite", action="store_true", default=d("overwrite"),
                   help="replace the run in --out: its checkpoint, metrics and figures are deleted once the new "
                        "run has loaded its data and passed its checks")
    g.add_argument("--quiet", action="store_true", default=d("quiet"),
                   help="no progress bars and no per-epoch lines (errors and the final summary only)")
    g.add_argument("--no-plots", action="store_true", default=d("no_plots"), help="skip the PNG figures")
    return p


# ----------------------------------------------------------------------------------------------
# configuration

class UsageError(ValueError):
    """A combination of flags that cannot work (reported like argparse's own errors)."""


class RunFolderError(RuntimeError):
    """The output folder cannot hold this run: not a writable folder, in use, or holding another run."""


def parse_args(argv):
    """(arguments with defaults, explicitly given ones) of the command line, checked for usage errors."""
    args = vars(build_parser().parse_args(argv))
    explicit = vars(build_parser(suppress_defaults=True).parse_args(argv))
    if args["out"] is not None and not args["out"].strip():
        raise UsageError("--out needs a folder name, got an empty one")
    if args["resume"] and args["overwrite"]:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give only one")
    if args["resume"] and args["out"] is None:
        raise UsageError("--resume needs --out RUN_DIR, the folder of the run to continue")
    if not args["resume"]:
        _check_mixed(args)
        _check_kfac(args)
    args["backend"] = _backend_name(explicit, {})
    return args, explicit


def _check_kfac(config):
    if config["hessian"] in KFAC_METHODS and config["method"] == "online":
        raise UsageError(
            f"--hessian {config['hessian']} is post-hoc only (--method posthoc): the online recursion "
            "H_t+1 = (1 - alpha) H_t + (N/B) GGN(batch) is on the precision, and running A and G each with the "
            "forgetting rate gives kron(sum_t w_t G_t, sum_t w_t A_t), which is not sum_t w_t kron(G_t, A_t) "
            "(cross terms between steps); use --method posthoc --hessian kfac, or an online diagonal "
            "(--hessian approx, exact, mixed or sqrt)")


def _check_mixed(config):
    if config["hessian"] == "mixed" and config["threshold"] is None and config["method"] != "ae":
        raise UsageError("--hessian mixed needs --hessian-threshold N (full M where a layer's feature size <= N)")


def _backend_name(explicit, stored_args):
    """--backend, else $MINILAE_BACKEND, else the checkpoint's, else numpy (read now, not at import)."""
    return (explicit.get("backend") or os.environ.get("MINILAE_BACKEND") or stored_args.get("backend")
            or "numpy")


def with_checkpoint(args, explicit):
    """(config, (state, stored)) of a resumed run: the checkpoint's flags, overridden by the explicit ones."""
    path = Path(args["out"]) / CHECKPOINT
    state, stored = load_checkpoint(path)
    stored_args = stored.get("args")
    if not isinstance(stored_args, dict):
        raise CheckpointError(f"{path} holds no run configuration; it was not written by minilae.train")
    fixed = [k for k in RUN_KEYS if stored_args.get("method") != "posthoc" or k not in POSTHOC_KEYS]
    conflicts = [f"--{k.replace('_', '-')}: checkpoint {stored_args.get(k)!r}, given {explicit[k]!r}"
                 for k in fixed if k in explicit and explicit[k] != stored_args.get(k)]
    if conflicts:
        raise CheckpointError(f"{path} belongs to a different run:\n  " + "\n  ".join(conflicts)
                              + "\nDrop these flags to continue that run, or choose a new --out folder.")
    _check_epochs(explicit.get("epochs"), state, path.parent)
    config = {**DEFAULTS, **stored_args, **explicit, "resume": True, "overwrite": False, "out": args["out"],
              "backend": _backend_name(explicit, stored_args), "distributed": explicit.get("distributed")}
    _check_mixed(config)
    _check_kfac(config)
    return config, (state, stored)


def _stopped_early(state):
    """Whether early stopping ended the run (an ensemble: a finished one, every member stopped early)."""
    if "members" in state:
        return state["stage"] == "done" and all(_stopped_early(m) for m in state["members"])
    stopper = state["stopper"]
    return stopper["num_bad_epochs"] >= stopper["patience"]


def _check_epochs(epochs, state, out):
    """Refuse an explicit --epochs N a resumed run cannot reach: below the epochs trained, or after an early stop."""
    if epochs is None:
        return
    done = int(state["epoch"])
    if epochs < done:
        raise UsageError(f"--epochs {epochs}: the run in {out} has already trained {done} epochs; give "
                         f"--epochs {done} or more, or leave --epochs out")
    if epochs > done and _stopped_early(state):
        raise UsageError(f"--epochs {epochs}: the run in {out} stopped early after epoch {done} (no validation "
                         f"improvement for {state['stopper']['patience']} epochs) and cannot train on; leave "
                         "--epochs out to evaluate it again, or start a new run")


def resolve_config(argv):
    """(config dict, explicitly given keys, (state, stored) of the checkpoint on --resume, else None)."""
    args, explicit = parse_args(argv)
    if not args["resume"]:
        return args, explicit, None
    config, resumed = with_checkpoint(args, explicit)
    return config, explicit, resumed


def _out_dir(config):
    if config["out"] is not None:
        return Path(config["out"])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config['dataset']}-{config['model']}-{config['method']}-{stamp}"


# ----------------------------------------------------------------------------------------------
# the output folder

def _remove_empty(folders):
    """rmdir the folders, deepest first, stopping at the first that is not empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def _create_folder(out):
    """mkdir -p out; return the folders it created, outermost first (a failing run removes them again)."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder")
    missing = [p for p in (out, *out.parents) if not p.exists()][::-1]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _remove_empty(missing)
        raise RunFolderError(f"cannot create the output folder {out}: {err.strerror}") from None
    return missing


def _lock(out):
    """An exclusive flock on the folder itself, held while the returned descriptor is open."""
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunFolderError(f"{out} is in use by another run (it holds the folder's lock); wait for that run "
                             "to end or choose another --out") from None
    return fd


@contextlib.contextmanager
def run_folder(out, create):
    """The run's folder: created (if create), checked writable and locked for the run, cleaned of stale
    temporary files; removed again if this run created it and fails leaving it empty."""
    out = Path(out)
    created = _create_folder(out) if create else []
    fd = None
    try:
        if not out.is_dir():
            raise RunFolderError(f"--out {out} is a file, not a folder" if out.exists() else
                                 f"no run to resume in {out}: the folder does not exist")
        if not is_writable(out):
            raise RunFolderError(f"--out {out} is not writable (a read-only folder or file system)")
        fd = _lock(out)
        for tmp in stale_temp_files(out, (CHECKPOINT, METRICS, MEMBER)):  # ours, from a killed run: we hold the lock
            tmp.unlink(missing_ok=True)
        yield out
    except BaseException:
        _remove_empty(created)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _refuse_existing_run(out, overwrite):
    found = [name for name in (CHECKPOINT, METRICS) if (out / name).exists()]
    if found and not overwrite:
        raise RunFolderError(f"{out} already holds a run ({', '.join(found)}): continue it with --resume, replace "
                             "it with --overwrite, or choose another --out")


def _clear_previous_run(out, log):
    """--overwrite: delete the previous run's files (only the names a run writes)."""
    removed = [name for name in (CHECKPOINT, METRICS, MEMBER, *FIGURES) if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    if removed:
        log(f"--overwrite: removed the previous run's {', '.join(removed)} from {out}")


def _load_images(name, split, limit, root):
    x, y = load_dataset(name, split, root=root)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def _make_trainer(config, model, n_train):
    optimizer = Adam(lr=config["lr"])
    method = config["method"]
    if method in ("ae", "ensemble", "ae-var", "mc-dropout"):  # eq. 1: no prior (ae-var: its learned variance;
        # mc-dropout: MAPTrainer draws the masks from fit's epoch generator, so a resumed run is exact)
        return MAPTrainer(model, optimizer, likelihood=method_likelihood(method))
    if method == "vae":
        from .vae import VAETrainer  # noqa: PLC0415 - only VAE runs need it

        return VAETrainer(model, optimizer, beta=config["beta"])
    if method == "posthoc":  # the MAP under lambda that the Laplace posterior assumes
        return MAPTrainer(model, optimizer, prior_precision=config["prior_precision"], n_data=n_train)
    return OnlineLaplace(model, n_train, config["alpha"], prior_precision=config["prior_precision"],
                         hessian=config["hessian"], threshold=config["threshold"], n_samples=config["train_samples"],
                         optimizer=optimizer)


# ----------------------------------------------------------------------------------------------
# evaluation and figures

def _evaluation_rng(seed):
    return backend.xp().random.default_rng(int(np.random.SeedSequence([int(seed), 2**31]).generate_state(1)[0]))


def _posterior_summary(posterior):
    if posterior is None:
        return None
    precision = posterior.precision
    return {"prior_precision": posterior.prior_precision, "precision_min": float(precision.min()),
            "precision_max": float(precision.max()), "variance_mean": float(posterior.variance.mean()),
            "num_params": posterior.num_params}


def evaluate(predictor, x, n_samples, seed):
    """Prediction over host images x with n_samples draws (one for a deterministic method)."""
    return predictor.predict(x, n_samples=n_samples, rng=_evaluation_rng(seed))


def _figures(out, config, predictor, val, ood, val_labels, log):
    files = []
    has_variance = predictor.stochastic or predictor.decoder_variance  # ae: x_var is 0, so no variance row

    def group(name, x, pred):
        return name, x, to_numpy(pred.x_mean), to_numpy(pred.x_var) if has_variance else None

    groups = [group(config["dataset"], val[0], val[1])] + ([group(ood[2], ood[0], ood[1])] if ood is not None else [])
    from .plots import latent_grid, plot_latent_variance, plot_reconstructions  # noqa: PLC0415 - matplotlib

    files.append(plot_reconstructions(groups, out / "reconstructions.png",
                                      title=f"{config['method']} {config['model']}: inputs, mean and variance"))
    if predictor.latent_size == 2:
        z = to_numpy(val[1].z_mean)
        xs, ys, grid = latent_grid(z, n=40, margin=0.3)
        variance, note = None, None
        if predictor.decoder_variance:
            _, var = predictor.predict_decoder(grid, n_samples=config["samples"],
                                               rng=_evaluation_rng(config["seed"] + 1))
            variance = to_numpy(var.reshape(var.shape[0], -1).mean(axis=1))
        else:
            note = f"{config['method']}: no output variance in latent space\n(its decoder is deterministic)"
        files.append(plot_latent_variance(z, val_labels, xs, ys, variance, out / "latent.png",
                                          title=f"{config['method']} {config['model']}: latent codes of "
                                                f"{config['dataset']} validation images", note=note))
    for f in files:
        log(f"wrote {f}")
    return [str(f) for f in files]


def _write_json(path, obj):
    """obj as JSON, written like the checkpoint (unique temporary file, fsync, os.replace)."""
    text = json.dumps(obj, indent=2, default=float)
    atomic_write(path, lambda f: f.write(text.encode()))


# ----------------------------------------------------------------------------------------------
# the command

def _load_data(config):
    """Host images: training, validation (+ labels for Fig. 1) and out-of-distribution test images."""
    x_train, _ = _load_images(config["dataset"], "train", config["limit_train"], config["data_root"])
    x_val, y_val = _load_images(config["dataset"], "val", config["limit_val"], config["data_root"])
    ood_name = ({"mnist": "fashionmnist", "fashionmnist": "mnist"}[config["dataset"]]
                if config["ood_dataset"] == "auto" else config["ood_dataset"])
    x_ood = None if ood_name == "none" else _load_images(ood_name, "test", len(x_val), config["data_root"])[0]
    return {"train": x_train, "val": x_val, "val_labels": y_val, "ood": x_ood, "ood_name": ood_name}


def _fit_posterior(config, model, trainer, state, x_train, log):
    """(posterior or None, post-hoc info): the online trainer's q_t, a post-hoc Laplace, or nothing (AE)."""
    if config["method"] == "online":
        return trainer.posterior(), None
    if config["method"] != "posthoc":
        return None, None
    if state.get("posterior") is not None:  # a finished post-hoc run, evaluated again
        return stored_posterior(state["posterior"], model.get_params().dtype), state.get("posthoc")
    structure = "KFAC factors" if config["hessian"] in KFAC_METHODS else "diagonal GGN"
    log(f"post-hoc Laplace: {config['hessian']} {structure} over {len(x_train)} training images "
        f"(batches of {_posthoc_batch_size(config)})")
    posterior, info = fit_posthoc(model, x_train, method=config["hessian"], threshold=config["threshold"],
                                  batch_size=_posthoc_batch_size(config), prior_precision=config["prior_precision"],
                                  optimize_prior=not config["fix_prior"], progress=not config["quiet"])
    log(f"prior precision {info['prior_precision']:.4g} "
        f"(log marginal likelihood {info['log_marginal_likelihood']:.6g})")
    return posterior, info


def _final_state(state, config, posterior, posthoc_info):
    """The run's last checkpoint: stage 'done', with the post-hoc posterior (the online one is the trainer's)."""
    stored = None
    if isinstance(posterior, KroneckerLaplace):
        stored = posterior.to_state()
    elif posterior is not None and config["method"] == "posthoc":
        stored = {"mean": posterior.mean, "ggn": posterior.ggn, "prior_precision": posterior.prior_precision}
    return {**state, "stage": "done", "posthoc": posthoc_info, "posterior": stored}


def _report(metrics, out, n_samples, log):
    v, ood = metrics["val"], metrics["ood"]
    log(f"validation ({v['n_images']} images, {n_samples} networks): MSE of the mean reconstruction "
        f"{v['mse']:.5f}, log p(x) {v['log_px']:.2f}, mean output variance {v['x_var']:.3g}"
        + (f"; {ood['dataset']}: mean output variance {ood['x_var']:.3g}" if ood else ""))
    files = [METRICS, CHECKPOINT] + [Path(f).name for f in metrics.get("figures", [])]
    log(f"results written to {out}/ ({', '.join(files)})")


def _use_backend(name):
    """Select the array backend; if it cannot work here, say that --backend numpy does."""
    try:
        backend.set_backend(name)
    except BackendError as err:
        reason = str(err).split(": the CuPy backend needs")[0]  # the library's advice is not the command's
        raise BackendError(f"the {name} backend cannot be used on this machine ({reason}); run on the CPU with "
                           "--backend numpy" + (", or install CuPy: pip install 'minilae[gpu]'"
                                                if name == "cupy" else "")) from None


def _check_ranks(config, comm, n_train, n_val):
    """Refuse a data-parallel run that cannot give every rank at least one image of every batch."""
    if comm.size == 1:
        return
    if config["method"] not in PARALLEL_METHODS:
        raise UsageError(f"--method {config['method']} does not run on {comm.size} ranks; data parallel: "
                         f"{', '.join(PARALLEL_METHODS)} (start it without mpiexec)")
    last = n_train % config["batch_size"]
    sizes = {"--batch-size": config["batch_size"], "the last batch of an epoch": last or n_train,
             "the validation images": n_val}
    small = [f"{what} ({n})" for what, n in sizes.items() if n < comm.size]
    if small:
        raise UsageError(f"{comm.size} ranks need at least {comm.size} images in every batch; too few in "
                         f"{', '.join(small)}: use fewer ranks, a larger --batch-size or another --limit-train")


def _posthoc_batch_size(config):
    return config["posthoc_batch_size"] or config["batch_size"]


def _check_hessian_memory(config, model, n_train, passes):
    """Refuse before the first step if a Hessian pass (name, batch size) would exceed the engine's memory budget."""
    budget = resolve_budget(None, backend.xp())
    for what, batch in passes:
        batch = min(batch, n_train)
        table = estimate_cost(model, model.input_shape, batch, config["hessian"], threshold=config["threshold"])
        if table.peak_bytes > budget:
            raise MemoryBudgetError(
                f"{what} (--hessian {config['hessian']}, batch {batch}) would need {format_bytes(table.peak_bytes)}, "
                f"more than the memory budget of {format_bytes(budget)} ({BUDGET_FRACTION:.0%} of the free "
                "memory); refused before starting")


def _plan(config, resume_state, stored_args):
    """(train, new posterior): whether this run trains (more) epochs and whether it computes a post-hoc posterior."""
    train = (resume_state is None or resume_state.get("stage") != "done"
             or (config["epochs"] > resume_state["epoch"] and not _stopped_early(resume_state)))
    new_posterior = config["method"] == "posthoc" and (
        train or any(config[k] != stored_args.get(k) for k in POSTHOC_KEYS))
    return train, new_posterior


def _network(config, input_shape, member=None):
    """The untrained network of the run (of ensemble member m: its own seed)."""
    seed = config["seed"] if member is None else member_seed(config["seed"], member)
    return build_network(config["method"], config["model"], input_shape, config["latent_size"], seed,
                         config["dropout"])


def run(config, resumed=None, log=print, argv=None):
    """Train, fit the posterior, evaluate and plot as the config says; return the metrics dict.

    config["out"] is the run's folder, prepared and locked by :func:`run_folder`.
    """
    _use_backend(config["backend"])
    backend.set_default_dtype(np.dtype(config["dtype"]))
    out = Path(config["out"])
    quiet_log = log if not config["quiet"] else (lambda *a, **k: None)
    data = _load_data(config)
    ensemble = config["method"] == "ensemble"
    comm = distributed.current()
    _check_ranks(config, comm, len(data["train"]), len(data["val"]))

    model = _network(config, data["train"].shape[1:], member=0 if ensemble else None)
    signature = model_signature(model, config["model"])
    ckpt_path = out / CHECKPOINT
    resume_state, stored_args = None, {}
    if resumed is not None:
        resume_state, stored = resumed
        check_signature(stored.get("signature", {}), signature, ckpt_path)
        stored_args = stored["args"]
    stored_config = {"args": {k: v for k, v in config.items() if k in DEFAULTS}, "signature": signature}
    train, new_posterior = _plan(config, resume_state, stored_args)
    passes = ([("the online training step", config["batch_size"])] if train and config["method"] == "online"
              else []) + ([("the post-hoc GGN pass", _posthoc_batch_size(config))] if new_posterior else [])
    _check_hessian_memory(config, model, len(data["train"]), passes)
    size = f"{config['ensemble_size']} members x " if ensemble else ""
    quiet_log(f"{config['method']} | {config['model']} | {config['dataset']} ({len(data['train'])} train, "
              f"{len(data['val'])} val) | {size}{model.num_params} parameters | backend {config['backend']} | "
              f"output {out}")
    if config["overwrite"] and comm.is_root:
        _clear_previous_run(out, quiet_log)

    start = time.perf_counter()
    posterior = posthoc_info = None
    if ensemble:
        state = _train_ensemble(config, data, stored_config, resume_state, train, quiet_log)
        train_time = time.perf_counter() - start
        predictor = make_predictor("ensemble", config, model,
                                   thetas=[m["trainer"]["theta"] for m in state["members"]])
    else:
        trainer = _make_trainer(config, model, len(data["train"]))
        state = _train(config, trainer, data, stored_config, resume_state, stored_args, train, new_posterior,
                       quiet_log)
        train_time = time.perf_counter() - start
        posterior, posthoc_info = _fit_posterior(config, model, trainer, state, data["train"], quiet_log)
        state = _final_state(state, config, posterior, posthoc_info)
        predictor = make_predictor(config["method"], config, model, posterior)
    if comm.is_root:
        save_checkpoint(ckpt_path, state, stored_config)

    n_samples = predictor.n_draws(config["samples"])
    quiet_log(f"evaluating with {n_samples} stochastic pass(es) on {len(data['val'])} validation images"
              + (f" and {len(data['ood'])} {data['ood_name']} images" if data["ood"] is not None else ""))
    val_pred = evaluate(predictor, data["val"], config["samples"], config["seed"])
    ood_pred = None if data["ood"] is None else evaluate(predictor, data["ood"], config["samples"], config["seed"])
    metrics = {
        "command": "python -m minilae.train " + " ".join(shlex.quote(a) for a in (argv or [])),
        "config": config, "signature": signature, "history": state["history"],
        "epochs_trained": state["epoch"], "best_epoch": (state.get("best") or {}).get("epoch"),
        "train_time_s": train_time, "posterior": _posterior_summary(posterior), "posthoc": posthoc_info,
        "val": val_pred.summary(),
        "ood": None if ood_pred is None else {"dataset": data["ood_name"], **ood_pred.summary()},
    }
    if ensemble:
        metrics["members"] = [_member_summary(config, m, s) for m, s in enumerate(state["members"])]
    if comm.size > 1:
        metrics["distributed"] = {"kind": comm.kind, "ranks": comm.size}
    if not comm.is_root:  # rank 0 alone writes the metrics and figures
        return metrics
    if not config["no_plots"]:
        metrics["figures"] = _figures(out, config, predictor, (data["val"], val_pred),
                                      None if ood_pred is None else (data["ood"], ood_pred, data["ood_name"]),
                                      data["val_labels"], quiet_log)
    _write_json(out / METRICS, metrics)
    _report(metrics, out, n_samples, log)
    return metrics


def _train(config, trainer, data, stored_config, resume_state, stored_args, train, new_posterior, log):
    """The run's state after training (or, for a finished run, as it was, ready for a new posterior)."""
    if train:
        if resume_state is not None and resume_state.get("stage") == "done":
            log(f"the run finished after epoch {resume_state['epoch']}: training on to epoch {config['epochs']}")
        try:
            return fit(trainer, data["train"], data["val"], epochs=config["epochs"],
                       batch_size=config["batch_size"], seed=config["seed"], lr_patience=config["lr_patience"],
                       stop_patience=config["stop_patience"], checkpoint=Path(config["out"]) / CHECKPOINT,
                       config=stored_config, resume=resume_state, progress=not config["quiet"], log=log)
        except ValueError as err:  # ae-var: the likelihood refuses a log-variance whose e^(+-s) overflows
            if config["method"] != "ae-var" or "overflows" not in str(err):
                raise
            raise TrainingDivergedError(f"training diverged: the decoder's {err}. {DIVERGENCE_HINT}") from None
    trainer.load_state_dict(resume_state["trainer"])
    if new_posterior:
        changed = [f"--{k.replace('_', '-')} {config[k]}" for k in POSTHOC_KEYS if config[k] != stored_args.get(k)]
        log(f"the checkpoint is of a finished run: recomputing its posterior with {', '.join(changed)}")
        return {**resume_state, "posterior": None, "posthoc": None}
    log("the checkpoint is of a finished run: evaluating it again")
    return resume_state


# ----------------------------------------------------------------------------------------------
# ensembles: members one after another, resumable per member

def _ensemble_state(members, current, stage):
    """The ensemble's checkpoint: the finished members' states (index m = member m), the member in training
    ({"member": m, "state": its epoch checkpoint} or None) and, for the rest of the command, the run's epoch
    (the most any member trained) and its history (every member's epochs, tagged with the member)."""
    states = [(m, s) for m, s in enumerate(members) if current is None or m != current["member"]]
    states += [(current["member"], current["state"])] if current else []
    return {"stage": stage, "epoch": max((s["epoch"] for _, s in states), default=0),
            "history": [{"member": m, **r} for m, s in states for r in s["history"]],
            "members": members, "current": current}


def _member_plan(config, m, members, current):
    """The state member m continues from (None: a new member), or False when it is finished and stays so."""
    if current is not None and current["member"] == m:
        return current["state"]
    if m < len(members):
        done = members[m]
        return done if config["epochs"] > done["epoch"] and not _stopped_early(done) else False
    return None


def _train_ensemble(config, data, stored_config, resume_state, train, log):
    """Train members 0..M-1 in turn (member m: seed member_seed(seed, m)); return the ensemble's final state."""
    out = Path(config["out"])
    ckpt, member_ckpt = out / CHECKPOINT, out / MEMBER
    members = list(resume_state["members"]) if resume_state is not None else []
    current = resume_state.get("current") if resume_state is not None else None
    if not train:
        log("the checkpoint is of a finished run: evaluating it again")
        return {**resume_state, "stage": "done"}
    member_ckpt.unlink(missing_ok=True)  # a killed run's; checkpoint.npz holds what counts
    for m in range(config["ensemble_size"]):
        resume = _member_plan(config, m, members, current)
        if resume is False:
            continue
        log(f"ensemble member {m + 1}/{config['ensemble_size']} (seed {member_seed(config['seed'], m)})"
            + (f": continuing after epoch {resume['epoch']}" if resume else ""))
        trainer = _make_trainer(config, _network(config, data["train"].shape[1:], member=m), len(data["train"]))

        def merge(epoch, record, m=m):
            """After each epoch: the member's epoch checkpoint into the ensemble's checkpoint."""
            state, _ = load_checkpoint(member_ckpt)
            save_checkpoint(ckpt, _ensemble_state(members, {"member": m, "state": state}, "train"), stored_config)

        state = fit(trainer, data["train"], data["val"], epochs=config["epochs"], batch_size=config["batch_size"],
                    seed=member_seed(config["seed"], m), lr_patience=config["lr_patience"],
                    stop_patience=config["stop_patience"], checkpoint=member_ckpt, config=stored_config,
                    resume=resume, progress=not config["quiet"], log=log, on_epoch_end=merge)
        members = members[:m] + [state] + members[m + 1:]
        current = None
        save_checkpoint(ckpt, _ensemble_state(members, None, "train"), stored_config)
        member_ckpt.unlink(missing_ok=True)
    return _ensemble_state(members, None, "done")


def _member_summary(config, m, state):
    """metrics.json's record of member m: its seed, epochs, best epoch and history."""
    return {"member": m, "seed": member_seed(config["seed"], m), "epochs_trained": state["epoch"],
            "best_epoch": (state["best"] or {}).get("epoch"), "history": state["history"]}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a terminated run ends like an interrupted one."""


def _raise_terminated(signum, frame):
    raise Terminated


def _os_error(err):
    """One line for an OSError: the file and the reason (e.g. a full disk), without a traceback."""
    return f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)


def _interrupted(err, out):
    what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
    if (Path(out) / CHECKPOINT).is_file():
        return (f"\n{what}; continue from the last finished epoch with: python -m minilae.train "
                f"--out {shlex.quote(str(out))} --resume")
    return f"\n{what} before the first epoch ended; nothing was saved"


def main(argv=None):
    """Entry point; returns the exit status (0 ok, 1 runtime error, 2 usage error, 130 SIGINT, 143 SIGTERM).

    Under mpiexec a rank that fails ends every rank (MPI_Abort), since the others would wait for it forever."""
    status = _command(sys.argv[1:] if argv is None else list(argv))
    comm = distributed.current()
    if status and comm.size > 1:
        sys.stderr.flush()
        comm.abort(status)
    return status


def _silent(*args, **kwargs):
    """The log of ranks other than 0."""


def _command(argv):
    """main() in one process (or one rank): the exit status."""
    out = "RUN_DIR"
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        args, explicit = parse_args(argv)
        comm = distributed.init(args["distributed"])
        out = comm.broadcast(_out_dir(args))  # one time stamp for all ranks
        # rank 0 owns the folder (creates, locks and cleans it) and reads the checkpoint for every rank
        with run_folder(out, create=not args["resume"]) if comm.is_root else contextlib.nullcontext():
            if not comm.is_root:
                config, resumed = comm.broadcast(None)
            elif args["resume"]:
                config, resumed = comm.broadcast(with_checkpoint(args, explicit))
            else:
                _refuse_existing_run(out, args["overwrite"])
                config, resumed = comm.broadcast((args, None))
            if comm.is_root:
                run({**config, "out": str(out)}, resumed, argv=argv)
            else:
                run({**config, "out": str(out), "quiet": True}, resumed, log=_silent, argv=argv)
    except UsageError as err:
        build_parser().print_usage(sys.stderr)
        print(f"python -m minilae.train: error: {err}", file=sys.stderr)
        return 2
    except (DataError, CheckpointError, TrainingDivergedError, BackendError, RunFolderError,
            distributed.DistributedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except MemoryBudgetError as err:
        print(f"error: {err}. Use a smaller --batch-size, --hessian sqrt (exact, slower) or --hessian approx / "
              "mixed.", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: {_os_error(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(_interrupted(err, out), file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())

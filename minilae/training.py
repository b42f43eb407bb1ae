"""The shared training machinery: one minibatch step for a plain autoencoder (MAP), the epoch loop
with the paper's schedule, and checkpoints that make an interrupted run resumable bit for bit.

The loop (:func:`fit`) drives any *trainer*: an object with
  * ``model``, ``optimizer``, ``theta`` (the flat parameter vector being optimised),
  * ``step(x, rng) -> dict`` one minibatch update, returning host floats for the progress bar,
  * ``snapshot()`` / ``restore(snap)`` copies of what defines the result (theta; the online LAE
    adds its precision), used to keep the best epoch,
  * ``state_dict()`` / ``load_state_dict(d)`` everything needed to continue (optimiser state too).
:class:`MAPTrainer` here is the plain AE; :class:`minilae.online.OnlineLaplace` is the online LAE.

The schedule is the paper's: Adam (lr 1e-3), lr halved when the validation loss has not improved
for 5 epochs, training stopped after 8 epochs without improvement; the result is the parameters
of the best validation epoch. The validation loss is the per-pixel MSE of the *mean* network's
reconstructions E[x | f] (the likelihood's mean, e.g. the mean channels of the AE with learned
variance), in evaluation mode (no dropout): deterministic (no sampling noise in the stopping rule)
and comparable across the AE, post-hoc and online LAE and the baselines.

Reproducible resumption: randomness is drawn from generators derived from (seed, epoch) at the
start of each epoch (:func:`epoch_rngs`), one for the host-side shuffling and one on the array
backend for weight sampling. A checkpoint written at the end of epoch e therefore needs no RNG
state: resuming re-creates the generators of epoch e + 1 exactly, on NumPy and CuPy alike, and an
interrupted run ends with the same weights as an uninterrupted one.

Checkpoints are single ``.npz`` files (host arrays via ``to_numpy``, plus the run's config and the
scalar state as JSON strings) written with :func:`minilae.files.atomic_write` (a unique temporary
file, fsync, ``os.replace``), so a crash while writing never replaces a good checkpoint with a
partial one.
"""
from __future__ import annotations

import json
import math
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np  # host side only: checkpoint files and seed derivation

from . import distributed
from .backend import array_module, asarray, to_numpy, xp
from .data import batches, n_batches
from .files import atomic_write
from .losses import Gaussian, get_likelihood
from .optim import Adam, EarlyStopping, ReduceLROnPlateau
from .validation import all_finite, positive, positive_int

__all__ = ["TrainingDivergedError", "CheckpointError", "MAPTrainer", "fit", "epoch_rngs", "DIVERGENCE_FACTOR",
           "reconstruction_mse", "reconstruction_stats", "training_mode", "check_finite", "model_signature",
           "check_signature", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1

DIVERGENCE_FACTOR = 1000.0
"""fit stops when the validation MSE exceeds this many times the untrained model's: three orders of
magnitude worse than no training at all. Runs that recover stay well under it (MNIST MLP, 512 images,
lr 0.03: at most ~130 times, after epoch 1, then below the untrained model); --lr 10 passes it a
thousandfold in the first epoch (validation MSE ~1e6 against ~0.13)."""

DIVERGENCE_HINT = "Try a smaller learning rate (--lr) or a larger prior precision."


class TrainingDivergedError(FloatingPointError):
    """Raised when a loss, gradient, parameter or precision becomes non-finite, or the validation MSE explodes
    (above DIVERGENCE_FACTOR times the untrained model's); names the step."""


class CheckpointError(RuntimeError):
    """Raised for a missing, unreadable, partial or incompatible checkpoint."""


# ----------------------------------------------------------------------------------------------
# small shared pieces

def check_finite(name, a, step):
    """Raise TrainingDivergedError unless every entry of the array a is finite."""
    if all_finite(a):
        return
    finite = array_module(a).isfinite(a)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise TrainingDivergedError(
            f"training diverged at step {step}: {name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
            f"(nan/inf). {DIVERGENCE_HINT}")


def reconstruction_stats(f, x, nll, likelihood=None):
    """Host floats for logging: mean nll per image and per-pixel MSE of the reconstruction E[x | f] (f itself
    without a likelihood; the mean channels of a mean-and-log-variance output)."""
    x_hat = f if likelihood is None else likelihood.mean(f)
    return {"nll": float(nll.mean()), "mse": float(((x_hat - x) ** 2).mean())}


@contextmanager
def training_mode(model, mode=True):
    """Run a block with model.train(mode) (Dropout draws masks only in training mode); the mode comes back after."""
    was = _modes(model)
    model.train(mode)
    try:
        yield model
    finally:
        for layer, flag in was:  # each layer's own flag: a chain may hold layers set apart (an eval-mode Dropout)
            layer.training = flag


def _modes(layer):
    """[(layer, layer.training)] for the layer and every layer inside it."""
    return [(layer, layer.training)] + [m for sub in getattr(layer, "layers", ()) for m in _modes(sub)]


def reconstruction_mse(model, x, batch_size=500, likelihood=None):
    """Per-pixel MSE of the reconstructions E[x | f] (f without a likelihood), mean over all images of the host
    array x; in evaluation mode, so a dropout model's validation loss is deterministic."""
    if len(x) == 0:
        raise ValueError("reconstruction_mse needs at least one image")
    dtype = model.get_params().dtype
    total = 0.0
    with training_mode(model, False):
        for xb in batches(x, batch_size, shuffle=False):
            xb = asarray(xb, dtype=dtype)
            f = model.forward(xb)
            total += float((((f if likelihood is None else likelihood.mean(f)) - xb) ** 2).sum())
    return total / x.size


def epoch_rngs(seed, epoch):
    """(host numpy Generator for shuffling, backend Generator for weight noise) of one epoch.

    Both are derived from (seed, epoch) with numpy's SeedSequence, so epoch e's randomness does not
    depend on how many draws earlier epochs made - the property that makes resuming exact.
    """
    host_seq, backend_seq = np.random.SeedSequence([int(seed), int(epoch)]).spawn(2)
    backend_seed = int(backend_seq.generate_state(1, np.uint32)[0])
    return np.random.default_rng(host_seq), xp().random.default_rng(backend_seed)


# ----------------------------------------------------------------------------------------------
# the plain autoencoder

class MAPTrainer:
    """theta <- Adam step on mean_b -log p(x_b | theta) + lambda / (2N) ||theta||^2.

    prior_precision = 0 (the default) is the plain AE of eq. 1. For post-hoc Laplace pass the prior
    precision lambda and the training-set size N: the objective is then -log p(theta | D) / N up to a
    constant, so training ends at (an estimate of) the mode under lambda that the Laplace posterior
    and its evidence assume; lambda / N is the weight decay on the batch-mean loss.
    """

    method = "ae"

    def __init__(self, model, optimizer=None, likelihood=None, prior_precision=0.0, n_data=None):
        self.model = model
        self.optimizer = optimizer if optimizer is not None else Adam(lr=1e-3)
        self.likelihood = get_likelihood(likelihood) if likelihood is not None else Gaussian(1.0)
        self.prior_precision = 0.0 if prior_precision == 0 else positive(prior_precision, "prior_precision")
        if self.prior_precision and n_data is None:
            raise ValueError("a prior (prior_precision > 0) needs n_data, the training-set size N of the "
                             "weight decay lambda / N")
        self.n_data = None if n_data is None else positive_int(n_data, "n_data (the training-set size N)")
        self.theta = model.get_params()
        self.t = 0  # optimiser steps taken

    def posterior(self):
        """A plain AE has no posterior."""
        return None

    def loss_and_grad(self, x):
        """Forward at the current parameters; (f, nll (B,), grad of mean_b nll_b + lambda/(2N) ||theta||^2 (P,)).

        The forward runs in training mode: a dropout model draws a new mask, and the gradient is that of the
        network the mask selects."""
        comm = distributed.current()  # data parallel: x is this rank's shard of the batch, B the batch's size
        with training_mode(self.model, True):
            f = self.model.forward(x)
            check_finite("the reconstruction", f, self.t + 1)
            nll = self.likelihood.nll(f, x)
            # d/dtheta mean_b l_b = J^T (dl/df / B): one backward pass
            grad = self.model.vjp_params(self.likelihood.grad(f, x) / comm.allreduce_sum(x.shape[0]))
        grad = comm.allreduce_sum(grad)
        if self.prior_precision:
            grad += (self.prior_precision / self.n_data) * self.theta  # the prior: weight decay lambda / N
        check_finite("the gradient", grad, self.t + 1)
        return f, nll, grad

    def step(self, x, rng=None):
        """One minibatch: gradient at theta, optimiser step; returns host stats.

        rng (fit's backend generator of the epoch) draws a dropout model's masks, so a resumed run draws the
        same masks as an uninterrupted one."""
        if rng is not None and getattr(self.model, "dropout_layers", None):
            self.model.reseed_dropout(rng)
        f, nll, grad = self.loss_and_grad(x)
        stats = reconstruction_stats(f, x, nll, self.likelihood)
        self.apply_gradient(grad)
        return stats

    def apply_gradient(self, grad):
        """theta <- optimiser step with grad; the model gets the new theta."""
        self.optimizer.step(self.theta, grad)
        self.t += 1
        check_finite("the parameters", self.theta, self.t)
        self.model.set_params(self.theta, check_finite=False, share=True)  # checked above; views, no P-long copy

    def snapshot(self):
        """Copies of what defines the result: theta."""
        return {"theta": self.theta.copy()}

    def restore(self, snap):
        """Put a snapshot back into the trainer and the model."""
        self.theta = asarray(snap["theta"], dtype=self.theta.dtype).copy()
        self.model.set_params(self.theta)

    def state_dict(self):
        """theta, step count, prior (lambda, N) and optimiser state."""
        return {"theta": self.theta.copy(), "t": self.t, "prior_precision": self.prior_precision,
                "n_data": self.n_data, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, d):
        """Restore theta, step count and optimiser state."""
        theta = asarray(d["theta"], dtype=self.theta.dtype)
        if theta.shape != self.theta.shape:
            raise CheckpointError(f"checkpoint holds {theta.shape[0]} parameters, the model has {self.theta.shape[0]}")
        self.theta = theta.copy()
        self.model.set_params(self.theta)
        self.t = int(d["t"])
        if "prior_precision" in d:  # checkpoints written before the prior entered the objective lack it
            self.prior_precision, self.n_data = float(d["prior_precision"]), d["n_data"]
        self.optimizer.load_state_dict(d["optimizer"])


# ----------------------------------------------------------------------------------------------
# the epoch loop

def _progress(iterable, total, desc, enabled):
    """tqdm bar when enabled and stderr is a terminal; the bare iterable otherwise (CI logs)."""
    if not enabled or not sys.stderr.isatty():
        return None, iterable
    from tqdm import tqdm  # noqa: PLC0415 - only needed with a terminal

    bar = tqdm(iterable, total=total, desc=desc, leave=False, unit="batch", dynamic_ncols=True)
    return bar, bar


def fit(trainer, x_train, x_val, *, epochs, batch_size, seed=0, lr_patience=5, lr_factor=0.5,
        stop_patience=8, checkpoint=None, config=None, resume=None, progress=True, log=print,
        on_epoch_end=None, divergence_factor=DIVERGENCE_FACTOR):
    """Train for up to ``epochs`` epochs with the paper's schedule; return the run's state dict.

    x_train, x_val: host arrays (N, C, H, W). ``checkpoint``: path written (atomically) after every
    epoch, with ``config`` (a JSON-able dict) stored beside the state. ``resume``: a state dict from
    :func:`load_checkpoint` to continue from. ``on_epoch_end(epoch, record)`` is called after the
    checkpoint is written (tests use it to interrupt a run). At the end the trainer holds the
    parameters of the best validation epoch; the returned state also keeps the last epoch's
    (``last``, when it is not the best) so that a finished run can be continued exactly.

    Data parallel (:mod:`minilae.distributed`): every rank passes the same x_train and x_val, steps on its shard
    of each batch and scores its shard of x_val; the statistics are averaged over the ranks, rank 0 alone writes
    the checkpoint, and theta is checked to be identical on all ranks after every epoch.

    Divergence: a non-finite loss, gradient, parameter or precision, or a validation MSE above
    ``divergence_factor`` times the untrained model's (measured before the first step), raises
    TrainingDivergedError; the checkpoint of the last good epoch is kept.
    """
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"need training and validation images, got {len(x_train)} and {len(x_val)}")
    comm = distributed.current()  # data parallel: each rank steps on its shard of every batch, rank 0 writes
    x_val = x_val[comm.shard(len(x_val))]
    scheduler = ReduceLROnPlateau(trainer.optimizer, factor=lr_factor, patience=lr_patience)
    stopper = EarlyStopping(patience=stop_patience)
    if resume is not None:
        trainer.load_state_dict(resume["trainer"])
        if resume.get("last") is not None:  # a finished run holds its best epoch: continue from its last
            trainer.restore(resume["last"])
        scheduler.load_state_dict(resume["scheduler"])
        stopper.load_state_dict(resume["stopper"])
        run = {"epoch": int(resume["epoch"]), "history": list(resume["history"]), "best": resume["best"],
               "untrained_val_mse": resume.get("untrained_val_mse")}
        log(f"resumed from the checkpoint after epoch {run['epoch']} (step {trainer.t})")
    else:
        run = {"epoch": 0, "history": [], "best": None, "untrained_val_mse": _val_mse(trainer, x_val, comm)}
    dtype = trainer.theta.dtype
    steps_per_epoch = n_batches(len(x_train), batch_size)
    for epoch in range(run["epoch"], epochs):
        if stopper.should_stop:
            break
        host_rng, backend_rng = epoch_rngs(seed, epoch)
        start, seen, sums = time.perf_counter(), 0, {}
        bar, it = _progress(batches(x_train, batch_size, rng=host_rng), steps_per_epoch,
                            f"epoch {epoch + 1}/{epochs}", progress)
        for i, xb in enumerate(it):
            part = xb[comm.shard(len(xb))]
            try:
                stats = comm.mean(trainer.step(asarray(part, dtype=dtype), backend_rng), len(part))
            except TrainingDivergedError as err:
                raise TrainingDivergedError(f"epoch {epoch + 1}, batch {i + 1}/{steps_per_epoch}: {err}") from None
            seen += len(xb)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v * len(xb)
            if bar is not None:
                bar.set_postfix(mse=f"{stats['mse']:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - start
        val_mse = _val_mse(trainer, x_val, comm)
        _check_val_mse(val_mse, run["untrained_val_mse"], divergence_factor, epoch + 1, trainer.t)
        record = {"epoch": epoch + 1, "step": trainer.t, "lr": trainer.optimizer.lr,
                  **{f"train_{k}": v / seen for k, v in sums.items()}, "val_mse": val_mse,
                  "epoch_time_s": train_time, "images_per_s": seen / train_time}
        scheduler.step(val_mse)
        stop = stopper.step(val_mse)
        if stopper.improved:
            run["best"] = {"epoch": epoch + 1, **trainer.snapshot()}
        run["history"].append(record)
        run["epoch"] = epoch + 1
        log(f"epoch {epoch + 1}/{epochs}: train mse {record['train_mse']:.5f}, val mse {val_mse:.5f}, "
            f"lr {record['lr']:.2e}, {train_time:.1f} s ({record['images_per_s']:.0f} img/s)"
            + ("  [best]" if stopper.improved else ""))
        state = _run_state(trainer, scheduler, stopper, run, stage="train")
        comm.check_identical(trainer.theta, f"theta after epoch {epoch + 1}")
        if checkpoint is not None and comm.is_root:
            save_checkpoint(checkpoint, state, config or {})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if stop:
            log(f"early stopping: no validation improvement for {stopper.patience} epochs "
                f"(best epoch {stopper.best_epoch + 1})")
            break
    last = None
    if run["best"] is not None:
        if run["best"]["epoch"] != run["epoch"]:
            last = trainer.snapshot()
        trainer.restore(run["best"])
    return _run_state(trainer, scheduler, stopper, run, stage="train", last=last)


def _val_mse(trainer, x_val, comm):
    """The validation MSE over all ranks' shards x_val: per-pixel means weighted by the shards' pixel counts."""
    mse = reconstruction_mse(trainer.model, x_val, likelihood=_likelihood(trainer))
    return comm.mean({"mse": mse}, x_val.size)["mse"]


def _likelihood(trainer):
    """The trainer's likelihood, whose mean(f) is the reconstruction the validation MSE scores (None: f itself)."""
    return getattr(trainer, "likelihood", None)


def _check_val_mse(val_mse, untrained, factor, epoch, step):
    """Raise TrainingDivergedError for a non-finite validation MSE or one above factor x the untrained model's."""
    if not math.isfinite(val_mse):
        raise TrainingDivergedError(f"training diverged in epoch {epoch} (step {step}): validation MSE is "
                                    f"{val_mse}. {DIVERGENCE_HINT}")
    if untrained is not None and untrained > 0 and val_mse > factor * untrained:
        raise TrainingDivergedError(f"training diverged in epoch {epoch} (step {step}): validation MSE "
                                    f"{val_mse:.4g} is more than {factor:g} times the untrained model's "
                                    f"({untrained:.4g}). {DIVERGENCE_HINT}")


def _run_state(trainer, scheduler, stopper, run, stage, last=None):
    """What a checkpoint holds; last: the last epoch's snapshot when the trainer holds the best one."""
    return {"stage": stage, "epoch": run["epoch"], "history": run["history"], "best": run["best"],
            "last": last, "untrained_val_mse": run["untrained_val_mse"], "trainer": trainer.state_dict(),
            "scheduler": scheduler.state_dict(), "stopper": stopper.state_dict()}


# ----------------------------------------------------------------------------------------------
# architecture signature

def model_signature(model, name):
    """What a checkpoint must match to be loaded into a model: name, shapes, latent size, P."""
    return {"model": str(name), "input_shape": list(model.input_shape), "latent_size": int(model.latent_size),
            "num_params": int(model.num_params), "param_shapes": [list(p.shape) for p in model.params]}


def check_signature(stored, current, path="checkpoint"):
    """Raise CheckpointError naming every field where the stored architecture differs."""
    diffs = [f"{k}: checkpoint {stored.get(k)!r}, this run {current[k]!r}"
             for k in current if stored.get(k) != current[k] and k != "param_shapes"]
    if not diffs and stored.get("param_shapes") != current["param_shapes"]:
        diffs.append("parameter shapes differ")
    if diffs:
        raise CheckpointError(f"{path} was written for a different architecture:\n  " + "\n  ".join(diffs)
                              + "\nUse a new --out folder, or the flags the checkpoint was trained with.")


# ----------------------------------------------------------------------------------------------
# checkpoint files

def _is_array(v):
    return hasattr(v, "shape") and hasattr(v, "dtype") and getattr(v, "ndim", 0) >= 1


def _split_state(tree, arrays, prefix):
    """Replace every array in a nested dict/list by {'__array__': key}, storing it (on the host) in arrays."""
    if isinstance(tree, dict):
        return {str(k): _split_state(v, arrays, f"{prefix}/{k}") for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_state(v, arrays, f"{prefix}/{i}") for i, v in enumerate(tree)]
    if _is_array(tree):
        arrays[prefix] = to_numpy(tree)
        return {"__array__": prefix}
    if hasattr(tree, "item"):  # 0-d numpy/cupy scalar
        return tree.item()
    return tree


def _join_state(tree, arrays):
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {k: _join_state(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_state(v, arrays) for v in tree]
    return tree


def save_checkpoint(path, state, config):
    """Write state (nested dict of arrays/scalars) and config atomically to path (.npz)."""
    path = Path(path)
    arrays = {}
    tree = _split_state(state, arrays, "state")
    meta = json.dumps({"format": CHECKPOINT_FORMAT, "config": config, "state": tree})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, __meta__=np.array(meta), **arrays))


def load_checkpoint(path):
    """(state, config) from a checkpoint file; CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["__meta__"]))
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable, truncated or not a minilae checkpoint "
                              f"({type(err).__name__}: {err})") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')!r}; this minilae reads "
                              f"format {CHECKPOINT_FORMAT}")
    try:
        state = _join_state(meta["state"], arrays)
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} is incomplete: array {err} is missing") from err
    return state, meta.get("config", {})

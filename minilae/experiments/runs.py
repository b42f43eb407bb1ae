"""Training or reusing the runs an experiment needs: RUNS/<task>-<dataset>-<model>/<method>/.

A method's folder holding a finished run (metrics.json present) is reused as it is; one holding
only a checkpoint (an interrupted run) is continued with ``--resume``; an absent or empty one is
trained by ``minilae.train.main`` in-process. A run whose stored dataset, model or latent size is
not the experiment's is refused: a runs folder made for another experiment is never mixed in.
"""
from __future__ import annotations

from pathlib import Path

from .. import backend, train
from ..methods import load_run

__all__ = ["ExperimentError", "RunSpec", "ensure_run", "ensure_runs", "check_methods"]


class ExperimentError(RuntimeError):
    """An experiment cannot run: a run failed or a folder belongs to something else."""


class RunSpec(dict):
    """What defines a run for an experiment: dataset, model, latent_size, and training-size flags."""

    IDENTITY = ("dataset", "model", "latent_size")

    @property
    def folder_name(self):
        return f"{self['task']}-{self['dataset']}-{self['model']}"

    @property
    def quiet_flag(self):
        """--quiet for the training runs only when the experiment is quiet: long runs show their progress."""
        return ["--quiet"] if self.get("quiet") else []

    def train_argv(self, method, out):
        """The python -m minilae.train command line of this run."""
        argv = ["--method", method, "--dataset", self["dataset"], "--model", self["model"],
                "--latent-size", str(self["latent_size"]), "--seed", str(self["seed"]), "--out", str(out),
                "--ood-dataset", "none", "--no-plots"] + self.quiet_flag
        for key in ("epochs", "limit_train", "limit_val", "samples", "backend"):
            if self.get(key) is not None:
                argv += [f"--{key.replace('_', '-')}", str(self[key])]
        return argv


def check_methods(methods):
    """The methods asked for, in minilae.train.METHODS order; unknown names are a ValueError."""
    unknown = [m for m in methods if m not in train.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(train.METHODS)}")
    return [m for m in train.METHODS if m in methods]


def _check_identity(predictor, spec, method, folder):
    wrong = [f"{k}: stored {predictor.config.get(k)!r}, this experiment needs {spec[k]!r}"
             for k in RunSpec.IDENTITY if predictor.config.get(k) != spec[k]]
    if predictor.method != method:
        wrong.append(f"method: stored {predictor.method!r}, the folder is {method!r}'s")
    if wrong:
        raise ExperimentError(f"{folder} holds a run of another experiment ({'; '.join(wrong)}); use another "
                              "--runs folder")


def _train(argv, log):
    """minilae.train.main(argv) on its own backend, ours restored afterwards; refuse a failed run."""
    current = backend.get_backend()
    try:
        status = train.main(argv)
    finally:
        backend.set_backend(current)
    if status in (130, 143):  # Ctrl-C / SIGTERM: the run kept its checkpoint; the next call resumes it
        raise KeyboardInterrupt
    if status != 0:
        raise ExperimentError(f"python -m minilae.train {' '.join(argv)} failed with exit status {status}")
    log(f"trained: python -m minilae.train {' '.join(argv)}")


def ensure_run(spec, method, runs_root, log=print):
    """The Predictor of method's run in runs_root: reused if finished, resumed if interrupted, else trained."""
    folder = Path(runs_root) / spec.folder_name / method
    finished = (folder / train.METRICS).is_file()
    interrupted = not finished and (folder / train.CHECKPOINT).is_file()
    if finished or interrupted:
        _check_identity(load_run(folder), spec, method, folder)
    if finished:
        log(f"reusing the finished run {folder}")
    elif interrupted:
        log(f"resuming the interrupted run {folder}")
        _train(["--out", str(folder), "--resume", "--no-plots"] + spec.quiet_flag, log)
    else:
        _train(spec.train_argv(method, folder), log)
    return load_run(folder)


def ensure_runs(spec, methods, runs_root, log=print):
    """{method: Predictor} for every method asked for (each trained, resumed or reused)."""
    return {m: ensure_run(spec, m, runs_root, log) for m in check_methods(methods)}

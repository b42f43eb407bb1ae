"""The MNIST classifier of the imputation experiment: an MLP from the library's layers, trained with
the Categorical likelihood (cross-entropy) and Adam, cached once in the runs folder.

  logits = W2 tanh(W1 flatten(x) + b1) + b2,   p(y | x) = softmax(logits),
  theta <- Adam step on mean_b -log p(y_b | x_b).

The cache (``classifier.npz``, written with :func:`minilae.files.atomic_write`) stores theta and
the configuration; a cache of another configuration (dataset, architecture, training size) is
refused rather than silently reused or replaced.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np  # host side: the cache file and the shuffling

from ..backend import asarray, to_numpy
from ..data import batches, load_dataset
from ..files import atomic_write
from ..layers import Flatten, Linear, Sequential, Tanh
from ..losses import Categorical
from ..optim import Adam
from .runs import ExperimentError

__all__ = ["Classifier", "load_or_train", "CACHE"]

CACHE = "classifier.npz"
N_CLASSES = 10


class Classifier:
    """p(y | x) of an MLP 784 -> hidden -> 10 (Tanh), on the current backend."""

    def __init__(self, input_shape=(1, 28, 28), hidden=256, seed=0):
        rng = np.random.default_rng(seed)
        d = int(np.prod(input_shape))
        self.net = Sequential(Flatten(), Linear(d, hidden, rng=rng), Tanh(), Linear(hidden, N_CLASSES, rng=rng))
        self.likelihood = Categorical()

    def fit(self, x, y, epochs, batch_size=128, lr=1e-3, seed=0):
        """Adam on mean_b -log softmax(f(x_b))_{y_b}; x, y host arrays."""
        theta = self.net.get_params()
        opt = Adam(lr=lr)
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            for idx in batches(np.arange(len(x)), batch_size, rng=rng):
                xb, yb = asarray(x[idx], dtype=theta.dtype), asarray(y[idx].astype(np.int64))
                f = self.net.forward(xb)
                opt.step(theta, self.net.vjp_params(self.likelihood.grad(f, yb) / xb.shape[0]))
                self.net.set_params(theta)
        return self

    def probs(self, x, batch_size=1000):
        """Host (N, 10) softmax probabilities of host images x."""
        dtype = self.net.get_params().dtype
        return np.concatenate([to_numpy(self.likelihood.mean(self.net.forward(asarray(x[s:s + batch_size],
                                                                                      dtype=dtype))))
                               for s in range(0, len(x), batch_size)]).astype(np.float64)


def _config(dataset, hidden, epochs, limit_train, seed):
    return {"dataset": dataset, "hidden": hidden, "epochs": epochs, "limit_train": limit_train, "seed": seed}


def load_or_train(folder, dataset="mnist", hidden=256, epochs=5, limit_train=None, seed=0, data_root=None,
                  log=print):
    """The cached classifier in folder/classifier.npz, else trained on dataset's training split and cached."""
    path = Path(folder) / CACHE
    config = _config(dataset, hidden, epochs, limit_train, seed)
    clf = Classifier(hidden=hidden, seed=seed)
    if path.is_file():
        with np.load(path) as f:
            stored = json.loads(str(f["config"]))
            theta = f["theta"]
        wrong = [f"{k}: cached {stored.get(k)!r}, asked {v!r}" for k, v in config.items() if stored.get(k) != v]
        if wrong:
            raise ExperimentError(f"{path} is a classifier of another configuration ({'; '.join(wrong)}); use another "
                             "--runs folder, or the cached classifier's flags")
        clf.net.set_params(asarray(theta, dtype=clf.net.get_params().dtype))
        log(f"reusing the classifier {path} ({stored})")
        return clf, stored
    x, y = load_dataset(dataset, "train", root=data_root)
    if limit_train is not None:
        x, y = x[:limit_train], y[:limit_train]
    clf.fit(x, y, epochs, seed=seed)
    xv, yv = load_dataset(dataset, "val", root=data_root)
    config["val_accuracy"] = float((clf.probs(xv).argmax(1) == yv).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    theta = to_numpy(clf.net.get_params())
    atomic_write(path, lambda f: np.savez(f, theta=theta, config=json.dumps(config)))
    log(f"trained the classifier into {path}: validation accuracy {config['val_accuracy']:.3f}")
    return clf, config

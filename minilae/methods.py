# SHIM for issue 11 development: replaced by issue 10's methods.py at merge
"""A trained autoencoder of any method seen through one interface (the Predictor contract)."""
from __future__ import annotations

import numbers
from pathlib import Path

from .backend import asarray, xp
from .predictive import Prediction, predict, predict_decoder

__all__ = ["Predictor", "load_run", "Prediction"]


def _generator(rng):
    """A backend Generator from an int seed, None (0) or a Generator."""
    if rng is None or isinstance(rng, numbers.Integral):
        return xp().random.default_rng(0 if rng is None else int(rng))
    return rng


class Predictor:
    """ae (no posterior: deterministic), posthoc and online (a diagonal Laplace posterior over the weights)."""

    def __init__(self, method, model, posterior, config):
        self.method, self.model, self.posterior, self.config = method, model, posterior, dict(config)
        self.input_shape = tuple(model.input_shape)
        self.latent_size = int(model.latent_size)
        self.stochastic = posterior is not None

    def predict(self, x, n_samples=100, rng=None, batch_size=500, memory_budget=None) -> Prediction:
        """predictive.predict with this run's network(s)."""
        return predict(self.model, x, self.posterior, n_samples if self.stochastic else 1, rng=rng,
                       batch_size=batch_size, memory_budget=memory_budget)

    def predict_decoder(self, z, n_samples=100, rng=None, batch_size=500):
        """predictive.predict_decoder with this run's network(s)."""
        return predict_decoder(self.model, z, self.posterior, n_samples if self.stochastic else 1, rng=rng,
                               batch_size=batch_size)

    def _passes(self, x, n_samples, rng, batch_size, fn):
        """Stack over k of fn(x batch) with theta_k ~ q(theta) (one theta_k for all inputs)."""
        K = int(n_samples) if self.stochastic else 1
        theta0 = self.model.get_params()
        gen = _generator(rng)
        out = []
        try:
            for _ in range(K):
                if self.stochastic:
                    self.model.set_params(self.posterior.sample(1, gen)[0])
                parts = [fn(asarray(x[s:s + batch_size], dtype=theta0.dtype)) for s in range(0, len(x), batch_size)]
                out.append(xp().concatenate(parts))
        finally:
            self.model.set_params(theta0)
        return xp().stack(out)

    def sample_codes(self, x, n_samples, rng=None, batch_size=500):
        """(K, N, latent) encodings z_k = encoder(x; theta_k)."""
        return self._passes(x, n_samples, rng, batch_size, self.model.encode)

    def sample_reconstructions(self, x, n_samples, rng=None, batch_size=500):
        """(K, N, *input_shape) reconstructions decoder(encoder(x; theta_k); theta_k)."""
        return self._passes(x, n_samples, rng, batch_size, lambda b: self.model.decode(self.model.encode(b)))


def load_run(run_dir) -> Predictor:
    """A finished or interrupted run folder of python -m minilae.train as its Predictor."""
    from .train import load_run as _load  # noqa: PLC0415 - train imports this module's users lazily

    model, posterior, args = _load(Path(run_dir))
    return Predictor(args["method"], model, posterior, args)

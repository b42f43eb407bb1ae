"""minilae: Laplacian autoencoders from scratch, with every derivative written out and checked."""
from . import (backend, curvature, data, gradcheck, hessian, laplace, layers, losses, models, online, optim,
               posthoc, predictive, training)
from .backend import get_backend, set_backend, xp

__version__ = "0.1.0"
__all__ = ["backend", "curvature", "data", "gradcheck", "hessian", "laplace", "layers", "losses", "models", "online",
           "optim", "posthoc", "predictive", "training", "get_backend", "set_backend", "xp"]

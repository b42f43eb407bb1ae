"""Layers with explicit forward, input-Jacobian and parameter-Jacobian methods, and the curvature rules
(how the loss Hessian M passes through them) that the Hessian engine walks."""
from .activations import ELU, Elementwise, LeakyReLU, ReLU, Sigmoid, Softplus, Tanh
from .base import Layer, MissingRuleError
from .conv import Conv2d
from .conv_transpose import ConvTranspose2d
from .dropout import Dropout
from .linear import Linear
from .pooling import AvgPool2d, MaxPool2d, Upsample
from .reshape import Flatten, Reshape
from .sequential import Sequential

__all__ = ["Layer", "MissingRuleError", "Elementwise", "Linear", "Conv2d", "ConvTranspose2d", "Tanh", "ReLU",
           "Sigmoid", "LeakyReLU", "ELU", "Softplus", "MaxPool2d", "AvgPool2d", "Upsample", "Flatten", "Reshape",
           "Dropout", "Sequential"]

"""Layers with explicit forward, input-Jacobian and parameter-Jacobian methods."""
from .activations import Elementwise, ReLU, Sigmoid, Tanh
from .base import Layer
from .conv import Conv2d
from .dropout import Dropout
from .linear import Linear
from .pooling import MaxPool2d, Upsample
from .reshape import Flatten, Reshape
from .sequential import Sequential

__all__ = ["Layer", "Elementwise", "Linear", "Conv2d", "Tanh", "ReLU", "Sigmoid", "MaxPool2d",
           "Upsample", "Flatten", "Reshape", "Dropout", "Sequential"]

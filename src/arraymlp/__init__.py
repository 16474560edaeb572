"""arraymlp: multilayer perceptrons written once against the Array API standard.

The same forward and backward code runs on NumPy (CPU), CuPy (CUDA GPUs), PyTorch
tensors, array-api-strict, and any namespace array-api-compat wraps. Name a backend
(``backend="cupy"``) or let a model follow the arrays it is given.

>>> import numpy as np, arraymlp as am
>>> model = am.MLP([4, 8, 3], output_activation="softmax", backend="numpy", seed=0)
>>> model(np.zeros((2, 4), dtype=np.float32)).shape
(2, 3)
"""

from . import distributed as distributed
from . import functional, metrics
from ._backend import Generator, resolve_backend, to_backend, to_numpy
from ._version import __version__
from .functional import ACTIVATIONS
from .gradcheck import GradcheckError, GradcheckReport, gradcheck
from .init import INITIALIZERS
from .io import Checkpoint, ModelFileError, export_onnx, load, save
from .layers import (
    ELU,
    GELU,
    Activation,
    Dense,
    Dropout,
    Identity,
    Layer,
    LayerNorm,
    LeakyReLU,
    LogSoftmax,
    ReLU,
    Sigmoid,
    SiLU,
    Softmax,
    Softplus,
    Tanh,
)
from .losses import LOSSES, Loss, get_loss
from .model import MLP, Sequential
from .optim import LBFGS, SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop, get_optimizer
from .precision import MixedPrecision
from .schedules import (
    Constant,
    CosineAnnealing,
    CosineWarmRestarts,
    ExponentialDecay,
    LinearWarmup,
    ReduceOnPlateau,
    StepDecay,
    get_schedule,
)
from .training import Callback, DivergenceError, EarlyStopping, History

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "GELU",
    "INITIALIZERS",
    "LBFGS",
    "LOSSES",
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "Callback",
    "Checkpoint",
    "Constant",
    "CosineAnnealing",
    "CosineWarmRestarts",
    "ExponentialDecay",
    "LinearWarmup",
    "ReduceOnPlateau",
    "StepDecay",
    "get_schedule",
    "DivergenceError",
    "EarlyStopping",
    "History",
    "Loss",
    "Optimizer",
    "RMSprop",
    "get_loss",
    "get_optimizer",
    "MLP",
    "MixedPrecision",
    "ModelFileError",
    "Activation",
    "Dense",
    "Dropout",
    "Generator",
    "GradcheckError",
    "GradcheckReport",
    "Identity",
    "Layer",
    "LayerNorm",
    "LeakyReLU",
    "LogSoftmax",
    "ReLU",
    "Sequential",
    "SiLU",
    "Sigmoid",
    "Softmax",
    "Softplus",
    "Tanh",
    "__version__",
    "export_onnx",
    "load",
    "save",
    "functional",
    "metrics",
    "gradcheck",
    "resolve_backend",
    "to_backend",
    "to_numpy",
]

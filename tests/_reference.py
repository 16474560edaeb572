"""Independent references for the tests: float64 NumPy forward passes and PyTorch
autograd versions of arraymlp models."""

from __future__ import annotations

import numpy as np

import arraymlp as am


def np_activation(name, x):
    x = np.asarray(x, dtype=np.float64)
    if name == "identity":
        return x
    if name == "relu":
        return np.maximum(x, 0)
    if name == "leaky_relu":
        return np.where(x > 0, x, 0.01 * x)
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    if name == "gelu":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x / (1 + np.exp(-x))
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "softplus":
        return np.logaddexp(0, x)
    if name in ("softmax", "log_softmax"):
        z = x - x.max(axis=-1, keepdims=True)
        ls = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        return np.exp(ls) if name == "softmax" else ls
    raise KeyError(name)


def np_forward(model, x):
    """Float64 NumPy forward of a model's layers (inference)."""
    h = np.asarray(x, dtype=np.float64)
    for layer, p in zip(model.layers, model.params):
        p = {k: np.asarray(am.to_numpy(v), dtype=np.float64) for k, v in p.items()}
        if isinstance(layer, am.Dense):
            h = h @ p["W"] + (p["b"] if "b" in p else 0.0)
        elif isinstance(layer, am.Activation):
            h = np_activation(layer.name, h)
        elif isinstance(layer, am.LayerNorm):
            mu = h.mean(-1, keepdims=True)
            var = h.var(-1, keepdims=True)
            h = (h - mu) / np.sqrt(var + layer.eps) * p["gamma"] + p["beta"]
    return h


def torch_activation(name, x):
    import torch
    import torch.nn.functional as F

    return {
        "identity": lambda t: t,
        "relu": F.relu,
        "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
        "elu": F.elu,
        "gelu": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
        "softplus": F.softplus,
        "softmax": lambda t: F.softmax(t, dim=-1),
        "log_softmax": lambda t: F.log_softmax(t, dim=-1),
    }[name](x)


def torch_loss_and_grads(model, x, y, loss, l2=0.0):
    """Loss and parameter gradients of ``model`` computed by PyTorch autograd (float64).

    Cross-entropy and binary cross-entropy take the logits when the model ends with the
    fused activation, as arraymlp does."""
    import torch
    import torch.nn.functional as F

    tparams = [
        {k: torch.tensor(np.asarray(am.to_numpy(v), dtype=np.float64), requires_grad=True) for k, v in p.items()}
        for p in model.params
    ]
    h = torch.tensor(np.asarray(x, dtype=np.float64))
    layers = list(model.layers)
    fused = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}.get(loss)
    if fused and isinstance(layers[-1], am.Activation) and layers[-1].name == fused:
        layers = layers[:-1]
    for layer, p in zip(layers, tparams):
        if isinstance(layer, am.Dense):
            h = h @ p["W"] + (p["b"] if "b" in p else 0.0)
        elif isinstance(layer, am.Activation):
            h = torch_activation(layer.name, h)
        elif isinstance(layer, am.LayerNorm):
            h = F.layer_norm(h, (layer.n_in,), p["gamma"], p["beta"], eps=layer.eps)
    t = torch.tensor(np.asarray(y))
    if loss == "mse":
        value = F.mse_loss(h, t.reshape(h.shape).double())
    elif loss == "cross_entropy":
        value = F.cross_entropy(h, t if t.ndim == 1 else t.double())
    elif loss == "binary_cross_entropy":
        value = F.binary_cross_entropy_with_logits(h, t.reshape(h.shape).double())
    else:
        raise KeyError(loss)
    if l2:
        value = value + 0.5 * l2 * sum((p["W"] ** 2).sum() for p in tparams if "W" in p)
    value.backward()
    grads = [{k: v.grad.numpy() for k, v in p.items()} for p in tparams]
    return float(value.detach()), grads

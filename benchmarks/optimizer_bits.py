"""Digests of the optimisers' trajectories, to compare two versions of the library bit
for bit.

Every optimiser variant of ``tests/test_optim.py`` (SGD with and without momentum,
dampening, Nesterov, weight decay and clipping; Adam, AMSGrad, AdamW; RMSprop centred
and with momentum; Adagrad with its options) takes 25 steps on parameters of three
sizes (a vector, a small matrix, and a 200 x 200 matrix that takes the work-buffer
paths), with gradients that depend on the parameters, on NumPy (compiled kernels on
and off) and torch (compiled kernels on: its CPU Adam takes them), in float32 and
float64; a short ``fit`` of a small network with each optimiser adds the training
loop's path. Each run's final parameters are hashed
(SHA-256 of their bytes), and the digests are written as JSON.

    python benchmarks/optimizer_bits.py --out before.json      # with one version
    python benchmarks/optimizer_bits.py --out after.json --compare before.json

``--compare`` prints every run whose digest differs and exits with status 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

SHAPES = [{"W": (3, 4), "b": (4,)}, {"W": (200, 200), "b": (200,)}]
STEPS = 25


def _cases():
    from arraymlp.optim import SGD, Adagrad, Adam, AdamW, RMSprop

    return {
        "sgd": (SGD, dict(lr=0.05)),
        "sgd-momentum": (SGD, dict(lr=0.05, momentum=0.9)),
        "sgd-momentum-dampening": (SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
        "sgd-nesterov-wd": (SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
        "sgd-wd-decay-bias": (SGD, dict(lr=0.05, weight_decay=0.1, decay_bias=True)),
        "sgd-momentum-clip-both": (SGD, dict(lr=0.05, momentum=0.9, clip_value=0.5, clip_norm=1.0)),
        "adam": (Adam, dict(lr=0.05)),
        "adam-wd": (Adam, dict(lr=0.05, weight_decay=0.1)),
        "adam-amsgrad": (Adam, dict(lr=0.05, betas=(0.8, 0.99), amsgrad=True)),
        "adam-clip-norm": (Adam, dict(lr=0.05, clip_norm=1.0)),
        "adamw": (AdamW, dict(lr=0.05, weight_decay=0.1)),
        "adamw-decay-bias-amsgrad": (AdamW, dict(lr=0.05, weight_decay=0.1, decay_bias=True, amsgrad=True)),
        "rmsprop": (RMSprop, dict(lr=0.01)),
        "rmsprop-centered-momentum-wd": (RMSprop, dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.05)),
        "rmsprop-momentum-clip-value": (RMSprop, dict(lr=0.01, momentum=0.9, clip_value=0.5)),
        "adagrad": (Adagrad, dict(lr=0.1)),
        "adagrad-options": (Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1,
                                          clip_norm=2.0)),
    }


def _digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _steps(cls, kwargs, backend: str, dtype: str) -> str:
    import arraymlp as am

    rng = np.random.default_rng(0)
    params = [{k: am.to_backend(rng.normal(size=s).astype(dtype), backend) for k, s in layer.items()}
              for layer in SHAPES]
    opt = cls(**kwargs)
    for t in range(STEPS):
        host = [{k: am.to_numpy(v) for k, v in layer.items()} for layer in params]
        grads = [{k: am.to_backend((2.0 * v - np.sin(3.0 * v) + 0.1 * np.cos(0.7 * t)).astype(dtype), backend)
                  for k, v in layer.items()} for layer in host]
        params = opt.step(params, grads)
    return _digest(am.to_numpy(v) for layer in params for v in layer.values())


def _fit(name: str, backend: str, dtype: str) -> str:
    import arraymlp as am

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 20)).astype(dtype)
    y = rng.integers(0, 5, size=300)
    model = am.MLP([20, 64, 5], output_activation="softmax", seed=0, backend=backend, dtype=dtype)
    model.fit(am.to_backend(x, backend), am.to_backend(y, backend), loss="cross_entropy", optimizer=name,
              epochs=3, batch_size=32, seed=2, progress=False)
    return _digest(am.to_numpy(v) for layer in model.params for v in layer.values())


def digests() -> dict:
    from arraymlp.kernels import _jit

    out = {}
    rows = [("numpy", True), ("numpy", False)]
    try:
        import torch  # noqa: F401

        rows.append(("torch", True))
    except ImportError:
        pass
    for backend, jit in rows:
        _jit.set_enabled(jit)
        tag = backend if backend == "torch" else f"{backend}-jit{'on' if jit else 'off'}"
        for dtype in ("float32", "float64"):
            for case, (cls, kwargs) in _cases().items():
                out[f"{tag}/{dtype}/step/{case}"] = _steps(cls, kwargs, backend, dtype)
            for name in ("sgd", "adam", "adamw", "rmsprop", "adagrad"):
                out[f"{tag}/{dtype}/fit/{name}"] = _fit(name, backend, dtype)
    _jit.set_enabled(True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file of the digests")
    ap.add_argument("--compare", help="a JSON file of another version's digests")
    args = ap.parse_args(argv)
    got = digests()
    with open(args.out, "w") as f:
        json.dump(got, f, indent=1, sort_keys=True)
    if args.compare is None:
        print(f"{len(got)} digests written")
        return 0
    with open(args.compare) as f:
        want = json.load(f)
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    for k in differ:
        print(f"differs: {k}  {want.get(k)} -> {got.get(k)}")
    print(f"{len(got)} runs compared, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m arraymlp demo``: train an MLP on scikit-learn's bundled digits.

The 8x8 digits (1,797 images, no download) are split 75/25 (stratified, fixed seed)
and standardised with the training part's statistics; a ``64-256-10`` ReLU network
with a softmax output is trained with Adam under a cosine learning-rate schedule and a
small L2 penalty. Every epoch prints one line (training loss, held-out loss and
accuracy); at the end the held-out accuracy is printed and a PNG of the loss and
accuracy curves is written with matplotlib's Agg canvas (no display needed, and the
global matplotlib backend is left alone).

The held-out quarter is only reported on, never used to choose anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["add_arguments", "main", "pick_backend", "plot_history", "run"]

SIZES = (64, 256, 10)
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
L2 = 1e-3
DEFAULT_PLOT = "arraymlp-demo.png"
BACKEND_CHOICES = ("auto", "numpy", "cupy", "torch", "array_api_strict")
EXTRAS_HINT = "pip install arraymlp[demo]"


class MissingExtrasError(ImportError):
    """scikit-learn or matplotlib is not installed."""


def _cupy_gpu() -> bool:
    """Whether CuPy is installed and sees a CUDA device."""
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device, broken install: no CuPy GPU
        return False


def _torch_cuda() -> bool:
    """Whether PyTorch is installed with a usable CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def pick_backend(name: str) -> tuple[str, Any]:
    """The backend name and device the demo trains on.

    Parameters
    ----------
    name : {"auto", "numpy", "cupy", "torch", "array_api_strict"}
        ``"auto"`` takes CuPy when a CUDA GPU is present, else PyTorch on CUDA when
        available, else NumPy. ``"torch"`` uses CUDA when available, else the CPU.

    Returns
    -------
    backend : str
    device : str or None
        ``None`` means the backend's default device.
    """
    if name not in BACKEND_CHOICES:
        msg = f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}"
        raise ValueError(msg)
    if name == "auto":
        if _cupy_gpu():
            return "cupy", None
        if _torch_cuda():
            return "torch", "cuda"
        return "numpy", None
    if name == "torch":
        return "torch", "cuda" if _torch_cuda() else "cpu"
    return name, None


def _require_extras():
    """Import what the demo needs beyond arraymlp, or say how to install it."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:
        msg = f"the demo needs scikit-learn for its data set ({exc}); install it with `{EXTRAS_HINT}`"
        raise MissingExtrasError(msg) from exc
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = f"the demo needs matplotlib for its plot ({exc}); install it with `{EXTRAS_HINT}`"
        raise MissingExtrasError(msg) from exc
    return load_digits, train_test_split, StandardScaler, Figure, FigureCanvasAgg


def _digits(seed: int):
    """Standardised float32 digits, split 75/25 stratified: ``x_tr, x_te, y_tr, y_te``."""
    import numpy as np

    load_digits, train_test_split, StandardScaler, _, _ = _require_extras()
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    x_tr = scaler.transform(x_tr).astype(np.float32)
    x_te = scaler.transform(x_te).astype(np.float32)
    return x_tr, x_te, y_tr.astype(np.int64), y_te.astype(np.int64)


def plot_history(history, path: str | os.PathLike, *, title: str = "") -> str:
    """Write the loss and held-out accuracy curves of a :class:`~arraymlp.History` as a PNG.

    Parameters
    ----------
    history : History
        With ``loss``, ``val_loss`` and ``val_metric`` (accuracy) per epoch.
    path : str or path-like
        Where to write the PNG (its folder must exist).
    title : str
        Figure title.

    Returns
    -------
    str
        The absolute path written.
    """
    *_, Figure, FigureCanvasAgg = _require_extras()
    epochs = range(1, len(history.loss) + 1)
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, history.loss, label="training (with the L2 term)")
    if history.val_loss:
        ax_loss.plot(epochs, history.val_loss, label="held-out")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if history.val_metric:
        ax_acc.plot(epochs, history.val_metric, color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("held-out accuracy")
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.path.abspath(os.fspath(path))
    fig.savefig(path, dpi=110, format="png")
    return path


def run(backend: str = "auto", *, epochs: int = 30, seed: int = 0, plot: str | os.PathLike | None = DEFAULT_PLOT,
        out: TextIO | None = None) -> dict[str, Any]:
    """Train the demo network on digits and report; see the module docstring.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy", "torch", "array_api_strict"}
    epochs : int
        Passes over the 1,347 training images.
    seed : int
        Seeds the split, the initial weights and the shuffling.
    plot : str, path-like or None
        PNG to write; ``None`` writes none.
    out : text stream, optional
        Where the lines go (default ``sys.stdout``).

    Returns
    -------
    dict
        ``accuracy`` (float), ``history`` (History), ``plot`` (absolute path or None),
        ``backend``, ``device`` and ``seconds`` (training time).
    """
    import arraymlp as am

    out = sys.stdout if out is None else out
    if not isinstance(epochs, int) or epochs < 1:
        msg = f"epochs must be a positive int, got {epochs!r}"
        raise ValueError(msg)
    _require_extras()  # fail before any work when an extra is missing
    name, device = pick_backend(backend)
    x_tr, x_te, y_tr, y_te = _digits(seed)

    model = am.MLP(list(SIZES), output_activation="softmax", seed=seed, backend=name, device=device)
    dev = model.device

    def put(a):
        return am.to_backend(a, name, device=dev)

    xtr, ytr, xte, yte = put(x_tr), put(y_tr), put(x_te), put(y_te)
    print(f"arraymlp demo: digits, {len(y_tr)} training / {len(y_te)} held-out images; "
          f"MLP {'-'.join(map(str, SIZES))} on {name} ({dev}), Adam {LEARNING_RATE:g} with a cosine schedule, "
          f"batch {BATCH_SIZE}, {epochs} epochs", file=out, flush=True)

    class _Lines(am.Callback):
        def on_epoch_end(self, model, logs):
            print(f"epoch {logs['epoch'] + 1:>3}/{epochs}  loss {logs['loss']:.4f}  "
                  f"held-out loss {logs['val_loss']:.4f}  accuracy {logs['val_metric']:.4f}  "
                  f"({logs['time']:.2f} s)", file=out, flush=True)

    t0 = time.perf_counter()
    history = model.fit(xtr, ytr, loss="cross_entropy", schedule=am.CosineAnnealing(LEARNING_RATE, T_max=epochs),
                        l2=L2, epochs=epochs, batch_size=BATCH_SIZE, validation_data=(xte, yte), seed=seed,
                        callbacks=[_Lines()], progress=False)
    seconds = time.perf_counter() - t0
    pred = am.to_numpy(model.predict(xte))
    correct = int((pred == y_te).sum())
    accuracy = correct / len(y_te)
    print(f"held-out accuracy: {accuracy:.4f} ({correct} of {len(y_te)} images) after {seconds:.1f} s of training",
          file=out, flush=True)
    path = None
    if plot is not None:
        path = plot_history(history, plot, title=f"arraymlp on digits ({name}): held-out accuracy {accuracy:.4f}")
        print(f"plot written to {path}", file=out, flush=True)
    return {"accuracy": accuracy, "history": history, "plot": path, "backend": name, "device": dev,
            "seconds": seconds}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (shared by ``python -m arraymlp demo``)."""
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="array library to train on; auto takes CuPy with a CUDA GPU, else torch on CUDA, "
                             "else numpy (default: auto)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training images (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, weights and shuffling (default: 0)")
    parser.add_argument("--plot", metavar="PATH", default=DEFAULT_PLOT,
                        help=f"PNG of the loss and accuracy curves (default: ./{DEFAULT_PLOT})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo from command-line arguments (those after ``demo``).

    Returns
    -------
    int
        Exit status: 0 on success, 1 when an optional dependency or the chosen
        backend is missing, 2 on bad arguments.
    """
    parser = argparse.ArgumentParser(
        prog="python -m arraymlp demo",
        description="Train an MLP on scikit-learn's bundled digits, report its held-out accuracy, plot its curves.",
    )
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return run_args(args)


def run_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; errors become a message and an exit status."""
    if args.epochs < 1:
        print(f"error: --epochs must be at least 1, got {args.epochs}", file=sys.stderr)
        return 2
    if args.seed < 0:
        print(f"error: --seed must be a non-negative int, got {args.seed}", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(args.plot)) if args.plot else None
    if folder is not None and not os.path.isdir(folder):
        print(f"error: --plot {args.plot}: the folder {folder} does not exist", file=sys.stderr)
        return 2
    try:
        run(args.backend, epochs=args.epochs, seed=args.seed, plot=args.plot)
    except ImportError as exc:  # a missing extra, or a backend that is not installed
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

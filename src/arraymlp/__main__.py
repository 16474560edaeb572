"""Command line: ``python -m arraymlp <command> [options]`` (also the ``arraymlp`` script).

Commands
--------
demo
    Train an MLP on scikit-learn's bundled digits, print per-epoch progress and the
    held-out accuracy, write a loss/accuracy plot (:mod:`arraymlp.demo`).
bench
    Time the hot path and whole training steps on every backend present, beside
    PyTorch and scikit-learn (:func:`arraymlp.bench.main`, which parses its own
    options: ``python -m arraymlp bench --help``).

A new command is a function ``(argv) -> int`` and one row of :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

__all__ = ["COMMANDS", "main"]


def _demo(argv: list[str]) -> int:
    from . import demo

    return demo.main(argv)


def _bench(argv: list[str]) -> int:
    if importlib.util.find_spec("arraymlp.bench") is None:
        print("benchmarks are not available in this installation of arraymlp (no arraymlp.bench module)",
              file=sys.stderr)
        return 1
    bench = importlib.import_module("arraymlp.bench")
    return int(bench.main(argv) or 0)


#: Command name -> (function of the arguments after the name, one-line help).
COMMANDS = {
    "demo": (_demo, "train an MLP on scikit-learn's digits, print progress and accuracy, plot the curves"),
    "bench": (_bench, "time arraymlp against its GEMM floor, PyTorch and scikit-learn on every backend"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m arraymlp",
        description="arraymlp: multilayer perceptrons on NumPy, CuPy, PyTorch and any Array API library.",
        epilog="Each command takes its own options: python -m arraymlp <command> --help",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (_, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``python -m arraymlp`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The command's exit status (0 on success; 2 for an unknown command).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:  # the command parses the rest itself
        fn, _ = COMMANDS[argv[0]]
        return fn(argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.version:
        from ._version import __version__

        print(f"arraymlp {__version__}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

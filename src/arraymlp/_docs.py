"""Shared numpydoc fragments, so that a paragraph many docstrings need is written once.

A docstring names a fragment on a line of its own, ``{xp}`` say, indented as the
parameter entry would be; :func:`fill` replaces that line with the fragment, indented
to match. Fragments are plain text in numpydoc form.
"""

from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["FRAGMENTS", "fill"]

F = TypeVar("F", bound=Callable)

#: Name to numpydoc text (first line unindented, later lines indented by four).
FRAGMENTS = {
    "xp": (
        "xp : namespace, optional\n"
        "    The array namespace; taken from the arrays when omitted (resolve it once per\n"
        "    call of your own and pass it down)."
    ),
}


def fill(fn: F) -> F:
    """Decorator: replace each ``{name}`` line of ``fn``'s docstring by its fragment."""
    doc = fn.__doc__
    if doc:
        lines = []
        for line in doc.split("\n"):
            key = line.strip()
            if key.startswith("{") and key.endswith("}") and key[1:-1] in FRAGMENTS:
                pad = line[: len(line) - len(line.lstrip())]
                lines.extend(pad + part for part in FRAGMENTS[key[1:-1]].split("\n"))
            else:
                lines.append(line)
        fn.__doc__ = "\n".join(lines)
    return fn

"""``python -m arraymlp.bench``: the same command as ``python -m arraymlp bench``."""

from .runner import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

"""Sphinx configuration of the arraymlp documentation.

Build the site (warnings are errors) and run every example on its pages and in the
docstrings the reference pulls in::

    sphinx-build -W -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest

Nothing here fetches from the network (no intersphinx), so both builds work offline.
"""

from __future__ import annotations

import doctest

import arraymlp

# -- project -------------------------------------------------------------------------
project = "arraymlp"
author = "the arraymlp developers"
copyright = "the arraymlp developers"  # noqa: A001 (Sphinx's name)
version = release = arraymlp.__version__

# -- general -------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
default_role = "py:obj"
pygments_style = "sphinx"

# -- autodoc / autosummary / numpydoc ---------------------------------------------------
autodoc_typehints = "none"  # the numpydoc sections carry the types and shapes
autodoc_member_order = "bysource"
autodoc_inherit_docstrings = True
autosummary_generate = False  # the reference page lists every object itself
numpydoc_show_class_members = False  # members come from autodoc's :members:
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- MyST (the Markdown pages) -----------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

# -- doctest: every ``>>>`` example on every page runs --------------------------------------
# Exception messages are compared in full (no IGNORE_EXCEPTION_DETAIL), and whitespace
# is normalised so that long outputs and messages may wrap in the source.
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
doctest_global_setup = """
import importlib.util
have_torch = importlib.util.find_spec("torch") is not None
have_cupy = importlib.util.find_spec("cupy") is not None
"""

# -- HTML ------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"arraymlp {release}"
html_static_path = ["_static"]
html_css_files = ["arraymlp.css"]
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "auto"}


# -- executing the Markdown pages' examples -------------------------------------------------
def _prompt_fences_are_doctests(app, doctree) -> None:
    """Make a ```` ```pycon ```` or ```` ```python ```` fence that starts with ``>>>`` a
    doctest, as a ``>>>`` paragraph already is in reStructuredText: every interactive
    example runs under ``sphinx-build -b doctest``. Code shown but not run (GPU lines,
    shell commands) is written without prompts."""
    from docutils import nodes

    for node in doctree.findall(nodes.literal_block):
        if "testnodetype" in node or node.get("language", "python") not in ("python", "pycon", "default"):
            continue
        if node.astext().lstrip().startswith(">>>"):
            node["testnodetype"] = "doctest"
            node["groups"] = ["default"]
            node["options"] = {}
            node["language"] = "pycon"


def setup(app):
    app.connect("doctree-read", _prompt_fences_are_doctests)

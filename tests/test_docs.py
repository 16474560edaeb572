"""The documentation covers the public surface.

- Every name in ``arraymlp.__all__`` has an entry in the API reference (docs/api.rst)
  and a docstring (for data, a ``#:`` comment where it is defined, or a described
  ``.. data::`` entry in the reference).
- Every public function, class and method that takes arrays states their shapes: each
  array parameter's entry in the numpydoc ``Parameters`` section (or, for a one-line
  docstring without sections, the docstring itself) gives a shape such as ``(n,
  n_features)`` or says "shape". Public names that take no arrays at all are listed in
  ``NO_ARRAY_ARGUMENTS``, and the test checks that the list tells the truth.

The pages' examples themselves are run by ``sphinx-build -b doctest`` (see .ci/run).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
from pathlib import Path

import pytest

import arraymlp

DOCS = Path(__file__).resolve().parents[1] / "docs"
API = DOCS / "api.rst"

#: Public modules documented in full on the reference page, besides the package itself.
PUBLIC_MODULES = ["functional", "losses", "metrics", "optim", "schedules", "training", "init", "ensemble"]

#: Parameter names that hold arrays (or lists of dicts of arrays) throughout the library.
ARRAY_PARAMS = {
    "x", "y", "dy", "W", "b", "outputs", "targets", "sample_weight", "gamma", "beta",
    "mask", "saved", "cache", "caches", "params", "grads",
}

#: Public names that take no array arguments (hyper-parameters, names, files, callbacks,
#: tables). ``module.*`` covers a whole module. Everything else must document shapes.
NO_ARRAY_ARGUMENTS = {
    # configuration objects, errors, records and callbacks
    "Callback", "ensemble.MemberGenerators", "EarlyStopping", "DivergenceError", "GradcheckError", "GradcheckReport",
    "History", "Generator", "functional.Activation", "MixedPrecision", "optim.LBFGSIteration",
    # look-ups by name
    "get_loss", "get_optimizer", "get_schedule", "resolve_backend", "metrics.get_metric",
    "metrics.top_k_accuracy",
    "functional.get_activation", "losses.get_loss", "optim.get_optimizer",
    "init.default_for", "init.get_initializer",
    # a learning rate is a float: every schedule
    "Constant", "StepDecay", "ExponentialDecay", "CosineAnnealing", "CosineWarmRestarts",
    "LinearWarmup", "ReduceOnPlateau", "schedules.*",
    # training records and callbacks in their own module
    "training.Callback", "training.DivergenceError", "training.EarlyStopping", "training.History",
    # an ensemble's history, its member count and its members' seeds
    "ensemble.EnsembleHistory", "ensemble.check_members", "ensemble.member_seeds", "ensemble.check_layers",
    # persistence: models and paths
    "save", "load", "export_onnx", "Checkpoint", "ModelFileError",
}

#: A numpydoc type that is an array: "array, shape (n, k)", "arrays", "list of dict of arrays".
ARRAY_TYPE_RE = re.compile(r"(?:(?:list|dict|tuple|sequence) of )*arrays?\b")

SHAPE_RE = re.compile(
    r"\bshapes?\b"  # "shape (n, k)", "same keys and shapes as params"
    r"|\((?:n|d|k|n_\w+)\s*[,)]"  # "(n, n_features)", "(n,)", "(d,)", "(n_out,)"
    r"|\b0-d\b"
)


# --------------------------------------------------------------------------- helpers
def _api_source() -> str:
    return API.read_text(encoding="utf-8")


def _reference_entries(source: str) -> set[str]:
    """Names the reference page documents with a directive (``autoclass``,
    ``autofunction``, ``automodule``, ``data``, ...), without the ``arraymlp.`` prefix.
    An autosummary row alone does not count: it would link to nothing."""
    pattern = r"^\.\. (?:auto)?(?:class|function|data|exception|module|method|attribute)::\s*(\S+)"
    return {m.removeprefix("arraymlp.") for m in re.findall(pattern, source, re.MULTILINE)}


def _data_described(source: str, name: str) -> bool:
    """``.. data:: name`` followed by an indented, non-empty description."""
    m = re.search(rf"^\.\. data:: {re.escape(name)}\n\n( {{3}}\S.*)", source, re.MULTILINE)
    return m is not None


def _attribute_comment(name: str) -> bool:
    """Whether a module-level assignment of ``name`` in arraymlp carries a ``#:`` comment
    (Sphinx's attribute docstring) or a string literal right after it."""
    for path in Path(arraymlp.__file__).parent.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        lines = text.splitlines()
        body = tree.body
        for i, node in enumerate(body):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            else:
                targets = []
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            before = lines[node.lineno - 2].strip() if node.lineno >= 2 else ""
            after = body[i + 1] if i + 1 < len(body) else None
            if before.startswith("#:") or (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                return True
    return False


def _own_doc(obj) -> str | None:
    """The object's own docstring (not one inherited from a builtin base)."""
    if inspect.isclass(obj):
        return vars(obj).get("__doc__")
    return getattr(obj, "__doc__", None)


def _public(modname: str | None):
    mod = arraymlp if modname is None else importlib.import_module(f"arraymlp.{modname}")
    prefix = "" if modname is None else f"{modname}."
    for name in mod.__all__:
        yield prefix + name, getattr(mod, name)


def _exempt(qualname: str) -> bool:
    module = qualname.split(".")[0] if "." in qualname else None
    return qualname in NO_ARRAY_ARGUMENTS or (module is not None and f"{module}.*" in NO_ARRAY_ARGUMENTS)


def _param_entries(doc: str) -> dict[str, tuple[str, str]]:
    """Entries of the numpydoc ``Parameters`` (and, for dataclass-like classes,
    ``Attributes``) sections: name -> (type, type and description)."""
    entries: dict[str, tuple[str, str]] = {}
    lines = doc.splitlines()
    in_params, current = False, []
    for i, line in enumerate(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", nxt):  # a section header
            in_params, current = line.strip() in ("Parameters", "Other Parameters", "Attributes"), []
            continue
        if re.fullmatch(r"-{3,}", line.strip()) or not in_params:
            continue
        if line and not line[0].isspace():
            head, _, kind = line.partition(" : ")
            current = [n.strip().lstrip("*") for n in head.split(",")]
            for n in current:
                entries[n] = (kind, line)
        elif line.strip():
            for n in current:
                entries[n] = (entries[n][0], entries[n][1] + " " + line.strip())
    return entries


def _array_params(fn, doc: str) -> list[str]:
    """Parameters of ``fn`` that hold arrays: documented with an array type, or, when
    not documented in a section, named like the library's array arguments."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    entries = _param_entries(doc)
    out = []
    for p in sig.parameters:
        if p in ("self", "cls", "xp"):
            continue
        if p in entries:
            if ARRAY_TYPE_RE.match(entries[p][0]):
                out.append(p)
        elif p in ARRAY_PARAMS:
            out.append(p)
    return out


def _callables(qualname: str, obj):
    """``(qualname, function, docstring)`` for a public function, or a class (its
    constructor against the class docstring) and its public methods."""
    if inspect.isclass(obj):
        init = vars(obj).get("__init__") or next(
            (vars(c)["__init__"] for c in obj.__mro__ if "__init__" in vars(c)), None
        )
        yield qualname, init, inspect.getdoc(obj) or ""
        for name, member in inspect.getmembers(obj):
            if name.startswith("_") and name != "__call__":
                continue
            if not inspect.isfunction(member) or not member.__module__.startswith("arraymlp"):
                continue
            yield f"{qualname}.{name}", member, inspect.getdoc(member) or ""
    elif inspect.isfunction(obj):
        yield qualname, obj, inspect.getdoc(obj) or ""


ALL_PUBLIC = [item for mod in [None, *PUBLIC_MODULES] for item in _public(mod)]
CALLABLE_PUBLIC = [(q, o) for q, o in ALL_PUBLIC if inspect.isclass(o) or inspect.isfunction(o)]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", arraymlp.__all__)
def test_every_public_name_is_in_the_reference(name):
    assert name in _reference_entries(_api_source()), (
        f"arraymlp.{name} is public but docs/api.rst does not document it; add an autoclass / "
        f"autofunction (or a described .. data::) and an autosummary row in the right section"
    )


@pytest.mark.parametrize("name", arraymlp.__all__)
def test_every_public_name_has_a_docstring(name):
    obj = getattr(arraymlp, name)
    if inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType):
        doc = _own_doc(obj)
        assert doc and doc.strip(), f"arraymlp.{name} has no docstring"
    else:  # data: a table or the version string
        assert _attribute_comment(name) or _data_described(_api_source(), name), (
            f"arraymlp.{name} is data without a description: give its assignment a '#:' comment "
            f"or describe it under '.. data:: {name}' in docs/api.rst"
        )


@pytest.mark.parametrize("modname", PUBLIC_MODULES)
def test_public_modules_are_in_the_reference(modname):
    source = _api_source()
    assert re.search(rf"^\.\. automodule:: arraymlp\.{modname}$", source, re.MULTILINE), (
        f"docs/api.rst has no '.. automodule:: arraymlp.{modname}'"
    )
    mod = importlib.import_module(f"arraymlp.{modname}")
    assert (mod.__doc__ or "").strip(), f"arraymlp.{modname} has no module docstring"


@pytest.mark.parametrize("qualname,obj", CALLABLE_PUBLIC, ids=[q for q, _ in CALLABLE_PUBLIC])
def test_array_arguments_state_their_shapes(qualname, obj):
    checked, problems = 0, []
    for where, fn, doc in _callables(qualname, obj):
        if fn is None:
            continue
        entries = _param_entries(doc)
        for p in _array_params(fn, doc):
            checked += 1
            text = entries[p][1] if p in entries else None
            if text is not None:
                if not SHAPE_RE.search(text):
                    problems.append(f"{where}: parameter {p!r} is documented without a shape: {text.strip()!r}")
            elif not SHAPE_RE.search(doc):
                problems.append(f"{where}: takes the array {p!r} but its docstring states no shape")
    if _exempt(qualname):
        assert checked == 0, (
            f"{qualname} is listed in NO_ARRAY_ARGUMENTS (tests/test_docs.py) but takes arrays; "
            f"remove it from the list and document the shapes"
        )
        return
    assert checked, (
        f"{qualname} takes no array arguments: add it to NO_ARRAY_ARGUMENTS in tests/test_docs.py"
    )
    assert not problems, "\n".join(problems)


def test_allow_list_names_exist():
    public = {q for q, _ in ALL_PUBLIC}
    modules = {f"{m}.*" for m in PUBLIC_MODULES}
    stale = sorted(n for n in NO_ARRAY_ARGUMENTS if n not in public and n not in modules)
    assert not stale, f"NO_ARRAY_ARGUMENTS names that are not public: {stale}"


def test_array_type_pattern():
    assert ARRAY_TYPE_RE.match("array, shape (n, n_features)")
    assert ARRAY_TYPE_RE.match("list of dict of arrays")
    assert ARRAY_TYPE_RE.match("arrays, shape (d,)")
    assert not ARRAY_TYPE_RE.match('``"input"`` or ``"output"``: which array backward reads')
    assert not ARRAY_TYPE_RE.match("float")


def test_shape_pattern_is_meaningful():
    assert SHAPE_RE.search("x : array, shape (n, n_features)")
    assert SHAPE_RE.search("sample_weight : array of shape (n,), optional")
    assert SHAPE_RE.search("b : array (n_out,)")
    assert not SHAPE_RE.search("x : array")
    assert not SHAPE_RE.search("y : array-like of labels")
    assert not SHAPE_RE.search("the (new) value")


def test_reference_entries_parser():
    source = inspect.cleandoc(
        """
        .. autosummary::

           MLP
           Dense

        .. autoclass:: MLP
           :members:

        .. autofunction:: arraymlp.to_numpy
        .. automodule:: arraymlp.functional
        .. data:: __version__

           The version.
        """
    )
    assert _reference_entries(source) == {"MLP", "to_numpy", "functional", "__version__"}
    assert _data_described(source, "__version__")
    assert not _data_described(source, "MLP")


def test_param_entries_parser():
    doc = inspect.cleandoc(
        """Summary.

        Parameters
        ----------
        x : array, shape (n, d)
        W, b : arrays
            The weights, (d, k), and bias.
        lr : float

        Returns
        -------
        y : array
        """
    )
    entries = _param_entries(doc)
    assert set(entries) == {"x", "W", "b", "lr"}
    assert entries["W"][0] == "arrays" and "(d, k)" in entries["W"][1] and "(d, k)" in entries["b"][1]
    assert entries["lr"] == ("float", "lr : float")
    assert "y" not in entries

"""The command line (``python -m arraymlp``) and its ``demo`` command."""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types

import pytest

import arraymlp.__main__ as cli
from arraymlp import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def test_demo_reaches_097_and_writes_png(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    plot = tmp_path / "curves.png"
    rc = cli.main(["demo", "--backend", "numpy", "--epochs", "30", "--seed", "0", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [int(re.match(r"epoch\s+(\d+)/30", line).group(1)) for line in epoch_lines] == list(range(1, 31))
    m = re.search(r"^held-out accuracy: ([0-9.]+) \((\d+) of (\d+) images\)", out, re.M)
    assert m, out
    accuracy, correct, total = float(m.group(1)), int(m.group(2)), int(m.group(3))
    assert total == 450  # a quarter of the 1,797 digits
    assert accuracy == pytest.approx(correct / total, abs=5e-5)
    assert accuracy >= 0.97
    # the last epoch line reports the same held-out accuracy
    assert float(re.search(r"accuracy ([0-9.]+)", epoch_lines[-1]).group(1)) == pytest.approx(accuracy, abs=5e-5)
    assert f"plot written to {plot}" in out
    data = plot.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # two panels of curves, not an empty canvas


def test_demo_default_plot_goes_to_current_directory(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--backend", "numpy", "--epochs", "1"]) == 0
    path = tmp_path / demo.DEFAULT_PLOT
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert f"plot written to {path}" in capsys.readouterr().out


def test_demo_without_sklearn_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    rc = cli.main(["demo", "--backend", "numpy", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "scikit-learn" in err and "pip install arraymlp[demo]" in err
    assert not (tmp_path / "x.png").exists()


def test_demo_without_matplotlib_says_what_to_install(monkeypatch, capsys, tmp_path):
    pytest.importorskip("sklearn")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    rc = cli.main(["demo", "--backend", "numpy", "--plot", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "matplotlib" in err and "pip install arraymlp[demo]" in err


@pytest.mark.parametrize(
    ("cupy_gpu", "torch_cuda", "name", "expected"),
    [
        (False, False, "auto", ("numpy", None)),
        (False, True, "auto", ("torch", "cuda")),
        (True, True, "auto", ("cupy", None)),
        (True, False, "auto", ("cupy", None)),
        (True, True, "numpy", ("numpy", None)),
        (False, False, "torch", ("torch", "cpu")),
        (False, True, "torch", ("torch", "cuda")),
        (False, False, "array_api_strict", ("array_api_strict", None)),
    ],
)
def test_pick_backend(monkeypatch, cupy_gpu, torch_cuda, name, expected):
    monkeypatch.setattr(demo, "_cupy_gpu", lambda: cupy_gpu)
    monkeypatch.setattr(demo, "_torch_cuda", lambda: torch_cuda)
    assert demo.pick_backend(name) == expected


def test_pick_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'jax'; choose one of auto, numpy"):
        demo.pick_backend("jax")


def test_demo_bad_arguments_exit_2(capsys):
    assert cli.main(["demo", "--backend", "jax"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs must be at least 1" in capsys.readouterr().err
    assert cli.main(["demo", "--seed", "-1"]) == 2
    assert "--seed must be a non-negative int, got -1" in capsys.readouterr().err
    assert cli.main(["demo", "--plot", "no/such/folder/curves.png"]) == 2
    assert "--plot no/such/folder/curves.png: the folder" in capsys.readouterr().err


def test_bench_command_forwards_its_arguments(monkeypatch):
    seen = []
    fake = types.ModuleType("arraymlp.bench")
    fake.__spec__ = importlib.machinery.ModuleSpec("arraymlp.bench", None)
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "arraymlp.bench", fake)
    assert cli.main(["bench", "--quick", "--backend", "numpy"]) == 0
    assert seen == [["--quick", "--backend", "numpy"]]
    fake.main = lambda argv: 2
    assert cli.main(["bench", "--workload", "nope"]) == 2


def test_bench_command_without_bench_module(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "arraymlp.bench", None)  # as if the module were absent
    assert cli.main(["bench"]) == 1
    assert "benchmarks are not available" in capsys.readouterr().err


def test_no_command_prints_help_and_unknown_command_fails(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out
    assert cli.main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"arraymlp \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)

"""The GPU check script (benchmarks/gpu/check.py), on the CPU: its arguments, its report
(one JSON named with the device, written after every section), its graceful handling of
a failing or overlong section, and a section run with torch on the CPU standing in for
the GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu" / "check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)


def test_arguments(check, tmp_path):
    a = check.parse_args([])
    assert a.budget == 450 and not a.cpu_standin and Path(a.out) == ROOT / "benchmarks" / "results"
    a = check.parse_args(["--out", str(tmp_path), "--skip", "pytest", "--only", "env", "--budget", "60"])
    assert (a.skip, a.only, a.budget) == (["pytest"], ["env"], 60.0)
    for bad in (["--skip", "nope"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            check.parse_args(bad)
    assert check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert check.device_slug("  ") == "unknown-device"
    assert set(check.FUNCTIONS) == set(check.SECTIONS) == set(check.CAPS)


def test_a_failing_or_overlong_section_is_recorded_and_the_others_run(check, tmp_path, monkeypatch):
    ran = []

    def ok(ctx):
        ran.append("ok")
        return {"value": 1.5}

    def broken(ctx):
        ran.append("broken")
        raise RuntimeError("no such kernel")

    def slow(ctx):
        ran.append("slow")
        ctx.partial["first"] = 2.5  # measured before it ran out of time
        time.sleep(30)

    monkeypatch.setitem(check.CAPS, "slow", 6)
    args = check.parse_args(["--out", str(tmp_path), "--cpu-standin", "--budget", "100"])
    report = check.run(args, {"env": ok, "broken": broken, "slow": slow, "after": ok})
    assert ran == ["ok", "broken", "slow", "ok"]
    assert report["device"] == "cpu-standin"
    assert "RuntimeError: no such kernel" in report["errors"]["broken"]
    assert "SectionTimeout" in report["errors"]["slow"] and 5 <= report["seconds"]["slow"] < 10
    on_disk = json.loads((tmp_path / "cpu-standin-gpu-check.json").read_text())
    assert on_disk["sections"] == {"env": {"value": 1.5}, "slow": {"first": 2.5, "incomplete": True},
                                   "after": {"value": 1.5}}
    text = check.summary(report)
    assert "broken" in text and "FAILED: RuntimeError: no such kernel" in text


def test_a_spent_budget_skips_the_rest(check, tmp_path):
    args = check.parse_args(["--out", str(tmp_path), "--cpu-standin", "--budget", "12"])
    report = check.run(args, {"first": lambda ctx: time.sleep(3) or {}, "second": lambda ctx: {}})
    assert "first" in report["sections"] and "budget spent" in report["skipped"]["second"]


def test_gemm_floor_section_on_the_standin(check, tmp_path):
    """Device time (here wall time) of the floor products of W1, W2 and a reduced W4, and
    the throughput computed from the products' own count of flops."""
    from arraymlp import bench

    args = check.parse_args(["--out", str(tmp_path), "--cpu-standin", "--only", "gemm_floor_device"])
    report = check.run(args)
    assert not report["errors"], report["errors"]
    floor = report["sections"]["gemm_floor_device"]
    assert set(floor) == {"W1 float32 floor[torch]", "W2 float32 floor[torch]", "W4 float32 floor[torch]"}
    w4 = check._workloads(check.Context(out=tmp_path, budget=1, standin=True))["W4"]
    assert w4.sizes == (64, 256, 256, 64) and w4.batches == (256,)
    flops = sum(2 * a[0] * a[1] * b[1] for _, a, b in bench.gemm_floor_products(w4.sizes, 256, "train"))
    r = floor["W4 float32 floor[torch]"]
    assert r["device_s"] > 0 and r["tflops_device"] == pytest.approx(flops / r["device_s"] / 1e12)

"""The GPU check script (benchmarks/gpu/check.py), on the CPU: its arguments, its report
(one JSON named with the device, written after every section), its handling of a failing
or overlong section, and one whole dry run (NumPy standing in for the GPU) whose report
has every section's structure with values checked against independent computations."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def dry(check, tmp_path_factory):
    """One whole dry run: every section, NumPy standing in for the GPU."""
    out = tmp_path_factory.mktemp("gpu-check")
    report = check.run(check.parse_args(["--out", str(out), "--dry"]))
    return report, out


def test_arguments(check, tmp_path):
    a = check.parse_args([])
    assert a.budget == check.BUDGET == sum(check.CAPS.values()) == 345 and not a.dry
    assert Path(a.out) == ROOT / "benchmarks" / "results"
    a = check.parse_args(["--out", str(tmp_path), "--skip", "pytest", "--only", "env", "--budget", "60", "--dry"])
    assert (a.skip, a.only, a.budget, a.dry) == (["pytest"], ["env"], 60.0, True)
    for bad in (["--skip", "nope"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            check.parse_args(bad)
    assert check.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert check.device_slug("  ") == "unknown-device"
    assert list(check.FUNCTIONS) == list(check.SECTIONS) == list(check.CAPS)


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
        with contextlib.suppress(Exception):  # a section's broad except cannot swallow its timeout
            time.sleep(30)

    monkeypatch.setitem(check.CAPS, "slow", 6)
    args = check.parse_args(["--out", str(tmp_path), "--dry", "--budget", "100"])
    report = check.run(args, {"env": ok, "broken": broken, "slow": slow, "after": ok})
    assert ran == ["ok", "broken", "slow", "ok"]
    assert report["device"] == "dry-run-cpu"
    assert "RuntimeError: no such kernel" in report["errors"]["broken"]
    assert "SectionTimeout" in report["errors"]["slow"] and 5 <= report["seconds"]["slow"] < 10
    on_disk = json.loads((tmp_path / "dry-run-cpu-gpu-check.json").read_text())
    assert on_disk["sections"] == {"env": {"value": 1.5}, "slow": {"first": 2.5, "incomplete": True},
                                   "after": {"value": 1.5}}
    text = check.summary(report)
    assert "broken" in text and "FAILED: RuntimeError: no such kernel" in text


def test_a_spent_budget_skips_the_rest(check, tmp_path):
    args = check.parse_args(["--out", str(tmp_path), "--dry", "--budget", "12"])
    report = check.run(args, {"first": lambda ctx: time.sleep(3) or {}, "second": lambda ctx: {}})
    assert "first" in report["sections"] and "budget spent" in report["skipped"]["second"]


def test_an_overlong_command_is_interrupted_not_killed(check, tmp_path):
    """pytest past its time gets SIGINT, as Ctrl-C, so that it still writes its JUnit
    file: a child that catches KeyboardInterrupt writes its file and exits."""
    done = tmp_path / "written-on-interrupt"
    code = ("import time, pathlib\n"
            "try:\n    time.sleep(60)\n"
            f"except KeyboardInterrupt:\n    pathlib.Path({str(done)!r}).write_text('ok')\n")
    # the interrupt must find the child past its start-up: -I -S skips site imports, and
    # the cap leaves a loaded machine room. Run from a shell's background job (SIGINT
    # ignored there, and inherited) too: the child gets SIGINT's default back.
    t0 = time.perf_counter()
    rc, _ = check._run_interruptible([sys.executable, "-I", "-S", "-c", code], 4.0, env={})
    assert rc == 124 and done.read_text() == "ok" and time.perf_counter() - t0 < 24


def test_an_interrupt_reaches_a_child_of_a_process_that_ignores_sigint(check, tmp_path):
    """A background job of a shell starts with SIGINT ignored; its children inherit that,
    and Python then never raises KeyboardInterrupt: the check's pytest would be killed 20 s
    later without its JUnit file. The child gets SIGINT's default disposition back."""
    import signal

    done = tmp_path / "written-on-interrupt"
    code = ("import time, pathlib\n"
            "try:\n    time.sleep(60)\n"
            f"except KeyboardInterrupt:\n    pathlib.Path({str(done)!r}).write_text('ok')\n")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc, _ = check._run_interruptible([sys.executable, "-I", "-S", "-c", code], 4.0, env={})
    finally:
        signal.signal(signal.SIGINT, before)
    assert rc == 124 and done.read_text() == "ok"


def test_a_section_alarm_leaves_no_child_running(check, tmp_path, monkeypatch):
    """A child that outlives its section (here it ignores SIGINT and the section's cap
    is shorter than the child's time) is killed when the section's alarm fires: nothing
    keeps running beside the next section's timings."""
    import os

    pid_file = tmp_path / "pid"
    code = ("import os, signal, time, pathlib\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))\n"
            "time.sleep(60)\n")

    def section(ctx):
        assert 0 < ctx.section_left() <= 6
        check._run_interruptible([sys.executable, "-c", code], 30.0, env={})

    monkeypatch.setitem(check.CAPS, "child", 6)
    report = check.run(check.parse_args(["--out", str(tmp_path), "--dry", "--budget", "60"]), {"child": section})
    assert "SectionTimeout" in report["errors"].get("child", ""), report
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_junit_counts(check, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                   '<testcase classname="tests.test_a" name="test_x[cupy]"><failure message="m"/></testcase>'
                   '<testcase classname="tests.test_a" name="test_y[cupy]"><error message="e"/></testcase>'
                   '<testcase classname="tests.test_a" name="test_z[cupy]"/>'
                   '</testsuite></testsuites>')
    assert check.junit_counts(xml) == {"tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2,
                                       "failing": ["tests.test_a::test_x[cupy]", "tests.test_a::test_y[cupy]"]}
    assert "missing" in check.junit_counts(tmp_path / "none.xml")


def test_launch_counts_are_judged_against_the_issues_targets(check):
    counts = {"W1 sgd arraymlp[cupy]": {"kernels_per_step": 22.0}, "W1 adam arraymlp[cupy]": {"kernels_per_step": 31.0},
              "W1 sgd torch eager": {"kernels_per_step": 19.0}}
    assert check.judge_launches(counts) == {"W1 sgd arraymlp[cupy]": True, "W1 adam arraymlp[cupy]": False}
    lines = check.figures({"sections": {"launches": {**counts, "within_target": check.judge_launches(counts)}}})
    assert "kernel launches per step, W1 adam arraymlp[cupy]: 31 (target <= 30: MISSED)" in lines
    assert "kernel launches per step, W1 sgd torch eager: 19" in lines


def test_the_gpu_run_leaves_the_host_side_kernel_checks_out(check):
    """The host-side checks of the CuPy set match ``-k "cupy or cuda"`` but would spend
    about a minute of the GPU run's test budget compiling on the host: ignored there."""
    targets = check.pytest_targets(False)
    assert targets[-1] == "tests" and len(targets) == 1 + len(check.HOST_ONLY_TESTS) == 3
    for opt, path in zip(targets, check.HOST_ONLY_TESTS):
        assert opt == f"--ignore={path}" and (ROOT / path).is_file() and "cupy" in path
    assert check.pytest_targets(True) == ["tests/test_staging.py"]


def test_profile_counts_kernels_copies_and_host_waits(check):
    """A CUDA profile of 2 steps: device kernels and copies counted by the device's
    events, host waits by the runtime and driver calls that block (the launches and
    asynchronous copies do not), the profile's own closing synchronisation left out."""
    step = [("arraymlp_adam", "DeviceType.CUDA"), ("sm90_xmma_gemm_f32f32", "DeviceType.CUDA"),
            ("cuLaunchKernel", "DeviceType.CPU"), ("cudaLaunchKernel", "DeviceType.CPU"),
            ("cudaMemcpyAsync", "DeviceType.CPU"), ("Memcpy HtoD (Pinned -> Device)", "DeviceType.CUDA"),
            ("cudaStreamWaitEvent", "DeviceType.CPU"), ("cudaEventRecord", "DeviceType.CPU")]
    reads = [("Memcpy DtoH (Device -> Pageable)", "DeviceType.CUDA"), ("cudaStreamSynchronize", "DeviceType.CPU"),
             ("cuEventSynchronize", "DeviceType.CPU"), ("cudaMemcpy", "DeviceType.CPU"),
             ("cuMemcpyDtoH_v2", "DeviceType.CPU")]
    closing = [("cudaDeviceSynchronize", "DeviceType.CPU")]
    got = check.profile_counts(step * 2 + closing, 2)
    assert got == {"kernels_per_step": 2.0, "memcpy_memset_per_step": 1.0, "pageable_copies_per_step": 0.0,
                   "host_waits_per_step": 0.0}
    got = check.profile_counts(step * 2 + reads + closing, 2)
    assert got == {"kernels_per_step": 2.0, "memcpy_memset_per_step": 1.5, "pageable_copies_per_step": 0.5,
                   "host_waits_per_step": 2.0}
    lines = check.figures({"sections": {"launches": {"W1 sgd arraymlp[cupy]": got}}})
    assert "host waits per step (CUDA profile), W1 sgd arraymlp[cupy]: 2 (target 0); pageable copies: 0.5" in lines


def test_a_run_where_every_gpu_row_skipped_is_flagged(check):
    """On a GPU machine, every row skipped means the suite did not see the GPU."""
    sec = {"pytest": {"counts": {"tests": 7, "passed": 0, "failed": 0, "errors": 0, "skipped": 7}}}
    assert check.figures({"sections": sec}) == [
        "tests -k 'cupy or cuda': 0 passed, 0 failed, 0 errors, 7 skipped (EVERY ROW SKIPPED: no GPU seen?)"]
    sec["pytest"]["counts"].update(passed=1, skipped=6)
    assert check.figures({"sections": sec}) == ["tests -k 'cupy or cuda': 1 passed, 0 failed, 0 errors, 6 skipped"]


def test_tf32_rounding(check):
    """TF32 keeps 10 fraction bits: at 1 the spacing is 2**-10; half of it rounds away."""
    x = np.array([1 + 2.0**-11, 1 + 2.0**-12, -(1 + 3 * 2.0**-11), 3.0], dtype=np.float32)
    np.testing.assert_array_equal(check.round_to_tf32(x), [1 + 2.0**-10, 1.0, -(1 + 2 * 2.0**-10), 3.0])


def test_the_dry_run_has_every_section(dry):
    report, out = dry
    assert report["device"] == "dry-run-cpu" and report["targets"] == ["numpy"]
    assert not report["errors"], report["errors"]
    assert list(report["sections"]) == list(report["seconds"]) == [
        "env", "pytest", "agreement", "host_syncs", "launches", "tf32_error", "gemm_floor_device", "bench", "amp",
        "ensemble"]
    assert report["sections"]["launches"] == {"skipped": "kernel launches are counted on CUDA only"}
    on_disk = json.loads((out / "dry-run-cpu-gpu-check.json").read_text())
    assert on_disk["sections"].keys() == report["sections"].keys() and on_disk["figures"] == report["figures"]
    for name in ("bench.json", "W5.png", "ensemble.png", "junit.xml"):
        assert (out / f"dry-run-cpu-{name}").stat().st_size > 0, name
    assert report["total_s"] < report["budget_s"]


def test_heavy_libraries_are_imported_before_any_section_alarm(check, dry):
    """torch and CuPy are imported before the first section, where no alarm can cut an
    import halfway (a half-imported torch fails in every later section); an absent
    module is left to the sections to report."""
    got = check.preload(("json", "no_such_module_of_arraymlp"))
    assert list(got) == ["json"] and got["json"] >= 0
    report, _ = dry
    want = [m for m in check.PRELOAD if importlib.util.find_spec(m.split(".")[0]) is not None]
    assert list(report["preload_s"]) == want and "torch" in check.PRELOAD


def test_the_dry_runs_tests_and_host_syncs(dry):
    """The pytest section's counts come from its JUnit file (here every cupy/cuda row
    skips); the host-sync probe counts reads on array_api_strict, and a fit step reads
    nothing, on device data and on host data staged to the model's device."""
    sec = dry[0]["sections"]
    c = sec["pytest"]["counts"]
    # the GPU rows skip here; a test of the CuPy stream protocol on a stand-in runs
    assert c["skipped"] > 0 and c["passed"] + c["skipped"] == c["tests"] and c["failed"] == c["errors"] == 0
    agree = sec["agreement"]  # NumPy against itself; strict's second device, staged and not
    assert agree["loss vs numpy [numpy]"] == 0 and agree["staged vs on-device, max |param diff| [numpy]"] == 0
    assert len(agree["numpy_loss"]) == 3 and agree["numpy_loss"][2] < agree["numpy_loss"][0]
    assert agree["fit time, staged over on-device [numpy]"] > 0
    syncs = sec["host_syncs"]
    assert set(syncs) == {"W1 sgd arraymlp[numpy]", "W1 adam arraymlp[numpy]",
                          "W1 adam, host data staged arraymlp[numpy]", "target"}
    for key, row in syncs.items():
        if key != "target":
            assert row["per_step"] == 0 and row["sites"] == [] and row["syncs"][8] == row["syncs"][16] > 0, key


def test_the_dry_runs_tf32_floor_and_bench(check, dry):
    from arraymlp import bench

    sec = dry[0]["sections"]
    tf = sec["tf32_error"]["host emulation"]
    n = sec["tf32_error"]["n"]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))

    def tf32(m):  # 11 significant bits, by frexp: an independent rounding
        f, e = np.frexp(m.astype(np.float32).astype(np.float64))
        return (np.sign(f) * np.floor(np.abs(f) * 2.0**11 + 0.5) / 2.0**11 * 2.0**e).astype(np.float32)

    ref = a @ b
    want = np.linalg.norm((tf32(a) @ tf32(b)).astype(np.float64) - ref) / np.linalg.norm(ref)
    assert tf["rel_err_tf32"] == pytest.approx(want, rel=1e-6)
    assert 100 < tf["ratio"] < 1e4  # 2**-11 against 2**-24, and a sum of n terms
    w4 = check._workloads(check.Context(out=Path("."), budget=1, dry=True))["W4"]
    flops = sum(2 * a[0] * a[1] * b[1] for _, a, b in bench.gemm_floor_products(w4.sizes, w4.batches[0], "train"))
    r = sec["gemm_floor_device"]["W4 float32 floor[numpy]"]
    assert r["device_s"] > 0 and r["tflops_device"] == pytest.approx(flops / r["device_s"] / 1e12)
    saved = json.loads((dry[1] / "dry-run-cpu-bench.json").read_text())
    assert {(c["workload"], c["batch"]) for c in saved["cases"]} >= {("W1", 64), ("W2", 32), ("W4", 256), ("W5", 16)}
    for case, ratios in sec["bench"]["ratios"].items():
        ours = ratios["arraymlp[numpy]"]
        medians = sec["bench"]["medians_s"][next(k for k in sec["bench"]["medians_s"] if k.startswith(case))]
        assert ours["floor"] == pytest.approx(medians["arraymlp[numpy]"] / medians["floor[numpy]"])


def test_the_dry_runs_amp_and_ensembles(check, dry):
    from arraymlp import bench

    sec = dry[0]["sections"]
    acc = sec["amp"]["digits"]["numpy"]
    assert 0 < acc["float32"] <= 1 and 0 < acc["float16"] <= 1 and "no bfloat16" in acc["bfloat16"]
    assert acc["within_0.5%"]["float16"] == (abs(acc["float16"] - acc["float32"]) <= 0.005)
    ens = sec["ensemble"]
    row = ens["ensemble_vs_sequential"]["numpy"]
    assert (row["K"], row["epochs"], row["sequential_timed"]) == (8, 1, 2)
    assert row["ratio"] == pytest.approx(row["sequential_s"] / row["ensemble_s"])
    steps = ens["step_s"]["numpy"]
    assert sorted(int(k) for k in steps) == [1, 4, 16]
    rows = ens["member_rows_per_s"]["numpy"]
    for k, sec_per_step in steps.items():
        assert rows[k] == pytest.approx(int(k) * 64 / sec_per_step)
    assert ens["crossover_K"] == {"numpy": bench.crossover_batch(rows, rows)}
    lines = dry[0]["figures"]
    for prefix in ("versions: python", "tests -k 'cupy or cuda':", "agreement, staged vs on-device",
                   "host syncs per step, W1 adam, host data staged",
                   "TF32 relative error, 256^3 product, host emulation", "GEMM floor by events, W4 float32",
                   "W4 b256 float32 arraymlp[numpy]:", "digits accuracy [numpy]:",
                   "ensemble K=8 vs 8 sequential fits [numpy]:", "ensemble step, K from which numpy"):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert check.summary(dry[0]).splitlines()[: len(lines)] == lines


def test_digits_without_scikit_learn(check, monkeypatch):
    """A machine without scikit-learn gets a stand-in of digits' shape, named as such."""
    name, Xtr, ytr, Xte, yte = check._digits()
    assert name == "digits" and Xtr.shape == (1400, 64) and Xte.shape == (397, 64)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    name, Xtr, ytr, Xte, yte = check._digits()
    assert name.startswith("digits-shaped stand-in") and Xtr.shape == (1400, 64) and yte.shape == (397,)
    assert Xtr.dtype == np.float32 and len(np.unique(ytr)) > 5

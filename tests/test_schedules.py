"""Learning-rate schedules against their closed forms and torch.optim.lr_scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arraymlp.schedules import (
    SCHEDULES,
    Constant,
    CosineAnnealing,
    CosineWarmRestarts,
    ExponentialDecay,
    LinearWarmup,
    ReduceOnPlateau,
    Schedule,
    StepDecay,
    get_schedule,
)

N = 40


def torch_lrs(make, n, lr, metrics=None):
    """Learning rates torch's scheduler gives at steps 0..n-1 (or after each metric)."""
    torch = pytest.importorskip("torch")
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = make(opt)
    out = [] if metrics is not None else [opt.param_groups[0]["lr"]]
    for k in range(len(metrics) if metrics is not None else n - 1):
        opt.step()
        if metrics is not None:
            sched.step(metrics[k])
        else:
            sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def values(schedule, n=N):
    return [schedule(t) for t in range(n)]


# ----------------------------------------------------------------------------- closed forms
def test_constant():
    assert values(Constant(0.3), 5) == [0.3] * 5


def test_step_decay_closed_form():
    s = StepDecay(0.5, step_size=7, gamma=0.3)
    assert values(s) == [0.5 * 0.3 ** (t // 7) for t in range(N)]
    assert s(6) == 0.5 and s(7) == pytest.approx(0.15, rel=1e-15)


def test_exponential_decay_closed_form():
    s = ExponentialDecay(0.2, gamma=0.9)
    np.testing.assert_allclose(values(s), [0.2 * 0.9**t for t in range(N)], rtol=1e-15)


def test_cosine_annealing_closed_form_and_hold():
    s = CosineAnnealing(0.1, T_max=20, eta_min=0.01)
    want = [0.01 + 0.09 * (1 + math.cos(math.pi * min(t, 20) / 20)) / 2 for t in range(N)]
    np.testing.assert_allclose(values(s), want, rtol=1e-15)
    assert s(0) == 0.1
    assert s(10) == pytest.approx(0.055, rel=1e-14)
    assert s(20) == pytest.approx(0.01, rel=1e-14)
    assert s(35) == s(20)  # held at eta_min after T_max
    assert s(2.5) == pytest.approx(0.01 + 0.09 * (1 + math.cos(math.pi * 2.5 / 20)) / 2, rel=1e-15)


def _sgdr(lr, eta_min, T_0, T_mult, t):
    """SGDR by walking the cycles one by one."""
    T_i, start = T_0, 0
    while t >= start + T_i:
        start, T_i = start + T_i, T_i * T_mult
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (t - start) / T_i)) / 2


@pytest.mark.parametrize("T_0, T_mult", [(5, 1), (3, 2), (2, 3)])
def test_warm_restarts_closed_form(T_0, T_mult):
    s = CosineWarmRestarts(0.1, T_0=T_0, T_mult=T_mult, eta_min=0.001)
    np.testing.assert_allclose(
        values(s), [_sgdr(0.1, 0.001, T_0, T_mult, t) for t in range(N)], rtol=1e-15
    )


def test_warm_restarts_restart_exactly_on_the_cycle_boundaries():
    s = CosineWarmRestarts(0.1, T_0=4, T_mult=2, eta_min=0.0)
    restarts = [0, 4, 12, 28, 60, 124, 252]
    for r in restarts:
        assert s(r) == 0.1
        assert s.cycle(r)[0] == 0
    assert s(3) < s(2) < s(1) < 0.1
    assert s.cycle(20) == (8, 16)
    assert s(8) == pytest.approx(0.05, rel=1e-14)  # half-way through the 8-step cycle
    t1 = CosineWarmRestarts(1.0, T_0=10)
    assert t1(10) == t1(20) == t1(0) == 1.0
    assert t1(15) == pytest.approx(0.5, rel=1e-14)


def test_linear_warmup_ramp_then_shifted_schedule():
    inner = StepDecay(0.4, step_size=5, gamma=0.5)
    s = LinearWarmup(inner, warmup_steps=4, start_factor=0.25)
    ramp = [0.4 * (0.25 + 0.75 * t / 4) for t in range(4)]
    np.testing.assert_allclose([s(t) for t in range(4)], ramp, rtol=1e-15)
    assert [s(t) for t in range(4, N)] == [inner(t - 4) for t in range(4, N)]
    assert s(4) == inner(0) == 0.4  # the ramp ends on the wrapped schedule's value


def test_linear_warmup_defaults_and_inputs():
    s = LinearWarmup(CosineAnnealing(1.0, T_max=10), warmup_steps=5)
    assert s(0) == 0.0 and s(1) == pytest.approx(0.2) and s(5) == 1.0
    assert s(15) == pytest.approx(0.0, abs=1e-15)
    assert values(LinearWarmup(StepDecay(0.1, 3), 0)) == values(StepDecay(0.1, 3))
    assert LinearWarmup(0.5, 2)(1) == pytest.approx(0.25)  # a number means Constant
    assert LinearWarmup(lambda t: 1.0 / (1 + t), 2)(3) == 0.5  # any callable of the step


def test_linear_warmup_wraps_reduce_on_plateau_state():
    inner = ReduceOnPlateau(1.0, patience=0)
    s = LinearWarmup(inner, 2)
    inner.step(1.0)
    inner.step(2.0)
    assert s(5) == pytest.approx(0.1)
    sd = s.state_dict()
    other = LinearWarmup(ReduceOnPlateau(1.0, patience=0), 2)
    other.load_state_dict(sd)
    assert other(5) == s(5)


def test_linear_warmup_passes_metrics_to_plateau_after_warmup():
    inner = ReduceOnPlateau(1.0, factor=0.5, patience=0)
    s = LinearWarmup(inner, warmup_steps=3)
    # rising losses while warming up are not passed on
    assert [s.step(m) for m in (1.0, 2.0)] == [None, None]
    assert inner.last_epoch == 0 and inner.lr == 1.0
    assert s.step(3.0) == 1.0  # the last warm-up epoch's metric: the plateau's first
    assert s.step(4.0) == 0.5 and s(3) == 0.5  # no improvement, patience 0
    assert s.state_dict() == {"schedule": inner.state_dict(), "metrics_seen": 4}
    other = LinearWarmup(ReduceOnPlateau(1.0, factor=0.5, patience=0), warmup_steps=3)
    other.load_state_dict(s.state_dict())
    assert other.metrics_seen == 4 and other.step(5.0) == s.step(5.0) == 0.25


def test_linear_warmup_step_without_a_stateful_schedule():
    s = LinearWarmup(CosineAnnealing(1.0, T_max=10), warmup_steps=0)
    assert s.step(1.0) is None and s(0) == 1.0
    assert s.state_dict() == {"schedule": {}}  # no count: nothing to pass metrics to
    s.load_state_dict({"schedule": {}})  # a checkpoint without the count
    assert s.metrics_seen == 0


# ----------------------------------------------------------------------------- against torch
def test_step_decay_matches_torch():
    torch = pytest.importorskip("torch")
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.3), N, 0.5)
    np.testing.assert_allclose(values(StepDecay(0.5, 7, 0.3)), want, rtol=1e-12)


def test_exponential_decay_matches_torch():
    torch = pytest.importorskip("torch")
    want = torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9), N, 0.2)
    np.testing.assert_allclose(values(ExponentialDecay(0.2, 0.9)), want, rtol=1e-12)


def test_cosine_annealing_matches_torch_up_to_T_max():
    torch = pytest.importorskip("torch")
    want = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=25, eta_min=0.01), 26, 0.1
    )
    np.testing.assert_allclose(values(CosineAnnealing(0.1, 25, 0.01), 26), want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("T_0, T_mult", [(5, 1), (3, 2), (2, 3)])
def test_warm_restarts_match_torch(T_0, T_mult):
    torch = pytest.importorskip("torch")
    want = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            o, T_0=T_0, T_mult=T_mult, eta_min=0.001
        ),
        N,
        0.1,
    )
    np.testing.assert_allclose(values(CosineWarmRestarts(0.1, T_0, T_mult, 0.001)), want, rtol=1e-12)


def test_linear_warmup_ramp_matches_torch_linear_lr():
    torch = pytest.importorskip("torch")
    want = torch_lrs(
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=8),
        9,
        0.3,
    )
    np.testing.assert_allclose(values(LinearWarmup(0.3, 8, start_factor=0.25), 9), want, rtol=1e-12)


PLATEAU_METRICS = [
    1.0,
    0.9,
    0.95,
    0.95,
    0.9,
    0.91,
    0.8,
    0.85,
    0.86,
    0.87,
    0.88,
    0.79,
    0.7999,
    0.7995,
    0.80,
    0.81,
    0.82,
    0.83,
    0.84,
    0.85,
    float("nan"),
    0.5,
    0.6,
    0.6,
    0.6,
    0.6,
    0.6,
    0.6,
]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(factor=0.5, patience=2),
        dict(factor=0.5, patience=1, cooldown=2),
        dict(factor=0.1, patience=0, min_lr=0.002),
        dict(factor=0.5, patience=1, threshold=0.01),
        dict(factor=0.5, patience=1, threshold=0.05, threshold_mode="abs"),
        dict(factor=0.5, patience=2, mode="max"),
    ],
)
def test_reduce_on_plateau_matches_torch(kwargs):
    torch = pytest.importorskip("torch")
    s = ReduceOnPlateau(0.1, **kwargs)
    got = [s.step(m) for m in PLATEAU_METRICS]
    want = torch_lrs(
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, **kwargs), None, 0.1, PLATEAU_METRICS
    )
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert len(set(got)) > 1  # the sequence really triggers reductions
    assert s(123) == s.lr == got[-1]


def test_reduce_on_plateau_by_hand():
    s = ReduceOnPlateau(1.0, factor=0.5, patience=1, cooldown=1, min_lr=0.2)
    # better, bad, bad -> reduce; cooldown swallows the next bad; bad, bad -> reduce; floor at min_lr
    seq = [
        (5.0, 1.0),
        (5.0, 1.0),
        (5.0, 0.5),
        (5.0, 0.5),
        (5.0, 0.5),
        (5.0, 0.25),
        (5.0, 0.25),
        (5.0, 0.25),
        (5.0, 0.2),
        (5.0, 0.2),
        (5.0, 0.2),
        (5.0, 0.2),
    ]
    for metric, lr in seq:
        assert s.step(metric) == lr
    s.step(np.float64(1.0))  # numbers and 0-d arrays
    assert s.best == 1.0 and s.num_bad_epochs == 0
    assert s() == 0.2


def test_reduce_on_plateau_state_dict_resumes():
    a = ReduceOnPlateau(0.1, factor=0.5, patience=1, cooldown=1)
    first = [a.step(m) for m in PLATEAU_METRICS[:10]]
    sd = a.state_dict()
    assert all(isinstance(v, (int, float)) for v in sd.values())
    rest = [a.step(m) for m in PLATEAU_METRICS[10:]]
    b = ReduceOnPlateau(0.1, factor=0.5, patience=1, cooldown=1)
    b.load_state_dict(sd)
    assert b() == first[-1]
    assert [b.step(m) for m in PLATEAU_METRICS[10:]] == rest
    b.reset()
    assert b() == 0.1 and b.best == math.inf
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"lr": 0.1})


def test_closed_forms_have_empty_state():
    s = CosineAnnealing(0.1, 10)
    assert s.state_dict() == {}
    s.load_state_dict({})
    with pytest.raises(ValueError, match="no state"):
        s.load_state_dict({"lr": 0.1})


# ----------------------------------------------------------------------------- names, errors, repr
@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("constant", dict(lr=0.1), Constant),
        ("step", dict(lr=0.1, step_size=3), StepDecay),
        ("exponential", dict(lr=0.1, gamma=0.9), ExponentialDecay),
        ("cosine", dict(lr=0.1, T_max=10), CosineAnnealing),
        ("cosine_warm_restarts", dict(lr=0.1, T_0=10, T_mult=2), CosineWarmRestarts),
        ("linear_warmup", dict(schedule=0.1, warmup_steps=3), LinearWarmup),
        ("reduce_on_plateau", dict(lr=0.1, patience=3), ReduceOnPlateau),
    ],
)
def test_get_schedule_by_name(name, kwargs, cls):
    s = get_schedule(name, **kwargs)
    assert type(s) is cls and isinstance(s, Schedule)
    assert name in SCHEDULES


def test_get_schedule_passes_instances_callables_and_numbers():
    s = StepDecay(0.1, 3)
    assert get_schedule(s) is s
    f = lambda t: 0.1  # noqa: E731
    assert get_schedule(f) is f
    assert get_schedule(0.05)(100) == 0.05
    with pytest.raises(TypeError, match="cannot be combined"):
        get_schedule(s, lr=0.2)
    with pytest.raises(TypeError, match="schedule must be a name"):
        get_schedule([0.1])


def test_get_schedule_unknown_name_lists_known_ones():
    with pytest.raises(
        ValueError, match="unknown schedule 'onecycle'; known schedules: constant, step, exponential"
    ):
        get_schedule("onecycle")


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: Constant(-0.1), ValueError, "lr must be >= 0"),
        (lambda: StepDecay(0.1, 0), ValueError, "step_size must be an integer >= 1"),
        (lambda: StepDecay(0.1, 2.5), TypeError, "step_size must be an integer"),
        (lambda: StepDecay(0.1, 2, gamma=0.0), ValueError, "gamma must be > 0"),
        (lambda: ExponentialDecay(0.1, -0.5), ValueError, "gamma must be > 0"),
        (lambda: CosineAnnealing(0.1, 0), ValueError, "T_max must be > 0"),
        (lambda: CosineAnnealing(0.1, 10, eta_min=-1.0), ValueError, "eta_min must be >= 0"),
        (lambda: CosineWarmRestarts(0.1, 0), ValueError, "T_0 must be an integer >= 1"),
        (lambda: CosineWarmRestarts(0.1, 5, T_mult=0), ValueError, "T_mult must be an integer >= 1"),
        (lambda: LinearWarmup(0.1, -1), ValueError, "warmup_steps must be an integer >= 0"),
        (
            lambda: LinearWarmup(0.1, 5, start_factor=1.5),
            ValueError,
            r"start_factor must be in \[0, 1\]",
        ),
        (lambda: LinearWarmup("cosine", 5), TypeError, "schedule must be a Schedule"),
        (lambda: ReduceOnPlateau(0.1, factor=1.0), ValueError, r"factor must be in \[0, 1\)"),
        (lambda: ReduceOnPlateau(0.1, patience=-1), ValueError, "patience must be an integer >= 0"),
        (lambda: ReduceOnPlateau(0.1, mode="lowest"), ValueError, "mode must be 'min' or 'max'"),
        (lambda: ReduceOnPlateau(0.1, threshold_mode="pct"), ValueError, "threshold_mode must be"),
        (lambda: ReduceOnPlateau(0.1, cooldown=-2), ValueError, "cooldown must be an integer >= 0"),
        (lambda: ReduceOnPlateau(0.1).step("low"), TypeError, "metric must be a number"),
        (lambda: StepDecay(0.1, 2)(-1), ValueError, "step must be a non-negative number"),
        (lambda: Constant(0.1)(None), TypeError, "step must be a non-negative number"),
    ],
)
def test_bad_arguments_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    "s",
    [
        Constant(0.1),
        StepDecay(0.1, 3, gamma=0.5),
        ExponentialDecay(0.1, 0.95),
        CosineAnnealing(0.1, 50, eta_min=0.001),
        CosineWarmRestarts(0.1, 10, T_mult=2, eta_min=0.001),
        LinearWarmup(CosineAnnealing(0.1, 50), 5, start_factor=0.1),
        ReduceOnPlateau(0.1, factor=0.5, patience=3, mode="max", cooldown=1),
    ],
    ids=repr,
)
def test_repr_rebuilds_the_schedule(s):
    ns = {
        c.__name__: c
        for c in (
            Constant,
            StepDecay,
            ExponentialDecay,
            CosineAnnealing,
            CosineWarmRestarts,
            LinearWarmup,
            ReduceOnPlateau,
        )
    }
    rebuilt = eval(repr(s), ns)
    assert type(rebuilt) is type(s) and repr(rebuilt) == repr(s)
    assert values(rebuilt, 60) == values(s, 60)

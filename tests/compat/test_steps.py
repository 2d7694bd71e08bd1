"""Step-size control against Diffrax: the same call through both libraries must take
the same steps (`SaveAt(steps=True)`), accept and reject the same ones, and end with
the same result.

Step counts, rejections and results must match exactly. Step times must match
exactly where they come from the controllers' own arithmetic (fixed grids, jump and
step times); elsewhere they depend on the vector field and solver, whose
floating-point operations XLA may fuse differently in the two programs (an
`a + b * c` may become a fused multiply-add in one of them), so they are compared to
a few hundred ULP."""

import functools
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")

TOLERANCE = {np.float64: (1e-11, 1e-12), np.float32: (2e-5, 2e-6)}
# Adaptive float32 solves: the error estimate cancels most digits of its stages, so
# an ULP of difference in a stage moves the next step by ~1e-5 relative.
TOLERANCE_ADAPTIVE = {np.float64: (1e-9, 1e-11), np.float32: (1e-3, 1e-3)}


def _heun_euler(lib):
    """The same embedded Heun–Euler pair written against either library, so that the
    two solves differ only in the step-size machinery."""

    class HeunEuler(lib.AbstractAdaptiveSolver):
        term_structure: ClassVar = lib.AbstractTerm
        interpolation_cls: ClassVar = lib.LocalLinearInterpolation

        def order(self, terms):
            return 2

        def error_order(self, terms):
            return 2

        def init(self, terms, t0, t1, y0, args):
            return None

        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            control = terms.contr(t0, t1)
            k1 = terms.vf_prod(t0, y0, args, control)
            k2 = terms.vf_prod(t1, y0 + k1, args, control)
            y1 = y0 + 0.5 * (k1 + k2)
            return y1, 0.5 * (k2 - k1), dict(y0=y0, y1=y1), None, lib.RESULTS.successful

        def func(self, terms, t0, y0, args):
            return terms.vf(t0, y0, args)

    return HeunEuler()


def _linear(t, y, args):
    return -2.0 * y + t


def _lotka_volterra(t, y, args):
    return jnp.stack([1.5 * y[0] - y[0] * y[1], -3.0 * y[1] + y[0] * y[1]])


def _van_der_pol(t, y, args):  # mildly stiff: mu = 5
    return jnp.stack([y[1], 5.0 * (1 - y[0] ** 2) * y[1] - y[0]])


PROBLEMS = {
    "linear": (_linear, [1.0, 0.5], 3.0),
    "lotka_volterra": (_lotka_volterra, [1.0, 1.0], 3.0),
    "van_der_pol": (_van_der_pol, [2.0, 0.0], 3.0),
}


def _controllers(lib, dtype):
    # float32 solves get tolerances 100x looser: near float32's resolution the error
    # estimates are mostly rounding noise.
    tol = 1.0 if dtype == np.float64 else 100.0

    def pid(rtol, atol, **kwargs):
        return lib.PIDController(rtol=rtol * tol, atol=atol * tol, **kwargs)

    def times(*ts):  # given in the time dtype, as Diffrax requires under strict
        return jnp.asarray(ts, dtype)

    return {
        "const": lib.ConstantStepSize(),
        "pid": pid(1e-4, 1e-7),
        "pid_loose": pid(1e-2, 1e-4),
        "pi": pid(1e-5, 1e-8, pcoeff=0.4, icoeff=0.3),
        "pid_dtmin": pid(1e-6, 1e-9, dtmin=0.02, dcoeff=0.1, icoeff=0.3),
        "pid_dtmax": pid(1e-3, 1e-6, dtmax=0.07),
        # step and jump times on t0, in the middle and on t1 (either direction)
        "clip_step": lib.ClipStepSizeController(
            pid(1e-4, 1e-7), step_ts=times(0.0, 0.5, 1.25, 3.0)
        ),
        "clip_jump": lib.ClipStepSizeController(
            pid(1e-4, 1e-7), jump_ts=times(0.0, 0.7, 1.6, 3.0)
        ),
        "clip_both": lib.ClipStepSizeController(
            pid(1e-4, 1e-7), step_ts=times(0.3, 1.1, 2.0), jump_ts=times(1.1, 2.5)
        ),
        "clip_rejected": lib.ClipStepSizeController(
            pid(1e-5, 1e-8), store_rejected_steps=20
        ),
        # The step-size factor's bounds and safety factor, and the error order.
        "pid_factors": pid(
            1e-5, 1e-8, factormin=0.5, factormax=2.0, safety=0.7, pcoeff=0.2
        ),
        "pid_wide_factors": pid(1e-4, 1e-7, factormin=0.05, factormax=50.0, safety=1.0),
        "pid_error_order": pid(1e-5, 1e-8, error_order=3, icoeff=0.5),
    }


# The controllers of the sampled product below (the factor and error-order ones have
# a test of their own, so that adding them did not change the sample).
_OWN_TEST = ("pid_factors", "pid_wide_factors", "pid_error_order")
CONTROLLERS = [c for c in _controllers(diffeqx, np.float64) if c not in _OWN_TEST]


def _solve(lib, problem, solver, controller, dtype, backwards, dt0, **kwargs):
    field, y0, t_end = PROBLEMS[problem]
    y0 = jnp.asarray(y0[: 1 if problem == "linear" else 2], dtype)
    t0, t1 = (dtype(t_end), dtype(0.0)) if backwards else (dtype(0.0), dtype(t_end))
    if dt0 is not None:
        dt0 = dtype(-dt0 if backwards else dt0)
    solver = _heun_euler(lib) if solver == "HeunEuler" else getattr(lib, solver)()
    sol = lib.diffeqsolve(
        lib.ODETerm(field),
        solver,
        t0,
        t1,
        dt0,
        y0,
        saveat=lib.SaveAt(steps=True),
        stepsize_controller=_controllers(lib, dtype)[controller],
        max_steps=4096,
        throw=False,
        **kwargs,
    )
    return sol


_RESULTS = ("successful", "max_steps_reached", "dt_min_reached", "max_steps_rejected")


def _result_name(lib, result):
    names = [name for name in _RESULTS if bool(result == getattr(lib.RESULTS, name))]
    return names[0] if names else "other"


def _observed(sol):
    lib = diffeqx if isinstance(sol, diffeqx.Solution) else diffrax
    stats = {k: int(v) for k, v in sol.stats.items() if k.startswith("num_")}
    ts, ys = np.asarray(sol.ts), np.asarray(jax.tree.leaves(sol.ys)[0])
    return ts, ys, stats, _result_name(lib, sol.result)


def _assert_same(ours, theirs, dtype, exact_ts=False):
    ts, ys, stats, result = _observed(ours)
    ref_ts, ref_ys, ref_stats, ref_result = _observed(theirs)
    assert stats == {k: ref_stats[k] for k in stats}
    assert result == ref_result
    assert ts.shape == ref_ts.shape and ts.dtype == ref_ts.dtype
    np.testing.assert_array_equal(np.isfinite(ts), np.isfinite(ref_ts))
    if exact_ts:
        np.testing.assert_array_equal(ts, ref_ts)
    rtol, atol = (TOLERANCE if exact_ts else TOLERANCE_ADAPTIVE)[dtype]
    np.testing.assert_allclose(ts, ref_ts, rtol=rtol, atol=atol)
    np.testing.assert_allclose(ys, ref_ys, rtol=rtol * 10, atol=atol * 10)


def _both(*args, exact_ts=False, **kwargs):
    ours = _solve(diffeqx, *args, **kwargs)
    theirs = _solve(diffrax, *args, **kwargs)
    _assert_same(ours, theirs, args[3], exact_ts=exact_ts)
    return ours


# A deterministic sample of problem x controller x dtype x direction x dt0 for the
# default run; the full product is marked slow.
_FULL = [
    (problem, controller, dtype, backwards, dt0)
    for problem in PROBLEMS
    for controller in CONTROLLERS
    for dtype in (np.float64, np.float32)
    for backwards in (False, True)
    for dt0 in (0.05, None)
    if not (controller == "const" and dt0 is None)
]
_DEFAULT = _FULL[::29]


def _params(cases, slow):
    marks = [pytest.mark.slow] if slow else []
    return [
        pytest.param(
            *case,
            id="-".join(
                [case[0], case[1], case[2].__name__, "bwd" if case[3] else "fwd"]
                + [f"dt0={case[4]}"]
            ),
            marks=marks,
        )
        for case in cases
    ]


@pytest.mark.parametrize(
    "problem, controller, dtype, backwards, dt0",
    _params(_DEFAULT, slow=False)
    + _params([c for c in _FULL if c not in _DEFAULT], slow=True),
)
def test_steps_match_diffrax(problem, controller, dtype, backwards, dt0):
    _both(problem, "HeunEuler", controller, dtype, backwards, dt0)


_FACTOR_CASES = [
    ("van_der_pol", "HeunEuler", np.float64, False),
    ("lotka_volterra", "HeunEuler", np.float32, True),
    ("lotka_volterra", "Tsit5", np.float64, False),
    ("van_der_pol", "Tsit5", np.float64, True),
    ("linear", "Bosh3", np.float64, False),
]


@pytest.mark.parametrize(
    "controller, problem, solver, dtype, backwards",
    [
        # By default each controller with one solve that takes and rejects many
        # steps (with the wide factors, the float32 solve stops at `max_steps`,
        # rejecting nearly all of them, in both libraries); the rest of the
        # product is marked slow.
        pytest.param(
            controller,
            *case,
            marks=[] if (j, i) in ((0, 1), (1, 0), (2, 2)) else [pytest.mark.slow],
        )
        for j, controller in enumerate(_OWN_TEST)
        for i, case in enumerate(_FACTOR_CASES)
    ],
)
def test_controller_factors_match_diffrax(
    controller, problem, solver, dtype, backwards
):
    # factormin, factormax, safety and error_order change which steps are taken and
    # rejected: the same steps, rejections and result as Diffrax's.
    sol = _both(problem, solver, controller, dtype, backwards, None)
    assert int(sol.stats["num_accepted_steps"]) > 2


@pytest.mark.parametrize(
    "controller, backwards",
    [
        ("pid", False),
        pytest.param("pid", True, marks=pytest.mark.slow),
        pytest.param("clip_jump", False, marks=pytest.mark.slow),
        pytest.param("clip_jump", True, marks=pytest.mark.slow),
    ],
)
def test_tsit5_steps_match_diffrax(controller, backwards):
    # The library's own solver: counts and results exactly, times to tolerance.
    # (float64 only: Tsit5's error estimate is not yet Diffrax's to the last bit,
    # which float32 step decisions can see.)
    _both("lotka_volterra", "Tsit5", controller, np.float64, backwards, None)


@pytest.mark.parametrize(
    "t0, t1, dt0",
    [
        (0.0, 1.0, 0.1),
        (0.0, 1.05, 0.1),
        (0.5, 3.2, 0.7),
        (0.3, 2.9, 0.13),
        (1.0, 0.0, -0.1),
        (0.0, 1.0, (1 - 1e-15) / 4),
        (0.0, 1.0, 0.25 * (1 + 1e-15)),
    ],
)
@pytest.mark.parametrize(
    "dtype", [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)]
)
def test_constant_step_grid_matches_diffrax(t0, t1, dt0, dtype):
    # Diffrax's grid: ceil((t1 - t0) / dt0) steps (dt0 rounded up one ULP), the first
    # of size dt0, step k ending at t0 + (t1 - t0) * k / n, the last exactly at t1.
    def solve(lib):
        return lib.diffeqsolve(
            lib.ODETerm(_linear),
            lib.Euler(),
            dtype(t0),
            dtype(t1),
            dtype(dt0),
            jnp.ones((1,), dtype),
            saveat=lib.SaveAt(steps=True),
        )

    _assert_same(solve(diffeqx), solve(diffrax), dtype, exact_ts=True)


@pytest.mark.parametrize(
    # In float32 by default: test_controllers.py::test_jump_ts_containing_t1_...
    "dtype",
    [np.float64, pytest.param(np.float32, marks=pytest.mark.slow)],
)
def test_jump_at_t1_ends_exactly_at_t1(dtype):
    # Diffrax moves a step start one ULP past a jump; a jump at t1 must not carry
    # the end time past t1.
    controller = diffeqx.ClipStepSizeController(
        diffeqx.PIDController(rtol=1e-3, atol=1e-6), jump_ts=jnp.asarray([1.0], dtype)
    )
    sol = diffeqx.diffeqsolve(
        diffeqx.ODETerm(_linear),
        diffeqx.Tsit5(),
        dtype(0),
        dtype(1),
        None,
        jnp.ones((1,), dtype),
        saveat=diffeqx.SaveAt(t1=True, steps=True),
        stepsize_controller=controller,
    )
    ts = np.asarray(sol.ts)
    assert ts[np.isfinite(ts)][-1] == dtype(1) and sol.t1 == dtype(1)


# By default: test_controllers.py (the first step inside diffeqsolve is 0.01, as in
# Diffrax, and the Hairer-Norsett-Wanner rule on a bare ODETerm, worked out by hand).
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_automatic_first_step_matches_diffrax(dtype):
    # Diffrax 0.7.2 applies the Hairer-Norsett-Wanner rule only to a bare ODETerm;
    # inside diffeqsolve the terms are wrapped, so the first step is always 0.01.
    def field(t, y, args):
        return -y

    y0 = jnp.asarray([3.0, -1.0], dtype)
    for lib in (diffeqx, diffrax):
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Tsit5(),
            dtype(0),
            dtype(1),
            None,
            y0,
            saveat=lib.SaveAt(steps=True),
            stepsize_controller=lib.PIDController(rtol=1e-3, atol=1e-6),
        )
        assert sol.ts[0] == dtype(0.01)
    # Called directly with a bare ODETerm, both use the Hairer-Norsett-Wanner rule.
    firsts = [
        lib.PIDController(rtol=1e-3, atol=1e-6).init(
            lib.ODETerm(field), dtype(0), dtype(1), y0, None, None, lib.Tsit5().func, 5
        )[0]
        for lib in (diffeqx, diffrax)
    ]
    assert firsts[0] == firsts[1] and firsts[0] != dtype(0.01)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pid_controller_arithmetic_matches_diffrax(dtype):
    # adapt_step_size on random inputs: bit-for-bit the same decisions, times and
    # state, including dtmin/dtmax/force_dtmin and float32 arithmetic.
    rng = np.random.default_rng(0)
    for _ in range(100):
        gains = [float(rng.choice([0.0, 0.1, 0.3, 0.4, 1.0])) for _ in range(3)]
        kwargs = dict(
            rtol=float(10 ** rng.uniform(-8, -2)),
            atol=float(10 ** rng.uniform(-10, -4)),
            pcoeff=gains[0],
            icoeff=gains[1] or 1.0,
            dcoeff=gains[2],
        )
        if rng.uniform() < 0.4:
            kwargs.update(
                dtmin=float(10 ** rng.uniform(-4, -1)),
                force_dtmin=bool(rng.integers(2)),
            )
        if rng.uniform() < 0.3:
            kwargs.update(dtmax=float(10 ** rng.uniform(-3, 0)))
        if rng.uniform() < 0.5:
            kwargs.update(
                factormin=float(rng.choice([0.01, 0.1, 0.5, 0.9])),
                factormax=float(rng.choice([1.5, 2.0, 5.0, 100.0])),
                safety=float(rng.choice([0.5, 0.8, 0.95, 1.0])),
            )
        if rng.uniform() < 0.3:
            kwargs.update(error_order=float(rng.choice([1.0, 2.5, 4.0])))
        y0 = jnp.asarray(rng.normal(size=3), dtype)
        y1 = y0 + jnp.asarray(rng.normal(size=3) * 0.1, dtype)
        error = jnp.asarray(
            rng.normal(size=3) * kwargs["rtol"] * 10 ** rng.uniform(-3, 2), dtype
        )
        state = (
            jnp.asarray(10 ** rng.uniform(-2, 2), dtype),
            jnp.asarray(10 ** rng.uniform(-2, 2), dtype),
            jnp.asarray(bool(rng.integers(2))),
        )
        t0 = jnp.asarray(rng.uniform(0, 10), dtype)
        t1 = t0 + jnp.asarray(10 ** rng.uniform(-4, 0), dtype)
        order = int(rng.integers(2, 8))
        outs = [
            lib.PIDController(**kwargs).adapt_step_size(
                t0, t1, y0, y1, None, error, order, state
            )
            for lib in (diffeqx, diffrax)
        ]
        ours, theirs = (jax.tree.leaves(out[:5]) for out in outs)
        for a, b in zip(ours, theirs, strict=True):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert _result_name(diffeqx, outs[0][5]) == _result_name(diffrax, outs[1][5])


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y).reshape(16, 3)


@functools.cache
def _cde_problem(dtype):
    """Diffrax's neural-CDE recipe: 200 observation times on [0, 1], a linear
    interpolation of the data as control, hidden size 16, an MLP vector field
    (width 64, depth 2, softplus, final tanh)."""
    ts = jnp.linspace(0, 1, 200, dtype=dtype)
    data = jnp.stack([ts, jnp.sin(6 * ts) * jnp.cos(2 * ts), jnp.cos(9 * ts**2)], -1)
    mlp = eqx.nn.MLP(
        16,
        48,
        64,
        2,
        activation=jax.nn.softplus,
        final_activation=jnp.tanh,
        key=jr.PRNGKey(0),
        dtype=dtype,
    )
    y0 = 0.3 * jr.normal(jr.PRNGKey(1), (4, 16), dtype)
    return ts, data.astype(dtype), _CDEField(mlp), y0


def _cde_solve(lib, dtype, rtol, batch):
    ts, data, field, y0 = _cde_problem(dtype)

    def solve(y0):
        term = lib.ControlTerm(field, lib.LinearInterpolation(ts, data)).to_ode()
        controller = lib.ClipStepSizeController(
            lib.PIDController(rtol=rtol, atol=rtol * 1e-3), jump_ts=ts
        )
        return lib.diffeqsolve(
            term,
            lib.Tsit5(),
            ts[0],
            ts[-1],
            None,
            y0,
            saveat=lib.SaveAt(steps=True),
            stepsize_controller=controller,
            max_steps=1024,
            throw=False,
        )

    return jax.jit(jax.vmap(solve) if batch else solve)(y0 if batch else y0[0])


# Control terms against Diffrax by default: tests/compat/test_protocol.py (a weakly
# diagonal control term, and the parts of a MultiTerm with a ControlTerm).
@pytest.mark.slow
@pytest.mark.parametrize(
    "dtype, rtol, batch",
    [
        (np.float64, 1e-3, False),
        pytest.param(np.float32, 1e-3, True, marks=pytest.mark.slow),
        pytest.param(np.float64, 1e-6, True, marks=pytest.mark.slow),
        pytest.param(np.float32, 1e-2, False, marks=pytest.mark.slow),
        pytest.param(np.float64, 1e-8, False, marks=pytest.mark.slow),
    ],
)
def test_neural_cde_with_jump_times_matches_diffrax(dtype, rtol, batch):
    ours = _cde_solve(diffeqx, dtype, rtol, batch)
    theirs = _cde_solve(diffrax, dtype, rtol, batch)
    for name in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        np.testing.assert_array_equal(ours.stats[name], theirs.stats[name])
    assert np.all(np.asarray(ours.result == diffeqx.RESULTS.successful))
    assert np.all(np.asarray(theirs.result == diffrax.RESULTS.successful))
    # Step ends come from the jump times (one ULP past each): exactly Diffrax's.
    np.testing.assert_array_equal(np.asarray(ours.ts), np.asarray(theirs.ts))
    rtol_, atol_ = TOLERANCE[dtype]
    np.testing.assert_allclose(
        np.asarray(ours.ys), np.asarray(theirs.ys), rtol=100 * rtol_, atol=100 * atol_
    )


def _forced_decay_total(lib, kind):
    """The integral over [0, 1] of `y' = -y + 1[s >= t]`, as a function of the
    switching time `t`, which is also the controller's `step_ts` or `jump_ts`."""

    def run(t):
        def field(s, y, forcing):
            y, _ = y
            return -y + forcing(s), y

        controller = lib.ClipStepSizeController(
            lib.PIDController(rtol=1e-8, atol=1e-8), **{kind: t[None]}
        )
        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Tsit5(),
            0.0,
            1.0,
            None,
            (1.0, 0.0),
            args=lambda s: jnp.where(s < t, 0.0, 1.0),
            stepsize_controller=controller,
        )
        return sol.ys[1][0]

    return run


@pytest.mark.parametrize(
    "kind", ["step_ts", pytest.param("jump_ts", marks=pytest.mark.slow)]
)
def test_gradient_with_respect_to_a_traced_step_time(kind):
    # Steps placed a few ULPs from a traced `step_ts`/`jump_ts` (by `nextafter` and
    # bit casts, which JAX cannot differentiate) follow it: `jax.grad` failed here.
    t = jnp.asarray(0.5)
    grads = {
        name: float(jax.jit(jax.grad(_forced_decay_total(lib, kind)))(t))
        for name, lib in {"diffeqx": diffeqx, "diffrax": diffrax}.items()
    }
    run = jax.jit(_forced_decay_total(diffeqx, kind))
    eps = 1e-5
    finite_difference = (float(run(t + eps)) - float(run(t - eps))) / (2 * eps)
    # The exact derivative of the integral with respect to the switching time.
    exact = -(1 - np.exp(-(1 - 0.5)))
    np.testing.assert_allclose(grads["diffeqx"], grads["diffrax"], rtol=1e-10)
    np.testing.assert_allclose(grads["diffeqx"], finite_difference, rtol=1e-5)
    # (A step time is not a jump: the discontinuity costs a little accuracy.)
    np.testing.assert_allclose(grads["diffeqx"], exact, rtol=1e-5)


def test_a_controller_stepped_by_hand_with_python_numbers_matches_diffrax():
    # The controller protocol called directly (as a hand-written stepping loop
    # does), with Python floats for the times, state and error: diffeqx's PID
    # controller read `.dtype` from them and failed.
    proposals = {}
    for name, lib in {"diffeqx": diffeqx, "diffrax": diffrax}.items():
        pid = lib.PIDController(rtol=0, atol=1.0)
        inner = lib.ClipStepSizeController(pid, jump_ts=[3.0, 13.0], step_ts=[23.0])
        outer = lib.ClipStepSizeController(inner, step_ts=[2.0, 13.0], jump_ts=[23.0])
        terms = lib.ODETerm(lambda t, y, args: -y)
        _, state = outer.init(
            terms, -1.0, 0.0, 0.0, 4.0, None, lambda terms, t, y, args: -y, 5
        )
        seen = []
        for t0, t1 in [(0.0, 1.0), (1.0, 2.0), (10.0, 11.0), (11.0, 12.5)]:
            _, next_t0, next_t1, jump, state, _ = outer.adapt_step_size(
                t0, t1, 0.0, 0.0, None, 0.0, 5, state
            )
            seen.append((float(next_t0), float(next_t1), bool(jump)))
        proposals[name] = seen
    assert proposals["diffeqx"] == proposals["diffrax"]


@pytest.mark.parametrize("y0", [None, {}], ids=["None", "empty-dict"])
def test_an_empty_state_with_an_adaptive_controller_steps_as_in_diffrax(y0):
    # No error to control: every step is accepted and the next grows by the largest
    # factor. diffeqx refused it (the empty error estimate came back as `None`).
    sols = {
        lib.__name__: lib.diffeqsolve(
            lib.ODETerm(lambda t, y, args: y),
            lib.Tsit5(),
            0.0,
            1.0,
            0.01,
            y0,
            saveat=lib.SaveAt(steps=True),
            stepsize_controller=lib.PIDController(rtol=1e-5, atol=1e-8),
        )
        for lib in (diffeqx, diffrax)
    }
    ours, theirs = sols["diffeqx"], sols["diffrax"]
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert int(ours.stats[key]) == int(theirs.stats[key]), key
    np.testing.assert_array_equal(np.asarray(ours.ts), np.asarray(theirs.ts))


@pytest.mark.parametrize(
    "kwargs",
    [
        lambda lib: dict(saveat=lib.SaveAt(ts=[0.0])),
        lambda lib: dict(saveat=lib.SaveAt(ts=[3.0])),
        lambda lib: dict(
            dt0=None, stepsize_controller=lib.StepTo(ts=[0.1, 0.8, 0.5, 1.1])
        ),
    ],
    ids=["save-before-t0", "save-after-t1", "step-to-out-of-order"],
)
def test_unusable_times_raise_an_error_diffraxs_handlers_catch(kwargs):
    # Diffrax raises a RuntimeError while the solve runs; diffeqx raises at the
    # call, an error that is both a ValueError and a RuntimeError.
    for lib in (diffeqx, diffrax):
        # (diffeqx checks `StepTo`'s times when it is created.)
        with pytest.raises(RuntimeError):
            arguments = dict(dt0=0.1) | kwargs(lib)
            lib.diffeqsolve(
                lib.ODETerm(lambda t, y, args: -y),
                lib.Dopri5(),
                0.1,
                1.1,
                y0=jnp.array([2.1]),
                **arguments,
            )


def _constant_step_stats(lib, how):
    term = lib.ODETerm(lambda t, y, args: -y)
    solver = lib.Euler() if how == "euler" else lib.Tsit5()

    def stats(y0):
        sol = lib.diffeqsolve(term, solver, 0.0, 1.0, 0.1, y0)
        return sol.ys[-1, 0], sol.stats

    y0 = jnp.ones(1)
    if how == "grad":
        return jax.grad(stats, has_aux=True)(y0)[1]
    if how == "vmap":
        return jax.vmap(stats)(jnp.ones((2, 1)))[1]
    return (jax.jit(stats) if how == "jit" else stats)(y0)[1]


@pytest.mark.parametrize("how", ["call", "jit", "grad", "vmap", "euler"])
def test_step_counts_are_weakly_typed_as_in_diffrax(how):
    # The counters start at Python 0 in both libraries; diffeqx's constant-step
    # path updated them with integer arrays, which made them strongly typed, so
    # that under strict dtype promotion `num_steps * float32` raised where Diffrax's
    # result is a float32.
    ours, theirs = (_constant_step_stats(lib, how) for lib in (diffeqx, diffrax))
    for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
        assert jax.typeof(ours[key]).weak_type == jax.typeof(theirs[key]).weak_type
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]))
    with jax.numpy_dtype_promotion("strict"):
        scaled = ours["num_steps"] * jnp.float32(0.5)
    assert scaled.dtype == jnp.float32

"""The solver protocol as a public interface: the user-written solver of
`examples/custom_solver.py` (its vector field takes the step size) integrates
correctly with constant and adaptive steps; `solver.init`/`solver.step` in a plain
Python loop reproduce `diffeqsolve`; and a solve resumed from a previous solve's
`solver_state`, `controller_state` and `made_jump` gives the answer of one solve."""

import contextlib
import functools
import importlib
import io
import pathlib
import sys
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@functools.cache
def _example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module("custom_solver")
    finally:
        sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def example():
    return _example()


@pytest.fixture(scope="module")
def example_output(example):
    # Running the example compiles the solves that the tests below reuse.
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        example.main()
    return buffer.getvalue()


# ---- the example's step-size-aware solver -----------------------------------------


def test_custom_solver_example_runs_and_reports(example_output):
    assert "Constant steps" in example_output
    assert "Adaptive steps" in example_output
    assert "max |difference| = 0.0e+00" in example_output


def test_step_size_aware_solver_converges_at_order_2_with_constant_steps(
    example, example_output
):
    errors = [example.final_error(example.solve_constant(dt)) for dt in (0.1, 0.05)]
    assert errors[0] < 1e-3
    assert abs(np.log2(errors[0] / errors[1]) - 2) <= 0.2


def test_step_size_aware_solver_is_adaptive_under_pid(example, example_output):
    errors, steps = [], []
    for rtol in (1e-4, 1e-6):
        sol = example.solve_adaptive(rtol, rtol)
        assert dfx.is_successful(sol.result)
        errors.append(example.final_error(sol))
        steps.append(int(sol.stats["num_steps"]))
    assert errors[0] < 1e-2 and errors[1] < 1e-4
    assert errors[1] < errors[0] / 10
    assert steps[1] > steps[0]


def test_step_size_aware_solver_integrates_backwards_in_time(example):
    # From the exact value at T1 back to t = 0: the field must be told the signed
    # step, and the solver asks the term for it.
    t1 = example.T1
    sol = dfx.diffeqsolve(
        example.TERM,
        example.StepSizeAwareEuler(),
        t1,
        0.0,
        -0.05,
        example.exact_solution(t1),
    )
    np.testing.assert_allclose(sol.ys[-1], example.Y0, atol=1e-4)


def test_step_size_aware_solver_reads_the_step_size_it_is_used_for(example):
    # One step by hand against the second-order Taylor step written out in full.
    solver, term = example.StepSizeAwareEuler(), example.TERM
    t0, dt, y0 = jnp.asarray(0.3), 0.2, example.Y0
    y1, y_error, _, _, result = solver.step(term, t0, t0 + dt, y0, None, None, False)
    assert result == dfx.RESULTS.successful

    def taylor(t, y, h):
        f = np.cos(t) * y * (1 - y)
        df_dt = -np.sin(t) * y * (1 - y) + np.cos(t) * (1 - 2 * y) * f
        return y + h * f + 0.5 * h**2 * df_dt

    y0_np = np.asarray(y0)
    one_step = taylor(0.3, y0_np, dt)
    two_halves = taylor(0.4, taylor(0.3, y0_np, dt / 2), dt / 2)
    np.testing.assert_allclose(y1, two_halves, rtol=1e-14)
    np.testing.assert_allclose(y_error, (two_halves - one_step) / 3, rtol=1e-9)


# ---- manual stepping ---------------------------------------------------------------


def test_manual_loop_of_the_example_solver_equals_diffeqsolve(example, example_output):
    ts, ys = example.step_by_hand(
        example.StepSizeAwareEuler(), example.TERM, 0.0, example.T1, 0.125, example.Y0
    )
    sol = example.solve_constant(0.125, saveat=dfx.SaveAt(steps=True))
    num_steps = int(sol.stats["num_steps"])
    assert num_steps == len(ts) == 80
    np.testing.assert_array_equal(ts, sol.ts[:num_steps])
    np.testing.assert_array_equal(ys, sol.ys[:num_steps])


def test_manual_loop_of_tsit5_threads_its_solver_state_like_diffeqsolve(example):
    # Tsit5 carries its last stage from step to step (first-same-as-last).
    term = dfx.ODETerm(example.logistic)
    ts, ys = example.step_by_hand(dfx.Tsit5(), term, 0.0, 2.0, 0.125, example.Y0)
    sol = dfx.diffeqsolve(
        term, dfx.Tsit5(), 0.0, 2.0, 0.125, example.Y0, saveat=dfx.SaveAt(steps=True)
    )
    # The same steps; the last bit may differ, as a constant-step `diffeqsolve`
    # combines the stages with fused sums and `step` on its own with dot products
    # (tests/test_stage_arithmetic.py).
    np.testing.assert_allclose(ys, sol.ys[:16], rtol=1e-14, atol=0)
    np.testing.assert_allclose(ys[-1], example.exact_solution(2.0), rtol=1e-6)


# ---- resuming a solve ----------------------------------------------------------------


class AdamsBashforth2(dfx.AbstractSolver):
    """Two-step Adams–Bashforth (variable step), started by one Heun step. Its state
    (the previous slope and step size) cannot be recomputed from `(t, y)`, so a
    resumed solve matches one solve only if the state is really carried over."""

    term_structure: ClassVar = dfx.ODETerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 2

    def init(self, terms, t0, t1, y0, args):
        slope = terms.vf(t0, y0, args)
        no_step = jnp.zeros((), jnp.result_type(t0))
        return jnp.zeros_like(slope), no_step, jnp.asarray(False)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        previous_slope, previous_dt, started = solver_state
        started = started & ~jnp.asarray(made_jump)
        dt = t1 - t0
        slope = terms.vf(t0, y0, args)
        ratio = dt / jnp.where(started, previous_dt, 1.0)
        adams = y0 + dt * ((1 + ratio / 2) * slope - (ratio / 2) * previous_slope)
        heun = y0 + dt / 2 * (slope + terms.vf(t1, y0 + dt * slope, args))
        y1 = jnp.where(started, adams, heun)
        new_state = (slope, dt, jnp.asarray(True))
        return y1, None, dict(y0=y0, y1=y1), new_state, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


_RESUMABLE = dfx.SaveAt(
    t1=True, solver_state=True, controller_state=True, made_jump=True
)


def _resume(solve, pieces, y0):
    """Solves over consecutive `pieces` [(t0, t1), ...], each starting from the
    previous one's final state and internal states."""
    y, states = y0, {}
    for t0, t1 in pieces:
        sol = solve(jnp.asarray(t0), jnp.asarray(t1), y, **states)
        y = sol.ys[-1]
        states = dict(
            solver_state=sol.solver_state,
            controller_state=sol.controller_state,
            made_jump=sol.made_jump,
        )
    return y, sol


@pytest.mark.parametrize("solver", [dfx.Tsit5(), AdamsBashforth2()], ids=type)
def test_resume_with_constant_steps_on_the_grid_equals_one_solve_exactly(
    example, solver
):
    term, dt = dfx.ODETerm(example.logistic), 0.125

    @eqx.filter_jit
    def solve(t0, t1, y0, **states):
        return dfx.diffeqsolve(
            term, solver, t0, t1, dt, y0, saveat=_RESUMABLE, **states
        )

    one = solve(jnp.asarray(0.0), jnp.asarray(3.0), example.Y0).ys[-1]
    resumed, last = _resume(solve, [(0.0, 1.0), (1.0, 2.25), (2.25, 3.0)], example.Y0)
    np.testing.assert_array_equal(resumed, one)
    # Constant steps never jump: `False` itself, as in Diffrax.
    assert last.made_jump is False
    if isinstance(solver, AdamsBashforth2):
        # Restarting without the state (a fresh Heun start) gives another answer.
        y_middle = _resume(solve, [(0.0, 1.0)], example.Y0)[0]
        restarted = solve(jnp.asarray(1.0), jnp.asarray(3.0), y_middle).ys[-1]
        assert np.max(np.abs(restarted - one)) > 1e-7


def test_resume_under_pid_controller_matches_one_solve_to_tolerance(example):
    term, rtol = dfx.ODETerm(example.logistic), 1e-8

    @eqx.filter_jit
    def solve(t0, t1, y0, **states):
        return dfx.diffeqsolve(
            term,
            dfx.Tsit5(),
            t0,
            t1,
            None,
            y0,
            saveat=_RESUMABLE,
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            **states,
        )

    one = solve(jnp.asarray(0.0), jnp.asarray(5.0), example.Y0)
    resumed, last = _resume(solve, [(0.0, 2.0), (2.0, 5.0)], example.Y0)
    assert dfx.is_successful(last.result)
    exact = example.exact_solution(5.0)
    np.testing.assert_allclose(one.ys[-1], exact, rtol=100 * rtol)
    np.testing.assert_allclose(resumed, exact, rtol=100 * rtol)
    np.testing.assert_allclose(resumed, one.ys[-1], rtol=100 * rtol)

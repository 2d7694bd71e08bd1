"""User-written solvers: subclasses of AbstractSolver / AbstractAdaptiveSolver plug into
diffeqsolve unchanged, and may read the step size t1 - t0 inside `step`."""

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from _user_solvers import HandWrittenEuler, heun_euler


class ExponentialEuler(dfx.AbstractSolver):
    """Exponential Euler for y' = -rate * y + N(t, y): the linear part is integrated
    exactly, so the step depends on the step size through exp(-rate * dt), not just
    linearly. The term holds N; `rate` is configuration held by the solver."""

    rate: float
    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        dt = t1 - t0
        decay = jnp.exp(-self.rate * dt)
        phi1 = (
            -jnp.expm1(-self.rate * dt) / self.rate
        )  # integral of exp(-rate s), 0..dt
        nonlinear = terms.vf(t0, y0, args)
        y1 = jax.tree_util.tree_map(lambda y, n: decay * y + phi1 * n, y0, nonlinear)
        dense_info = dict(y0=y0, y1=y1)
        return y1, None, dense_info, None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        nonlinear = terms.vf(t0, y0, args)
        return jax.tree_util.tree_map(lambda y, n: -self.rate * y + n, y0, nonlinear)


_DECAY = dfx.ODETerm(lambda t, y, args: -args * y)


def test_hand_written_euler_reproduces_the_euler_recursion_exactly():
    dt, rate = 0.05, 1.3
    y0 = jnp.array([1.0, -2.0])
    sol = dfx.diffeqsolve(
        _DECAY,
        HandWrittenEuler(),
        0.0,
        1.0,
        dt,
        y0,
        rate,
        saveat=dfx.SaveAt(steps=True),
    )
    num_steps = 20
    assert int(sol.stats["num_steps"]) == num_steps
    # y_{k+1} = (1 - rate * dt) y_k
    expected = (1 - rate * dt) ** np.arange(1, num_steps + 1)[:, None] * np.asarray(y0)
    np.testing.assert_allclose(sol.ys[:num_steps], expected, rtol=1e-12)


def test_hand_written_euler_saves_between_steps_by_its_linear_interpolation():
    dt, rate = 0.25, 1.0
    ts = jnp.array([0.1, 0.3, 0.5, 0.9, 1.0])
    sol = dfx.diffeqsolve(
        _DECAY,
        HandWrittenEuler(),
        0.0,
        1.0,
        dt,
        jnp.array([1.0]),
        rate,
        saveat=dfx.SaveAt(ts=ts),
    )
    grid = np.arange(5) * dt
    grid_values = (1 - rate * dt) ** np.arange(5)
    np.testing.assert_allclose(
        sol.ys[:, 0], np.interp(ts, grid, grid_values), rtol=1e-12
    )


def test_hand_written_euler_converges_at_order_1():
    errors = []
    for dt in (0.02, 0.01):
        sol = dfx.diffeqsolve(_DECAY, HandWrittenEuler(), 0.0, 1.0, dt, 1.0, 1.0)
        errors.append(abs(float(sol.ys[0]) - np.exp(-1.0)))
    order = np.log2(errors[0] / errors[1])
    assert abs(order - 1) <= 0.2


def test_step_size_dependent_solver_is_exact_for_constant_forcing():
    # y' = -a y + b has y = b / a + (y0 - b / a) exp(-a t); exponential Euler is exact
    # for constant b at any step size, so coarse steps must reproduce it to rounding.
    rate, forcing = 3.0, jnp.array([0.5, -1.0])
    y0 = jnp.array([2.0, 1.0])
    ts = jnp.array([0.25, 1.0, 1.75, 3.0])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, b: jnp.broadcast_to(b, y.shape)),
        ExponentialEuler(rate=rate),
        0.0,
        3.0,
        0.25,
        y0,
        forcing,
        saveat=dfx.SaveAt(ts=ts),
    )
    steady = np.asarray(forcing) / rate
    expected = (
        steady + (np.asarray(y0) - steady) * np.exp(-rate * np.asarray(ts))[:, None]
    )
    np.testing.assert_allclose(sol.ys, expected, rtol=1e-12)


def test_step_size_dependent_solver_handles_nonlinear_forcing_at_order_1():
    # y' = -y + sin(y): not exact any more, but first order convergence must remain.
    # Reference: the same problem solved by Tsit5 to tight tolerance.
    term = dfx.ODETerm(lambda t, y, args: jnp.sin(y))
    reference = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y + jnp.sin(y)),
        dfx.Tsit5(),
        0.0,
        2.0,
        0.01,
        jnp.array([1.5]),
        stepsize_controller=dfx.PIDController(rtol=1e-12, atol=1e-12),
    ).ys[0, 0]
    errors = []
    for dt in (0.04, 0.02):
        sol = dfx.diffeqsolve(
            term, ExponentialEuler(rate=1.0), 0.0, 2.0, dt, jnp.array([1.5])
        )
        errors.append(abs(float(sol.ys[0, 0] - reference)))
    order = np.log2(errors[0] / errors[1])
    assert abs(order - 1) <= 0.2


def _solve_heun_euler(rtol, dt0=0.1):
    return dfx.diffeqsolve(
        _DECAY,
        heun_euler(),
        0.0,
        5.0,
        dt0,
        jnp.array([1.0, 3.0]),
        0.7,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol * 1e-3),
    )


def test_adaptive_custom_solver_works_with_pid_controller():
    exact = np.exp(-0.7 * 5.0) * np.array([1.0, 3.0])
    errors, steps = [], []
    for rtol in (1e-3, 1e-5):
        sol = _solve_heun_euler(rtol)
        assert dfx.is_successful(sol.result)
        errors.append(np.max(np.abs(np.asarray(sol.ys[0]) - exact) / exact))
        steps.append(int(sol.stats["num_steps"]))
        # Global error of a controlled second-order method: a modest multiple of rtol.
        assert errors[-1] <= 50 * rtol
    assert errors[1] < errors[0]
    assert steps[1] > steps[0]


def test_adaptive_custom_solver_error_estimate_drives_rejections():
    # A first step of 2.0 is far too large for rtol 1e-5: the embedded estimate must
    # reject it, and the solve must still succeed accurately.
    sol = _solve_heun_euler(1e-5, dt0=2.0)
    assert int(sol.stats["num_rejected_steps"]) > 0
    exact = np.exp(-0.7 * 5.0) * np.array([1.0, 3.0])
    np.testing.assert_allclose(sol.ys[0], exact, rtol=5e-4)


def test_abstract_solver_returning_an_error_estimate_runs_adaptively():
    assert not isinstance(heun_euler(base="AbstractSolver"), dfx.AbstractAdaptiveSolver)
    exact = np.exp(-0.7 * 5.0) * np.array([1.0, 3.0])
    sol = dfx.diffeqsolve(
        _DECAY,
        heun_euler(base="AbstractSolver"),
        0.0,
        5.0,
        2.0,
        jnp.array([1.0, 3.0]),
        0.7,
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-8),
    )
    assert dfx.is_successful(sol.result)
    assert int(sol.stats["num_rejected_steps"]) > 0
    np.testing.assert_allclose(sol.ys[0], exact, rtol=5e-4)
    # The same steps as the AbstractAdaptiveSolver subclass: only the base differs.
    reference = _solve_heun_euler(1e-5, dt0=2.0)
    assert int(sol.stats["num_steps"]) == int(reference.stats["num_steps"])


def test_abstract_solver_without_error_estimate_is_refused_by_pid():
    with pytest.raises(ValueError, match="HandWrittenEuler returns no error estimate"):
        dfx.diffeqsolve(
            _DECAY,
            HandWrittenEuler(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            1.0,
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
        )


class LieSplitEuler(dfx.AbstractSolver):
    """Lie splitting for `y' = f(t, y) + g(t, y)` given as `MultiTerm(F, G)`: an Euler
    step with `F` at the start, then one with `G` at the end. Reads the two parts as
    `terms.terms`, as IMEX and SDE solvers do."""

    term_structure: ClassVar = dfx.MultiTerm[tuple[dfx.ODETerm, dfx.AbstractTerm]]
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        assert isinstance(terms, dfx.MultiTerm) and len(terms.terms) == 2
        first, second = terms.terms
        y_mid = y0 + first.vf_prod(t0, y0, args, first.contr(t0, t1))
        y1 = y_mid + second.vf_prod(t1, y_mid, args, second.contr(t0, t1))
        return y1, None, dict(y0=y0, y1=y1), None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


@pytest.mark.parametrize("t0, t1, dt", [(0.0, 1.0, 0.25), (1.0, 0.0, -0.25)])
def test_multiterm_solver_reads_its_parts_in_both_time_directions(t0, t1, dt):
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -y), dfx.ODETerm(lambda t, y, args: jnp.cos(t))
    )
    sol = dfx.diffeqsolve(
        terms,
        LieSplitEuler(),
        t0,
        t1,
        dt,
        jnp.array(2.0),
        saveat=dfx.SaveAt(steps=True),
    )
    # The splitting recursion in the user's time, dt negative when backwards.
    y, expected = 2.0, []
    for n in range(4):
        t_next = t0 + (n + 1) * dt
        y = y + dt * (-y)
        y = y + dt * np.cos(t_next)
        expected.append(y)
    np.testing.assert_allclose(sol.ys[:4], expected, rtol=1e-14)


def test_multiterm_solver_names_the_part_that_does_not_fit():
    ode = dfx.ODETerm(lambda t, y, args: -y)
    with pytest.raises(ValueError, match=r"`terms.terms\[0\]` expected ODETerm"):
        dfx.diffeqsolve(
            dfx.MultiTerm(
                dfx.ControlTerm(lambda t, y, args: y, lambda a, b: b - a), ode
            ),
            LieSplitEuler(),
            0.0,
            1.0,
            0.25,
            jnp.array(2.0),
        )

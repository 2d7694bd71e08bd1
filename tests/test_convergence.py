"""Empirical convergence order of every explicit Runge--Kutta solver, and of the
other explicit fixed-step ODE solvers (`LeapfrogMidpoint`, and `SemiImplicitEuler`
on the same problem split into position and velocity).

One parametrised harness: each solver integrates a forced harmonic oscillator with
a closed-form solution at several constant step sizes, and the slope of
log(error) against log(step size) is compared with the method's order. Adding a
solver is one line in `CASES`.

The dense-output tests evaluate `sol.evaluate` / `sol.derivative` at the same
fractional position inside every step, so that the error measured at each step
size is comparable, and compare against the closed form.
"""

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

T_END = 10.0

# Relative positions inside a step at which dense output is checked. Two values, so
# that an interpolant that happens to be exact at one point cannot hide its error.
_THETAS = (0.37, 0.81)


def _vector_field(t, y, args):
    # x'' = -x + cos(2t), written as a first-order system in (x, x').
    del args
    position, velocity = y[0], y[1]
    return jnp.stack([velocity, -position + jnp.cos(2 * t)])


_Y0 = jnp.array([1.0, 0.0])


def _exact_solution(t):
    position = jnp.cos(t) + (jnp.cos(t) - jnp.cos(2 * t)) / 3
    velocity = -jnp.sin(t) + (-jnp.sin(t) + 2 * jnp.sin(2 * t)) / 3
    return jnp.stack([position, velocity])


def _exact_derivative(t):
    return _vector_field(t, _exact_solution(t), None)


# The same problem for a partitioned solver: the position driven by the velocity,
# the velocity by the position.
_PARTITIONED_TERMS = (
    dfx.ODETerm(lambda t, velocity, args: velocity),
    dfx.ODETerm(lambda t, position, args: -position + jnp.cos(2 * t)),
)


# A user-defined method: classical fourth-order Runge--Kutta is nothing but a tableau.
# It has no embedded error estimate, so `b_error` is zero (it is only ever used with
# constant steps).
_CLASSICAL_RK4_TABLEAU = dfx.ButcherTableau(
    c=np.array([1 / 2, 1 / 2, 1.0]),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    b_error=np.zeros(4),
    a_lower=(
        np.array([1 / 2]),
        np.array([0.0, 1 / 2]),
        np.array([0.0, 0.0, 1.0]),
    ),
)


class ClassicalRK4(dfx.AbstractERK):
    tableau: ClassVar[dfx.ButcherTableau] = _CLASSICAL_RK4_TABLEAU
    interpolation_cls: ClassVar = dfx.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        del terms
        return 4


# Dopri8's dense output is specified to be (at least) seventh order, as Hairer's
# DOP853 dense output (three extra stages) is. Diffrax 0.7.2's Dopri8 interpolant
# uses the 14 main stages only and measures sixth order here (derivative: fifth).
_DOPRI8_DENSE_ORDER = 6


@dataclasses.dataclass(frozen=True)
class SolverCase:
    solver: dfx.AbstractSolver
    order: int
    # Step counts over [0, T_END]: inside the asymptotic regime, with the error of
    # the finest well above float64 roundoff.
    n_steps: tuple[int, ...]
    # Global order of `sol.evaluate` between steps: min(order, interpolant order+1).
    dense_order: int
    # Global order of `sol.derivative` between steps (a lower bound).
    derivative_order: int
    # Whether the solver takes the problem as `_PARTITIONED_TERMS`, with the state
    # `(position, velocity)`.
    partitioned: bool = False

    @property
    def name(self):
        return type(self.solver).__name__

    def terms_and_y0(self):
        if self.partitioned:
            return _PARTITIONED_TERMS, (_Y0[0], _Y0[1])
        return dfx.ODETerm(_vector_field), _Y0


def _stacked(y):
    """A state as the `(position, velocity)` array, whichever form it has."""
    return jnp.stack(y, axis=-1) if isinstance(y, tuple) else y


# Cubic Hermite interpolants built from the first and last stages: when the last
# stage approximates the slope at t1 well (FSAL for Bosh3, c=1 for Heun and RK4) the
# values converge at min(p, 4) and the derivative at min(p, 3). Midpoint's and
# Ralston's last stage sits at c<1, so their slope at t1 is only O(h) accurate: the
# values still converge at second order, the derivative only at first.
CASES = [
    SolverCase(dfx.Euler(), 1, (512, 1024, 2048), 1, 1),
    SolverCase(dfx.Heun(), 2, (64, 128, 256), 2, 2),
    SolverCase(dfx.Midpoint(), 2, (64, 128, 256), 2, 1),
    SolverCase(dfx.Ralston(), 2, (64, 128, 256), 2, 1),
    SolverCase(dfx.Bosh3(), 3, (64, 128, 256), 3, 3),
    SolverCase(ClassicalRK4(), 4, (64, 128, 256), 4, 3),
    SolverCase(dfx.Tsit5(), 5, (128, 256, 512), 5, 4),
    SolverCase(dfx.Dopri5(), 5, (128, 256, 512), 5, 4),
    SolverCase(
        dfx.Dopri8(), 8, (16, 32, 64), _DOPRI8_DENSE_ORDER, _DOPRI8_DENSE_ORDER - 1
    ),
    # Linear dense output: values at second order, the derivative (a difference
    # quotient over the step) at first.
    SolverCase(dfx.LeapfrogMidpoint(), 2, (64, 128, 256), 2, 1),
    SolverCase(dfx.SemiImplicitEuler(), 1, (512, 1024, 2048), 1, 1, True),
]

_ORDER_TOLERANCE = 0.2


def _fitted_order(n_steps, errors):
    step_sizes = T_END / np.asarray(n_steps, dtype=np.float64)
    slope, _ = np.polyfit(np.log(step_sizes), np.log(np.asarray(errors)), 1)
    return slope


def _case_id(case):
    return case.name


@functools.cache
def _endpoint_errors(case_index):
    case = CASES[case_index]
    terms, y0 = case.terms_and_y0()

    @jax.jit
    def endpoint_error(dt0):
        sol = dfx.diffeqsolve(terms, case.solver, 0.0, T_END, dt0, y0)
        final = _stacked(jax.tree.map(lambda ys: ys[-1], sol.ys))
        return jnp.max(jnp.abs(final - _exact_solution(T_END)))

    return [float(endpoint_error(T_END / n)) for n in case.n_steps]


@functools.cache
def _dense_errors(case_index):
    """Max error of `evaluate` and of `derivative` at fixed positions in every step."""
    case = CASES[case_index]
    terms, y0 = case.terms_and_y0()
    num_queries = max(case.n_steps)

    @jax.jit
    def dense_errors(n):
        dt0 = T_END / n.astype(jnp.float64)
        sol = dfx.diffeqsolve(
            terms, case.solver, 0.0, T_END, dt0, y0, saveat=dfx.SaveAt(dense=True)
        )
        # Every step is visited (indices repeat when n < num_queries).
        step_index = (jnp.arange(num_queries) % n).astype(jnp.float64)
        ts = jnp.concatenate([(step_index + theta) * dt0 for theta in _THETAS])
        values = _stacked(jax.vmap(sol.evaluate)(ts))
        value_error = jnp.max(jnp.abs(values - jax.vmap(_exact_solution)(ts)))
        derivatives = _stacked(jax.vmap(sol.derivative)(ts))
        derivative_error = jnp.max(
            jnp.abs(derivatives - jax.vmap(_exact_derivative)(ts))
        )
        return value_error, derivative_error

    errors = [tuple(map(float, dense_errors(n))) for n in case.n_steps]
    value_errors, derivative_errors = zip(*errors, strict=True)
    return list(value_errors), list(derivative_errors)


_INDEXED_CASES = [pytest.param(i, id=_case_id(case)) for i, case in enumerate(CASES)]
# Dense output: Heun's interpolant is built as Bosh3's and RK4's (last stage at c=1),
# Ralston's as Midpoint's (c<1); those two, a compilation each, carry the `slow`
# marker.
_DENSE_CASES = [
    pytest.param(
        i,
        id=_case_id(case),
        marks=(pytest.mark.slow,) if case.name in ("Heun", "Ralston") else (),
    )
    for i, case in enumerate(CASES)
]


@pytest.mark.parametrize("case_index", _INDEXED_CASES)
def test_solver_reports_its_order(case_index):
    case = CASES[case_index]
    assert case.solver.order(case.terms_and_y0()[0]) == case.order


@pytest.mark.parametrize("case_index", _INDEXED_CASES)
def test_solver_converges_at_its_order(case_index):
    case = CASES[case_index]
    errors = _endpoint_errors(case_index)
    assert all(np.isfinite(errors)), errors
    # The finest step must stay clear of roundoff, or the fit means nothing.
    assert min(errors) > 1e-13, errors
    assert errors == sorted(errors, reverse=True), errors
    fitted = _fitted_order(case.n_steps, errors)
    assert abs(fitted - case.order) <= _ORDER_TOLERANCE, (
        f"{case.name}: fitted order {fitted:.3f}, expected {case.order}; "
        f"errors {errors}"
    )


@pytest.mark.parametrize("case_index", _DENSE_CASES)
def test_dense_output_converges_between_steps(case_index):
    case = CASES[case_index]
    value_errors, _ = _dense_errors(case_index)
    assert min(value_errors) > 1e-13, value_errors
    fitted = _fitted_order(case.n_steps, value_errors)
    assert fitted >= case.dense_order - _ORDER_TOLERANCE, (
        f"{case.name}: dense output fitted order {fitted:.3f}, expected at least "
        f"{case.dense_order}; errors {value_errors}"
    )
    # Interpolation between steps costs at most a small factor over the solution
    # accuracy at step ends.
    endpoint_errors = _endpoint_errors(case_index)
    if case.dense_order >= case.order:
        assert value_errors[-1] <= 20 * max(endpoint_errors[-1], 1e-12)


@pytest.mark.parametrize("case_index", _DENSE_CASES)
def test_dense_derivative_converges_between_steps(case_index):
    case = CASES[case_index]
    _, derivative_errors = _dense_errors(case_index)
    assert derivative_errors == sorted(derivative_errors, reverse=True)
    fitted = _fitted_order(case.n_steps, derivative_errors)
    assert fitted >= case.derivative_order - _ORDER_TOLERANCE, (
        f"{case.name}: derivative fitted order {fitted:.3f}, expected at least "
        f"{case.derivative_order}; errors {derivative_errors}"
    )


def test_classical_rk4_from_tableau_matches_hand_written_step():
    # The user-defined tableau must produce exactly the textbook RK4 update.
    def vector_field(t, y, args):
        return jnp.sin(t) * y + t

    t0, dt, y0 = 0.3, 0.1, 0.7
    k1 = vector_field(t0, y0, None)
    k2 = vector_field(t0 + dt / 2, y0 + dt / 2 * k1, None)
    k3 = vector_field(t0 + dt / 2, y0 + dt / 2 * k2, None)
    k4 = vector_field(t0 + dt, y0 + dt * k3, None)
    expected = y0 + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field), ClassicalRK4(), t0, t0 + dt, dt, jnp.asarray(y0)
    )
    np.testing.assert_allclose(sol.ys[-1], expected, rtol=1e-14, atol=1e-14)

"""How the Runge–Kutta engine combines its stages.

With an adaptive controller every stage combination is one dot product of a weight
row with the stage buffer: the rounding is Diffrax's, bit for bit, so that accept /
reject decisions agree (tests/compat/test_error_estimate.py). With constant steps no
decision depends on the last bit, and the stages are combined by elementwise sums
that XLA fuses with the vector field: no dot product is left in the program (on CPU
a dot product is a separate runtime call, and it keeps a small solve's loop from
being compiled into one kernel: 10,000 RK4 steps ran 8-10x slower with them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from _jaxpr import equations
from diffeqx._solver.base import step_always_accepted, tracing_step


def _field(t, y, args):
    x, z = y[0], y[1]
    return jnp.stack([args * x - 0.02 * x * z, -0.4 * z + 0.02 * x * z])


def _primitives(fn, *args) -> set[str]:
    return {eqn.primitive.name for eqn in equations(fn, *args)}


def _solve(solver, controller, dt0=0.01):
    # `SaveAt(t1=True)`: no interpolation (whose coefficients are matrix products).
    # `t1` is traced, so the solve runs as the general while loop.
    def run(y0, args, t1):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_field),
            solver,
            0.0,
            t1,
            dt0,
            y0,
            args=args,
            stepsize_controller=controller,
        )
        return sol.ys

    return run


_ARGUMENTS = (jnp.array([10.0, 10.0]), jnp.asarray(0.1), jnp.asarray(1.0))


@pytest.mark.parametrize("solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Heun()], ids=str)
def test_constant_steps_combine_stages_without_dot_products(solver):
    run = _solve(solver, dfx.ConstantStepSize())
    assert "dot_general" not in _primitives(run, *_ARGUMENTS)
    run = _solve(solver, dfx.StepTo(ts=jnp.linspace(0.0, 1.0, 101)), dt0=None)
    assert "dot_general" not in _primitives(run, *_ARGUMENTS)


@pytest.mark.parametrize("solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Heun()], ids=str)
def test_adaptive_steps_combine_stages_with_dot_products(solver):
    run = _solve(solver, dfx.PIDController(rtol=1e-6, atol=1e-6))
    assert "dot_general" in _primitives(run, *_ARGUMENTS)


@pytest.mark.parametrize("solver", [dfx.Tsit5(), dfx.Dopri5(), dfx.Bosh3()], ids=str)
def test_both_stage_arithmetics_agree_to_rounding(solver):
    # The same steps traced both ways differ by rounding only.
    term = dfx.ODETerm(_field)
    y0 = jnp.array([10.0, 10.0], jnp.float64)
    args = jnp.asarray(0.1, jnp.float64)
    t0, t1 = jnp.asarray(0.0, jnp.float64), jnp.asarray(0.5, jnp.float64)

    def step(always_accepted):
        with tracing_step(always_accepted):
            state = solver.init(term, t0, t1, y0, args)
            return solver.step(term, t0, t1, y0, args, state, False)

    exact = step(False)
    fused = step(True)
    for a, b in zip(
        jax.tree.leaves(exact[:3]), jax.tree.leaves(fused[:3]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-13, atol=1e-13)


def test_always_accepted_only_inside_a_constant_step_solve():
    assert not step_always_accepted()
    seen = []

    def field(t, y, args):
        seen.append(step_always_accepted())
        return -y

    for controller, expected in (
        (dfx.ConstantStepSize(), True),
        (dfx.PIDController(rtol=1e-3, atol=1e-3), False),
    ):
        seen.clear()
        dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.ones(2),
            stepsize_controller=controller,
        )
        # The field is traced inside `step` (the stages) and outside it (the first
        # step size, first-same-as-last initialisation): the flag is set only for the
        # steps of a constant-step solve.
        assert any(seen) == expected
    assert not step_always_accepted()


class _CountingTerm(dfx.ODETerm):
    """Counts how often its vector field is traced."""

    def vf(self, t, y, args):
        _CALLS.append(t)
        return super().vf(t, y, args)


class _ScaledProductTerm(dfx.ODETerm):
    """An `ODETerm` whose product with the control is its own (here the same
    product, written differently): the stages then weight the increments."""

    def prod(self, vf, control):
        return jax.tree.map(lambda v: v * control, vf)


_CALLS: list = []


@pytest.mark.parametrize(
    "solver", [dfx.Heun(), dfx.Midpoint(), dfx.Ralston(), dfx.Bosh3(), dfx.Tsit5()]
)
def test_constant_steps_trace_the_vector_field_once_per_stage(solver):
    # The first stage's vector field is evaluated once, whether its product with
    # the step length is formed (dense output) or folded into the stage weights.
    term = _CountingTerm(_field)
    y0, args = jnp.array([10.0, 10.0]), jnp.asarray(0.1)
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.5)
    state = solver.init(term, t0, t1, y0, args)
    _CALLS.clear()
    with tracing_step(True):
        jax.eval_shape(lambda: solver.step(term, t0, t1, y0, args, state, False))
    # One trace measures the field's size (whether to loop over the stages); a
    # first-same-as-last method takes its first stage from the state.
    tableau = solver.tableau
    assert len(_CALLS) == 1 + tableau.num_stages - (1 if tableau.fsal else 0)


@pytest.mark.parametrize(
    "solver, degree",
    [(dfx.Euler(), 1), (dfx.Heun(), 2), (dfx.Midpoint(), 2), (dfx.Bosh3(), 3)],
    ids=str,
)
def test_constant_step_of_a_linear_problem_is_the_stability_polynomial(solver, degree):
    # On y' = lambda y an explicit method of s <= 3 stages and order s takes the
    # step y1 = R(lambda dt) y0, R the degree-s Taylor polynomial of exp.
    lam, dt = -0.7, 0.25
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: lam * y),
        solver,
        0.0,
        20 * dt,
        dt,
        jnp.array([1.0, -2.0]),
        stepsize_controller=dfx.ConstantStepSize(),
    )
    z = lam * dt
    growth = sum(z**k / np.prod(np.arange(1, k + 1)) for k in range(degree + 1))
    np.testing.assert_allclose(
        np.asarray(sol.ys[-1]), growth**20 * np.array([1.0, -2.0]), rtol=1e-13
    )


@pytest.mark.parametrize("solver", [dfx.Heun(), dfx.Tsit5(), dfx.Dopri8()], ids=str)
def test_constant_steps_with_an_own_product_agree_to_rounding(solver):
    # A term with its own `prod` takes the stages as increments; a plain
    # `ODETerm` folds the step length into the weights. Same steps, to rounding.
    def run(term):
        return dfx.diffeqsolve(
            term, solver, 0.0, 2.0, 0.05, jnp.array([10.0, 10.0]), args=0.1
        ).ys

    plain = run(dfx.ODETerm(_field))
    own = run(_ScaledProductTerm(_field))
    np.testing.assert_allclose(np.asarray(own), np.asarray(plain), rtol=1e-13)

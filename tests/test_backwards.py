"""Integration backwards in time (t1 < t0), with every solver and controller.

The problem is the forced oscillator x'' = -x + cos(2t), whose solution is known for
all t, integrated from t = 10 back to t = 0, so that both time-dependence and
direction matter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

T_START, T_END = 10.0, 0.0


def _vector_field(t, y, args):
    del args
    return jnp.stack([y[1], -y[0] + jnp.cos(2 * t)])


def _exact(t):
    position = jnp.cos(t) + (jnp.cos(t) - jnp.cos(2 * t)) / 3
    velocity = -jnp.sin(t) + (-jnp.sin(t) + 2 * jnp.sin(2 * t)) / 3
    return jnp.stack([position, velocity], axis=-1)


TERM = dfx.ODETerm(_vector_field)
Y_START = _exact(T_START)
Y_END = _exact(T_END)

# (solver, order, two step counts over |t1 - t0| in its asymptotic regime)
_FIXED_STEP_CASES = [
    (dfx.Euler(), 1, (1024, 2048)),
    (dfx.Heun(), 2, (128, 256)),
    (dfx.Midpoint(), 2, (128, 256)),
    (dfx.Ralston(), 2, (128, 256)),
    (dfx.Bosh3(), 3, (128, 256)),
    (dfx.Tsit5(), 5, (256, 512)),
    (dfx.Dopri5(), 5, (256, 512)),
    (dfx.Dopri8(), 8, (32, 64)),
]
ADAPTIVE_SOLVERS = [dfx.Bosh3(), dfx.Tsit5(), dfx.Dopri5(), dfx.Dopri8()]


def _name(solver):
    return type(solver).__name__


@pytest.mark.parametrize(
    "solver, order, n_steps",
    _FIXED_STEP_CASES,
    ids=[_name(case[0]) for case in _FIXED_STEP_CASES],
)
def test_backwards_fixed_step_converges_to_closed_form(solver, order, n_steps):
    @jax.jit
    def final_error(dt0):
        sol = dfx.diffeqsolve(TERM, solver, T_START, T_END, dt0, Y_START)
        assert sol.ts is not None
        return jnp.max(jnp.abs(sol.ys[-1] - Y_END)), sol.ts[-1]

    span = T_START - T_END
    results = [final_error(-span / n) for n in n_steps]
    errors = [float(error) for error, _ in results]
    for _, t_final in results:
        assert float(t_final) == T_END
    assert 1e-13 < errors[1] < errors[0] < 1e-1, errors
    fitted = np.log(errors[0] / errors[1]) / np.log(n_steps[1] / n_steps[0])
    assert abs(fitted - order) <= 0.3, (fitted, errors)


def test_backwards_euler_matches_its_recurrence_exactly():
    # Euler stepping backwards on y' = -y multiplies by (1 + h) each step.
    h = 0.125
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler(),
        1.0,
        0.0,
        -h,
        jnp.array(1.0),
        saveat=dfx.SaveAt(t0=True, steps=True),
    )
    num_saved = int(np.isfinite(np.asarray(sol.ts)).sum())
    np.testing.assert_allclose(sol.ts[:num_saved], 1.0 - h * np.arange(9))
    np.testing.assert_allclose(sol.ys[:num_saved], (1 + h) ** np.arange(9), rtol=1e-14)


@pytest.mark.parametrize(
    # Tsit5 and Dopri8 in the default run; the others backwards with constant steps
    # (test_backwards_fixed_step_converges_to_closed_form).
    "solver",
    [
        pytest.param(
            solver,
            id=_name(solver),
            marks=(pytest.mark.slow,) if _name(solver) in ("Bosh3", "Dopri5") else (),
        )
        for solver in ADAPTIVE_SOLVERS
    ],
)
def test_backwards_adaptive_matches_closed_form(solver):
    tol = 1e-8
    ts = jnp.linspace(T_START, T_END, 11)[1:]
    sol = dfx.diffeqsolve(
        TERM,
        solver,
        T_START,
        T_END,
        -0.01,
        Y_START,
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
        max_steps=16384,
    )
    assert dfx.is_successful(sol.result)
    np.testing.assert_allclose(sol.ts, ts)
    expected = _exact(ts)
    scale = float(jnp.max(jnp.abs(expected)))
    error = float(jnp.max(jnp.abs(sol.ys - expected)))
    assert error <= 100 * tol * scale, error
    stats = sol.stats
    assert int(stats["num_steps"]) == int(stats["num_accepted_steps"]) + int(
        stats["num_rejected_steps"]
    )
    assert 0 < int(stats["num_accepted_steps"]) < 16384


def test_backwards_adaptive_steps_are_saved_in_decreasing_order():
    sol = dfx.diffeqsolve(
        TERM,
        dfx.Tsit5(),
        T_START,
        T_END,
        -0.01,
        Y_START,
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
        max_steps=512,
    )
    ts = np.asarray(sol.ts)
    num_saved = int(np.isfinite(ts).sum())
    assert num_saved == int(sol.stats["num_accepted_steps"])
    assert np.isfinite(ts[:num_saved]).all()
    # Padding past the last step is infinite (its sign follows the direction).
    assert np.isinf(ts[num_saved:]).all()
    assert np.isinf(np.asarray(sol.ys[num_saved:])).all()
    assert (np.diff(ts[:num_saved]) < 0).all()
    assert ts[0] < T_START and ts[num_saved - 1] == T_END
    np.testing.assert_allclose(
        sol.ys[:num_saved], _exact(ts[:num_saved]), rtol=0, atol=1e-4
    )


def test_backwards_dense_output_and_derivative_match_closed_form():
    ts = jnp.linspace(T_START, T_END, 37)

    @jax.jit
    def dense_outputs():
        sol = dfx.diffeqsolve(
            TERM,
            dfx.Tsit5(),
            T_START,
            T_END,
            -0.01,
            Y_START,
            saveat=dfx.SaveAt(dense=True),
            stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-9),
        )
        values = jax.vmap(sol.evaluate)(ts)
        derivatives = jax.vmap(sol.derivative)(ts)
        return values, derivatives, sol.evaluate(7.0, 3.0)

    values, derivatives, increment = dense_outputs()
    np.testing.assert_allclose(values, _exact(ts), rtol=0, atol=1e-7)
    # `derivative` is dy/dt (not dy/d(-t)), whatever the direction of integration.
    exact_derivative = jax.vmap(lambda t: _vector_field(t, _exact(t), None))(ts)
    np.testing.assert_allclose(derivatives, exact_derivative, rtol=0, atol=1e-5)
    # evaluate(ta, tb) is y(tb) - y(ta), also when tb < ta.
    np.testing.assert_allclose(increment, _exact(3.0) - _exact(7.0), rtol=0, atol=1e-7)


def test_backwards_step_to_lands_on_requested_times():
    step_ts = jnp.array([T_START, 7.5, 5.0, 2.5, 1.0, T_END])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -0.1 * y),
        dfx.Tsit5(),
        T_START,
        T_END,
        None,
        jnp.array(1.0),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.StepTo(ts=step_ts),
        max_steps=8,
    )
    num_steps = len(step_ts) - 1
    assert int(sol.stats["num_accepted_steps"]) == num_steps
    np.testing.assert_array_equal(sol.ts[:num_steps], step_ts[1:])
    # Backwards, y' = -0.1 y grows like exp(0.1 (T_START - t)).
    expected = np.exp(0.1 * (T_START - np.asarray(step_ts[1:])))
    np.testing.assert_allclose(sol.ys[:num_steps], expected, rtol=1e-6)


def test_backwards_clipped_pid_controller_lands_on_step_and_jump_times():
    controller = dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-8, atol=1e-8),
        step_ts=jnp.array([7.5, 2.5]),
        jump_ts=jnp.array([5.0]),
    )
    sol = dfx.diffeqsolve(
        TERM,
        dfx.Tsit5(),
        T_START,
        T_END,
        -0.01,
        Y_START,
        saveat=dfx.SaveAt(steps=True, t1=True),
        stepsize_controller=controller,
        max_steps=1024,
    )
    ts = np.asarray(sol.ts)
    finite_ts = ts[np.isfinite(ts)]
    for landing_time in (7.5, 2.5):
        assert np.any(finite_ts == landing_time), landing_time
    # A jump is stepped up to from one side (to within a few ulps, so that the
    # vector field on either side is evaluated separately).
    assert np.min(np.abs(finite_ts - 5.0)) <= 1e-12
    np.testing.assert_allclose(
        sol.ys[np.isfinite(ts)], _exact(finite_ts), rtol=0, atol=1e-6
    )


def test_backwards_automatic_initial_step():
    sol = dfx.diffeqsolve(
        TERM,
        dfx.Dopri5(),
        T_START,
        T_END,
        None,
        Y_START,
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    np.testing.assert_allclose(sol.ts, [T_END])
    np.testing.assert_allclose(sol.ys[-1], Y_END, rtol=0, atol=1e-5)


def test_forward_then_backward_recovers_initial_state():
    y0 = jnp.array([0.3, -1.2])
    controller = dfx.PIDController(rtol=1e-10, atol=1e-10)
    forward = dfx.diffeqsolve(
        TERM, dfx.Dopri8(), 0.0, 3.0, 0.01, y0, stepsize_controller=controller
    )
    backward = dfx.diffeqsolve(
        TERM,
        dfx.Dopri8(),
        3.0,
        0.0,
        -0.01,
        forward.ys[-1],
        stepsize_controller=controller,
    )
    np.testing.assert_allclose(backward.ys[-1], y0, rtol=0, atol=1e-8)

"""Events: terminating and recorded, located by root finding, against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx

G = 9.81


def _projectile(t, y, args):
    return jnp.stack([y[1], -G])


def _ground_time(height, speed):
    return (speed + np.sqrt(speed**2 + 2 * G * height)) / G


def _height(t, y, args, **kwargs):
    return y[0]


ROOT_FINDERS = {
    "newton": optx.Newton(rtol=1e-12, atol=1e-12),
    "bisection": optx.Bisection(rtol=1e-12, atol=1e-12),
}


def _oscillator_solve(event, t1, tol, solver=None):
    """x'' = -x from x = 1, v = 0 (so x = cos t), with the given event."""
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]])),
        dfx.Tsit5() if solver is None else solver,
        0.0,
        t1,
        0.05,
        jnp.array([1.0, 0.0]),
        event=event,
        stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
    )


def _cos_zero(**kwargs):
    return dfx.Event(
        lambda t, y, args, **kw: y[0], root_finder=ROOT_FINDERS["newton"], **kwargs
    )


@pytest.mark.parametrize(
    "name",
    # Bisection against the closed form in the default run:
    # test_bisection_root_finder_under_vmap_with_members_without_event.
    [pytest.param("bisection", marks=pytest.mark.slow), "newton"],
)
def test_projectile_hits_ground_at_closed_form_time(name):
    event = dfx.Event(_height, root_finder=ROOT_FINDERS[name])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([10.0, 5.0]),
        event=event,
    )
    t_star = _ground_time(10.0, 5.0)
    assert sol.result == dfx.RESULTS.event_occurred
    assert dfx.is_event(sol.result) and dfx.is_okay(sol.result)
    assert not dfx.is_successful(sol.result)
    np.testing.assert_allclose(sol.ts[-1], t_star, rtol=0, atol=1e-10)
    # As in Diffrax, `Solution.t1` stays the `t1` asked for.
    assert float(sol.t1) == 10.0
    np.testing.assert_allclose(sol.ys[-1, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(sol.ys[-1, 1], 5.0 - G * t_star, atol=1e-9)
    assert bool(sol.event_mask)


def test_event_without_root_finder_stops_at_end_of_step():
    dt0 = 0.1
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        10.0,
        dt0,
        jnp.array([10.0, 5.0]),
        event=dfx.Event(_height),
    )
    t_star = _ground_time(10.0, 5.0)
    assert t_star <= float(sol.ts[-1]) < t_star + dt0 + 1e-12
    # The state is the solver's state at that step end: just below ground.
    assert float(sol.ys[-1, 0]) <= 0.0


def test_boolean_event_fires_when_condition_becomes_true():
    sol = jax.jit(
        lambda y0: dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            10.0,
            0.05,
            y0,
            event=dfx.Event(lambda t, y, args, **kw: y[0] < 0),
        )
    )(jnp.array([10.0, 5.0]))
    t_star = _ground_time(10.0, 5.0)
    assert sol.result == dfx.RESULTS.event_occurred
    assert t_star <= float(sol.ts[-1]) < t_star + 0.05 + 1e-12


def test_pytree_of_conditions_reports_which_fired():
    conds = {"ground": _height, "apex": lambda t, y, args, **kw: y[1]}
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([10.0, 5.0]),
        event=dfx.Event(conds, root_finder=ROOT_FINDERS["newton"]),
    )
    np.testing.assert_allclose(sol.ts[-1], 5.0 / G, atol=1e-10)
    assert bool(sol.event_mask["apex"]) and not bool(sol.event_mask["ground"])


@pytest.mark.parametrize(
    "direction, expected", [(True, 3 * np.pi / 2), (False, np.pi / 2)]
)
def test_event_direction_selects_crossings(direction, expected):
    sol = _oscillator_solve(_cos_zero(direction=direction), 10.0, 1e-10, dfx.Dopri5())
    np.testing.assert_allclose(sol.ts[-1], expected, atol=1e-8)


def test_non_terminating_event_records_each_crossing_in_its_step():
    sol = _oscillator_solve(_cos_zero(terminate=False, max_events=5), 10.0, 1e-11)
    # The solve is not stopped; zeros of cos(t) in [0, 10]: pi/2 + k pi, k = 0, 1, 2.
    assert sol.result == dfx.RESULTS.successful
    np.testing.assert_allclose(sol.ts[-1], 10.0)
    expected = np.pi / 2 + np.pi * np.arange(3)
    np.testing.assert_allclose(sol.event_ts[:3], expected, atol=1e-9)
    assert np.all(np.isinf(np.asarray(sol.event_ts[3:])))
    np.testing.assert_allclose(sol.event_ys[:3, 0], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.abs(sol.event_ys[:3, 1]), 1.0, atol=1e-9)
    np.testing.assert_array_equal(sol.event_mask, [True, True, True, False, False])


def test_non_terminating_event_keeps_at_most_max_events():
    sol = _oscillator_solve(_cos_zero(terminate=False, max_events=2), 20.0, 1e-10)
    np.testing.assert_allclose(
        sol.event_ts, np.pi / 2 + np.pi * np.arange(2), atol=1e-8
    )


def test_bouncing_ball_bounce_times_match_closed_form():
    height, restitution, bounces = 5.0, 0.8, 4
    event = dfx.Event(_height, root_finder=ROOT_FINDERS["newton"], direction=False)

    @jax.jit
    def fall(t0, y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            t0,
            t0 + 100.0,
            0.05,
            y0,
            event=event,
        )

    t, y = 0.0, jnp.array([height, 0.0])
    times = []
    for _ in range(bounces):
        sol = fall(t, y)
        t = sol.ts[-1]
        times.append(float(t))
        y = jnp.array([0.0, -restitution * sol.ys[-1, 1]])
    first = np.sqrt(2 * height / G)
    speed = G * first
    expected = [first]
    for k in range(1, bounces):
        expected.append(expected[-1] + 2 * restitution**k * speed / G)
    np.testing.assert_allclose(times, expected, rtol=0, atol=1e-10)


@pytest.mark.slow  # events under vmap: test_bisection_root_finder_under_vmap_...
def test_event_under_vmap_with_per_member_heights_and_t1():
    heights = jnp.array([1.0, 10.0, 20.0])
    t1s = jnp.array(
        [10.0, 10.0, 0.5]
    )  # the last member ends before reaching the ground

    def solve(h, t1):
        return dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            t1,
            0.05,
            jnp.stack([h, 5.0]),
            event=dfx.Event(_height, root_finder=ROOT_FINDERS["newton"]),
        )

    sol = jax.vmap(solve)(heights, t1s)
    expected = [_ground_time(1.0, 5.0), _ground_time(10.0, 5.0), 0.5]
    np.testing.assert_allclose(sol.ts[:, -1], expected, atol=1e-10)
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.event_occurred, [True, True, False]
    )
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.successful, [False, False, True]
    )


def test_event_time_gradient_matches_closed_form():
    def event_time(height):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            10.0,
            0.1,
            jnp.stack([height, 5.0]),
            event=dfx.Event(_height, root_finder=ROOT_FINDERS["newton"]),
        )
        return sol.ts[-1]

    # Jitted: one compilation rather than one per operation of an eager derivative.
    grad = jax.jit(jax.grad(event_time))(10.0)
    np.testing.assert_allclose(grad, 1 / np.sqrt(25 + 2 * G * 10.0), rtol=1e-8)


def test_save_times_after_event_are_inf():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([10.0, 5.0]),
        event=dfx.Event(_height, root_finder=ROOT_FINDERS["newton"]),
        saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 10.0, 11)),
    )
    t_star = _ground_time(10.0, 5.0)
    ts = np.asarray(sol.ts)
    assert np.all(np.isfinite(ts[ts <= t_star]))
    np.testing.assert_array_equal(ts[:3], [0.0, 1.0, 2.0])
    assert np.all(np.isinf(ts[3:]))
    np.testing.assert_allclose(sol.ys[1, 0], 10.0 + 5.0 - G / 2)


def test_steady_state_event_stops_at_steady_state():
    controller = dfx.PIDController(rtol=1e-6, atol=1e-6)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -(y - 2.0)),
        dfx.Tsit5(),
        0.0,
        1000.0,
        0.1,
        jnp.array([1.0]),
        event=dfx.Event(dfx.steady_state_event()),
        stepsize_controller=controller,
    )
    assert sol.result == dfx.RESULTS.event_occurred
    assert float(sol.ts[-1]) < 100.0
    derivative = abs(float(sol.ys[-1, 0]) - 2.0)
    assert derivative < 1e-6 + 1e-6 * 2.0 + 1e-12


def test_steady_state_event_needs_tolerances_with_constant_steps():
    with pytest.raises(ValueError, match="rtol"):
        dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0]),
            event=dfx.Event(dfx.steady_state_event()),
        )


def test_event_argument_errors():
    with pytest.raises(TypeError, match="event"):
        dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, 0.0]),
            event=_height,
        )
    with pytest.raises(TypeError, match="cond_fn"):
        dfx.Event(3.0)
    with pytest.raises(ValueError, match="scalar"):
        dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0, 0.0]),
            event=dfx.Event(lambda t, y, args, **kw: y),
        )


# --------------------------------------------------------------- directions per condition
def _cos_conditions():
    # On x = cos t: `a` falls through zero at pi/2 and rises at 3 pi/2; `b` falls
    # through zero at pi/3 and rises at 5 pi/3.
    return (
        lambda t, y, args, **kw: y[0],
        lambda t, y, args, **kw: y[0] - 0.5,
    )


@pytest.mark.parametrize(
    "direction, expected_time, expected_mask",
    [
        ((False, False), np.pi / 3, (False, True)),
        ((True, False), np.pi / 3, (False, True)),
        ((True, True), 3 * np.pi / 2, (True, False)),
        # More combinations (each a compilation of its own) in the slow run.
        pytest.param((False, True), np.pi / 2, (True, False), marks=pytest.mark.slow),
        pytest.param((None, True), np.pi / 2, (True, False), marks=pytest.mark.slow),
        pytest.param(None, np.pi / 3, (False, True), marks=pytest.mark.slow),
        pytest.param(True, 3 * np.pi / 2, (True, False), marks=pytest.mark.slow),
    ],
)
def test_pytree_of_directions_applies_one_per_condition(
    direction, expected_time, expected_mask
):
    event = dfx.Event(
        _cos_conditions(), root_finder=ROOT_FINDERS["newton"], direction=direction
    )
    sol = _oscillator_solve(event, 10.0, 1e-10)
    assert sol.result == dfx.RESULTS.event_occurred
    np.testing.assert_allclose(sol.ts[-1], expected_time, atol=1e-8)
    assert tuple(bool(m) for m in sol.event_mask) == expected_mask


def test_direction_must_match_the_conditions():
    with pytest.raises(ValueError, match="structure of `cond_fn`"):
        dfx.Event(_cos_conditions(), direction=(True, False, None))
    with pytest.raises(ValueError, match="None | bool"):
        dfx.Event(_cos_conditions(), direction=(True, "up"))
    event = dfx.Event(_cos_conditions(), direction=True)
    assert event.direction == (True, True)


def test_first_condition_in_order_wins_when_several_fire_in_one_step():
    # Both fall through zero inside the single step [0, 1]: the second one earlier.
    conds = (
        lambda t, y, args, **kw: 0.8 - t,
        lambda t, y, args, **kw: 0.3 - t,
    )
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler(),
        0.0,
        2.0,
        1.0,
        jnp.array([1.0]),
        event=dfx.Event(conds, root_finder=ROOT_FINDERS["newton"]),
    )
    assert tuple(bool(m) for m in sol.event_mask) == (True, False)
    np.testing.assert_allclose(sol.ts[-1], 0.8, atol=1e-10)


# ------------------------------------------------------------------- events at t0
@pytest.mark.parametrize("root_finder", [None, "newton"])
def test_boolean_condition_true_at_t0_stops_before_the_first_step(root_finder):
    y0 = jnp.array([1.0, 0.0])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]])),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        y0,
        event=dfx.Event(
            lambda t, y, args, **kw: y[0] > 0.5,
            root_finder=None if root_finder is None else ROOT_FINDERS[root_finder],
        ),
        saveat=dfx.SaveAt(t0=True, ts=jnp.array([0.0, 0.5]), t1=True),
    )
    assert sol.result == dfx.RESULTS.event_occurred
    assert bool(sol.event_mask)
    assert int(sol.stats["num_steps"]) == 0
    # t0, then where it stopped; the save times are not saved (as in Diffrax).
    np.testing.assert_array_equal(sol.ts, [0.0, 0.0, np.inf, np.inf])
    np.testing.assert_array_equal(sol.ys[0], y0)
    np.testing.assert_array_equal(sol.ys[1], y0)


def test_steady_state_event_started_at_equilibrium_stops_at_t0():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -(y - 2.0)),
        dfx.Tsit5(),
        0.0,
        1000.0,
        0.1,
        jnp.array([2.0]),
        event=dfx.Event(dfx.steady_state_event()),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
    )
    assert sol.result == dfx.RESULTS.event_occurred
    assert int(sol.stats["num_steps"]) == 0
    np.testing.assert_array_equal(sol.ts, [0.0])
    np.testing.assert_array_equal(sol.ys, [[2.0]])


@pytest.mark.parametrize(
    "direction, expected", [(None, 0.0), (True, np.pi), (False, 2 * np.pi)]
)
def test_real_condition_zero_at_t0_fires_when_it_leaves_zero(direction, expected):
    # -sin t is zero at t0 and negative just after: a change of sign for `None`, not
    # an upward one (that is at pi) and not a downward one from positive (2 pi).
    event = dfx.Event(
        lambda t, y, args, **kw: y[1],
        root_finder=ROOT_FINDERS["newton"],
        direction=direction,
    )
    sol = _oscillator_solve(event, 10.0, 1e-10)
    assert sol.result == dfx.RESULTS.event_occurred
    np.testing.assert_allclose(sol.ts[-1], expected, atol=1e-8)
    assert int(sol.stats["num_steps"]) >= 1


# ------------------------------------------------------------------ other behaviour
@pytest.mark.parametrize("terminate", [True, False])
def test_event_runs_without_a_step_bound(terminate):
    event = dfx.Event(
        _height, root_finder=ROOT_FINDERS["newton"], terminate=terminate, max_events=2
    )
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        3.0,
        0.1,
        jnp.array([10.0, 5.0]),
        event=event,
        max_steps=None,
    )
    t_star = _ground_time(10.0, 5.0)
    assert sol.stats["max_steps"] is None
    if terminate:
        np.testing.assert_allclose(sol.ts[-1], t_star, atol=1e-10)
    else:
        np.testing.assert_allclose(sol.event_ts, [t_star, np.inf], atol=1e-10)
        np.testing.assert_allclose(sol.ts[-1], 3.0)


def test_conditions_receive_the_solve_arguments_as_keywords():
    seen, values = {}, {}

    def cond(t, y, args, *, t0, t1, dt0, saveat, max_steps, **kwargs):
        seen.update(saveat=saveat, max_steps=max_steps)
        seen.update(kwargs)
        # The times are traced (the solve is compiled, even when called outside
        # `jax.jit`): read when it runs.
        jax.debug.callback(
            lambda *times: values.update(zip(("t0", "t1", "dt0"), times, strict=True)),
            t0,
            t1,
            dt0,
        )
        return y[0]

    saveat = dfx.SaveAt(t1=True)
    dfx.diffeqsolve(
        dfx.ODETerm(_projectile),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([10.0, 5.0]),
        event=dfx.Event(cond),
        saveat=saveat,
        max_steps=1000,
    )
    assert float(values["t0"]) == 0.0 and float(values["t1"]) == 10.0
    assert float(values["dt0"]) == 0.1 and seen["max_steps"] == 1000
    assert seen["saveat"] == saveat
    assert {"terms", "solver", "stepsize_controller"} <= set(seen)


def test_event_at_a_step_end_with_root_finder_saves_that_step_twice():
    # A boolean condition's event is at the end of the step in which it became true.
    # With a root finder and `SaveAt(steps=True)`, Diffrax 0.7.2 saves that step as
    # the solver reached it, then again as the event: diffeqx does the same.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler(),
        0.0,
        1.0,
        0.25,
        jnp.array([1.0]),
        event=dfx.Event(
            lambda t, y, args, **kw: t > 0.3, root_finder=ROOT_FINDERS["newton"]
        ),
        saveat=dfx.SaveAt(steps=True),
        max_steps=4,
    )
    np.testing.assert_array_equal(sol.ts, [0.25, 0.5, 0.5, np.inf])
    np.testing.assert_allclose(sol.ys[:3, 0], [0.75, 0.5625, 0.5625])


def test_bisection_root_finder_under_vmap_with_members_without_event():
    def solve(height):
        return dfx.diffeqsolve(
            dfx.ODETerm(_projectile),
            dfx.Tsit5(),
            0.0,
            2.0,
            0.1,
            jnp.stack([height, 5.0]),
            event=dfx.Event(_height, root_finder=ROOT_FINDERS["bisection"]),
        )

    sol = jax.vmap(solve)(jnp.array([1.0, 50.0]))
    np.testing.assert_allclose(sol.ts[:, -1], [_ground_time(1.0, 5.0), 2.0], atol=1e-10)
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.event_occurred, [True, False]
    )


def test_non_terminating_boolean_event_records_each_time_it_becomes_true():
    # cos t > 0.5 is true at t0 (recorded there) and becomes true again near 5 pi/3.
    event = dfx.Event(
        lambda t, y, args, **kw: y[0] > 0.5, terminate=False, max_events=3
    )
    sol = _oscillator_solve(event, 6.0, 1e-8)
    assert sol.result == dfx.RESULTS.successful
    assert float(sol.event_ts[0]) == 0.0
    assert 5 * np.pi / 3 <= float(sol.event_ts[1]) < 5 * np.pi / 3 + 0.5
    assert np.isinf(float(sol.event_ts[2]))
    np.testing.assert_array_equal(sol.event_mask, [True, True, False])


def test_non_terminating_event_records_one_crossing_per_step():
    # (t - 0.2)(t - 0.5)(t - 0.8) crosses zero three times inside the one step
    # [0, 1], and changes sign over it: one event is recorded, at the step's end.
    event = dfx.Event(
        lambda t, y, args, **kw: (t - 0.2) * (t - 0.5) * (t - 0.8),
        terminate=False,
        max_events=4,
    )
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler(),
        0.0,
        2.0,
        1.0,
        jnp.array([1.0]),
        event=event,
    )
    np.testing.assert_array_equal(sol.event_ts, [1.0, np.inf, np.inf, np.inf])
    np.testing.assert_array_equal(sol.event_mask, [True, False, False, False])


def test_root_finder_failure_is_the_result():
    # The cube root has an infinite slope at its zero: Newton's iterates oscillate
    # around it and never converge.
    event = dfx.Event(
        lambda t, y, args, **kw: jnp.cbrt(y[0]),
        root_finder=optx.Newton(rtol=1e-12, atol=1e-12),
    )
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]])),
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([1.0, 0.0]),
        event=event,
        throw=False,
    )
    assert sol.result == dfx.RESULTS.nonlinear_max_steps_reached
    assert not dfx.is_okay(sol.result)

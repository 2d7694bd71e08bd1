"""Step-size controllers: where steps go, how many there are, and how accurate they are."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

_DECAY = dfx.ODETerm(lambda t, y, args: -y)


def _step_times(sol):
    """The (finite) step end times saved by SaveAt(steps=True)."""
    ts = np.asarray(sol.ts)
    return ts[np.isfinite(ts)]


# ---------------------------------------------------------------------------------------
# ConstantStepSize
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t0, t1, dt0, expected_steps",
    [
        (0.0, 1.0, 0.125, 8),
        (0.0, 1.0, 0.1, 10),  # 0.1 is inexact in binary: still 10 steps, not 11
        (0.0, 1.0, 0.3, 4),
        (0.0, 1.05, 0.1, 11),
        (0.5, 3.2, 0.7, 4),
        (1.0, 0.0, -0.1, 10),  # backwards in time
    ],
)
def test_constant_step_size_takes_ceil_of_interval_over_dt0_steps(
    t0, t1, dt0, expected_steps
):
    assert expected_steps == math.ceil(round((t1 - t0) / dt0, 9))
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Euler(),
        t0,
        t1,
        dt0,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
    )
    assert int(sol.stats["num_steps"]) == expected_steps
    steps = _step_times(sol)
    assert steps.size == expected_steps
    assert steps[-1] == pytest.approx(t1, abs=1e-14)
    step_sizes = np.abs(np.diff(np.concatenate([[t0], steps])))
    assert np.all(step_sizes <= abs(dt0) * (1 + 1e-12))
    assert np.all(step_sizes > 0)


def test_constant_step_size_with_dividing_dt0_steps_on_uniform_grid():
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Euler(),
        0.0,
        1.0,
        0.125,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
    )
    np.testing.assert_allclose(_step_times(sol), 0.125 * np.arange(1, 9), atol=1e-15)
    # Explicit Euler on y' = -y: y_N = (1 - h)^N exactly.
    np.testing.assert_allclose(
        sol.ys[:8, 0], (1 - 0.125) ** np.arange(1, 9), rtol=1e-13
    )


# ---------------------------------------------------------------------------------------
# StepTo
# ---------------------------------------------------------------------------------------


def test_step_to_steps_exactly_on_given_times():
    grid = np.array([0.0, 0.1, 0.3, 0.35, 0.8, 1.0, 1.7])
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Euler(),
        grid[0],
        grid[-1],
        None,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.StepTo(ts=jnp.asarray(grid)),
    )
    steps = _step_times(sol)
    np.testing.assert_array_equal(steps, grid[1:])
    assert int(sol.stats["num_steps"]) == grid.size - 1
    # Explicit Euler on y' = -y over this grid: y_{k+1} = (1 - h_k) y_k.
    expected = np.cumprod(1 - np.diff(grid))
    np.testing.assert_allclose(sol.ys[: steps.size, 0], expected, rtol=1e-13)


# ---------------------------------------------------------------------------------------
# PIDController
# ---------------------------------------------------------------------------------------

_STIFFNESS = -50.0
# y' = lambda (y - sin t) + cos t, y(0) = 1  has  y = sin t + exp(lambda t).
_MILDLY_STIFF = dfx.ODETerm(
    lambda t, y, args: _STIFFNESS * (y - jnp.sin(t)) + jnp.cos(t)
)


def test_pid_controller_converges_and_rejects_steps_on_a_hard_problem():
    t1 = 3.0
    exact = np.sin(t1) + np.exp(_STIFFNESS * t1)
    errors, steps = [], []
    for rtol in (1e-4, 1e-6, 1e-8):
        sol = dfx.diffeqsolve(
            _MILDLY_STIFF,
            dfx.Tsit5(),
            0.0,
            t1,
            0.1,
            jnp.array([1.0]),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol * 1e-2),
        )
        assert dfx.is_successful(sol.result)
        # Stability-limited explicit steps on a stiff problem: some must be rejected.
        assert int(sol.stats["num_rejected_steps"]) > 0
        errors.append(abs(float(sol.ys[0, 0]) - exact))
        steps.append(int(sol.stats["num_steps"]))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8
    assert steps[0] < steps[1] < steps[2]


_STEP_TS = [0.33, 0.77, 1.41, 1.9]


@pytest.mark.parametrize("construction", ["pid-keyword", "clip-wrapper"])
def test_step_ts_are_all_landed_on(construction):
    if construction == "pid-keyword":
        controller = dfx.PIDController(rtol=1e-3, atol=1e-6, step_ts=_STEP_TS)
        assert isinstance(controller, dfx.ClipStepSizeController)
    else:
        controller = dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-3, atol=1e-6), step_ts=jnp.array(_STEP_TS)
        )
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        0.0,
        2.0,
        0.5,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=controller,
    )
    steps = _step_times(sol)
    for t in _STEP_TS:
        assert np.min(np.abs(steps - t)) <= 1e-14, f"no step ends at {t}: {steps}"
    np.testing.assert_allclose(sol.ys[steps.size - 1, 0], np.exp(-2.0), rtol=1e-3)


# y' = y before t = 1 and y' = -y after, y(0) = 1: y = e^t, then e^(2 - t). A Tsit5 (FSAL)
# step that straddles t = 1 sees a discontinuous field; jump_ts makes a step end there
# and refreshes the first-same-as-last stage.
_SWITCHING = dfx.ODETerm(lambda t, y, args: jnp.where(t < 1.0, y, -y))
_TS_SWITCHING = np.array([0.5, 1.0, 1.5, 2.0])
_EXACT_SWITCHING = np.where(
    _TS_SWITCHING < 1.0, np.exp(_TS_SWITCHING), np.exp(2.0 - _TS_SWITCHING)
)


def _solve_switching(controller):
    return dfx.diffeqsolve(
        _SWITCHING,
        dfx.Tsit5(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(ts=jnp.asarray(_TS_SWITCHING)),
        stepsize_controller=controller,
    )


def test_jump_ts_at_a_discontinuity_is_accurate_and_avoids_rejections():
    rtol, atol = 1e-6, 1e-9
    with_jump = _solve_switching(dfx.PIDController(rtol=rtol, atol=atol, jump_ts=[1.0]))
    without = _solve_switching(dfx.PIDController(rtol=rtol, atol=atol))
    error_with = np.max(np.abs(np.asarray(with_jump.ys[:, 0]) - _EXACT_SWITCHING))
    error_without = np.max(np.abs(np.asarray(without.ys[:, 0]) - _EXACT_SWITCHING))
    # Accurate to about the tolerance (relative to |y| <= e), ...
    assert error_with <= 10 * rtol * np.e
    # ... and better than stepping blindly over the jump, with fewer rejections.
    assert error_with < error_without
    assert int(with_jump.stats["num_rejected_steps"]) < int(
        without.stats["num_rejected_steps"]
    )


def test_dtmax_caps_every_step():
    def solve(dtmax):
        return dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            2.0,
            0.01,
            jnp.array([1.0]),
            saveat=dfx.SaveAt(steps=True),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6, dtmax=dtmax),
        )

    uncapped = solve(None)
    assert np.max(np.diff(_step_times(uncapped))) > 0.05  # the cap below really binds
    capped = solve(0.05)
    steps = _step_times(capped)
    assert np.all(np.diff(np.concatenate([[0.0], steps])) <= 0.05 * (1 + 1e-12))
    assert int(capped.stats["num_steps"]) >= 40
    np.testing.assert_allclose(capped.ys[steps.size - 1, 0], np.exp(-2.0), rtol=1e-4)


def test_dt0_none_with_pid_controller_is_accurate_and_not_wasteful():
    def solve(dt0):
        return dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            5.0,
            dt0,
            jnp.array([1.0]),
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
        )

    automatic = solve(None)
    sensible = solve(0.1)
    np.testing.assert_allclose(automatic.ys[0, 0], np.exp(-5.0), rtol=1e-7)
    assert int(automatic.stats["num_steps"]) <= int(sensible.stats["num_steps"]) + 2

"""Step-size controllers: where steps go, how many there are, and how accurate they are."""

import math

import jax
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

    # The tolerance is traced: one compilation serves the three tolerances.
    @jax.jit
    def solve(rtol):
        return dfx.diffeqsolve(
            _MILDLY_STIFF,
            dfx.Tsit5(),
            0.0,
            t1,
            0.1,
            jnp.array([1.0]),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol * 1e-2),
        )

    for rtol in (1e-4, 1e-6, 1e-8):
        sol = solve(jnp.asarray(rtol))
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


# ---------------------------------------------------------------------------------------
# The automatic first step (Hairer, Nørsett & Wanner) and the PID filter
# ---------------------------------------------------------------------------------------


def test_hairer_first_step_on_a_bare_ode_term_follows_the_book():
    # y' = -50 y, y0 = 1, rtol = 1e-3, atol = 0: d0 = 1000, d1 = 50000, so
    # h0 = 0.01 * d0 / d1 = 2e-4; the Euler trial step gives d2 = 50 * d1 * ... and
    # h1 = (0.01 / max(d1, d2))^(1/k). Worked out here in float64 by hand.
    lam, rtol, k = 50.0, 1e-3, 5
    w = rtol * 1.0
    d0, d1 = 1.0 / w, lam / w
    h0 = 0.01 * d0 / d1
    f1 = -lam * (1.0 - h0 * lam)
    d2 = abs(f1 + lam) / w / h0
    expected = min(100 * h0, (0.01 / max(d1, d2)) ** (1 / k))
    controller = dfx.PIDController(rtol=rtol, atol=0.0)
    t1, _ = controller.init(
        dfx.ODETerm(lambda t, y, args: -lam * y),
        0.0,
        1.0,
        jnp.array([1.0]),
        None,
        None,
        dfx.Tsit5().func,
        k,
    )
    assert float(t1) == pytest.approx(expected, rel=1e-12)


def test_automatic_first_step_inside_diffeqsolve_is_0_01_as_diffrax():
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        0.0,
        1.0,
        None,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
    )
    assert float(sol.ts[0]) == 0.01


def test_pid_step_ratio_is_the_digital_filter():
    # Accepted step of size 0.1 with scaled error e = 0.05 after errors 0.25, 0.8:
    # ratio = 0.9 * (1/e)^(b1/k) (1/e1)^(b2/k) (1/e2)^(b3/k) with b1 = p + i + d,
    # b2 = -(p + 2d), b3 = d.
    p, i, d, k = 0.3, 0.4, 0.1, 4
    controller = dfx.PIDController(rtol=1.0, atol=0.0, pcoeff=p, icoeff=i, dcoeff=d)
    history = (jnp.asarray(1 / 0.25), jnp.asarray(1 / 0.8), jnp.asarray(False))
    keep, t0, t1, _, state, _ = controller.adapt_step_size(
        0.0,
        0.1,
        jnp.array([1.0]),
        jnp.array([1.0]),
        None,
        jnp.array([0.05]),
        k,
        history,
    )
    ratio = (
        0.9 * 20.0 ** ((p + i + d) / k) * 4.0 ** (-(p + 2 * d) / k) * 1.25 ** (d / k)
    )
    assert 1 < ratio < 10  # inside [1, factormax], so not limited
    assert bool(keep) and float(t0) == 0.1
    assert float(t1) == pytest.approx(0.1 + 0.1 * ratio, rel=1e-14)
    assert float(state[0]) == pytest.approx(20.0) and float(state[1]) == 4.0


def test_pid_decides_in_float32_for_a_float32_state():
    controller = dfx.PIDController(rtol=1e-3, atol=1e-6)
    _, state = controller.init(
        _DECAY, 0.0, 1.0, jnp.ones((1,), jnp.float32), 0.1, None, None, 5
    )
    assert state[0].dtype == jnp.float32
    out = controller.adapt_step_size(
        0.0,
        0.1,
        jnp.ones((1,), jnp.float32),
        jnp.ones((1,), jnp.float32),
        None,
        jnp.full((1,), 1e-4, jnp.float32),
        5,
        state,
    )
    assert out[4][0].dtype == jnp.float32


def test_pid_controller_positional_arguments_bind_as_in_diffrax():
    # rtol, atol, norm, pcoeff, icoeff, dcoeff, dtmin, dtmax, force_dtmin, ...
    controller = dfx.PIDController(1e-3, 1e-6, None, 0.1, 0.2, 0.3, 1e-4, 0.5, False)
    assert controller.norm is None
    assert (controller.pcoeff, controller.icoeff, controller.dcoeff) == (0.1, 0.2, 0.3)
    assert (controller.dtmin, controller.dtmax, controller.force_dtmin) == (
        1e-4,
        0.5,
        False,
    )


# ---------------------------------------------------------------------------------------
# ClipStepSizeController
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_jump_ts_containing_t1_ends_exactly_at_t1(dtype):
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        jnp.asarray(0.0, dtype),
        jnp.asarray(1.0, dtype),
        jnp.asarray(0.1, dtype),
        jnp.ones((1,), dtype),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-4, atol=1e-7),
            jump_ts=jnp.asarray([0.0, 0.5, 1.0], dtype),
        ),
    )
    steps = _step_times(sol)
    assert steps[-1] == 1.0 and float(sol.t1) == 1.0
    # A step ends one ULP before the jump at 0.5, the next starts one ULP after it.
    half = np.asarray(0.5, dtype)
    assert np.nextafter(half, np.asarray(1.0, dtype)) in steps


def test_clipped_constant_step_size_never_exceeds_dt0_and_resumes_its_grid():
    # Extension over Diffrax (which refuses to clip a constant step size).
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Euler(),
        0.0,
        1.0,
        0.1,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.ClipStepSizeController(
            dfx.ConstantStepSize(), step_ts=[0.05, 0.42]
        ),
    )
    steps = _step_times(sol)
    expected = np.sort(np.concatenate([[0.05, 0.42], 0.1 * np.arange(1, 11)]))
    np.testing.assert_allclose(steps, expected, atol=1e-15)
    assert np.all(np.diff(np.concatenate([[0.0], steps])) <= 0.1 + 1e-15)


def _rejecting_solve(store):
    # Stiff decay from a step far too long: several rejections in a row.
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -200.0 * y),
        dfx.Tsit5(),
        0.0,
        0.2,
        0.1,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.ClipStepSizeController(
            dfx.PIDController(rtol=1e-6, atol=1e-9), store_rejected_steps=store
        ),
        throw=False,
    )


def test_store_rejected_steps_later_steps_land_on_every_rejected_end():
    plain = _rejecting_solve(None)
    stored = _rejecting_solve(10)
    assert plain.result == dfx.RESULTS.successful
    assert stored.result == dfx.RESULTS.successful
    # The ends of the rejected steps of the plain solve: the first tries, from 0.
    first_accepted = _step_times(plain)[0]
    steps = _step_times(stored)
    tried, t = [], 0.1
    while t > first_accepted:
        tried.append(t)
        t *= 0.2  # factormin: each retry is a fifth of the last
    assert len(tried) >= 3
    for end in tried:
        assert np.min(np.abs(steps - end)) == 0, f"no step ends at {end}"


def test_store_rejected_steps_overflow_ends_the_solve():
    sol = _rejecting_solve(1)
    assert sol.result == dfx.RESULTS.max_steps_rejected
    with pytest.raises(Exception, match="store_rejected_steps"):
        dfx.ClipStepSizeController(dfx.ConstantStepSize(), store_rejected_steps=0)

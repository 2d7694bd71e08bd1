"""Failure is a value: result codes, throw=True/False, partial output and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

# throw=True failures surface as equinox's runtime error or jax's JaxRuntimeError; both
# subclass RuntimeError.
_RUNTIME_ERROR = RuntimeError

_DECAY = dfx.ODETerm(lambda t, y, args: -y)
# y' = y**2, y(0) = 1 has the solution 1 / (1 - t), which blows up at t = 1.
_BLOW_UP = dfx.ODETerm(lambda t, y, args: y**2)


def _blow_up_exact(t):
    return 1.0 / (1.0 - np.asarray(t))


# ---------------------------------------------------------------------------------------
# max_steps
# ---------------------------------------------------------------------------------------

# 20 steps of 0.1 reach t = 2, far short of t1 = 10.
_TS_PAST_MAX_STEPS = jnp.array([0.0, 0.55, 1.25, 1.95, 2.6, 5.0, 10.0])
_REACHED = 4  # the first four save times lie before t = 2.


def _solve_until_max_steps(throw):
    return dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        0.0,
        10.0,
        0.1,
        jnp.array([1.0, -2.0]),
        saveat=dfx.SaveAt(ts=_TS_PAST_MAX_STEPS),
        max_steps=20,
        throw=throw,
    )


def test_max_steps_reached_raises_naming_max_steps_when_throw():
    with pytest.raises(_RUNTIME_ERROR, match="max_steps"):
        jax.block_until_ready(_solve_until_max_steps(throw=True).ys)


def test_max_steps_reached_is_returned_when_not_throw():
    sol = _solve_until_max_steps(throw=False)
    assert sol.result == dfx.RESULTS.max_steps_reached
    assert not dfx.is_successful(sol.result)
    assert not dfx.is_okay(sol.result)
    assert int(sol.stats["num_steps"]) == 20
    assert int(sol.stats["max_steps"]) == 20


def test_max_steps_reached_keeps_saves_before_failure_and_pads_the_rest_with_inf():
    sol = _solve_until_max_steps(throw=False)
    reached = np.asarray(_TS_PAST_MAX_STEPS[:_REACHED])
    np.testing.assert_allclose(sol.ts[:_REACHED], reached, rtol=0, atol=1e-14)
    expected = np.exp(-reached)[:, None] * np.array([1.0, -2.0])[None]
    np.testing.assert_allclose(sol.ys[:_REACHED], expected, rtol=1e-7)
    assert np.all(np.isinf(np.asarray(sol.ts[_REACHED:])))
    assert np.all(np.isinf(np.asarray(sol.ys[_REACHED:])))


# ---------------------------------------------------------------------------------------
# dtmin
# ---------------------------------------------------------------------------------------

_TS_SINGULAR = jnp.array([0.5, 0.9, 1.5])


def _solve_into_singularity(throw):
    # Step sizes shrink towards the singularity at t = 1 until they fall below dtmin.
    # (force_dtmin=False: the default would step on with dt = dtmin instead of failing.)
    controller = dfx.PIDController(rtol=1e-8, atol=1e-8, dtmin=1e-4, force_dtmin=False)
    return dfx.diffeqsolve(
        _BLOW_UP,
        dfx.Tsit5(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(ts=_TS_SINGULAR),
        stepsize_controller=controller,
        throw=throw,
    )


def test_dt_min_reached_is_returned_with_saves_intact():
    sol = _solve_into_singularity(throw=False)
    assert sol.result == dfx.RESULTS.dt_min_reached
    assert not dfx.is_okay(sol.result)
    np.testing.assert_allclose(
        sol.ys[:2, 0], _blow_up_exact(_TS_SINGULAR[:2]), rtol=1e-5
    )
    assert np.isinf(float(sol.ys[2, 0]))


def test_dt_min_reached_raises_naming_dtmin_when_throw():
    with pytest.raises(_RUNTIME_ERROR, match="dtmin"):
        jax.block_until_ready(_solve_into_singularity(throw=True).ys)


# ---------------------------------------------------------------------------------------
# non-finite state (diffeqx adds RESULTS.non_finite_state)
# ---------------------------------------------------------------------------------------

_TS_BLOW_UP = jnp.array([0.25, 0.5, 0.75, 1.5])


def _solve_through_blow_up(throw):
    # Fixed steps carry the numerical solution straight past t = 1, where it overflows.
    return dfx.diffeqsolve(
        _BLOW_UP,
        dfx.Tsit5(),
        0.0,
        2.0,
        0.01,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(ts=_TS_BLOW_UP),
        throw=throw,
    )


def test_blow_up_returns_non_finite_state_with_saves_intact():
    sol = _solve_through_blow_up(throw=False)
    assert sol.result == dfx.RESULTS.non_finite_state
    assert not dfx.is_okay(sol.result)
    np.testing.assert_allclose(
        sol.ys[:3, 0], _blow_up_exact(_TS_BLOW_UP[:3]), rtol=1e-6
    )
    assert np.isinf(float(sol.ts[3]))
    assert np.isinf(float(sol.ys[3, 0]))
    # The solve stopped where the state went non-finite, not at max_steps.
    assert int(sol.stats["num_steps"]) < 200


def test_blow_up_raises_naming_non_finite_when_throw():
    with pytest.raises(_RUNTIME_ERROR, match="non-finite"):
        jax.block_until_ready(_solve_through_blow_up(throw=True).ys)


# ---------------------------------------------------------------------------------------
# is_successful / is_okay, per member under vmap, stats
# ---------------------------------------------------------------------------------------


def _decay_solve(t1, max_steps=4096, throw=True):
    return dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        0.0,
        t1,
        0.1,
        jnp.array([1.0]),
        max_steps=max_steps,
        throw=throw,
    )


def test_successful_solve_is_successful_and_okay():
    sol = _decay_solve(1.0)
    assert sol.result == dfx.RESULTS.successful
    assert dfx.is_successful(sol.result)
    assert dfx.is_okay(sol.result)
    assert not dfx.is_event(sol.result)
    np.testing.assert_allclose(sol.ys[0, 0], np.exp(-1.0), rtol=1e-8)


def test_vmap_gives_each_member_its_own_result():
    t1s = jnp.array([1.0, 5.0, 1.5])  # 10, 50 and 15 steps of 0.1; max_steps is 20.
    sol = jax.vmap(lambda t1: _decay_solve(t1, max_steps=20, throw=False))(t1s)
    np.testing.assert_array_equal(dfx.is_successful(sol.result), [True, False, True])
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.max_steps_reached, [False, True, False]
    )
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.successful, [True, False, True]
    )
    np.testing.assert_array_equal(sol.stats["num_steps"], [10, 20, 15])
    for i in (0, 2):
        np.testing.assert_allclose(sol.ts[i, 0], t1s[i], rtol=0, atol=1e-14)
        np.testing.assert_allclose(sol.ys[i, 0, 0], np.exp(-t1s[i]), rtol=1e-8)


def test_stats_count_steps_for_constant_step_size():
    sol = dfx.diffeqsolve(
        _DECAY, dfx.Tsit5(), 0.0, 1.0, 0.1, jnp.array([1.0]), max_steps=50
    )
    assert set(sol.stats) >= {
        "num_steps",
        "num_accepted_steps",
        "num_rejected_steps",
        "max_steps",
    }
    assert int(sol.stats["num_steps"]) == 10
    assert int(sol.stats["num_accepted_steps"]) == 10
    assert int(sol.stats["num_rejected_steps"]) == 0
    assert int(sol.stats["max_steps"]) == 50


def test_stats_count_rejected_steps_for_adaptive_solve():
    sol = _solve_into_singularity(throw=False)
    accepted = int(sol.stats["num_accepted_steps"])
    rejected = int(sol.stats["num_rejected_steps"])
    assert rejected > 0  # approaching a singularity must reject steps
    assert int(sol.stats["num_steps"]) == accepted + rejected


# ---------------------------------------------------------------------------------------
# The trace-time helpers for result codes (diffeqx._solution)
# ---------------------------------------------------------------------------------------


def _items(enumeration):
    return [getattr(enumeration, name) for name in enumeration._name_to_item]


def test_result_helpers_agree_with_equinox_on_every_item():
    import lineax as lx
    import optimistix as optx

    from diffeqx._solution import promote_result, succeeded, where_result

    for parent in (lx.RESULTS, optx.RESULTS):
        for item in _items(parent):
            # Constants are decided in Python; traced items are staged.
            assert bool(succeeded(item)) == bool(item == parent.successful)
            traced = jax.jit(lambda i: succeeded(i))(item)
            assert bool(traced) == bool(item == parent.successful)
            promoted = promote_result(item, dfx.RESULTS)
            assert bool(promoted == dfx.RESULTS.promote(item)), item
    items = _items(dfx.RESULTS)
    a, b = items[3], items[5]
    assert where_result(np.bool_(True), a, b) is a
    assert where_result(False, a, b) is b
    for pred in (True, False):
        chosen = jax.jit(lambda p: where_result(p, a, b))(jnp.asarray(pred))
        assert bool(chosen == (a if pred else b))
    with pytest.raises(ValueError, match="same enumeration"):
        where_result(True, a, optx.RESULTS.successful)

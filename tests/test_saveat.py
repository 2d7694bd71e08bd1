"""What `SaveAt` keeps, in what order and with what shapes.

The state is a PyTree with two leaves of different shapes, each with a closed-form
solution, so that every saved value can be checked against the truth:

    decay:    y' = -y,          y(0) = 1        ->  exp(-t)
    rotation: y' = [[0, -1], [1, 0]] y, y(0) = (1, 0)  ->  (cos t, sin t)
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

T0, T1, DT0 = 0.0, 1.0, 0.125
# Constant steps of DT0 land on these times (exact binary fractions).
STEP_TIMES = np.arange(1, 9) * DT0
SAVE_TS = np.array([0.3, 0.5, 0.8])
ATOL = 1e-6


def _vector_field(t, y, args):
    del t, args
    rotation = y["rotation"]
    return {"decay": -y["decay"], "rotation": jnp.stack([-rotation[1], rotation[0]])}


def _exact(t):
    t = jnp.asarray(t)
    return {"decay": jnp.exp(-t), "rotation": jnp.stack([jnp.cos(t), jnp.sin(t)], -1)}


Y0 = {"decay": jnp.array(1.0), "rotation": jnp.array([1.0, 0.0])}
TERM = dfx.ODETerm(_vector_field)


def _solve(saveat, *, t0=T0, t1=T1, dt0=DT0, solver=None, **kwargs):
    return dfx.diffeqsolve(
        TERM, solver or dfx.Tsit5(), t0, t1, dt0, Y0, saveat=saveat, **kwargs
    )


def _assert_tree_close(actual, expected, atol=ATOL):
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=0, atol=atol),
        actual,
        expected,
    )


def _finite_prefix_length(ts):
    ts = np.asarray(ts)
    finite = np.isfinite(ts)
    count = int(finite.sum())
    # Every unused slot is padding at the end, never a gap in the middle.
    assert finite[:count].all() and not finite[count:].any(), ts
    return count


def _combination_id(combination):
    names = [
        name
        for name, on in zip(("t0", "ts", "steps", "t1"), combination, strict=True)
        if on
    ]
    return "+".join(names)


_COMBINATIONS = [
    combination
    for combination in itertools.product([False, True], repeat=4)
    if any(combination)
]
# In the default run: every output at once, and `ts` with `steps` (their merge in
# time order) with and without `t0`. The other combinations (a compilation each) carry
# the `slow` marker; the single outputs are also saved in the other tests here.
_DEFAULT_COMBINATIONS = ("t0+ts+steps+t1", "ts+steps", "t0+ts+steps")


@pytest.mark.parametrize(
    "combination",
    [
        pytest.param(
            combination,
            id=_combination_id(combination),
            marks=()
            if _combination_id(combination) in _DEFAULT_COMBINATIONS
            else (pytest.mark.slow,),
        )
        for combination in _COMBINATIONS
    ],
)
def test_saveat_outputs_t0_then_ts_and_steps_in_time_order_then_t1(combination):
    save_t0, save_ts, save_steps, save_t1 = combination
    saveat = dfx.SaveAt(
        t0=save_t0,
        ts=SAVE_TS if save_ts else None,
        steps=save_steps,
        t1=save_t1,
    )
    sol = _solve(saveat)
    # As Diffrax: t0, then the ts and the step ends merged in time order (a save time
    # equal to a step's end first), then t1.
    middle = []
    if save_ts:
        middle += [(t, 0) for t in SAVE_TS]
    if save_steps:
        # The last step ends at t1; it is not saved a second time for `t1=True`.
        middle += [(t, 1) for t in STEP_TIMES]
    expected_ts = [T0] if save_t0 else []
    expected_ts += [t for t, _ in sorted(middle)]
    if save_t1 and not save_steps:
        expected_ts.append(T1)
    expected_ts = np.asarray(expected_ts)

    num_saved = _finite_prefix_length(sol.ts)
    np.testing.assert_allclose(sol.ts[:num_saved], expected_ts, rtol=0, atol=1e-12)
    # Every leaf of the PyTree state gains a leading time axis of the same length.
    assert jax.tree.structure(sol.ys) == jax.tree.structure(Y0)
    for leaf, leaf0 in zip(jax.tree.leaves(sol.ys), jax.tree.leaves(Y0), strict=True):
        assert leaf.shape == (sol.ts.shape[0], *leaf0.shape)
        assert not np.isfinite(np.asarray(leaf[num_saved:])).any()
    saved = jax.tree.map(lambda leaf: leaf[:num_saved], sol.ys)
    _assert_tree_close(saved, _exact(expected_ts))


def test_default_saveat_saves_only_t1():
    sol = dfx.diffeqsolve(TERM, dfx.Tsit5(), T0, T1, DT0, Y0)
    np.testing.assert_array_equal(sol.ts, [T1])
    _assert_tree_close(sol.ys, _exact(np.array([T1])))


def test_saveat_steps_with_adaptive_steps_pads_with_inf():
    max_steps = 64
    sol = _solve(
        dfx.SaveAt(steps=True),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        max_steps=max_steps,
    )
    num_accepted = int(sol.stats["num_accepted_steps"])
    assert 1 < num_accepted < max_steps
    num_saved = _finite_prefix_length(sol.ts)
    assert num_saved == num_accepted
    saved_ts = np.asarray(sol.ts[:num_saved])
    assert (np.diff(saved_ts) > 0).all()
    assert saved_ts[0] > T0
    assert saved_ts[-1] == T1
    for leaf in jax.tree.leaves(sol.ys):
        assert leaf.shape[0] == sol.ts.shape[0]
        assert np.isinf(np.asarray(leaf[num_saved:])).all()
    saved = jax.tree.map(lambda leaf: leaf[:num_saved], sol.ys)
    _assert_tree_close(saved, _exact(saved_ts), atol=1e-7)


def test_saveat_ts_at_t0_and_t1_exactly():
    sol = _solve(dfx.SaveAt(ts=[T0, 0.5, T1]))
    np.testing.assert_array_equal(sol.ts, [T0, 0.5, T1])
    # The value at t0 is y0 itself, not an interpolation.
    jax.tree.map(lambda a, e: np.testing.assert_array_equal(a[0], e), sol.ys, Y0)
    _assert_tree_close(sol.ys, _exact(np.array([T0, 0.5, T1])))
    # The value at t1 is the solver's final state, as with `SaveAt(t1=True)`.
    final = _solve(dfx.SaveAt(t1=True))
    _assert_tree_close(
        jax.tree.map(lambda leaf: leaf[-1], sol.ys),
        jax.tree.map(lambda leaf: leaf[-1], final.ys),
        atol=1e-12,
    )


def test_saveat_fn_is_applied_to_saved_states():
    def kinetic_energy_like(t, y, args):
        return {"value": args * y["decay"] ** 2 + t, "x": y["rotation"][0]}

    sol = _solve(
        dfx.SaveAt(t0=True, ts=SAVE_TS, t1=True, fn=kinetic_energy_like), args=3.0
    )
    times = np.concatenate([[T0], SAVE_TS, [T1]])
    np.testing.assert_allclose(sol.ts, times)
    assert sol.ys["value"].shape == (len(times),)
    np.testing.assert_allclose(
        sol.ys["value"], 3.0 * np.exp(-2 * times) + times, rtol=0, atol=ATOL
    )
    np.testing.assert_allclose(sol.ys["x"], np.cos(times), rtol=0, atol=ATOL)


def test_subsaveat_list_gives_one_output_per_sub():
    subs = [
        dfx.SubSaveAt(t1=True),
        dfx.SubSaveAt(ts=SAVE_TS, fn=lambda t, y, args: y["rotation"][1]),
        dfx.SubSaveAt(t0=True, steps=True, fn=lambda t, y, args: y["decay"]),
    ]
    sol = _solve(dfx.SaveAt(subs=subs))
    assert isinstance(sol.ts, list) and len(sol.ts) == 3
    assert isinstance(sol.ys, list) and len(sol.ys) == 3

    final_ts, sine_ts, decay_ts = sol.ts
    final_ys, sine_ys, decay_ys = sol.ys
    np.testing.assert_array_equal(final_ts, [T1])
    _assert_tree_close(final_ys, _exact(np.array([T1])))
    np.testing.assert_allclose(sine_ts, SAVE_TS)
    np.testing.assert_allclose(sine_ys, np.sin(SAVE_TS), rtol=0, atol=ATOL)
    num_saved = _finite_prefix_length(decay_ts)
    expected = np.concatenate([[T0], STEP_TIMES])
    np.testing.assert_allclose(decay_ts[:num_saved], expected)
    np.testing.assert_allclose(
        decay_ys[:num_saved], np.exp(-expected), rtol=0, atol=ATOL
    )


def test_subsaveat_dict_gives_dict_of_outputs():
    subs = {
        "coarse": dfx.SubSaveAt(ts=[0.5]),
        "end": dfx.SubSaveAt(t1=True, fn=lambda t, y, args: y["decay"]),
    }
    sol = _solve(dfx.SaveAt(subs=subs))
    assert set(sol.ts) == set(sol.ys) == {"coarse", "end"}
    _assert_tree_close(sol.ys["coarse"], _exact(np.array([0.5])))
    np.testing.assert_allclose(sol.ys["end"], [np.exp(-T1)], rtol=0, atol=ATOL)


def test_t0_equal_to_t1_returns_y0():
    sol = _solve(dfx.SaveAt(t0=True, ts=[0.5], t1=True), t0=0.5, t1=0.5)
    np.testing.assert_array_equal(sol.ts, [0.5, 0.5, 0.5])
    for saved, initial in zip(
        jax.tree.leaves(sol.ys), jax.tree.leaves(Y0), strict=True
    ):
        for row in saved:
            np.testing.assert_array_equal(row, initial)
    assert int(sol.stats["num_steps"]) == 0


def test_backwards_saveat_ts_decreasing_matches_closed_form():
    ts = SAVE_TS[::-1]
    for controller in (
        dfx.ConstantStepSize(),
        dfx.PIDController(rtol=1e-8, atol=1e-8),
    ):
        sol = _solve(
            dfx.SaveAt(t0=True, ts=ts, t1=True),
            t0=T1,
            t1=T0,
            dt0=-DT0,
            stepsize_controller=controller,
        )
        times = np.concatenate([[T1], ts, [T0]])
        np.testing.assert_allclose(sol.ts, times)
        # Backwards from y(1) = y0: the exact solution is exact(t - 1).
        _assert_tree_close(sol.ys, _exact(times - T1))


def test_dense_output_matches_closed_form_and_returns_increments():
    sol = _solve(
        dfx.SaveAt(dense=True),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    ts = np.linspace(T0, T1, 13)

    # Jitted: one compilation rather than one per operation of an eager evaluation
    # (evaluated eagerly by the other dense-output tests here).
    @jax.jit
    def evaluate(sol, ts):
        return jax.vmap(sol.evaluate)(ts), sol.evaluate(0.2, 0.7)

    values, increment = evaluate(sol, jnp.asarray(ts))
    _assert_tree_close(values, _exact(ts), atol=1e-7)
    # evaluate(ta, tb) on a PyTree state is the leafwise increment y(tb) - y(ta).
    # (Diffrax fails here: it subtracts the two PyTrees with `-`.)
    expected = jax.tree.map(lambda b, a: b - a, _exact(0.7), _exact(0.2))
    _assert_tree_close(increment, expected, atol=1e-7)


def test_dense_evaluate_of_two_times_is_the_increment():
    def decay(t, y, args):
        return -y

    sol = dfx.diffeqsolve(
        dfx.ODETerm(decay),
        dfx.Tsit5(),
        T0,
        T1,
        DT0,
        jnp.array([1.0, 2.0]),
        saveat=dfx.SaveAt(dense=True),
    )
    increment = sol.evaluate(0.2, 0.7)
    expected = np.array([1.0, 2.0]) * (np.exp(-0.7) - np.exp(-0.2))
    np.testing.assert_allclose(increment, expected, rtol=0, atol=ATOL)
    difference = sol.evaluate(0.7) - sol.evaluate(0.2)
    np.testing.assert_allclose(increment, difference, rtol=0, atol=1e-14)
    # Reversing the arguments reverses the sign.
    np.testing.assert_allclose(sol.evaluate(0.7, 0.2), -increment, atol=1e-14)


def test_dense_only_saveat_saves_no_ys():
    sol = _solve(dfx.SaveAt(dense=True))
    assert sol.ts is None and sol.ys is None
    _assert_tree_close(sol.evaluate(0.4), _exact(0.4))


def test_dense_does_not_change_saved_values():
    saveat_kwargs = dict(t0=True, ts=SAVE_TS, t1=True)
    plain = _solve(dfx.SaveAt(**saveat_kwargs))
    dense = _solve(dfx.SaveAt(**saveat_kwargs, dense=True))
    np.testing.assert_array_equal(plain.ts, dense.ts)
    _assert_tree_close(plain.ys, dense.ys, atol=1e-14)
    _assert_tree_close(dense.evaluate(0.65), _exact(0.65))


def test_evaluate_left_and_right_at_step_boundary():
    # Euler's dense output is piecewise linear, so its derivative jumps at every step
    # boundary: `left=True` takes the step that ends there, `left=False` the one that
    # starts there. The value is continuous.
    def decay(t, y, args):
        return -y

    sol = dfx.diffeqsolve(
        dfx.ODETerm(decay),
        dfx.Euler(),
        T0,
        T1,
        DT0,
        jnp.array(1.0),
        saveat=dfx.SaveAt(t0=True, steps=True, dense=True),
    )
    # Euler on y' = -y: y_k = (1 - h)^k, exactly.
    k = 4
    boundary = k * DT0
    y_k = (1 - DT0) ** k
    np.testing.assert_allclose(sol.ys[k], y_k, rtol=1e-14)
    for left in (True, False):
        np.testing.assert_allclose(sol.evaluate(boundary, left=left), y_k, rtol=1e-14)
    # Slope of step k-1 -> k is -y_{k-1}; of step k -> k+1 it is -y_k.
    np.testing.assert_allclose(
        sol.derivative(boundary, left=True), -((1 - DT0) ** (k - 1)), rtol=1e-12
    )
    np.testing.assert_allclose(sol.derivative(boundary, left=False), -y_k, rtol=1e-12)


def test_saveat_ts_outside_interval_is_rejected():
    with pytest.raises(ValueError, match="ts"):
        _solve(dfx.SaveAt(ts=[0.2, 1.5]))
    with pytest.raises(ValueError, match="ts"):
        _solve(dfx.SaveAt(ts=[-0.1, 0.5]))


def test_saveat_ts_not_monotonic_is_rejected():
    with pytest.raises(ValueError, match="ts") as error:
        _solve(dfx.SaveAt(ts=[0.5, 0.2, 0.8]))
    assert "increasing" in str(error.value)


def _euler_decay(saveat, dt0=0.25, max_steps=8, **kwargs):
    # Euler on dy/dt = -y from y(0) = 1 has the exact discrete solution (1 - dt)^k.
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler(),
        0.0,
        1.0,
        dt0,
        jnp.asarray(1.0),
        saveat=saveat,
        max_steps=max_steps,
        **kwargs,
    )


@pytest.mark.parametrize(
    "n, dt0, t1, expected",
    [
        # (every n-th step, step size, SaveAt(t1=...), expected saved times)
        (2, 0.25, True, [0.5, 1.0]),
        (2, 0.2, True, [0.4, 0.8, 1.0]),
        (2, 0.2, False, [0.4, 0.8]),
        (3, 0.25, False, [0.75]),
        (3, 0.25, True, [0.75, 1.0]),
        (4, 0.25, True, [1.0]),
    ],
)
def test_saveat_steps_n_saves_every_nth_step_and_t1_once(n, dt0, t1, expected):
    sol = _euler_decay(dfx.SaveAt(steps=n, t1=t1), dt0=dt0)
    # Buffer: max_steps // n step slots, plus one for t1 when that does not divide.
    size = -(-8 // n) if t1 else 8 // n
    assert sol.ts.shape == (size,)
    count = len(expected)
    np.testing.assert_allclose(sol.ts[:count], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        sol.ys[:count], (1 - dt0) ** np.round(np.asarray(expected) / dt0), rtol=1e-12
    )
    assert np.all(np.isinf(sol.ts[count:])) and np.all(np.isinf(sol.ys[count:]))


def test_saveat_steps_rejects_negative_or_fractional_n():
    with pytest.raises(ValueError, match="steps"):
        dfx.SaveAt(steps=-1)
    with pytest.raises(ValueError, match="steps"):
        dfx.SaveAt(steps=2.5)


def test_saveat_nothing_returns_no_outputs():
    sol = _euler_decay(dfx.SaveAt(solver_state=True))
    assert sol.ts is None and sol.ys is None
    sol = _euler_decay(dfx.SaveAt())
    assert sol.ts is None and sol.ys is None and int(sol.stats["num_steps"]) == 4


@pytest.mark.parametrize(
    "saveat, expected_ts",
    [
        # The t1 slot holds where the solve stopped, right after what was saved.
        (dfx.SaveAt(t1=True), [0.5]),
        (dfx.SaveAt(t1=True, ts=[0.1, 0.6, 0.9]), [0.1, 0.5]),
        (dfx.SaveAt(t0=True, t1=True, ts=[0.1, 0.6, 0.9]), [0.0, 0.1, 0.5]),
        # With `steps=True` the last step is already saved.
        (dfx.SaveAt(t1=True, steps=True, ts=[0.1]), [0.1, 0.25, 0.5]),
        (dfx.SaveAt(t1=True, steps=2, ts=[0.3]), [0.3, 0.5]),
        (dfx.SaveAt(t1=True, steps=3), [0.5]),
    ],
)
def test_saveat_t1_of_early_stopped_solve_holds_the_stop(saveat, expected_ts):
    sol = _euler_decay(saveat, max_steps=2, throw=False)
    assert sol.result == dfx.RESULTS.max_steps_reached
    count = len(expected_ts)
    np.testing.assert_allclose(sol.ts[:count], expected_ts, rtol=0, atol=1e-12)
    assert np.all(np.isinf(sol.ts[count:]))
    # The saved state at the stop is the state after two Euler steps.
    assert float(sol.ys[count - 1]) == pytest.approx(0.75**2, rel=1e-12)


@pytest.mark.parametrize("backwards", [False, True], ids=["forwards", "backwards"])
def test_dense_output_is_nan_outside_the_solved_interval(backwards):
    t0, t1, dt0 = (1.0, 0.0, -0.25) if backwards else (0.0, 1.0, 0.25)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(dense=True),
    )
    y_t0 = 1.0
    for t in (-0.5, 1.5):
        assert np.isnan(sol.evaluate(t)).all() and np.isnan(sol.derivative(t)).all()
    for t in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(
            sol.evaluate(t), y_t0 * np.exp(-(t - t0)) * np.ones(1), rtol=1e-3
        )


def test_dense_output_is_nan_after_a_terminating_event():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        1.0,
        0.25,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(dense=True),
        event=dfx.Event(lambda t, y, args, **kwargs: t > 0.6),
    )
    # A boolean condition stops the solve at the end of the step where it became
    # true; `Solution.t1` stays the requested end.
    assert float(sol.t1) == 1.0
    np.testing.assert_allclose(sol.evaluate(0.7), np.exp(-0.7) * np.ones(1), rtol=1e-3)
    assert np.isnan(sol.evaluate(0.8)).all()

"""Batching with `jax.vmap`: every argument a user batches over (`y0`, `args`, `t0`,
`t1`, `dt0`, `SaveAt(ts)`) gives each member the answer of its own single solve, and
a member that fails never disturbs the others. Lists where arrays belong are errors
that name the argument."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx

# Batched arithmetic may round differently from unbatched arithmetic in the last bit,
# so "equal to its own single solve" is checked to a few ulps.
ULPS = 1e-13
# Adaptive step times of a batch member and of the same solve alone may differ in the
# last digits (XLA compiles the batched program differently), and the controller
# carries such differences on: step times are compared to this tolerance.
STEP_TIMES_RTOL = 1e-6

_DECAY = dfx.ODETerm(lambda t, y, rate: -rate * y)
_TIGHT = dfx.PIDController(rtol=1e-10, atol=1e-12)


def _decay_exact(t0, t, y0, rate):
    return y0 * np.exp(-rate * (np.asarray(t) - t0))


def _singles(solve, *batched_args):
    """Each member solved on its own (compiled once, called once per member)."""
    single = jax.jit(solve)
    return [single(*args) for args in zip(*batched_args, strict=True)]


def _member(batched_leaf, index):
    return batched_leaf[index]


def _assert_members_equal(batched, singles):
    """`batched` (leading batch axis) against a list of single solves' outputs."""
    for index, single in enumerate(singles):
        member = jtu.tree_map(functools.partial(_member, index=index), batched)
        jtu.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=ULPS, atol=0),
            member,
            single,
        )


# ---- what can be batched ---------------------------------------------------------


# vmap over y0 against single solves and the closed form by default: the nested vmap
# over y0 and args, and jit(vmap(partial(diffeqsolve))) below.
@pytest.mark.slow
def test_vmap_over_y0_matches_a_loop_of_single_solves():
    ts = jnp.linspace(0.0, 2.0, 7)

    def solve(y0):
        sol = dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            2.0,
            0.1,
            y0,
            0.8,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=_TIGHT,
        )
        return sol.ys

    y0s = jnp.array([[1.0, -1.0], [2.0, 0.5], [0.0, 3.0]])
    batched = jax.vmap(solve)(y0s)
    assert batched.shape == (3, 7, 2)
    _assert_members_equal(batched, _singles(solve, y0s))
    exact = np.asarray(y0s)[:, None, :] * np.exp(-0.8 * np.asarray(ts))[None, :, None]
    np.testing.assert_allclose(batched, exact, rtol=1e-8, atol=1e-12)


def test_vmap_over_a_pytree_of_args_with_per_leaf_in_axes():
    # y' = -k y + c has y = c/k + (y0 - c/k) exp(-k t); k is batched, c is shared.
    term = dfx.ODETerm(lambda t, y, args: -args["k"] * y + args["c"])

    def solve(y0, args):
        return dfx.diffeqsolve(
            term, dfx.Tsit5(), 0.0, 1.5, 0.1, y0, args, stepsize_controller=_TIGHT
        ).ys[0]

    rates = jnp.array([0.5, 1.0, 4.0])
    batched = jax.vmap(solve, in_axes=(None, {"k": 0, "c": None}))(
        2.0, {"k": rates, "c": 0.3}
    )
    steady = 0.3 / np.asarray(rates)
    exact = steady + (2.0 - steady) * np.exp(-np.asarray(rates) * 1.5)
    np.testing.assert_allclose(batched, exact, rtol=1e-9)


def test_vmap_over_t0_and_t1_including_backward_and_empty_intervals():
    # Members integrate forwards, backwards and over an empty interval in one batch.
    def solve(t0, t1, dt0):
        ts = t0 + (t1 - t0) * jnp.linspace(0.0, 1.0, 5)
        sol = dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            t0,
            t1,
            dt0,
            1.0,
            0.7,
            saveat=dfx.SaveAt(t0=True, ts=ts),
            stepsize_controller=_TIGHT,
        )
        return sol.ts, sol.ys, sol.stats["num_steps"]

    t0s = jnp.array([0.0, 1.0, 0.5, 2.0])
    t1s = jnp.array([1.0, 0.0, 0.5, 3.5])
    dt0s = jnp.array([0.1, -0.1, 0.1, 0.2])
    ts, ys, steps = jax.vmap(solve)(t0s, t1s, dt0s)
    for i, (t0, t1) in enumerate(zip(t0s.tolist(), t1s.tolist(), strict=True)):
        expected_ts = np.concatenate([[t0], t0 + (t1 - t0) * np.linspace(0, 1, 5)])
        np.testing.assert_allclose(ts[i], expected_ts, rtol=1e-15, atol=1e-15)
        np.testing.assert_allclose(
            ys[i], _decay_exact(t0, expected_ts, 1.0, 0.7), rtol=1e-9
        )
    assert int(steps[2]) == 0  # t0 == t1: no step at all
    _assert_members_equal((ts, ys, steps), _singles(solve, t0s, t1s, dt0s))


def test_vmap_over_dt0_with_constant_steps_gives_each_members_euler_recursion():
    def solve(dt0):
        return dfx.diffeqsolve(_DECAY, dfx.Euler(), 0.0, 1.0, dt0, 1.0, 1.0).ys[0]

    dt0s = jnp.array([0.5, 0.25, 0.125, 1 / 64])
    batched = jax.vmap(solve)(dt0s)
    exact = [(1 - dt) ** round(1 / dt) for dt in dt0s.tolist()]
    np.testing.assert_allclose(batched, exact, rtol=1e-14)


@pytest.mark.slow  # t1 under vmap by default: test_vmap_over_t0_and_t1_including_...
def test_vmap_over_t1_with_constant_steps_stops_each_member_at_its_own_end():
    def solve(t1):
        return dfx.diffeqsolve(_DECAY, dfx.Euler(), 0.0, t1, 0.25, 1.0, 1.0)

    sol = jax.vmap(solve)(jnp.array([0.5, 1.0, 0.75]))
    np.testing.assert_allclose(sol.ys[:, 0], [0.75**2, 0.75**4, 0.75**3], rtol=1e-15)
    np.testing.assert_array_equal(sol.stats["num_steps"], [2, 4, 3])


def test_vmap_over_saveat_ts_gives_each_member_its_own_save_times():
    # A SaveAt holding a batch of times is built inside the vmapped function, so
    # that each member sees a 1-D array of its own times.
    def solve(ts, rate):
        sol = dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            3.0,
            0.1,
            1.0,
            rate,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=_TIGHT,
        )
        return sol.ts, sol.ys

    ts = jnp.array([[0.0, 0.1, 0.2, 0.3], [0.5, 1.0, 2.0, 3.0], [2.9, 2.9, 3.0, 3.0]])
    rates = jnp.array([1.0, 0.5, 2.0])
    batched_ts, batched_ys = jax.vmap(solve)(ts, rates)
    np.testing.assert_array_equal(batched_ts, ts)
    exact = np.exp(-np.asarray(rates)[:, None] * np.asarray(ts))
    np.testing.assert_allclose(batched_ys, exact, rtol=1e-9)
    _assert_members_equal((batched_ts, batched_ys), _singles(solve, ts, rates))


# Where the step-size control is beside the point, Euler with constant steps keeps
# the compile cheap and the truth exact: y_n = (1 - rate dt)^n y0.


def test_vmap_over_a_non_leading_axis_with_out_axes():
    def solve(y0):
        return dfx.diffeqsolve(_DECAY, dfx.Euler(), 0.0, 1.0, 0.25, y0, 2.0).ys[0]

    y0s = jnp.arange(6.0).reshape(2, 3)  # three members along axis 1
    batched = jax.vmap(solve, in_axes=1, out_axes=1)(y0s)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched, np.asarray(y0s) * 0.5**4, rtol=1e-15)


def test_nested_vmap_over_y0_and_args_is_a_grid_of_single_solves():
    def solve(y0, rate):
        return dfx.diffeqsolve(_DECAY, dfx.Euler(), 0.0, 1.0, 0.25, y0, rate).ys[0]

    y0s = jnp.array([1.0, -2.0, 3.0])
    rates = jnp.array([0.5, 1.0])
    grid = jax.vmap(jax.vmap(solve, in_axes=(None, 0)), in_axes=(0, None))(y0s, rates)
    assert grid.shape == (3, 2)
    exact = np.asarray(y0s)[:, None] * (1 - 0.25 * np.asarray(rates))[None, :] ** 4
    np.testing.assert_allclose(grid, exact, rtol=1e-15)


def test_vmap_over_a_list_y0_maps_each_list_entry():
    # A list is a PyTree: each entry is a state leaf, batched along its own axis 0.
    term = dfx.ODETerm(lambda t, y, args: [-y[0], -2.0 * y[1]])

    def solve(y0):
        return dfx.diffeqsolve(term, dfx.Euler(), 0.0, 1.0, 0.25, y0).ys

    ys = jax.vmap(solve)([jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])])
    assert isinstance(ys, list) and len(ys) == 2
    np.testing.assert_allclose(ys[0][:, 0], 0.75**4 * np.array([1, 2]), rtol=1e-15)
    np.testing.assert_allclose(ys[1][:, 0], 0.5**4 * np.array([3, 4]), rtol=1e-15)


# ---- the jit(vmap(partial(diffeqsolve))) pattern -----------------------------------


def test_filter_jit_of_vmap_of_partial_diffeqsolve_returns_a_batched_solution():
    solve = eqx.filter_jit(
        jax.vmap(
            functools.partial(
                dfx.diffeqsolve,
                _DECAY,
                dfx.Tsit5(),
                0.0,
                2.0,
                0.1,
                saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 2.0, 5)),
                stepsize_controller=_TIGHT,
            ),
            in_axes=(0, None),  # y0 batched, args shared
        )
    )
    y0s = jnp.array([1.0, 2.0, 4.0])
    sol = solve(y0s, 0.5)
    assert isinstance(sol, dfx.Solution)
    assert sol.ys.shape == (3, 5)
    assert sol.ts.shape == (3, 5)
    assert sol.stats["num_steps"].shape == (3,)
    assert bool(jnp.all(dfx.is_successful(sol.result)))
    exact = np.asarray(y0s)[:, None] * np.exp(-0.5 * np.linspace(0.0, 2.0, 5))
    np.testing.assert_allclose(sol.ys, exact, rtol=1e-9)
    # The compiled function is reused for a new batch of the same shape.
    again = solve(2 * y0s, 0.5)
    np.testing.assert_allclose(again.ys, 2 * exact, rtol=1e-9)


# ---- failures stay per member ------------------------------------------------------


def _solve_allowing_failure(y0, rate, t1, max_steps=25):
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Tsit5(),
        0.0,
        t1,
        0.1,
        y0,
        rate,
        saveat=dfx.SaveAt(t0=True, ts=t1 * jnp.linspace(0.1, 1.0, 4), steps=True),
        stepsize_controller=_TIGHT,
        max_steps=max_steps,
        throw=False,
    )
    return sol.ts, sol.ys, sol.result, sol.stats


# The middle member needs far more than 25 steps; the others need fewer.
_FAILURE_BATCH = (
    jnp.array([1.0, 2.0, 3.0]),  # y0
    jnp.array([0.5, 1.0, 0.2]),  # rate
    jnp.array([1.0, 500.0, 2.0]),  # t1
)


@functools.cache
def _solve_failure_batch():
    return jax.vmap(_solve_allowing_failure)(*_FAILURE_BATCH)


def test_throw_false_under_vmap_gives_a_result_code_per_member():
    _, _, result, stats = _solve_failure_batch()
    okay = np.asarray(dfx.is_successful(result))
    np.testing.assert_array_equal(okay, [True, False, True])
    max_steps_reached = np.asarray(result == dfx.RESULTS.max_steps_reached)
    np.testing.assert_array_equal(max_steps_reached, [False, True, False])
    assert int(stats["num_steps"][1]) == 25
    assert np.all(np.asarray(stats["num_steps"])[[0, 2]] < 25)


def test_an_unfinished_member_never_corrupts_the_others():
    y0s, rates, _ = _FAILURE_BATCH
    ts, ys, _, stats = _solve_failure_batch()
    singles = _singles(_solve_allowing_failure, *_FAILURE_BATCH)
    for i, (single_ts, single_ys, _, single_stats) in enumerate(singles):
        # Same values, and `inf` padding in the same places (unfilled `steps` slots,
        # and the failed member's unreached save times).
        np.testing.assert_allclose(ts[i], single_ts, rtol=STEP_TIMES_RTOL)
        np.testing.assert_allclose(ys[i], single_ys, rtol=STEP_TIMES_RTOL)
        for key in ("num_steps", "num_accepted_steps", "num_rejected_steps"):
            assert int(stats[key][i]) == int(single_stats[key])
    # The finished members are also right in absolute terms.
    for i in (0, 2):
        saved = np.isfinite(np.asarray(ts[i]))
        np.testing.assert_allclose(
            ys[i][saved],
            _decay_exact(0.0, ts[i][saved], float(y0s[i]), float(rates[i])),
            rtol=1e-8,
        )
    # The failed member kept what it saved before stopping, in time order, and
    # padded the rest.
    saved = np.isfinite(np.asarray(ts[1]))
    assert saved[0] and not saved[-1]
    assert np.all(np.diff(np.asarray(ts[1])[saved]) >= 0)
    assert np.all(np.isfinite(ys[1][saved])) and np.all(np.isinf(ys[1][~saved]))


def test_members_that_finish_at_different_steps_record_only_their_own_events():
    # Members with different frequencies take different numbers of steps and cross
    # zero a different number of times; each member's saves, dense output, event
    # record and counts are those of its own solve, whatever the others still do.
    import optimistix as optx

    def solve(omega):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, w: jnp.stack([y[1], -(w**2) * y[0]])),
            dfx.Tsit5(),
            0.0,
            4.0,
            0.05,
            jnp.array([1.0, 0.0]),
            omega,
            saveat=dfx.SaveAt(ts=[1.0, 2.0, 3.0], steps=True, dense=True),
            stepsize_controller=dfx.PIDController(rtol=1e-9, atol=1e-9),
            event=dfx.Event(
                lambda t, y, args, **kw: y[0],
                root_finder=optx.Newton(rtol=1e-12, atol=1e-12),
                terminate=False,
                max_events=8,
            ),
            max_steps=400,
        )
        outputs = (sol.ts, sol.ys, sol.event_ts, sol.event_ys, sol.evaluate(2.5))
        counts = (sol.stats["num_steps"], sol.stats["num_accepted_steps"])
        return outputs, counts, sol.result

    omegas = jnp.array([0.5, 3.0, 1.0])
    outputs, counts, result = jax.vmap(solve)(omegas)
    assert np.all(np.asarray(dfx.is_successful(result)))
    for i, (single_out, single_counts, _) in enumerate(_singles(solve, omegas)):
        for got, want in zip(outputs, single_out, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=STEP_TIMES_RTOL, atol=1e-7)
        assert [int(c[i]) for c in counts] == [int(c) for c in single_counts]
    # Against the closed form x = cos(w t): zeros at (k + 1/2) pi / w below t1 = 4.
    event_ts = np.asarray(outputs[2])
    for i, w in enumerate(np.asarray(omegas)):
        zeros = (np.arange(8) + 0.5) * np.pi / w
        zeros = zeros[zeros < 4.0]
        np.testing.assert_allclose(event_ts[i][: zeros.size], zeros, atol=1e-7)
        assert np.all(np.isinf(event_ts[i][zeros.size :]))
    np.testing.assert_allclose(
        outputs[4][:, 0], np.cos(2.5 * np.asarray(omegas)), atol=1e-7
    )
    assert len(set(int(c) for c in counts[0])) == 3  # all stop at different steps


def test_dense_output_under_vmap_is_per_member_even_when_one_fails():
    def solve(y0, t1):
        sol = dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            t1,
            0.1,
            y0,
            0.7,
            saveat=dfx.SaveAt(dense=True),
            stepsize_controller=_TIGHT,
            max_steps=20,
            throw=False,
        )
        return sol.evaluate(0.5), sol.result

    values, result = jax.vmap(solve)(jnp.array([1.0, 2.0]), jnp.array([1.0, 1e4]))
    np.testing.assert_array_equal(dfx.is_successful(result), [True, False])
    # Both members passed t = 0.5 before stopping, so both can be evaluated there.
    np.testing.assert_allclose(values, np.exp(-0.35) * np.array([1.0, 2.0]), rtol=1e-8)


def test_a_wrong_sign_dt0_in_one_member_fails_only_that_member():
    def solve(dt0):
        return dfx.diffeqsolve(
            _DECAY, dfx.Euler(), 0.0, 1.0, dt0, 1.0, 0.5, throw=False
        )

    sol = jax.vmap(solve)(jnp.array([0.25, -0.25]))
    np.testing.assert_array_equal(dfx.is_successful(sol.result), [True, False])
    np.testing.assert_array_equal(
        sol.result == dfx.RESULTS.dt0_wrong_sign, [False, True]
    )
    np.testing.assert_allclose(sol.ys[0, 0], 0.875**4, rtol=1e-15)


def test_throw_true_under_vmap_raises_when_any_member_fails():
    def solve(t1):
        return dfx.diffeqsolve(
            _DECAY, dfx.Euler(), 0.0, t1, 0.1, 1.0, 0.7, max_steps=20
        ).ys

    with pytest.raises(Exception, match="maximum number of solver steps"):
        jax.block_until_ready(jax.vmap(solve)(jnp.array([1.0, 1e4])))


@pytest.mark.parametrize("staged", [False, True], ids=["eager", "jit"])
def test_a_vmap_over_no_members_returns_empty_outputs(staged):
    """A batch of size 0 (e.g. the empty remainder of a split) gives outputs with a
    leading axis of size 0, with `throw=True`, adaptive or constant steps, saves,
    dense output, an event, a Brownian tree, a CDE, Langevin, and under `jax.grad`
    (of the batch, and per member with every adjoint)."""
    maybe_jit = jax.jit if staged else (lambda f: f)
    ts = jnp.linspace(0.0, 1.0, 5)
    pid = dfx.PIDController(rtol=1e-6, atol=1e-8)

    def ode(y0, rate, saveat=dfx.SaveAt(ts=ts), event=None, solver=dfx.Tsit5()):
        sol = dfx.diffeqsolve(
            _DECAY,
            solver,
            0.0,
            1.0,
            0.1,
            y0,
            rate,
            saveat=saveat,
            event=event,
            stepsize_controller=pid
            if solver.order(_DECAY) > 1
            else dfx.ConstantStepSize(),
        )
        return sol

    def sde(key):
        path = dfx.VirtualBrownianTree(
            0.0, 1.0, 1e-3, (), key, levy_area=dfx.SpaceTimeLevyArea
        )
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, a: -y),
            dfx.ControlTerm(lambda t, y, a: 0.1 * y, path),
        )
        return dfx.diffeqsolve(
            terms,
            dfx.SPaRK(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
        ).ys

    none = jnp.zeros((0,))
    assert maybe_jit(jax.vmap(lambda y: ode(y, 0.7).ys))(none).shape == (0, 5)
    assert maybe_jit(jax.vmap(lambda r: ode(1.0, r).ys))(none).shape == (0, 5)
    assert maybe_jit(jax.vmap(lambda y: ode(y, 0.7, solver=dfx.Euler()).ys))(
        none
    ).shape == (0, 5)
    dense = jax.vmap(lambda y: ode(y, 0.7, dfx.SaveAt(dense=True)).evaluate(0.5))
    assert maybe_jit(dense)(none).shape == (0,)
    event = dfx.Event(lambda t, y, args, **kwargs: y - 0.5)
    assert maybe_jit(jax.vmap(lambda y: ode(y, 0.7, dfx.SaveAt(t1=True), event).ts))(
        none
    ).shape == (0, 1)
    assert maybe_jit(jax.vmap(sde))(jax.random.split(jax.random.key(0), 0)).shape == (
        0,
        1,
    )
    assert maybe_jit(
        jax.vmap(jax.vmap(lambda y, r: ode(y, r).ys, (0, None)), (None, 0))
    )(jnp.ones(3), none).shape == (0, 3, 5)

    def loss(rate):
        return jax.vmap(lambda y: ode(y, rate).ys)(none).sum()

    assert maybe_jit(jax.grad(loss))(0.7) == 0.0

    # Arguments checked while the solve runs (`StepTo`'s times, a tree's interval,
    # an interpolation's times), mapped over no members.
    def step_to(ts):
        controller = dfx.StepTo(ts=ts)
        return dfx.diffeqsolve(
            _DECAY,
            dfx.Euler(),
            ts[0],
            ts[-1],
            None,
            1.0,
            0.7,
            stepsize_controller=controller,
        ).ys

    assert maybe_jit(jax.vmap(step_to))(jnp.zeros((0, 4))).shape == (0, 1)

    def tree(t1):
        path = dfx.VirtualBrownianTree(0.0, t1, 1e-3, (), jax.random.key(0))
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, a: -y),
            dfx.ControlTerm(lambda t, y, a: 0.1, path),
        )
        return dfx.diffeqsolve(terms, dfx.Euler(), 0.0, t1, 0.1, 1.0).ys

    assert maybe_jit(jax.vmap(tree))(none).shape == (0, 1)

    def cde(ts):
        path = dfx.LinearInterpolation(ts, jnp.stack([ts, ts**2], -1))
        term = dfx.ControlTerm(lambda t, y, a: jnp.ones((1, 2)), path)
        return dfx.diffeqsolve(
            term.to_ode(), dfx.Tsit5(), ts[0], ts[-1], 0.1, jnp.zeros(1)
        ).ys

    assert maybe_jit(jax.vmap(cde))(jnp.zeros((0, 5))).shape == (0, 1, 1)

    def langevin(gamma):
        path = dfx.VirtualBrownianTree(
            0.0, 1.0, 1e-3, (2,), jax.random.key(0), levy_area=dfx.SpaceTimeLevyArea
        )
        terms = dfx.MultiTerm(
            dfx.UnderdampedLangevinDriftTerm(gamma, 1.0, lambda x, args: x),
            dfx.UnderdampedLangevinDiffusionTerm(gamma, 1.0, path),
        )
        y0 = (jnp.ones(2), jnp.zeros(2))
        return dfx.diffeqsolve(terms, dfx.ALIGN(0.1), 0.0, 1.0, 0.1, y0).ys[0]

    assert maybe_jit(jax.vmap(langevin))(none).shape == (0, 1, 2)

    # Every adjoint, and root finders, under `jax.grad` per member: their derivative
    # rules (traced where the `jax.vmap` cannot be seen) hold checks of their own.
    def loss(y0, adjoint, solver=dfx.Tsit5(), event=None):
        return dfx.diffeqsolve(
            _DECAY,
            solver,
            0.0,
            1.0 if event is None else jnp.inf,
            0.1,
            y0,
            0.7,
            adjoint=adjoint,
            event=event,
            stepsize_controller=pid,
            max_steps=4096,
        ).ys.sum()

    newton = optx.Newton(rtol=1e-8, atol=1e-8)
    crossing = dfx.Event(lambda t, y, args, **kwargs: y - 0.5, root_finder=newton)
    for adjoint, solver, event in [
        (dfx.BacksolveAdjoint(), dfx.Tsit5(), None),
        (dfx.ImplicitAdjoint(), dfx.Tsit5(), dfx.Event(dfx.steady_state_event())),
        (dfx.RecursiveCheckpointAdjoint(), dfx.Tsit5(), crossing),
        (dfx.RecursiveCheckpointAdjoint(), dfx.Kvaerno5(), None),
        (dfx.DirectAdjoint(), dfx.Tsit5(), None),
    ]:
        gradient = jax.vmap(
            jax.grad(
                functools.partial(loss, adjoint=adjoint, solver=solver, event=event)
            )
        )
        assert maybe_jit(gradient)(none).shape == (0,)
    hessian = jax.vmap(
        jax.hessian(functools.partial(loss, adjoint=dfx.RecursiveCheckpointAdjoint()))
    )
    assert maybe_jit(hessian)(none).shape == (0,)

    # The (empty) solution has the structure, dtypes and weak types of a member's.
    def solution(y0):
        return dfx.diffeqsolve(
            _DECAY,
            dfx.Tsit5(),
            0.0,
            1.0,
            0.1,
            y0,
            0.7,
            saveat=dfx.SaveAt(ts=ts),
            stepsize_controller=pid,
        )

    one = jax.eval_shape(solution, 1.0)
    empty = jax.eval_shape(jax.vmap(solution), none)
    assert jtu.tree_structure(one) == jtu.tree_structure(empty)
    for a, b in zip(jtu.tree_leaves(one), jtu.tree_leaves(empty), strict=True):
        assert (b.shape, b.dtype, b.weak_type) == ((0, *a.shape), a.dtype, a.weak_type)


# ---- lists where arrays belong ---------------------------------------------------


def test_y0_as_a_list_of_scalars_is_a_valid_pytree():
    term = dfx.ODETerm(lambda t, y, args: [-y[0], -3.0 * y[1]])
    sol = dfx.diffeqsolve(term, dfx.Euler(), 0.0, 1.0, 0.25, [1.0, 2.0])
    assert isinstance(sol.ys, list)
    np.testing.assert_allclose(sol.ys[0], [0.75**4], rtol=1e-15)
    np.testing.assert_allclose(sol.ys[1], [2.0 * 0.25**4], rtol=1e-15)


def test_saveat_ts_given_as_a_flat_list_is_accepted():
    saveat = dfx.SaveAt(ts=[0.0, 0.5, 1.0])
    sol = dfx.diffeqsolve(_DECAY, dfx.Euler(), 0.0, 1.0, 0.25, 1.0, 1.0, saveat=saveat)
    np.testing.assert_allclose(sol.ys, [1.0, 0.75**2, 0.75**4], rtol=1e-15)


def test_step_to_given_as_a_flat_list_is_accepted():
    sol = dfx.diffeqsolve(
        _DECAY,
        dfx.Euler(),
        0.0,
        1.0,
        None,
        1.0,
        1.0,
        stepsize_controller=dfx.StepTo(ts=[0.0, 0.5, 1.0]),
    )
    np.testing.assert_allclose(sol.ys, [0.25], rtol=1e-15)


@pytest.mark.parametrize("name", ["t0", "t1"])
@pytest.mark.parametrize("value", [[0.0, 1.0], [0.5], (0.5,), [0.0, [1.0]]])
def test_t0_or_t1_given_a_list_is_an_error_naming_the_argument(name, value):
    times = {"t0": 0.0, "t1": 2.0, name: value}
    with pytest.raises((TypeError, ValueError), match=f"`{name}` must be a scalar"):
        dfx.diffeqsolve(_DECAY, dfx.Tsit5(), times["t0"], times["t1"], 0.1, 1.0, 1.0)


def test_t0_given_an_array_of_times_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="`t0` must be a scalar"):
        dfx.diffeqsolve(_DECAY, dfx.Tsit5(), jnp.zeros(3), 1.0, 0.1, 1.0, 1.0)


def test_dt0_given_a_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="`dt0` must be a scalar"):
        dfx.diffeqsolve(_DECAY, dfx.Tsit5(), 0.0, 1.0, [0.1, 0.2], 1.0, 1.0)


def test_saveat_ts_given_a_nested_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"`SaveAt\(ts=...\)` must be a 1-D array"):
        dfx.SaveAt(ts=[[0.0, 0.5], [0.5, 1.0]])


def test_step_to_given_a_nested_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"`StepTo\(ts=...\)`"):
        dfx.StepTo(ts=[[0.0, 0.5], [0.5, 1.0]])


# Ragged sequences: the error names the argument rather than numpy's own message
# about an inhomogeneous shape.
_RAGGED = [0.0, [0.5, 1.0]]


def test_saveat_ts_given_a_ragged_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"SaveAt\(ts=...\)"):
        dfx.SaveAt(ts=_RAGGED)


def test_step_to_given_a_ragged_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match=r"StepTo\(ts=...\)"):
        dfx.StepTo(ts=_RAGGED)


def test_dt0_given_a_ragged_list_is_an_error_naming_the_argument():
    with pytest.raises(ValueError, match="`dt0`"):
        dfx.diffeqsolve(_DECAY, dfx.Tsit5(), 0.0, 1.0, _RAGGED, 1.0, 1.0)


def _step_batchings(monkeypatch, fn, *args):
    """How many times JAX batches the largest program it batches while tracing
    `jax.vmap(fn)(*args)` (the solve loop's body)."""
    from jax._src.interpreters import batching

    sizes = []
    batch_jaxpr_axes = batching.batch_jaxpr_axes

    def counting(closed_jaxpr, *args, **kwargs):
        sizes.append(len(closed_jaxpr.jaxpr.eqns))
        return batch_jaxpr_axes(closed_jaxpr, *args, **kwargs)

    monkeypatch.setattr(batching, "batch_jaxpr_axes", counting)
    jax.jit(jax.vmap(fn)).trace(*args)
    monkeypatch.undo()
    return sizes.count(max(sizes))


@pytest.mark.parametrize("mapped", ["args", "y0"])
def test_vmap_batches_the_adaptive_step_twice(monkeypatch, mapped):
    # Under `jax.vmap`, JAX finds which loop values are mapped by batching the loop
    # body until that set stops growing, then once more. The solve starts every loop
    # value mapped, and its loop carries no predicate of its own per member (the
    # step body holds finished members), so the set never grows: the step is batched
    # twice, whether `y0` or only `args` is mapped (as with a batch of Brownian keys).
    def solve(y0, rate):
        return dfx.diffeqsolve(
            _DECAY, dfx.Tsit5(), 0.0, 2.0, 0.1, y0, args=rate,
            stepsize_controller=_TIGHT, saveat=dfx.SaveAt(ts=[0.5, 1.0, 1.5]),
        ).ys  # fmt: skip

    rates = jnp.array([0.5, 1.0, 3.0])
    y0 = jnp.array([1.0, 2.0])
    if mapped == "args":
        fn, args = functools.partial(solve, y0), (rates,)
    else:
        fn, args = functools.partial(solve, rate=1.5), (jnp.stack([y0, 2 * y0]),)
    assert _step_batchings(monkeypatch, fn, *args) == 2


def _euler_decay_to(t1, rate):
    """Euler with constant steps of 0.25 on `y' = -rate y` up to a traced `t1` (so
    the general loop, not the fixed-step scan: each member of a `jax.vmap` over `t1`
    stops at its own end), saving at `t1 / 2` and `t1`."""
    sol = dfx.diffeqsolve(
        _DECAY, dfx.Euler(), 0.0, t1, 0.25, 1.0, rate,
        saveat=dfx.SaveAt(ts=t1 * jnp.array([0.5, 1.0])), max_steps=8,
    )  # fmt: skip
    return sol.ys, sol.stats["num_steps"]


_EULER_T1S = (0.5, 1.0, 0.75)
_EULER_RATES = (1.0, 0.5, 2.0)


def test_vmap_batches_the_constant_step_loop_twice(monkeypatch):
    # Constant steps under `jax.vmap` in the general loop: the loop's condition is
    # mapped (each member's end, and its finite-state check), so the step body
    # holds the finished members, as with an adaptive controller, and the step is
    # batched twice (three times when the loop carried a predicate per member).
    t1s, rates = jnp.array(_EULER_T1S), jnp.array(_EULER_RATES)
    assert _step_batchings(monkeypatch, _euler_decay_to, t1s, rates) == 2


def _euler_decay_saved(t, rate, dt=0.25):
    """Euler's values for `y' = -rate y`, `y(0) = 1`, at `t`, interpolated linearly
    inside a step; and their derivatives with respect to `rate`."""
    k = np.floor(t / dt + 1e-12)
    frac = t / dt - k
    a = 1.0 - dt * rate
    value = (1 - frac) * a**k + frac * a ** (k + 1)
    slope = -dt * ((1 - frac) * k * a ** (k - 1) + frac * (k + 1) * a**k)
    return value, slope


def _count_stored_loops(monkeypatch) -> list:
    """The `max_steps` of each of diffeqx's stored loops traced from now on."""
    from diffeqx._adjoint import stored

    calls = []
    stored_while_loop = stored.stored_while_loop

    def counting(*args, **kwargs):
        calls.append(kwargs.get("max_steps"))
        return stored_while_loop(*args, **kwargs)

    monkeypatch.setattr(stored, "stored_while_loop", counting)
    return calls


def test_constant_steps_under_vmap_with_members_ending_apart_and_their_gradients(
    monkeypatch,
):
    # Members of 2, 4 and 3 steps in one batch: values, step counts and gradients
    # with respect to each member's rate are those of Euler's recursion, and of each
    # member solved alone. Under reverse mode the loop stores every step's state
    # (diffeqx's own loop; before, Equinox's checkpointed loop).
    calls = _count_stored_loops(monkeypatch)
    t1s, rates = jnp.array(_EULER_T1S), jnp.array(_EULER_RATES)
    ys, steps = jax.jit(jax.vmap(_euler_decay_to))(t1s, rates)

    def loss(rates):
        return jnp.sum(jax.vmap(_euler_decay_to)(t1s, rates)[0])

    grads = jax.jit(jax.grad(loss))(rates)
    assert calls == [8]
    np.testing.assert_array_equal(steps, [2, 4, 3])
    for i, (t1, rate) in enumerate(zip(_EULER_T1S, _EULER_RATES, strict=True)):
        value, slope = _euler_decay_saved(np.array([t1 / 2, t1]), rate)
        np.testing.assert_allclose(ys[i], value, rtol=1e-14)
        np.testing.assert_allclose(grads[i], slope.sum(), rtol=1e-13)
        single = jax.grad(lambda r, t1=t1: jnp.sum(_euler_decay_to(t1, r)[0]))
        np.testing.assert_allclose(grads[i], single(rate), rtol=ULPS)


def test_derivatives_inside_vmap_with_members_ending_apart(monkeypatch):
    # The `jax.vmap` outside the derivative (per-member gradients, `jax.jvp`,
    # `jax.linearize`): the members' inputs are seen as mapped through the
    # derivative's values, the step holds the finished members, and under reverse
    # mode the loop is diffeqx's stored loop. Euler's recursion gives each member's
    # derivative with respect to its rate.
    calls = _count_stored_loops(monkeypatch)
    t1s, rates = jnp.array(_EULER_T1S), jnp.array(_EULER_RATES)

    def total(t1, rate):
        return jnp.sum(_euler_decay_to(t1, rate)[0])

    grads = jax.jit(jax.vmap(jax.grad(total, argnums=1)))(t1s, rates)
    assert calls == [8]
    tangents = jax.jit(
        jax.vmap(lambda t1, r: jax.jvp(lambda r: total(t1, r), (r,), (1.0,))[1])
    )(t1s, rates)
    linear = jax.vmap(lambda t1, r: jax.linearize(lambda r: total(t1, r), r)[1](1.0))(
        t1s, rates
    )
    for i, (t1, rate) in enumerate(zip(_EULER_T1S, _EULER_RATES, strict=True)):
        _, slope = _euler_decay_saved(np.array([t1 / 2, t1]), rate)
        for derivative in (grads, tangents, linear):
            np.testing.assert_allclose(derivative[i], slope.sum(), rtol=1e-13)


def test_vmap_over_args_alone_gives_each_members_own_solve():
    def solve(rate):
        return dfx.diffeqsolve(
            _DECAY, dfx.Tsit5(), 0.0, 2.0, 0.1, jnp.array([1.0, 2.0]), args=rate,
            stepsize_controller=_TIGHT,
        ).ys[-1]  # fmt: skip

    rates = jnp.array([0.5, 1.0, 3.0])
    batched = jax.jit(jax.vmap(solve))(rates)
    for rate, ys in zip(rates, batched, strict=True):
        np.testing.assert_allclose(
            ys, _decay_exact(0.0, 2.0, np.array([1.0, 2.0]), float(rate)), rtol=1e-8
        )
        np.testing.assert_allclose(ys, jax.jit(solve)(rate), rtol=ULPS)


def test_vmap_evaluates_the_field_after_a_jump_only_where_a_member_needs_it():
    # A first-same-as-last solver told that the solve starts past a jump, under
    # `vmap` with an adaptive controller: `made_jump` then differs between members
    # (a rejected first step keeps it), and the field is evaluated again only in
    # steps where some member needs it, not in every step. Members scaled by a power
    # of two take the same steps, so the batch is evaluated as often as one member
    # alone (a callback with no batched argument runs once per batched evaluation;
    # measured: 81 and 81, and 92 when every step evaluated the field again).
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(None))
        return -y

    def solve(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(field),
            dfx.Tsit5(),
            0.0,
            3.0,
            0.5,
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-12),
            made_jump=jnp.asarray(True),
        ).ys

    alone = jax.jit(solve)(jnp.array([1.0]))
    jax.effects_barrier()
    alone_calls, calls[:] = len(calls), []
    batched = jax.jit(jax.vmap(solve))(jnp.array([[1.0], [2.0]]))
    jax.effects_barrier()
    np.testing.assert_allclose(batched[1], 2 * alone, rtol=1e-12)
    assert len(calls) == alone_calls


def _nested_calls(monkeypatch, nest: bool = True):
    """Records each step traced as a nested `jax.jit` (`loop._nested_call`); with
    `nest=False` the step is called directly instead."""
    from diffeqx._solve import loop

    calls = []
    real = loop._nested_call

    def spy(fn, inputs):
        calls.append(fn)
        return real(fn, inputs) if nest else fn(*inputs)

    monkeypatch.setattr(loop, "_nested_call", spy)
    return calls


def _batched_solves(solver, event=False):
    """Adaptive solves over a batch of parameters, closed over by the vector field
    (a `jax.vmap` tracer the nested step must see) and passed as `args`."""

    def solve(p):
        def field(t, y, args):
            return jnp.stack([p * y[1], -args * y[0] - 0.1 * y[1]])

        return dfx.diffeqsolve(
            dfx.ODETerm(field),
            solver,
            0.0,
            3.0,
            0.1,
            jnp.array([1.0, 0.0]),
            args=p + 1.0,
            saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 3.0, 7)),
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
            event=dfx.Event(lambda t, y, args, **kw: y[0] + 0.5) if event else None,
        )

    return jax.jit(jax.vmap(solve))(jnp.array([0.5, 1.0, 2.0]))


@pytest.mark.parametrize(
    "solver, event",
    [(dfx.Tsit5(), False), (dfx.Dopri5(), True), (dfx.Kvaerno3(), False)],
)
def test_the_nested_step_under_vmap_gives_the_same_solution(monkeypatch, solver, event):
    """Under `jax.vmap` (and no derivative) the adaptive loop traces its step as a
    nested `jax.jit` (less tracing and lowering time); the solution is that of the
    step traced in place, bit for bit."""
    calls = _nested_calls(monkeypatch)
    nested = _batched_solves(solver, event)
    assert len(calls) >= 1
    _nested_calls(monkeypatch, nest=False)
    in_place = _batched_solves(solver, event)
    for a, b in zip(jtu.tree_leaves(nested), jtu.tree_leaves(in_place), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_step_is_nested_only_under_vmap_without_derivatives(monkeypatch):
    calls = _nested_calls(monkeypatch)

    def solve(y0):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y), dfx.Tsit5(), 0.0, 1.0, 0.1, y0,
            stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
        ).ys[-1]  # fmt: skip

    y0s = jnp.array([1.0, 2.0])
    jax.make_jaxpr(jax.vmap(solve))(y0s)
    assert len(calls) == 1
    jax.make_jaxpr(solve)(y0s[0])
    jax.make_jaxpr(jax.grad(lambda y: jnp.sum(jax.vmap(solve)(y))))(y0s)
    # Constant steps: the fixed-step scan steps in place.
    jax.make_jaxpr(
        jax.vmap(
            lambda y0: (
                dfx.diffeqsolve(
                    dfx.ODETerm(lambda t, y, args: -y), dfx.Tsit5(), 0.0, 1.0, 0.1, y0
                ).ys
            )
        )
    )(y0s)
    assert len(calls) == 1

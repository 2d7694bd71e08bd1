"""The fixed-step fast path (constant steps known at trace time, run as a scan) gives
exactly what the general while loop gives: same steps, same end at t1, same result
code and counts when a solve fails."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from diffeqx._adjoint import checkpoint as checkpoint_module
from diffeqx._solve import fixed


def _field(t, y, args):
    return {"x": -args * y["x"] + jnp.sin(t), "v": y["x"] - y["v"]}


def _blow_up(t, y, args):
    # Finite until y passes 1, then infinite: the solve fails part-way.
    return jnp.where(y < 1, 10.0 * y + 1, jnp.inf).astype(y.dtype)


def _uses_scan(fn, *args):
    """Whether the solve's loop is the scan (which may hold a loop saving requested
    times in each step: a `while` printed inside the scan's body, after it)."""
    text = str(jax.make_jaxpr(fn)(*args))
    if "scan[" not in text:
        return False
    return "while[" not in text or text.index("scan[") < text.index("while[")


def _both_paths(solve_from_times, t0, t1, dt0):
    """Runs a solve with its times known at trace time (fast path) and with traced
    times (while loop), checking which path each took. The fast path is given the
    times as concrete arrays: values its program computes with, as the loop's are
    (Python numbers would be compiled in as constants, which XLA folds into the
    step times, rounding them otherwise)."""
    known = tuple(np.asarray(x) for x in (t0, t1, dt0))
    fast = solve_from_times(*known)
    assert _uses_scan(lambda: solve_from_times(*known))
    traced = jax.jit(solve_from_times)
    general = traced(jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(dt0))
    assert not _uses_scan(
        solve_from_times, jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(dt0)
    )
    return fast, general


def _assert_identical(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_same_saves(a, b):
    """`(ts, ys, stats, result)` of two batched solves: the same times, counts and
    result codes; the values to rounding (XLA may fuse the batched arithmetic of
    the two programs differently)."""
    _assert_identical((a[0], a[2], a[3]), (b[0], b[2], b[3]))
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-14, atol=0)


_SAVEATS = {
    "t1": dfx.SaveAt(t1=True),
    "t0+t1": dfx.SaveAt(t0=True, t1=True),
    "fn": dfx.SaveAt(t1=True, fn=lambda t, y, args: y["x"] * t),
    "subs": dfx.SaveAt(subs=[dfx.SubSaveAt(t0=True), dfx.SubSaveAt(t1=True)]),
}


# By default with Tsit5: `SaveAt(t1=True)` forwards in float64 and backwards in
# float32, and `subs` (several outputs) forwards in float64. (Euler's fixed-step path
# by default: the test of a solve that becomes non-finite.) The rest of the product is
# `slow`.
_DEFAULT_FIXED_PATH_CASES = (
    "Tsit5-t1-forwards-float64",
    "Tsit5-t1-backwards-float32",
    "Tsit5-subs-forwards-float64",
)


def _fixed_path_cases():
    for solver, name in ((dfx.Euler(), "Euler"), (dfx.Tsit5(), "Tsit5")):
        for saveat in _SAVEATS:
            for backwards in (False, True):
                for dtype in (jnp.float32, jnp.float64):
                    case_id = (
                        f"{name}-{saveat}-{'backwards' if backwards else 'forwards'}"
                        f"-{jnp.dtype(dtype).name}"
                    )
                    default = case_id in _DEFAULT_FIXED_PATH_CASES
                    yield pytest.param(
                        dtype,
                        backwards,
                        saveat,
                        solver,
                        id=case_id,
                        marks=() if default else (pytest.mark.slow,),
                    )


@pytest.mark.parametrize("dtype, backwards, saveat, solver", list(_fixed_path_cases()))
def test_fixed_step_path_matches_while_loop(dtype, backwards, saveat, solver):
    y0 = {"x": jnp.ones(3, dtype), "v": jnp.zeros(3, dtype)}
    t0, t1, dt0 = (1.0, 0.0, -0.03) if backwards else (0.0, 1.0, 0.03)

    def solve(t0, t1, dt0):
        # NumPy scalars stay concrete under tracing (JAX arrays made inside a traced
        # function do not), so the fast path sees them.
        cast = np.float32 if dtype == jnp.float32 else None
        times = (t0, t1, dt0)
        if cast is not None and not isinstance(t0, jax.Array):
            times = tuple(map(cast, times))
        elif cast is not None:
            times = tuple(x.astype(dtype) for x in times)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_field),
            solver,
            *times,
            y0,
            args=jnp.asarray(0.7, dtype),
            saveat=_SAVEATS[saveat],
        )
        return sol.ts, sol.ys, sol.stats, sol.result

    fast, general = _both_paths(solve, t0, t1, dt0)
    _assert_identical(fast, general)
    ts = fast[0] if saveat != "subs" else fast[0][1]
    # Ends exactly at t1 (34 steps of 0.03: the last one is shortened).
    assert ts[-1] == t1
    assert int(fast[2]["num_steps"]) == 34


@pytest.mark.parametrize(
    "solver, dtype, backwards",
    [(dfx.Tsit5(), np.float64, False), (dfx.Euler(), np.float32, True)],
    ids=["Tsit5-forwards-float64", "Euler-backwards-float32"],
)
def test_fixed_step_path_under_jit_with_constant_times_matches_while_loop(
    solver, dtype, backwards
):
    # Under `jax.jit`, times known at trace time are compiled as constants, and the
    # scan's starting values too (they are not computed at run time, see
    # `initial_state(seeded=False)`): the scan still gives what the while loop gives
    # with the same constant times. (Either may differ in the last bits from a solve
    # whose times are traced, as XLA folds constants into the arithmetic.)
    y0 = {"x": jnp.ones(3, dtype), "v": jnp.zeros(3, dtype)}
    times = tuple(
        dtype(x) for x in ((1.0, -2.0, -0.0123) if backwards else (0.0, 3.0, 0.0123))
    )
    ends = dfx.SubSaveAt(t0=True, t1=True)

    def solve(subs):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_field),
            solver,
            *times,
            y0,
            args=jnp.asarray(0.7, dtype),
            saveat=dfx.SaveAt(subs=subs, controller_state=True),
        )
        return sol.ts[0], sol.ys[0], sol.stats, sol.result, sol.controller_state

    # Saving every step as well takes the while loop.
    scan, loop = (
        (lambda: solve([ends])),
        (lambda: solve([ends, dfx.SubSaveAt(steps=True)])),
    )
    assert _uses_scan(scan) and not _uses_scan(loop)
    fast, general = jax.jit(scan)(), jax.jit(loop)()
    _assert_identical(fast, general)
    assert int(fast[2]["num_steps"]) == 244


@pytest.mark.parametrize("t1, steps", [(1.0, None), (0.27, 27)])
def test_fixed_step_path_matches_while_loop_when_solve_becomes_non_finite(t1, steps):
    """Part-way, and at the last step (`steps`: where it fails)."""

    def solve(t0, t1, dt0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_blow_up),
            dfx.Euler(),
            t0,
            t1,
            dt0,
            jnp.asarray(0.0),
            saveat=dfx.SaveAt(t0=True, t1=True),
            throw=False,
        )
        return sol.ts, sol.ys, sol.stats, sol.result

    fast, general = _both_paths(solve, 0.0, t1, 0.01)
    _assert_identical(fast, general)
    assert fast[3] == dfx.RESULTS.non_finite_state
    if steps is None:
        # It stopped part-way, not after all 100 steps.
        assert int(fast[2]["num_steps"]) < 100
    else:
        assert int(fast[2]["num_steps"]) == steps


def test_fixed_step_path_under_vmap_with_members_failing_at_different_steps():
    """Under `jax.vmap` the members share where the loop is until one stops: each
    member's own end (time, counts, result code, controller state) is its single
    solve's, and the while loop's, to the bit. The members: two failing part-way at
    different steps, one at its first step (its field already infinite), one never."""
    y0s = jnp.asarray([0.0, 0.5, 2.0, -5.0])

    def single(y0, t0, t1, dt0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_blow_up),
            dfx.Euler(),
            t0,
            t1,
            dt0,
            y0,
            saveat=dfx.SaveAt(t0=True, t1=True, controller_state=True),
            throw=False,
        )
        return sol.ts, sol.ys, sol.stats, sol.result, sol.controller_state

    def solve(t0, t1, dt0):
        return jax.vmap(single, in_axes=(0, None, None, None))(y0s, t0, t1, dt0)

    fast, general = _both_paths(solve, 0.0, 1.0, 0.01)
    _assert_identical(fast, general)
    steps = [int(n) for n in fast[2]["num_steps"]]
    assert steps[1] < steps[0] < 100 and steps[2] == 1 and steps[3] == 100
    results = fast[3]
    for i, y0 in enumerate(y0s):
        alone = single(y0, *(np.asarray(x) for x in (0.0, 1.0, 0.01)))
        member = jax.tree.map(lambda x, i=i: x[i], fast)
        _assert_identical(member, alone)
    failed = np.asarray(results == dfx.RESULTS.non_finite_state)
    assert failed.tolist() == [True, True, True, False]


def test_fixed_step_path_with_resumed_solver_state_matches_while_loop():
    term = dfx.ODETerm(lambda t, y, args: -y)
    first = dfx.diffeqsolve(
        term,
        dfx.Tsit5(),
        0.0,
        0.5,
        0.05,
        jnp.ones(2),
        saveat=dfx.SaveAt(t1=True, solver_state=True),
    )

    def solve(t0, t1, dt0):
        sol = dfx.diffeqsolve(
            term,
            dfx.Tsit5(),
            t0,
            t1,
            dt0,
            first.ys[-1],
            solver_state=first.solver_state,
        )
        return sol.ys, sol.stats

    fast, general = _both_paths(solve, 0.5, 1.0, 0.05)
    _assert_identical(fast, general)
    np.testing.assert_allclose(fast[0][-1], np.exp(-1.0) * np.ones(2), rtol=1e-6)


def test_resumed_controller_state_takes_the_while_loop():
    term = dfx.ODETerm(lambda t, y, args: -y)
    first = dfx.diffeqsolve(
        term,
        dfx.Euler(),
        0.0,
        0.5,
        0.1,
        jnp.ones(()),
        saveat=dfx.SaveAt(t1=True, controller_state=True),
    )

    def solve():
        return dfx.diffeqsolve(
            term,
            dfx.Euler(),
            0.5,
            1.0,
            0.1,
            first.ys[-1],
            controller_state=first.controller_state,
        ).ys

    assert not _uses_scan(solve)
    np.testing.assert_allclose(solve(), [0.9**10], rtol=1e-12)


def _field_solve(args, t0, t1, dt0, saveat):
    """The saved states of `_field` from `x = 1, v = 0` with `Tsit5`."""
    return dfx.diffeqsolve(
        dfx.ODETerm(_field),
        dfx.Tsit5(),
        t0,
        t1,
        dt0,
        {"x": jnp.ones(3), "v": jnp.zeros(3)},
        args=args,
        saveat=saveat,
    ).ys


def _assert_gradients_are_the_while_loops(loss):
    """`jax.grad(loss)(args, t0, t1, dt0)` with the times as static Python numbers
    (the fixed-step path) and as arrays (the while loop): the same, for one solve
    and under `jax.vmap` (against the while loop member by member). Returns the
    first."""
    times = (jnp.asarray(0.0), jnp.asarray(1.0), jnp.asarray(0.01))
    general = jax.jit(jax.grad(loss))
    fast = jax.jit(jax.grad(loss), static_argnums=(1, 2, 3))(0.7, 0.0, 1.0, 0.01)
    np.testing.assert_allclose(fast, general(0.7, *times), rtol=1e-12)
    args = jnp.array([0.5, 0.7])
    batched = jax.jit(
        jax.vmap(jax.grad(loss), in_axes=(0, None, None, None)),
        static_argnums=(1, 2, 3),
    )(args, 0.0, 1.0, 0.01)
    np.testing.assert_allclose(
        batched, [general(float(a), *times) for a in args], rtol=1e-12
    )
    return fast


DEFAULT_STORAGE_BYTES = checkpoint_module._STORAGE_BYTES


@pytest.mark.parametrize("storage", ["stored", "blocks"])
def test_fixed_step_path_gradients_match_while_loop(storage, monkeypatch):
    # Under reverse mode the fixed-step path stores every step's values when they are
    # few enough, else recomputes them in blocks: both, against the while loop.
    stored_bytes = []
    original = fixed._stored_bytes
    monkeypatch.setattr(
        fixed,
        "_stored_bytes",
        lambda *a: stored_bytes.append(original(*a)) or stored_bytes[-1],
    )
    if storage == "blocks":
        # A bound too small for any solve: the step traced for it is reused in the
        # blocks under `vmap`, and traced again for them outside.
        monkeypatch.setattr(checkpoint_module, "_STORAGE_BYTES", 1)

    def loss(args, t0, t1, dt0):
        ys = _field_solve(args, t0, t1, dt0, dfx.SaveAt(t1=True))
        return jnp.sum(ys["x"] ** 2) + jnp.sum(ys["v"])

    # Batched too: the bound counts the batch.
    _assert_gradients_are_the_while_loops(loss)
    # 100 steps, a few kB each: within the default bound, and about twice as much
    # counted for the batch of 2 (the batched step's program differs a little).
    assert len(stored_bytes) == 2
    assert 0 < stored_bytes[0] <= DEFAULT_STORAGE_BYTES
    assert 1.8 <= stored_bytes[1] / stored_bytes[0] <= 2.2


# ---- requested times (`SaveAt(ts=...)`) on the fixed-step path ----------------------
#
# Constant steps with requested times known at trace time run as the scan too: each
# step writes the next few requested times (as many as any step can cover, counted
# at trace time), at one index for all members under `jax.vmap`. Against the while
# loop: the same times, values, counts and result codes, to the bit.

_STEPS = np.arange(35) * 0.03  # the step ends of 0.03 from 0 (the last one is 1)


def _requested(name, backwards):
    ts = {
        "step ends": np.minimum(_STEPS, 1.0),
        "between ends": np.sort(np.random.default_rng(0).uniform(0.0, 1.0, 9)),
        "three per step": np.linspace(0.0, 1.0, 100),
        "t0 and t1 only": np.array([0.0, 1.0]),
    }[name]
    return 1.0 - ts if backwards else ts


_TS_CASES = [
    ("step ends", False, np.float64, dfx.Tsit5()),
    ("between ends", False, np.float64, dfx.Tsit5()),
    ("three per step", False, np.float64, dfx.Euler()),
    ("t0 and t1 only", False, np.float64, dfx.Tsit5()),
    ("between ends", True, np.float32, dfx.Tsit5()),
    ("step ends", True, np.float64, dfx.Euler()),
]


@pytest.mark.parametrize(
    "name, backwards, dtype, solver",
    _TS_CASES,
    ids=[f"{c[0]}-{'backwards' if c[1] else 'forwards'}" for c in _TS_CASES],
)
def test_requested_times_on_the_fixed_step_path_match_while_loop(
    name, backwards, dtype, solver
):
    # Under `jax.vmap` (a single solve without reverse mode saves as fast in the
    # while loop, and takes it: see the test after this one).
    y0 = {"x": jnp.ones((2, 3), dtype), "v": jnp.zeros((2, 3), dtype)}
    t0, t1, dt0 = (1.0, 0.0, -0.03) if backwards else (0.0, 1.0, 0.03)
    ts = _requested(name, backwards).astype(dtype)
    saveat = dfx.SaveAt(
        subs=[
            dfx.SubSaveAt(ts=ts),
            dfx.SubSaveAt(t0=True, t1=True, ts=ts[1::2], fn=lambda t, y, a: y["x"] * t),
        ]
    )

    def solve(t0, t1, dt0):
        if dtype == np.float32:
            t0, t1, dt0 = (
                x.astype(dtype) if isinstance(x, jax.Array) else dtype(x)
                for x in (t0, t1, dt0)
            )

        def single(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_field),
                solver,
                t0,
                t1,
                dt0,
                y0,
                args=jnp.asarray(0.7, dtype),
                saveat=saveat,
            )
            return sol.ts, sol.ys, sol.stats, sol.result

        return jax.vmap(single)(y0)

    fast, general = _both_paths(solve, t0, t1, dt0)
    _assert_same_saves(fast, general)
    np.testing.assert_array_equal(fast[0][0][0], ts)
    assert fast[2]["num_steps"].tolist() == [34, 34]


def _decay(y0, ts, solver=None, dt0=0.1):
    """`y' = -y` from 0 to 1 in constant steps, saved at `ts`."""
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Euler() if solver is None else solver,
        0.0,
        1.0,
        dt0,
        y0,
        saveat=dfx.SaveAt(ts=ts),
    ).ys


def test_a_single_solve_saving_requested_times_takes_the_while_loop_without_grad():
    # Without `jax.vmap` or reverse mode the while loop saves as fast (it skips
    # its inner loop in the steps that save nothing); with reverse mode, the scan.
    def solve(y0):
        return _decay(y0, np.linspace(0.0, 1.0, 11))

    assert not _uses_scan(solve, 1.0)
    assert _uses_scan(jax.vmap(solve), jnp.ones(2))
    assert _uses_scan(jax.grad(lambda y0: jnp.sum(solve(y0))), 1.0)


def _vmapped_blow_ups(t0, t1, dt0):
    # Members failing part-way at different steps, at their first step, or never:
    # each keeps the saves of the steps it kept, and no others.
    def single(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_blow_up),
            dfx.Euler(),
            t0,
            t1,
            dt0,
            y0,
            saveat=dfx.SaveAt(ts=np.linspace(0.0, 1.0, 21), t1=True),
            throw=False,
        )
        return sol.ts, sol.ys, sol.stats, sol.result

    return jax.vmap(single)(jnp.asarray([0.0, 0.5, 2.0, -5.0]))


def test_requested_times_on_the_fixed_step_path_under_vmap_with_failures():
    fast, general = _both_paths(_vmapped_blow_ups, 0.0, 1.0, 0.01)
    _assert_same_saves(fast, general)
    steps = [int(n) for n in fast[2]["num_steps"]]
    assert steps[1] < steps[0] < 100 and steps[2] == 1 and steps[3] == 100
    # The members stopped early saved fewer times: the rest of the slots unfilled.
    saved = np.isfinite(np.asarray(fast[0])).sum(axis=1)
    assert saved[3] == 22 and saved[2] == 1 and saved[1] < saved[0] < 22


def test_requested_times_counted_on_the_steps_the_loop_takes():
    # `dt0 = 0.3` does not divide [0, 1]: the steps end at 0.3, 0.5, 0.75 and 1
    # (`ConstantStepSize`'s rule), not at 0.3, 0.6, 0.9. The four times in
    # (0.5, 0.75] are all saved by the third step: counted on multiples of `dt0`
    # (at most two per step), two of them were lost and two saved with the wrong
    # values.
    ts = np.array([0.0, 0.52, 0.58, 0.62, 0.7, 1.0])
    writes = fixed.requested_writes([dfx.SubSaveAt(ts=ts)], 0.0, 1.0, 0.3, 4)
    assert writes.counts == (4,) and writes.at_start == (1,)

    def single(y0, t1):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Euler(),
            0.0,
            t1,
            0.3,
            y0,
            saveat=dfx.SaveAt(ts=ts),
        )
        return sol.ys

    y0 = jnp.array([1.0, 2.0])
    assert _uses_scan(lambda: jax.vmap(lambda y: single(y, 1.0))(y0))
    fast = jax.vmap(lambda y: single(y, 1.0))(y0)
    general = jax.jit(jax.vmap(single, in_axes=(0, None)))(y0, jnp.asarray(1.0))
    np.testing.assert_allclose(fast, general, rtol=1e-14)
    # Euler: each step multiplies by (1 - h); the saves interpolate linearly.
    ends, values = [0.0, 0.3, 0.5, 0.75, 1.0], [1.0, 0.7, 0.56, 0.42, 0.315]
    np.testing.assert_allclose(fast[0], np.interp(ts, ends, values), rtol=1e-13)


def test_requested_times_on_the_steps_grid_take_one_write_a_step():
    # Times at the steps' ends (`t0` included, saved from `y0` before the first
    # step): one write a step, not the two a margin on each side of every end
    # would count; a time just past an end is saved by that step.
    grid = np.linspace(0.0, 2.0, 21)
    subs = [dfx.SubSaveAt(ts=grid)]
    writes = fixed.requested_writes(subs, 0.0, 2.0, 0.1, 20)
    assert writes.counts == (1,) and writes.at_start == (1,)
    assert 0 < writes.shift < 1e-3
    float32 = fixed.requested_writes(
        [dfx.SubSaveAt(ts=grid.astype(np.float32))], 0.0, 2.0, 0.1, 20
    )
    assert float32.counts == (1,) and float32.shift >= writes.shift
    # Every other end: still one; two per step: two; not starting at t0: none
    # before the first step.
    assert fixed.requested_writes([dfx.SubSaveAt(ts=grid[::2])], 0.0, 2.0, 0.1, 20)[
        0
    ] == (1,)
    dense = fixed.requested_writes(
        [dfx.SubSaveAt(ts=np.linspace(0.0, 2.0, 41))], 0.0, 2.0, 0.1, 20
    )
    assert dense.counts == (2,)
    later = fixed.requested_writes([dfx.SubSaveAt(ts=grid[1:])], 0.0, 2.0, 0.1, 20)
    assert later.at_start == (0,) and later.counts == (1,)

    # The same saves as the while loop, times and values, under `jax.vmap`,
    # forwards and backwards, with the first step failing for one member.
    def batched(t0, t1, dt0, sign=1.0):
        def single(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_blow_up),
                dfx.Heun(),
                t0,
                t1,
                dt0,
                y0,
                saveat=dfx.SaveAt(ts=sign * grid * 0.05),
                throw=False,
            )
            return sol.ts, sol.ys, sol.stats, sol.result

        return jax.vmap(single)(jnp.asarray([0.0, -0.5, 5.0]))

    for sign in (1.0, -1.0):
        fast, general = _both_paths(
            lambda *times, sign=sign: batched(*times, sign=sign),
            0.0,
            0.1 * sign,
            0.005 * sign,
        )
        _assert_same_saves(fast, general)
        saved = np.isfinite(np.asarray(fast[0])).sum(axis=1)
        assert saved[2] == 0 and saved[0] == 21


def test_requested_times_under_vmap_are_written_without_a_scatter():
    # Under `jax.vmap` the members share where the loop is, and so the index of the
    # next requested time: each write is a dynamic update of all the members at
    # once, where an index per member would make it a scatter.
    def solve(y0):
        return _decay(y0, np.linspace(0.0, 1.0, 11), dfx.Heun(), 0.01)

    batched = jax.vmap(solve)
    assert _uses_scan(batched, jnp.ones((8, 2)))
    # In the compiled program (a dynamic update under `jax.vmap` is a scatter to
    # JAX, which XLA makes a dynamic update again when its index is one for all
    # members). Scatters into small arrays, e.g. a solver's stages, are not saves.
    hlo = jax.jit(batched).lower(jnp.ones((8, 2))).compile().as_text()
    scatters = re.findall(r"(\w+\[[\d,]*\])\S* (?:\w+-)?scatter\(", hlo)
    scatters += re.findall(
        r"(\w+\[[\d,]*\])\S* fusion\([^\n]*calls=%wrapped_scatter", hlo
    )
    assert not [s for s in scatters if re.match(r"\w+\[8,1\d", s)], scatters
    np.testing.assert_allclose(
        batched(jnp.ones((8, 2)))[0, :, 0], np.exp(-np.linspace(0, 1, 11)), rtol=1e-4
    )


def test_requested_times_traced_or_dense_are_saved_by_a_loop_in_each_step():
    # Times only known at run time, or more in a step than the scan writes at
    # once: a loop in each step saves them, as many as the step covers. Not under
    # reverse mode (the loop is not reverse-differentiable): see the gradient
    # tests below.
    def single(ts, y0):
        return _decay(y0, ts)

    def solve(ts, y0=jnp.ones(2)):
        return jax.vmap(single, in_axes=(None, 0))(ts, y0)[0]

    sparse, dense = np.linspace(0.0, 1.0, 11), np.linspace(0.0, 1.0, 101)
    assert fixed._MAX_WRITES < 10
    # Known (NumPy arrays, constants to the trace) or traced.
    assert _uses_scan(lambda: solve(sparse))
    assert _uses_scan(lambda: solve(dense))
    assert _uses_scan(solve, sparse)
    # Known and sparse: one block of writes per step, no loop; else a loop.
    assert "while[" not in str(jax.make_jaxpr(lambda: solve(sparse))())
    assert "while[" in str(jax.make_jaxpr(lambda: solve(dense))())

    def loss(y0, ts):
        return jnp.sum(single(ts, y0))

    # Euler on y' = -y with steps of 0.1: y(t) = 0.9^(t / 0.1) at the steps' ends.
    expected = 0.9 ** np.arange(11)
    np.testing.assert_allclose(jax.jit(solve)(jnp.asarray(sparse)), expected, 1e-12)
    np.testing.assert_allclose(solve(dense)[::10], expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.grad(loss)(1.0, jnp.asarray(sparse)), expected.sum(), rtol=1e-12
    )


def _loop_and_general(solve, *args):
    """`solve(*args)` with a loop in each step saving the requested times, and
    through the while loop (`requested_writes` made to decline)."""
    assert _uses_scan(solve, *args)
    fast = jax.jit(solve)(*args)
    original = fixed.requested_writes
    try:
        fixed.requested_writes = lambda *a, **k: None
        from diffeqx._solve import diffeqsolve as module

        module.requested_writes = fixed.requested_writes
        jax.clear_caches()
        assert not _uses_scan(solve, *args)
        general = jax.jit(solve)(*args)
    finally:
        fixed.requested_writes = original
        module.requested_writes = original
        jax.clear_caches()
    return fast, general


def test_requested_times_saved_by_a_loop_match_the_while_loop():
    ts = jnp.linspace(0.0, 1.0, 21)

    def solve(ts, y0s):
        def single(y0):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(_blow_up),
                dfx.Euler(),
                0.0,
                1.0,
                0.01,
                y0,
                saveat=dfx.SaveAt(
                    subs=[
                        dfx.SubSaveAt(ts=ts, t1=True),
                        dfx.SubSaveAt(t0=True, ts=ts[::3]),
                    ]
                ),
                throw=False,
            )
            return sol.ts, sol.ys, sol.stats, sol.result

        return jax.vmap(single)(y0s)

    fast, general = _loop_and_general(solve, ts, jnp.asarray([0.0, 0.5, 2.0, -5.0]))
    _assert_identical((fast[0], fast[2], fast[3]), (general[0], general[2], general[3]))
    for x, y in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(general[1]), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-14, atol=0)
    saved = np.isfinite(np.asarray(fast[0][0])).sum(axis=1)
    assert saved[3] == 22 and saved[2] == 1 and saved[1] < saved[0] < 22


@pytest.mark.parametrize(
    "storage, saves",
    # (The two other combinations take ~7 s each on 2 cores: in the slow run.)
    [
        ("stored", "after the scan"),
        ("blocks", "blocks of writes"),
        pytest.param("stored", "blocks of writes", marks=pytest.mark.slow),
        pytest.param("blocks", "after the scan", marks=pytest.mark.slow),
    ],
)
def test_requested_times_on_the_fixed_step_path_have_the_while_loops_gradients(
    storage, saves, monkeypatch
):
    # Under reverse mode the scan outputs every step's interpolation data and the
    # times are interpolated after it; where that would be too big, times known
    # at trace time are written in the steps, and others take the while loop.
    if storage == "blocks":
        monkeypatch.setattr(checkpoint_module, "_STORAGE_BYTES", 1)
    if saves == "blocks of writes":
        monkeypatch.setattr(fixed, "_EMIT_BYTES", 1)
    ts = np.linspace(0.0, 1.0, 7)
    interpolated = []
    original = fixed._interpolate_emitted
    monkeypatch.setattr(
        fixed,
        "_interpolate_emitted",
        lambda *a: interpolated.append(1) or original(*a),
    )

    def loss(args, t0, t1, dt0, ts=ts):
        ys = _field_solve(args, t0, t1, dt0, dfx.SaveAt(ts=ts, t1=True))
        return jnp.sum(jnp.sin(ys["x"])) + jnp.sum(ys["v"] ** 2)

    assert _uses_scan(lambda: jax.grad(loss)(0.7, np.asarray(0.0), 1.0, 0.01))
    assert bool(interpolated) == (saves == "after the scan")
    fast = _assert_gradients_are_the_while_loops(loss)
    times = (jnp.asarray(0.0), jnp.asarray(1.0), jnp.asarray(0.01))
    h = 1e-6
    fd = (loss(0.7 + h, *times) - loss(0.7 - h, *times)) / (2 * h)
    np.testing.assert_allclose(fast, fd, rtol=1e-6)
    # Times traced: interpolated after the scan, or (too big) the while loop.
    traced = jax.jit(jax.grad(loss), static_argnums=(1, 2, 3))
    grad_traced = jax.grad(lambda a, ts: loss(a, 0.0, 1.0, 0.01, ts))
    assert _uses_scan(grad_traced, 0.7, jnp.asarray(ts)) == (saves == "after the scan")
    np.testing.assert_allclose(
        traced(0.7, 0.0, 1.0, 0.01, jnp.asarray(ts)), fast, rtol=1e-12
    )

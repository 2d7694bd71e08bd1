"""The fixed-step fast path (constant steps known at trace time, run as a scan) gives
exactly what the general while loop gives: same steps, same end at t1, same result
code and counts when a solve fails."""

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
    text = str(jax.make_jaxpr(fn)(*args))
    return "scan[" in text and "while[" not in text


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
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_field),
            dfx.Tsit5(),
            t0,
            t1,
            dt0,
            {"x": jnp.ones(3), "v": jnp.zeros(3)},
            args=args,
        )
        return jnp.sum(sol.ys["x"] ** 2) + jnp.sum(sol.ys["v"])

    # Times as static Python numbers: the fixed-step path; as arrays: the while loop.
    times = (jnp.asarray(0.0), jnp.asarray(1.0), jnp.asarray(0.01))
    general = jax.jit(jax.grad(loss))
    fast = jax.jit(jax.grad(loss), static_argnums=(1, 2, 3))(0.7, 0.0, 1.0, 0.01)
    np.testing.assert_allclose(fast, general(0.7, *times), rtol=1e-12)
    # Batched: the bound counts the batch. (Against the while loop member by member.)
    args = jnp.array([0.5, 0.7])
    fast = jax.jit(
        jax.vmap(jax.grad(loss), in_axes=(0, None, None, None)),
        static_argnums=(1, 2, 3),
    )(args, 0.0, 1.0, 0.01)
    np.testing.assert_allclose(
        fast, [general(float(a), *times) for a in args], rtol=1e-12
    )
    # 100 steps, a few kB each: within the default bound, and about twice as much
    # counted for the batch of 2 (the batched step's program differs a little).
    assert len(stored_bytes) == 2
    assert 0 < stored_bytes[0] <= DEFAULT_STORAGE_BYTES
    assert 1.8 <= stored_bytes[1] / stored_bytes[0] <= 2.2

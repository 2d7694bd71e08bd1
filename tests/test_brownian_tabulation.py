"""On the fixed-step path, the Brownian samples of a block of steps are computed
before the block runs (`_solve/tabulate.py`). Every step must still receive the
sample it would have computed itself: the solve equals the same solve run by the
while loop (times only known at run time), where each step evaluates its path. Bit
for bit with `UnsafeBrownianPath` (whose samples depend on the times' bits); to
rounding with a `VirtualBrownianTree`, whose tabulated `W` comes from a table of its
cells computed with the same arithmetic as a walk, which XLA may fuse (and so round)
differently."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffeqx as dfx
import diffeqx._solve.fixed as fixed
from diffeqx._adjoint import checkpoint as checkpoint_module


def _path(kind, levy_area, key):
    if kind == "unsafe":
        return dfx.UnsafeBrownianPath((2,), key, levy_area=levy_area)
    return dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (2,), key, levy_area=levy_area)


def _solve(kind, solver, levy_area, adjoint=None):
    def solve(t0, t1, dt0, key):
        drift = dfx.ODETerm(lambda t, y, a: -0.5 * y + jnp.sin(t))
        diffusion = dfx.ControlTerm(
            lambda t, y, a: 0.3 * jnp.stack([y, jnp.cos(y)], axis=-1),
            _path(kind, levy_area, key),
        )
        kwargs = {} if adjoint is None else dict(adjoint=adjoint)
        return dfx.diffeqsolve(
            dfx.MultiTerm(drift, diffusion),
            solver,
            t0,
            t1,
            dt0,
            jnp.array([1.0, 0.5]),
            **kwargs,
        ).ys

    return solve


def _assert_same(kind, fast, slow):
    if kind == "unsafe":
        np.testing.assert_array_equal(np.asarray(fast), np.asarray(slow))
    else:
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), rtol=1e-13)


@pytest.fixture
def tabulated_blocks(monkeypatch):
    """Counts the solves that took the tabulated scan."""
    calls = []
    original = fixed.prepare

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fixed, "prepare", spy)
    return calls


# name: (path, solver, levy area, whether the samples are tabulated)
_CASES = {
    "Euler-unsafe": ("unsafe", dfx.Euler(), dfx.BrownianIncrement, True),
    "Heun-tree": ("tree", dfx.Heun(), dfx.BrownianIncrement, True),
    "SPaRK-unsafe-levy": ("unsafe", dfx.SPaRK(), dfx.SpaceTimeLevyArea, True),
    # A tree's Lévy areas are not bit-exact when batched: not tabulated.
    "GeneralShARK-tree-levy": (
        "tree",
        dfx.GeneralShARK(),
        dfx.SpaceTimeLevyArea,
        False,
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        # (An unsafe path's table by default: SPaRK's below, and Euler's against the
        # while loop in the next test.)
        pytest.param(name, marks=[pytest.mark.slow] * (name == "Euler-unsafe"))
        for name in _CASES
    ],
)
def test_tabulated_solve_equals_the_untabulated_one(
    case, tabulated_blocks, monkeypatch
):
    kind, solver, levy_area, tabulated = _CASES[case]
    solve = jax.jit(lambda k: _solve(kind, solver, levy_area)(0.0, 0.5, 2.0**-7, k))
    key = jr.key(3)
    # 1/128 steps: 64 steps of the fixed-step scan.
    fast = solve(key)
    assert bool(tabulated_blocks) == tabulated
    monkeypatch.setattr(fixed, "tabulation", lambda spec, state: None)
    jax.clear_caches()
    untabulated = jax.jit(
        lambda k: _solve(kind, solver, levy_area)(0.0, 0.5, 2.0**-7, k)
    )(key)
    _assert_same(kind, fast, untabulated)


@pytest.mark.parametrize("case", ["Euler-unsafe", "Heun-tree"])
def test_tabulated_solve_equals_the_while_loop(case, tabulated_blocks):
    kind, solver, levy_area, _ = _CASES[case]
    solve = _solve(kind, solver, levy_area)
    key = jr.key(3)
    fast = jax.jit(lambda k: solve(0.0, 0.5, 2.0**-7, k))(key)
    assert tabulated_blocks
    general = jax.jit(solve)(jnp.asarray(0.0), jnp.asarray(0.5), 2.0**-7, key)
    _assert_same(kind, fast, general)


@pytest.mark.parametrize(
    # (tests/test_fixed_step_path.py covers the blocks with a bound exceeded.)
    "storage",
    ["default", pytest.param("exceeded", marks=pytest.mark.slow)],
)
def test_tabulated_solve_under_vmap_and_grad(tabulated_blocks, storage, monkeypatch):
    # A batch over keys, and a gradient: through the steps' kept values by default,
    # or, with a bound too small for them, through rematerialised blocks (whose
    # samples are recomputed in the backward pass, and whose step is the one traced
    # for the bound): against the while loop.
    if storage == "exceeded":
        monkeypatch.setattr(checkpoint_module, "_STORAGE_BYTES", 1)
    solve = _solve("tree", dfx.Heun(), dfx.BrownianIncrement)
    keys = jr.split(jr.key(5), 4)

    def loss(scale, t1, key):
        return jnp.sum(solve(0.0, t1, 2.0**-6, key) * scale)

    fast = jax.jit(jax.vmap(lambda k: solve(0.0, 1.0, 2.0**-6, k)))(keys)
    general = jax.jit(jax.vmap(solve, in_axes=(None, None, None, 0)))(
        jnp.asarray(0.0), jnp.asarray(1.0), 2.0**-6, keys
    )
    _assert_same("tree", fast, general)
    grad_fast = jax.grad(lambda s: loss(s, 1.0, keys[0]))(2.0)
    grad_general = jax.jit(jax.grad(loss), static_argnums=())(
        2.0, jnp.asarray(1.0), keys[0]
    )
    np.testing.assert_allclose(grad_fast, grad_general, rtol=1e-13)
    assert len(tabulated_blocks) >= 2


class _HalfStepEuler(dfx.Euler):
    """Euler–Maruyama that asks for its increment in two halves: queries over other
    intervals than the step's own, so the steps must evaluate the path themselves."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        mid = t0 + 0.5 * (t1 - t0)
        first = terms.contr(t0, mid)
        second = terms.contr(mid, t1)
        control = jax.tree.map(lambda a, b: a + b, first, second)
        y1 = jax.tree.map(lambda y, d: y + d, y0, terms.vf_prod(t0, y0, args, control))
        return y1, None, dict(y0=y0, y1=y1), None, dfx.RESULTS.successful


def test_steps_that_query_other_intervals_evaluate_the_path_themselves(
    tabulated_blocks,
):
    solve = _solve("tree", _HalfStepEuler(), dfx.BrownianIncrement)
    key = jr.key(7)
    fast = jax.jit(lambda k: solve(0.0, 0.5, 2.0**-7, k))(key)
    assert not tabulated_blocks
    general = jax.jit(solve)(jnp.asarray(0.0), jnp.asarray(0.5), 2.0**-7, key)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(general))
    # The halves of a tree's increment add up to the whole step's increment.
    whole = _solve("tree", dfx.Euler(), dfx.BrownianIncrement)(0.0, 0.5, 2.0**-7, key)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(whole), rtol=1e-12)


# (tol, shape, levy area, steps, the table's level): a table at the leaves; one
# above them (a deep tree, whose queries walk the levels below the table); Lévy
# areas in the tree (their `W` is split with them); a PyTree of two dtypes.
_TABLES = {
    "leaves": (1e-3, (2,), dfx.BrownianIncrement, 1000, 10),
    "above-leaves": (1e-5, (), dfx.BrownianIncrement, 1000, 11),
    "levy-tree": (1e-3, (3,), dfx.SpaceTimeTimeLevyArea, 1000, 10),
    "few-steps": (1e-3, (), dfx.BrownianIncrement, 20, 6),
    "pytree": (
        1e-3,
        {
            "a": jax.ShapeDtypeStruct((2,), jnp.float32),
            "b": jax.ShapeDtypeStruct((), jnp.float64),
        },
        dfx.BrownianIncrement,
        1000,
        10,
    ),
}


@pytest.mark.parametrize(
    "case",
    [
        # (A table at the leaves by default: the Lévy-area and PyTree cases.)
        pytest.param(name, marks=[pytest.mark.slow] * (name == "leaves"))
        for name in _TABLES
    ],
)
def test_tree_table_gives_the_walks_increments(case):
    # A tree's tabulator answers from a table of cells built once: its increments
    # over any intervals (steps' ends inside cells, on cell boundaries, at the
    # tree's ends, backwards) are `evaluate`'s, to rounding.
    tol, shape, levy_area, steps, level = _TABLES[case]
    tree = dfx.VirtualBrownianTree(0.0, 1.0, tol, shape, jr.key(11), levy_area)
    assert tree._table_level(steps) == level
    rng = np.random.default_rng(0)
    ends = np.concatenate(
        [[0.0, 1.0, 0.5, 0.25, 2.0**-10, 1.0 - 2.0**-10], rng.uniform(0, 1, 200)]
    )
    t0s, t1s = jnp.asarray(ends[:-1]), jnp.asarray(ends[1:])
    # Built under `jit`, as in a solve (built eagerly, the table costs seconds).
    tabulated = jax.jit(lambda a, b: tree._tabulator(True, False, steps)(a, b))(
        t0s, t1s
    )
    walked = jax.jit(jax.vmap(tree.evaluate))(t0s, t1s)
    pairs = zip(jax.tree.leaves(tabulated), jax.tree.leaves(walked), strict=True)
    for fast, slow in pairs:
        assert fast.dtype == slow.dtype and fast.shape == slow.shape
        rtol = 1e-5 if fast.dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(fast, slow, rtol=rtol, atol=rtol * 1e-2)


def test_tree_tables_are_not_built_for_levy_queries_or_traced_intervals():
    levy = dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (), jr.key(0), dfx.SpaceTimeLevyArea)
    tabulate = levy._tabulator(True, True, 1000)
    # The generic tabulator: `evaluate` batched, which walks from the root.
    t0s, t1s = jnp.linspace(0, 0.5, 5), jnp.linspace(0.5, 1, 5)
    # (Under `jit`: walked eagerly, op by op, the queries cost seconds.)
    np.testing.assert_array_equal(
        jax.jit(lambda a, b: tabulate(a, b).H)(t0s, t1s),
        jax.jit(jax.vmap(lambda a, b: levy.evaluate(a, b, use_levy=True).H))(t0s, t1s),
    )

    def level(t1):
        tree = dfx.VirtualBrownianTree(0.0, t1, 1e-3, (), jr.key(0))
        return tree._table_level(1000)

    assert level(1.0) == 10
    jax.jit(lambda t1: assert_none(level(t1)))(1.0)


def assert_none(x):
    assert x is None

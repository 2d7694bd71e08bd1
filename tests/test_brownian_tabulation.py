"""On the fixed-step path, the Brownian samples of a block of steps are computed
before the block runs (`_solve/tabulate.py`). Every step must still receive exactly
the sample it would have computed itself: the solve equals, bit for bit, the same
solve run by the while loop (times only known at run time), where each step
evaluates its path."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffeqx as dfx
import diffeqx._solve.fixed as fixed


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


@pytest.fixture
def tabulated_blocks(monkeypatch):
    """Counts the solves that took the tabulated scan."""
    calls = []
    original = fixed.scan_tabulated

    def spy(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(fixed, "scan_tabulated", spy)
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


@pytest.mark.parametrize("case", list(_CASES))
def test_tabulated_solve_equals_the_untabulated_one_bit_for_bit(
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
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(untabulated))


@pytest.mark.parametrize("case", ["Euler-unsafe", "Heun-tree"])
def test_tabulated_solve_equals_the_while_loop_bit_for_bit(case, tabulated_blocks):
    kind, solver, levy_area, _ = _CASES[case]
    solve = _solve(kind, solver, levy_area)
    key = jr.key(3)
    fast = jax.jit(lambda k: solve(0.0, 0.5, 2.0**-7, k))(key)
    assert tabulated_blocks
    general = jax.jit(solve)(jnp.asarray(0.0), jnp.asarray(0.5), 2.0**-7, key)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(general))


def test_tabulated_solve_under_vmap_and_grad(tabulated_blocks):
    # A batch over keys, and a gradient through the rematerialised blocks (whose
    # samples are recomputed in the backward pass): against the while loop.
    solve = _solve("tree", dfx.Heun(), dfx.BrownianIncrement)
    keys = jr.split(jr.key(5), 4)

    def loss(scale, t1, key):
        return jnp.sum(solve(0.0, t1, 2.0**-6, key) * scale)

    fast = jax.jit(jax.vmap(lambda k: solve(0.0, 1.0, 2.0**-6, k)))(keys)
    general = jax.jit(jax.vmap(solve, in_axes=(None, None, None, 0)))(
        jnp.asarray(0.0), jnp.asarray(1.0), 2.0**-6, keys
    )
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(general))
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

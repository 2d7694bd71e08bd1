"""Brownian motion: `VirtualBrownianTree`, `UnsafeBrownianPath` and the Lévy-area types.

Truth: the law of Brownian motion and of its Lévy areas (moments checked over many
keys with z-tests), the definitions of `H` and `K` as integrals of the Brownian bridge
(checked on a fine grid of the path itself), exact identities (additivity, reversal,
the concatenation of Lévy areas), SciPy's normal quantile, JAX's Threefry hash, the
closed-form pathwise solution of geometric Brownian motion, and central finite
differences.

Statistical tests use fixed seeds, so they are deterministic; each states the chance
that it would fail for a correct sampler with a fresh seed. A z-test at 5 sigma fails
with probability 5.7e-7, so a test making `k` such checks fails with probability at
most `k * 5.7e-7`.
"""

import functools
import math
import os
import subprocess

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.special

import diffeqx as dfx
from _sde import spark_on_a_tree
from _xla_defaults import run_pytest_with_xla_defaults
from diffeqx._brownian import levy
from diffeqx._brownian.base import _normal_quantile, threefry2x32

Z = 5.0  # sigmas for every z-test below
N_KEYS = 4000
KEYS = jr.split(jr.key(20240601), N_KEYS)
LEVY = dfx.SpaceTimeTimeLevyArea


def _tree(key, levy_area=LEVY, tol=1e-3, shape=(), t0=0.0, t1=1.0):
    return dfx.VirtualBrownianTree(t0, t1, tol, shape, key, levy_area=levy_area)


# One compiled query for most tests (shape (2,): two independent components).
@jax.jit
def _between(key, s, t):
    return _tree(key, shape=(2,)).evaluate(s, t, use_levy=True)


@jax.jit
def _value(key, t):
    return _tree(key, shape=(2,)).evaluate(t)


_between_keys = jax.jit(jax.vmap(_between, in_axes=(0, None, None)))
_value_keys = jax.jit(jax.vmap(_value, in_axes=(0, None)))


def _assert_mean_zero(x, sd):
    x = np.asarray(x)
    z = np.mean(x) / (sd / math.sqrt(x.size))
    assert abs(z) < Z, f"mean {np.mean(x):.3g}, z = {z:.2f}"


def _assert_variance(x, var):
    # Sample variance of n normals: standard deviation var * sqrt(2 / n).
    x = np.asarray(x)
    z = (np.mean(x**2) - var) / (var * math.sqrt(2 / x.size))
    assert abs(z) < Z, f"variance {np.mean(x**2):.4g}, expected {var:.4g}, z = {z:.2f}"


def _assert_uncorrelated(x, y, sd_x, sd_y):
    # Mean of products of independent centred normals: sd_x sd_y / sqrt(n).
    x, y = np.asarray(x), np.asarray(y)
    z = np.mean(x * y) / (sd_x * sd_y / math.sqrt(x.size))
    assert abs(z) < Z, f"covariance {np.mean(x * y):.3g}, z = {z:.2f}"


# ---- building blocks -------------------------------------------------------------------


def test_threefry_matches_jax():
    from jax.extend.random import threefry_2x32

    rng = np.random.default_rng(0)
    key = rng.integers(0, 2**32, 2, dtype=np.uint32)
    counts = rng.integers(0, 2**32, (2, 257), dtype=np.uint32)
    theirs = threefry_2x32(jnp.asarray(key), jnp.asarray(counts.reshape(-1)))
    ours = threefry2x32(
        jnp.uint32(key[0]), jnp.uint32(key[1]), *map(jnp.asarray, counts)
    )
    np.testing.assert_array_equal(np.concatenate(ours), theirs)


def test_key_words_are_jax_random_bits():
    """The trees' and unsafe paths' key words are `jax.random.bits` of the key, for
    every kind of key (computed by diffeqx's own hash for Threefry keys, by JAX's
    for others, and by JAX's when its bits are not the partitionable ones), under
    `jax.jit` and `jax.vmap` too."""
    from diffeqx._brownian.base import key_words

    def bits(key, *shape):
        return jr.bits(key, (*shape, 2), jnp.uint32)

    keys = [jr.key(7), jr.PRNGKey(7), jr.key(7, impl="rbg"), jr.key(2**31 + 5)]
    for key in keys:
        for shape in [(1,), (1, 4), (3, 5, 2)]:
            np.testing.assert_array_equal(key_words(key, *shape), bits(key, *shape))
    batch = jr.split(jr.key(3), 6)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(lambda k: key_words(k, 2, 4)))(batch),
        jax.vmap(lambda k: bits(k, 2, 4))(batch),
    )
    with jax.threefry_partitionable(False):
        np.testing.assert_array_equal(key_words(jr.key(7), 3), bits(jr.key(7), 3))


@pytest.mark.parametrize(
    "dtype, tol",
    [(jnp.float64, 2e-15), pytest.param(jnp.float32, 2e-6, marks=pytest.mark.slow)],
)
def test_normal_quantile_matches_scipy(dtype, tol):
    bits = 52 if dtype == jnp.float64 else 24
    rng = np.random.default_rng(1)
    k = np.concatenate(
        [rng.integers(0, 2**bits, 20000, dtype=np.int64), np.arange(50)]
    ).astype(np.float64)
    k = np.concatenate([k, 2.0**bits - 1 - k[-50:]])
    q = (2 * k + 1 - 2.0**bits) * 2.0 ** -(
        bits + 1
    )  # the sampler's grid in (-1/2, 1/2)
    expected = np.where(
        q > 0, -scipy.special.ndtri(0.5 - q), scipy.special.ndtri(0.5 + q)
    )
    ours = np.asarray(_normal_quantile(jnp.asarray(q, dtype)), np.float64)
    np.testing.assert_allclose(ours, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("lam", [0.5, 0.1, 0.731, 0.999])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_split_matrix_has_orthonormal_rows(lam, m):
    q = np.array(levy.split_matrix(lam, m, math.sqrt), dtype=np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(m), atol=1e-14)
    if lam == 0.5:  # the explicit kernel completes it to an orthogonal matrix
        full = np.vstack([q, np.array(levy.MIDPOINT_KERNEL[m])])
        np.testing.assert_allclose(full @ full.T, np.eye(2 * m), atol=1e-14)


def _moments_by_quadrature(f, s, t, n=20001):
    # (W, H, K) of a smooth path f over [s, t], from their definitions.
    u = np.linspace(s, t, n)
    h = t - s
    w = f(t) - f(s)
    bridge = f(u) - f(s) - (u - s) / h * w
    trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    return np.array(
        [w, trapezoid(bridge, u) / h, trapezoid(bridge * (h / 2 - (u - s)), u) / h**2]
    )


def test_concatenation_of_levy_areas_matches_their_definitions():
    def f(u):
        return np.sin(3 * u) + u**3 - 0.5 * np.exp(u)

    a, b, c = 0.2, 0.45, 1.3
    h1, h2 = b - a, c - a - (b - a)
    left, right = _moments_by_quadrature(f, a, b), _moments_by_quadrature(f, b, c)
    whole = _moments_by_quadrature(f, a, c)
    scaled = [levy.scale(h, tuple(jnp.asarray(left_or_right))) for h, left_or_right in
              ((h1, left), (h2, right), (c - a, whole))]  # fmt: skip
    joined = levy.unscale(jnp.asarray(c - a), levy.concat(h1, scaled[0], h2, scaled[1]))
    np.testing.assert_allclose(joined, whole, atol=1e-8)
    back = levy.unscale(jnp.asarray(h2), levy.remainder(h1, scaled[0], h2, scaled[2]))
    np.testing.assert_allclose(back, right, atol=1e-8)
    # Time reversal: the path traversed from c to a.
    reversed_ = _moments_by_quadrature(lambda u: f(a + c - u), a, c)
    np.testing.assert_allclose(levy.reverse(tuple(whole)), reversed_, atol=1e-8)


def test_levy_area_types():
    assert issubclass(dfx.SpaceTimeTimeLevyArea, dfx.AbstractSpaceTimeTimeLevyArea)
    assert issubclass(dfx.AbstractSpaceTimeTimeLevyArea, dfx.AbstractSpaceTimeLevyArea)
    assert issubclass(dfx.SpaceTimeLevyArea, dfx.AbstractSpaceTimeLevyArea)
    assert issubclass(dfx.AbstractSpaceTimeLevyArea, dfx.AbstractBrownianIncrement)
    assert issubclass(dfx.BrownianIncrement, dfx.AbstractBrownianIncrement)
    assert not issubclass(dfx.BrownianIncrement, dfx.AbstractSpaceTimeLevyArea)
    area = dfx.SpaceTimeTimeLevyArea(dt=1.0, W=2.0, H=3.0, K=4.0)
    assert (area.dt, area.W, area.H, area.K) == (1.0, 2.0, 3.0, 4.0)
    assert issubclass(dfx.VirtualBrownianTree, dfx.AbstractBrownianPath)
    assert issubclass(dfx.UnsafeBrownianPath, dfx.AbstractBrownianPath)


# ---- the law of the tree ---------------------------------------------------------------

# Intervals with their ends in different cells of the tree (tol = 1e-3: cells 2^-10
# wide), where the law is exact: long ones, one crossing a single cell boundary, and
# one between adjacent cells.
CELL = 2.0**-10
INTERVALS = [(0.3, 0.7), (0.3001, 0.3008), (0.0, 1.0), (126.8 * CELL, 127.3 * CELL)]


def _flat(x):
    return np.asarray(x).reshape(-1)  # keys x components: independent samples


@pytest.mark.parametrize("s, t", INTERVALS)
def test_tree_increments_have_brownian_moments(s, t):
    # 9 z-tests over 2 * 4000 samples: failure chance < 6e-6 with a fresh seed.
    h = t - s
    area = _between_keys(KEYS, s, t)
    sd = (math.sqrt(h), math.sqrt(h / 12), math.sqrt(h / 720))
    w, hh, k = _flat(area.W), _flat(area.H), _flat(area.K)
    for x, sd_x in zip((w, hh, k), sd, strict=True):
        _assert_mean_zero(x, sd_x)
        _assert_variance(x, sd_x**2)
    _assert_uncorrelated(w, hh, sd[0], sd[1])
    _assert_uncorrelated(w, k, sd[0], sd[2])
    _assert_uncorrelated(hh, k, sd[1], sd[2])
    np.testing.assert_allclose(area.dt, h, rtol=1e-12)


def test_tree_increments_over_disjoint_intervals_are_independent():
    # 9 z-tests: failure chance < 6e-6.
    first, second = _between_keys(KEYS, 0.1, 0.3), _between_keys(KEYS, 0.3, 0.35)
    sd1 = np.sqrt(np.array([1, 1 / 12, 1 / 720]) * 0.2)
    sd2 = np.sqrt(np.array([1, 1 / 12, 1 / 720]) * 0.05)
    for a, sa in zip((first.W, first.H, first.K), sd1, strict=True):
        for b, sb in zip((second.W, second.H, second.K), sd2, strict=True):
            _assert_uncorrelated(_flat(a), _flat(b), sa, sb)


def test_tree_values_have_brownian_covariance():
    # Var W(t) = t at a time strictly inside a cell, and
    # Cov(W(0.25, 0.75), W(0.3, 0.7)) = 0.4: 2 z-tests, failure chance < 1.2e-6.
    point = 0.5 + 0.37 * CELL
    _assert_variance(_flat(_value_keys(KEYS, point)), point)
    outer = _flat(_between_keys(KEYS, 0.25, 0.75).W)
    inner = _flat(_between_keys(KEYS, 0.3, 0.7).W)
    # Var of the product of two normals with covariance c: s1^2 s2^2 + c^2.
    sd = math.sqrt(0.5 * 0.4 + 0.4**2)
    z = (np.mean(outer * inner) - 0.4) / (sd / math.sqrt(outer.size))
    assert abs(z) < Z


def test_levy_areas_are_the_integrals_of_the_path():
    # H and K over [0, 1] against the trapezoid rule applied to the tree's own path on
    # its cells' endpoints (2^-10 apart: the rule's error is about 3e-4 here).
    key = jr.key(7)
    grid = np.linspace(0.0, 1.0, 2**10 + 1)
    path = np.asarray(jax.jit(jax.vmap(_value, in_axes=(None, 0)))(key, grid))
    area = _between(key, 0.0, 1.0)
    bridge = path - grid[:, None] * np.asarray(area.W)
    trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    h_quad = trapezoid(bridge, grid, axis=0)
    k_quad = trapezoid(bridge * (0.5 - grid[:, None]), grid, axis=0)
    np.testing.assert_allclose(area.H, h_quad, atol=2e-3)
    np.testing.assert_allclose(area.K, k_quad, atol=2e-3)


# ---- exact properties of the tree ------------------------------------------------------


def test_tree_is_reproducible_whatever_was_queried_before():
    key = jr.key(3)
    queries = [(0.1, 0.2), (0.55, 0.9), (0.2001, 0.2002), (0.0, 1.0), (0.333, 0.334)]
    forwards = [_between(key, s, t) for s, t in queries]
    backwards = [_between(key, s, t) for s, t in reversed(queries)][::-1]
    for a, b in zip(forwards, backwards, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("s, t", [(0.2, 0.7), (0.3001, 0.3004)])
def test_tree_reversed_query_is_the_time_reversal(s, t):
    forwards, backwards = _between(jr.key(4), s, t), _between(jr.key(4), t, s)
    np.testing.assert_array_equal(backwards.dt, -forwards.dt)
    np.testing.assert_array_equal(backwards.W, -forwards.W)
    np.testing.assert_array_equal(backwards.H, forwards.H)
    np.testing.assert_array_equal(backwards.K, -forwards.K)


def _moments(area):
    return area.dt, (area.W, area.H, area.K)


@pytest.mark.parametrize(
    "a, b, c",
    [
        (0.1, 0.4, 0.9),  # far apart
        (0.3001, 0.3003, 0.3007),  # all in one cell
        (0.3001, 0.3009, 0.31),  # neighbouring cells
        (0.0, 0.5, 1.0),  # the whole interval
    ],
)
def test_tree_increments_and_levy_areas_add_up(a, b, c):
    key = jr.key(5)
    (h, whole), (h1, left), (h2, right) = (
        _moments(_between(key, s, t)) for s, t in ((a, c), (a, b), (b, c))
    )
    np.testing.assert_allclose(whole[0], left[0] + right[0], rtol=1e-12, atol=1e-14)
    joined = levy.concat(h1, levy.scale(h1, left), h2, levy.scale(h2, right))
    np.testing.assert_allclose(levy.unscale(h, joined), whole, rtol=1e-9, atol=1e-12)
    # Values are those of one path, whichever interval asked.
    np.testing.assert_allclose(
        _value(key, c) - _value(key, a), whole[0], rtol=1e-12, atol=1e-14
    )


@jax.jit
def _bm_value(key, t):  # W only (BrownianIncrement), tol = 1e-3
    return _tree(key, levy_area=dfx.BrownianIncrement).evaluate(t)


def test_tree_inside_a_cell_is_one_bridge_sample():
    # Documented: with BrownianIncrement, inside a cell [a, b] of width g,
    # W(t) = W(a) + lam (W(b) - W(a)) + sqrt(lam (1 - lam) g) xi, one xi per cell.
    key, a = jr.key(6), 300 * CELL
    wa, wb = _bm_value(key, a), _bm_value(key, a + CELL)
    xis = []
    for lam in (0.1, 0.5, 0.77):
        residual = _bm_value(key, a + lam * CELL) - wa - lam * (wb - wa)
        xis.append(residual / math.sqrt(lam * (1 - lam) * CELL))
    np.testing.assert_allclose(xis, xis[0], rtol=1e-9)


def test_tree_depth_follows_tol():
    assert _tree(jr.key(0), tol=1e-3)._depth == 10  # 2^-10 <= 1e-3 < 2^-9
    assert _tree(jr.key(0), tol=2.0**-10)._depth == 10
    assert _tree(jr.key(0), tol=5.0, t0=0.0, t1=2.0)._depth == 0
    one_cell = _tree(jr.key(0), tol=5.0, levy_area=dfx.BrownianIncrement)
    assert np.isfinite(jax.jit(lambda s, t: one_cell.evaluate(s, t))(0.3, 0.8))


def test_tree_with_traced_bounds_is_the_same_path():
    @jax.jit
    def traced(t0, t1, tol, t):
        tree = dfx.VirtualBrownianTree(t0, t1, tol, (), jr.key(8))
        return tree.evaluate(t)

    for t in (0.3001, 0.45, 1.0):
        np.testing.assert_allclose(
            traced(0.0, 1.0, 1e-3, t), _bm_value(jr.key(8), t), rtol=1e-12
        )


@pytest.mark.slow
def test_tree_with_traced_bounds_has_the_same_levy_areas():
    @jax.jit
    def traced(t0, t1, tol, s, t):
        tree = dfx.VirtualBrownianTree(t0, t1, tol, (2,), jr.key(8), levy_area=LEVY)
        return tree.evaluate(s, t, use_levy=True)

    for s, t in [(0.3001, 0.45), (0.3001, 0.3004), (0.0, 1.0)]:
        ours, expected = traced(0.0, 1.0, 1e-3, s, t), _between(jr.key(8), s, t)
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


# Depths 0, 1, 3 and 6 on [-1, 2] (three units; at tol 4.0 one cell).
_TRACED_CASES = [(4.0, 0), (2.0, 1), (0.4, 3), (0.05, 6)]


def _queries(seed, count=12):
    """Query pairs on [-1, 2]: random, reversed, equal, at the ends, and pairs that
    share a leaf cell at the finest depth tested."""
    rng = np.random.default_rng(seed)
    pairs = [tuple(x) for x in rng.uniform(-1.0, 2.0, size=(count, 2))]
    pairs += [(-1.0, 2.0), (2.0, -1.0), (0.7, 0.7), (0.31, 0.32), (-1.0, -0.99)]
    return np.array(pairs)


@pytest.mark.parametrize(
    "levy_area",
    # (`SpaceTimeLevyArea` goes through the same traced-depth walk as
    # `SpaceTimeTimeLevyArea`, with one moment fewer: in the slow run, ~5 s on 2
    # cores.)
    [
        dfx.BrownianIncrement,
        pytest.param(dfx.SpaceTimeLevyArea, marks=pytest.mark.slow),
        dfx.SpaceTimeTimeLevyArea,
    ],
)
def test_tree_with_traced_bounds_matches_static_trees_at_every_depth(levy_area):
    # Bounds known only at run time walk exactly the tree's depth (a loop over the
    # levels), bounds known at trace time an unrolled walk: the same path, to
    # rounding, for increments, values and Lévy areas.
    def query(tree, s, t):
        use_levy = levy_area is not dfx.BrownianIncrement
        pair = tree.evaluate(s, t, use_levy=use_levy)
        start = tree.evaluate(t, use_levy=use_levy)
        return pair, start

    @jax.jit
    def traced(t0, t1, tol, s, t):
        tree = dfx.VirtualBrownianTree(t0, t1, tol, (2,), jr.key(3), levy_area)
        return jax.vmap(functools.partial(query, tree))(s, t)

    pairs = _queries(7)
    for tol, depth in _TRACED_CASES:
        static = dfx.VirtualBrownianTree(-1.0, 2.0, tol, (2,), jr.key(3), levy_area)
        assert static._depth == depth
        expected = jax.jit(jax.vmap(functools.partial(query, static)))(
            pairs[:, 0], pairs[:, 1]
        )
        ours = traced(-1.0, 2.0, tol, pairs[:, 0], pairs[:, 1])
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
            # (Within one leaf cell the moments are a difference of the parts
            # before each time, which loses a few digits: hence the `atol`.)
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-11, err_msg=str(tol))


@pytest.mark.parametrize("levy_area", [dfx.BrownianIncrement, dfx.SpaceTimeLevyArea])
def test_tree_bounds_batched_under_vmap_with_a_depth_each(levy_area):
    # `vmap` over trees of different depths (the loop over levels runs to the
    # deepest and leaves each tree at its own): each is the tree built alone.
    tols = np.array([tol for tol, _ in _TRACED_CASES])
    s, t = 0.123, 1.77

    @jax.jit
    @jax.vmap
    def batched(tol, key):
        tree = dfx.VirtualBrownianTree(-1.0, jnp.asarray(2.0), tol, (), key, levy_area)
        return tree.evaluate(s, t, use_levy=True)

    keys = jr.split(jr.key(11), len(tols))
    ours = batched(tols, keys)
    for i, tol in enumerate(tols):
        alone = dfx.VirtualBrownianTree(-1.0, 2.0, float(tol), (), keys[i], levy_area)
        expected = alone.evaluate(s, t, use_levy=True)
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(x[i], y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("levy_area", [dfx.BrownianIncrement, dfx.SpaceTimeLevyArea])
def test_solve_on_a_tree_with_traced_bounds_is_differentiable(levy_area):
    # A tree whose depth is known only at run time loops over its levels (a while
    # loop): reverse mode goes through it, the path being a constant. The
    # gradient is that of the same solve on a tree of static depth, and matches
    # central differences on the same path.
    solver = dfx.Heun() if levy_area is dfx.BrownianIncrement else dfx.SPaRK()

    def solve(a, t1, static):
        bm = dfx.VirtualBrownianTree(
            0.0, 1.0 if static else t1, 0.01, (), jr.key(0), levy_area
        )
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, a: -a * y),
            dfx.ControlTerm(lambda t, y, a: 0.5 * y, bm),
        )
        sol = dfx.diffeqsolve(terms, solver, 0.0, t1, 0.05, jnp.asarray(1.0), args=a)
        return sol.ys[-1]

    grad = jax.jit(jax.grad(solve), static_argnums=2)
    ours, static = grad(1.0, 1.0, False), grad(1.0, 1.0, True)
    np.testing.assert_allclose(ours, static, rtol=1e-10)
    value = jax.jit(solve, static_argnums=2)
    h = 1e-5
    fd = (value(1.0 + h, 1.0, False) - value(1.0 - h, 1.0, False)) / (2 * h)
    np.testing.assert_allclose(ours, fd, rtol=1e-6)


@pytest.mark.parametrize("levy_area", [dfx.BrownianIncrement, LEVY])
def test_tree_with_traced_bounds_walks_only_its_depth(levy_area):
    # The depth of a tree with traced bounds is known only at run time; its walk
    # loops over the levels it has, rather than over all `_MAX_DEPTH` levels with
    # those below the depth masked (four times the hashing at depth 7, and the
    # cost of a query is mostly hashing): no array in the program has an axis of
    # `_MAX_DEPTH` levels (or those plus the root's and the leaf's samples).
    from diffeqx._brownian.tree import _MAX_DEPTH

    def query(t0, t1, s, t):
        tree = dfx.VirtualBrownianTree(t0, t1, 0.5, (3,), jr.key(0), levy_area)
        return tree.evaluate(s, t, use_levy=levy_area is not dfx.BrownianIncrement)

    jaxpr = jax.make_jaxpr(query)(0.0, 63.0, 1.0, 2.0)
    sizes = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                sizes.update(getattr(var.aval, "shape", ()))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jaxpr.jaxpr)
    assert not sizes & {_MAX_DEPTH, _MAX_DEPTH + 1, _MAX_DEPTH + 2}, sorted(sizes)


def test_powers_of_two_of_a_traced_depth_are_ldexps():
    # A tree whose depth is known only at run time scales by powers of two of it
    # in every query; `times_pow2` builds them from exponent bits, and must give
    # `jnp.ldexp`'s values (the tests above check the paths against static trees).
    from diffeqx._brownian.base import times_pow2

    for dtype in (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16):
        x = jnp.asarray([1.0, 3.7, 1e-3, 123.4, 0.0, -2.5, 2.0**-20], dtype)
        n = jnp.arange(-33, 34, dtype=jnp.int32)[:, None]
        got = jax.jit(times_pow2)(x[None, :], n)
        want = jnp.ldexp(x[None, :], n)
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(got, np.float64), np.asarray(want, np.float64)
        )


def test_tree_pytree_shape_with_mixed_dtypes():
    shape = {
        "a": jax.ShapeDtypeStruct((2, 3), jnp.float32),
        "b": jax.ShapeDtypeStruct((), jnp.float64),
    }

    @jax.jit
    def query(t0, t1):
        tree = dfx.VirtualBrownianTree(0.0, 1.0, 0.25, shape, jr.key(9), levy_area=LEVY)
        return tree.evaluate(t0, t1, use_levy=True), tree.evaluate(t0, t1)

    area, increment = query(0.2, 0.6)
    for field in (area.dt, area.W, area.H, area.K, increment):
        assert field["a"].dtype == jnp.float32 and field["b"].dtype == jnp.float64
    for field in (area.W, area.H, area.K, increment):
        assert field["a"].shape == (2, 3) and field["b"].shape == ()
    assert area.dt["a"].shape == () and np.isclose(area.dt["b"], 0.4)  # one per leaf
    assert len(set(np.asarray(area.W["a"]).ravel().tolist())) == 6  # own samples
    np.testing.assert_allclose(increment["a"], area.W["a"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(increment["b"], area.W["b"], rtol=1e-12, atol=1e-14)


def test_tuple_shape_is_the_default_float_dtype():
    tree = dfx.VirtualBrownianTree(0.0, 1.0, 1e-2, (4,), jr.key(0))
    assert tree.shape == jax.ShapeDtypeStruct((4,), jnp.float64)


def test_vmap_over_keys_equals_a_loop():
    # A different program (batched over keys) computes the same path.
    batched = _between_keys(KEYS, 0.3, 0.61)
    for i, key in enumerate(KEYS[:3]):
        single = _between(key, 0.3, 0.61)
        for x, y in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            np.testing.assert_allclose(x[i], y, rtol=1e-13, atol=1e-15)


def test_legacy_uint32_keys_work():
    assert np.isfinite(_bm_value(jr.PRNGKey(0), 0.1))


# ---- solving SDEs ----------------------------------------------------------------------


def _sde(bm, drift=lambda t, y, a: -a * y, diffusion=lambda t, y, a: 0.5 * y):
    return dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))


def test_euler_maruyama_on_the_tree_sums_its_increments():
    # dy = 0 dt + dW (Euler on a MultiTerm: Euler-Maruyama) sums the increments over
    # its steps, which add up to W(t0, t1); backwards in time, to -W(t0, t1).
    key = jr.key(12)
    bm = _tree(key, levy_area=dfx.BrownianIncrement)
    terms = _sde(bm, drift=lambda t, y, a: 0.0 * y, diffusion=lambda t, y, a: 1.0)

    @jax.jit
    def solve(t0, t1, dt0):
        sol = dfx.diffeqsolve(terms, dfx.Euler(), t0, t1, dt0, 0.0)
        return sol.ys[-1], sol.result

    expected = _bm_value(key, 0.9) - _bm_value(key, 0.1)
    forwards, result = solve(0.1, 0.9, 0.01)
    assert result == dfx.RESULTS.successful
    np.testing.assert_allclose(forwards, expected, atol=1e-12)
    np.testing.assert_allclose(solve(0.9, 0.1, -0.01)[0], -expected, atol=1e-12)


@pytest.mark.slow  # solves on the unsafe path: test_unsafe_path_refuses_adaptive_...
def test_euler_maruyama_runs_on_the_unsafe_path():
    bm = dfx.UnsafeBrownianPath((2,), jr.key(11))
    terms = _sde(bm, diffusion=lambda t, y, a: jnp.diag(0.5 * y))
    sol = dfx.diffeqsolve(terms, dfx.Euler(), 0.0, 1.0, 0.01, jnp.ones(2), args=1.0)
    assert sol.result == dfx.RESULTS.successful
    assert sol.ys.shape == (1, 2) and np.all(np.isfinite(sol.ys))


# Gradients of SDE solves against finite differences on the same path in the default
# run: test_sde.py::test_discrete_adjoints_match_finite_differences.
@pytest.mark.slow
def test_grad_through_sde_solve_matches_finite_differences():
    # A coarse tree (cells of 1/32) keeps compilation short; the gradient is that
    # of the solve on whatever path it is given.
    bm = _tree(jr.key(13), levy_area=dfx.BrownianIncrement, tol=2.0**-5)

    @jax.jit
    @jax.value_and_grad
    def final(rate):
        sol = dfx.diffeqsolve(_sde(bm), dfx.Euler(), 0.0, 1.0, 0.02, 1.0, args=rate)
        return sol.ys[-1]

    eps = 1e-6
    _, grad = final(0.7)
    fd = (final(0.7 + eps)[0] - final(0.7 - eps)[0]) / (2 * eps)
    assert np.isfinite(grad)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    # The path itself gets zero cotangents.
    assert jax.jit(jax.grad(lambda t: bm.evaluate(0.2, t)))(0.5) == 0.0


def test_euler_maruyama_has_strong_order_one_half():
    # Geometric Brownian motion, against X0 exp((mu - sigma^2/2) T + sigma W(T)) on the
    # same tree; the mean error over 200 paths at 5 step sizes has slope 0.5 +- 0.15.
    mu, sigma, x0 = 0.5, 0.8, 1.0

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None))
    def error(key, dt):
        bm = dfx.VirtualBrownianTree(0.0, 1.0, 2.0**-9, (), key)
        terms = _sde(
            bm, drift=lambda t, y, a: mu * y, diffusion=lambda t, y, a: sigma * y
        )
        exact = x0 * jnp.exp((mu - sigma**2 / 2) + sigma * bm.evaluate(0.0, 1.0))
        sol = dfx.diffeqsolve(terms, dfx.Euler(), 0.0, 1.0, dt, x0, max_steps=128)
        return jnp.abs(sol.ys[-1] - exact)

    keys = jr.split(jr.key(14), 200)
    dts = 2.0 ** -np.arange(3, 8)
    mean_error = [float(jnp.mean(error(keys, dt))) for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(mean_error), 1)[0]
    assert abs(slope - 0.5) < 0.15, slope


# ---- UnsafeBrownianPath ------------------------------------------------------------------


def test_unsafe_path_law_reproducibility_and_reversal():
    # 7 z-tests: failure chance < 4e-6.
    @jax.jit
    @jax.vmap
    def sample(key):
        bm = dfx.UnsafeBrownianPath((), key, levy_area=LEVY)
        return bm.evaluate(0.2, 0.45, use_levy=True), bm.evaluate(0.45, 0.5)

    area, after = sample(KEYS)
    h = 0.25
    _assert_variance(area.W, h)
    _assert_variance(area.H, h / 12)
    _assert_variance(area.K, h / 720)
    _assert_mean_zero(area.W, math.sqrt(h))
    _assert_uncorrelated(area.W, area.H, math.sqrt(h), math.sqrt(h / 12))
    _assert_uncorrelated(area.W, after, math.sqrt(h), math.sqrt(0.05))
    _assert_variance(after, 0.05)
    bm = dfx.UnsafeBrownianPath((2,), jr.key(15), levy_area=LEVY)
    forwards, backwards = (
        bm.evaluate(0.1, 0.3, use_levy=True),
        bm.evaluate(0.3, 0.1, use_levy=True),
    )
    np.testing.assert_array_equal(forwards.W, bm.evaluate(0.1, 0.3, use_levy=True).W)
    np.testing.assert_array_equal(backwards.W, -forwards.W)
    np.testing.assert_array_equal(backwards.H, forwards.H)
    np.testing.assert_array_equal(backwards.K, -forwards.K)
    np.testing.assert_array_equal(backwards.dt, -forwards.dt)
    np.testing.assert_array_equal(bm.evaluate(0.3, 0.3), 0.0)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_unsafe_scalar_increments_law_and_independence(dtype):
    # A scalar increment takes its bits from the query's own hash (no third hash):
    # its law, and independence of adjacent, overlapping and repeated-start queries.
    # 6 z-tests: failure chance < 4e-6.
    @jax.jit
    @jax.vmap
    def sample(key):
        bm = dfx.UnsafeBrownianPath(jax.ShapeDtypeStruct((), dtype), key)
        return (
            bm.evaluate(0.2, 0.45),
            bm.evaluate(0.45, 0.5),
            bm.evaluate(0.2, 0.5),
            bm.evaluate(0.45, 0.2),
        )

    first, second, overlapping, reversed_ = sample(KEYS)
    assert first.dtype == dtype
    _assert_variance(first, 0.25)
    _assert_variance(second, 0.05)
    _assert_mean_zero(first, 0.5)
    _assert_uncorrelated(first, second, 0.5, math.sqrt(0.05))
    _assert_uncorrelated(first, overlapping, 0.5, math.sqrt(0.3))
    _assert_uncorrelated(second, overlapping, math.sqrt(0.05), math.sqrt(0.3))
    np.testing.assert_array_equal(reversed_, -first)
    np.testing.assert_array_equal(sample(KEYS)[0], first)


def test_unsafe_consecutive_steps_are_independent():
    # The steps of one fixed-step solve: each query's later end is the next query's
    # earlier end (one folded into the hash's key, the other its counter), so check
    # the law of 20,000 consecutive increments of one path, and that neighbours
    # (lag 1) and steps two apart are uncorrelated. 4 z-tests: failure < 3e-6.
    dt = 2.0**-12
    ts = jnp.arange(20_001, dtype=jnp.float64) * dt
    bm = dfx.UnsafeBrownianPath((), jr.key(23))
    dws = jax.jit(jax.vmap(bm.evaluate))(ts[:-1], ts[1:])
    sd = math.sqrt(dt)
    _assert_mean_zero(dws, sd)
    _assert_variance(dws, dt)
    _assert_uncorrelated(dws[:-1], dws[1:], sd, sd)
    _assert_uncorrelated(dws[:-2], dws[2:], sd, sd)


def test_unsafe_path_pytree_shape():
    shape = (
        jax.ShapeDtypeStruct((3,), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.float64),
    )
    bm = dfx.UnsafeBrownianPath(shape, jr.key(16))
    w = jax.jit(lambda s, t: bm.evaluate(s, t))(0.0, 0.1)
    assert (
        w[0].dtype == jnp.float32 and w[0].shape == (3,) and w[1].dtype == jnp.float64
    )


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t0=1.0, t1=0.0), "t0 < t1"),
        (dict(t0=0.0, t1=0.0), "t0 < t1"),
        (dict(tol=0.0), "positive"),
        (dict(tol=-1e-3), "positive"),
        (dict(tol=1e-12), "finer than"),
        (dict(shape=[2]), "tuple of integers"),
        (dict(shape=jax.ShapeDtypeStruct((2,), jnp.int32)), "floating"),
        (dict(key=3), "PRNG key"),
        (dict(key=jr.split(jr.key(0), 2)), "jax.vmap"),
        (dict(levy_area=dfx.BrownianIncrement(1.0, 1.0)), "class itself"),
        (dict(levy_area=int), "levy_area"),
    ],
)
def test_tree_construction_errors(kwargs, match):
    arguments = dict(t0=0.0, t1=1.0, tol=1e-3, shape=(), key=jr.key(0))
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        dfx.VirtualBrownianTree(**arguments)


def test_query_outside_the_tree():
    tree = _tree(jr.key(0))
    with pytest.raises(ValueError, match=r"outside the tree's interval \[t0, t1\]"):
        tree.evaluate(0.5, 1.5)
    with pytest.raises(ValueError, match="outside"):
        tree.evaluate(-0.1)
    # Known only at run time: NaN.
    query = jax.jit(lambda t: tree.evaluate(0.5, t))
    assert np.isnan(query(1.5)) and np.isfinite(query(1.0))


def test_unsafe_path_has_no_values():
    with pytest.raises(ValueError, match="evaluate\\(t0, t1\\)"):
        dfx.UnsafeBrownianPath((), jr.key(0)).evaluate(0.5)
    with pytest.raises(ValueError, match="PRNG key"):
        dfx.UnsafeBrownianPath((), 0)


def test_missing_levy_area_is_a_clear_error():
    bm = dfx.VirtualBrownianTree(0.0, 1.0, 1e-3, (), jr.key(0))
    area = jax.eval_shape(lambda: bm.evaluate(0.1, 0.2, use_levy=True))
    assert isinstance(area, dfx.BrownianIncrement) and not hasattr(area, "H")
    with pytest.raises(ValueError, match="levy_area=diffeqx.SpaceTimeLevyArea"):
        levy.require_levy_area(bm, dfx.AbstractSpaceTimeLevyArea, "SRA1")
    levy.require_levy_area(_tree(jr.key(0)), dfx.AbstractSpaceTimeLevyArea, "SRA1")


def test_brownian_paths_are_modules_and_pytrees():
    tree = _tree(jr.key(0))
    assert isinstance(tree, eqx.Module)
    leaves = jax.tree.leaves(tree)
    assert any(
        jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key) for x in leaves
    )


# ---- against Diffrax ----------------------------------------------------------------------


@pytest.mark.slow
def test_levy_area_normalisation_matches_diffrax():
    # Diffrax's tree's H and K are the same integrals of its path as ours: the
    # normalisation its solvers' coefficients assume.
    diffrax = pytest.importorskip("diffrax")
    tree = diffrax.VirtualBrownianTree(
        0.0, 1.0, 2.0**-12, (), jr.key(7), levy_area=diffrax.SpaceTimeTimeLevyArea
    )
    grid = jnp.linspace(0.0, 1.0, 2**12 + 1)
    path = np.asarray(jax.jit(jax.vmap(tree.evaluate))(grid))
    area = tree.evaluate(0.0, 1.0, use_levy=True)
    grid = np.asarray(grid)
    bridge = path - grid * float(area.W)
    trapezoid = np.trapezoid if hasattr(np, "trapezoid") else np.trapz
    np.testing.assert_allclose(float(area.H), trapezoid(bridge, grid), atol=2e-3)
    np.testing.assert_allclose(
        float(area.K), trapezoid(bridge * (0.5 - grid), grid), atol=2e-3
    )


def _unsafe_ou_solve(rate, adjoint=None, controller=None):
    bm = dfx.UnsafeBrownianPath((), jr.key(3))
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, a: -a * y),
        dfx.ControlTerm(lambda t, y, a: 0.5 + 0 * y, bm),
    )
    kwargs = {} if adjoint is None else dict(adjoint=adjoint)
    if controller is not None:
        kwargs["stepsize_controller"] = controller
    return dfx.diffeqsolve(
        terms,
        dfx.Heun() if controller else dfx.Euler(),
        0.0,
        1.0,
        0.01,
        jnp.asarray(1.0),
        args=rate,
        **kwargs,
    ).ys[-1]


def test_unsafe_path_refuses_adaptive_steps_and_reverse_mode():
    rate = jnp.asarray(0.7)
    with pytest.raises(ValueError, match="adaptive step-size controller"):
        _unsafe_ou_solve(rate, controller=dfx.PIDController(rtol=1e-3, atol=1e-3))
    for adjoint in (dfx.RecursiveCheckpointAdjoint(), dfx.DirectAdjoint()):
        with pytest.raises(ValueError, match="Reverse-mode differentiation"):
            jax.jit(jax.grad(lambda a, adjoint=adjoint: _unsafe_ou_solve(a, adjoint)))(
                rate
            )
    # Forward mode is supported, and matches finite differences on the same path.
    derivative = jax.jit(jax.jacfwd(_unsafe_ou_solve))(rate)
    eps = 1e-6
    fd = (_unsafe_ou_solve(rate + eps) - _unsafe_ou_solve(rate - eps)) / (2 * eps)
    np.testing.assert_allclose(float(derivative), float(fd), rtol=1e-6)


# ---- complex Brownian motion -------------------------------------------------------


_COMPLEX = jax.ShapeDtypeStruct((N_KEYS,), jnp.complex128)


@pytest.mark.parametrize("kind", ["tree", "unsafe"])
def test_complex_leaves_have_independent_real_and_imaginary_halves(kind):
    # As in Diffrax: a complex leaf's real and imaginary parts are independent
    # Brownian motions with half the variance each (E|W|^2 = dt), and the Lévy
    # areas likewise (E|H|^2 = dt / 12, E|K|^2 = dt / 720).
    s, t = 0.1, 0.5
    dt = t - s
    if kind == "tree":
        path = _tree(jr.key(5), shape=_COMPLEX)
    else:
        path = dfx.UnsafeBrownianPath(_COMPLEX, jr.key(5), levy_area=LEVY)
    sample = path.evaluate(s, t, use_levy=True)
    assert sample.W.dtype == sample.H.dtype == sample.K.dtype == jnp.complex128
    assert sample.dt.dtype == jnp.float64
    for moment, var in ((sample.W, dt), (sample.H, dt / 12), (sample.K, dt / 720)):
        for part in (moment.real, moment.imag):
            _assert_mean_zero(part, math.sqrt(var / 2))
            _assert_variance(part, var / 2)
        sd = math.sqrt(var / 2)
        _assert_uncorrelated(moment.real, moment.imag, sd, sd)


def test_complex_tree_values_are_consistent_and_reproducible():
    shape = jax.ShapeDtypeStruct((3,), jnp.complex64)
    path = _tree(jr.key(7), shape=shape, levy_area=dfx.BrownianIncrement)
    increment = path.evaluate(0.2, 0.7)
    assert increment.dtype == jnp.complex64 and increment.shape == (3,)
    np.testing.assert_allclose(
        increment, path.evaluate(0.7) - path.evaluate(0.2), atol=1e-6
    )
    np.testing.assert_array_equal(increment, path.evaluate(0.2, 0.7))
    np.testing.assert_array_equal(-increment, path.evaluate(0.7, 0.2))


def test_euler_maruyama_with_complex_noise_uses_the_complex_increments():
    # dy = -y dt + 0.5 (1 + i) dW with complex W: Euler-Maruyama by hand, on the
    # same increments, gives the same solution.
    shape = jax.ShapeDtypeStruct((), jnp.complex128)
    path = dfx.UnsafeBrownianPath(shape, jr.key(3))
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.ControlTerm(lambda t, y, args: jnp.asarray(0.5 + 0.5j), path),
    )
    dt, n = 0.05, 20
    sol = dfx.diffeqsolve(
        terms,
        dfx.Euler(),
        0.0,
        n * dt,
        dt,
        jnp.asarray(1.0 + 0j),
        saveat=dfx.SaveAt(steps=True),
    )
    ts = np.asarray(sol.ts)[:n]
    y, expected = 1.0 + 0j, []
    for k in range(n):
        start = 0.0 if k == 0 else ts[k - 1]
        increment = complex(path.evaluate(start, ts[k]))
        y = y - y * (ts[k] - start) + (0.5 + 0.5j) * increment
        expected.append(y)
    np.testing.assert_allclose(np.asarray(sol.ys)[:n], np.array(expected), rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["tree", "unsafe"])
def test_half_precision_paths_are_finite_brownian_samples(kind, dtype):
    # Sampled in float32 and rounded: the tree's quantiles and bridge arithmetic in
    # float16 overflowed, and every sample was NaN.
    shape = jax.ShapeDtypeStruct((N_KEYS,), dtype)
    if kind == "tree":
        path = _tree(jr.key(9), shape=shape, t0=0.3, t1=1.0, tol=0.2)
    else:
        path = dfx.UnsafeBrownianPath(shape, jr.key(9), levy_area=LEVY)
    sample = path.evaluate(0.3, 0.6, use_levy=True)
    for moment, var in ((sample.W, 0.3), (sample.H, 0.3 / 12), (sample.K, 0.3 / 720)):
        assert moment.dtype == dtype
        values = np.asarray(moment.astype(jnp.float32))
        assert np.all(np.isfinite(values))
        _assert_mean_zero(values, math.sqrt(var))
        _assert_variance(values, var)
    assert sample.dt.dtype == dtype


def _one_path_adaptive_spark(key):
    matrix = jnp.array(
        [[-1.0, 0.5, 0.0, 0.2], [-0.5, -1.0, 0.3, 0.0], [0.0, -0.3, -0.8, 0.4],
         [-0.2, 0.0, -0.4, -0.6]]
    )  # fmt: skip
    sol, _ = spark_on_a_tree(
        key,
        lambda t, y, args: matrix @ y + jnp.sin(y),
        lambda t, y, args: 0.3 * jnp.outer(jnp.cos(y), y),
        jnp.ones(4),
    )
    return sol.ys[-1], sol.result


def test_adaptive_solve_of_one_path_on_a_deep_tree():
    """An adaptive SPaRK solve of one path on a tree of depth 19 (the adaptive
    benchmark's problem without `jax.vmap`). With XLA's default code generator its
    compilation once took minutes, in LLVM, on a kernel into which XLA had fused the
    tree's key hash (run below in a process with those defaults)."""
    y, result = jax.jit(_one_path_adaptive_spark)(jr.key(0))
    assert result == dfx.RESULTS.successful
    assert np.all(np.isfinite(np.asarray(y)))


@pytest.mark.skipif(
    os.environ.get("DIFFEQX_TEST_XLA_DEFAULTS") is not None,
    reason="already running with XLA's defaults",
)
def test_adaptive_solve_on_a_deep_tree_compiles_with_xlas_default_code_generator():
    """The case above compiles in seconds (about 1.5 s on 2 cores) with the code
    generator users get; it took minutes before the key hash's words were computed
    into memory (`base._hashed_words`). A time limit 40 times that is a hang check,
    not a timing test."""
    try:
        done = run_pytest_with_xla_defaults(
            "tests/test_brownian.py",
            "-k",
            "test_adaptive_solve_of_one_path_on_a_deep_tree",
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the solve took over 120 s")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout, done.stdout[-2000:]

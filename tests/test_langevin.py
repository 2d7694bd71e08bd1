"""The underdamped Langevin terms and their solvers ALIGN, ShOULD and QUICSORT.

    dx = v dt,    dv = -gamma v dt - u grad_f(x) dt + sqrt(2 gamma u) dW.

What is checked, and against what:

- strong orders (2, 3, 3) on `VirtualBrownianTree` paths, against a fine-step solve
  by the same solver on the same paths, for a quadratic and a quartic potential;
- weak orders (2, 3, 3) exactly, without sampling: for a quadratic potential each
  step is an affine map of the state and of `(W, H, K)`, read off the solver by
  `jax.jacfwd`, so the law of the numerical solution at `T` is Gaussian with a mean
  and covariance computed by recursion, compared with the closed form (matrix
  exponentials);
- the closed-form mean and covariance again, by Monte Carlo over many sampled paths
  (the sampler and the solver together);
- the terms with generic solvers (`Euler`, `Heun`) against the dedicated solvers;
- adaptive steps, backward solves, batching, float32, gradients, PyTree states, the
  coefficients against 80-digit arithmetic, and the errors.

Most tests drive the solves with `GridPath`, Brownian increments and Lévy areas
sampled once on the solve's own step grid, which compiles in a fraction of the time
of a Brownian tree; the tree is used where consistency across step sizes matters
(convergence orders, adaptive steps).
"""

import math
from decimal import Decimal, getcontext

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.linalg

import diffeqx as dfx
from _sde import fitted_order, langevin_half_precision_rms

SOLVERS = ("ALIGN", "ShOULD", "QUICSORT")
LEVY = {
    "ALIGN": dfx.SpaceTimeLevyArea,
    "ShOULD": dfx.SpaceTimeTimeLevyArea,
    "QUICSORT": dfx.SpaceTimeTimeLevyArea,
}
STRONG_ORDER = {"ALIGN": 2.0, "ShOULD": 3.0, "QUICSORT": 3.0}

# A two-dimensional problem with per-component friction and inverse mass, and a
# coupled quadratic potential f(x) = x^T Q x / 2.
GAMMA = np.array([0.8, 1.5])
U = np.array([1.0, 0.7])
Q = np.array([[2.0, 0.5], [0.5, 1.0]])
X0 = np.array([1.0, -0.5])
V0 = np.array([0.3, 0.2])


def mixed_gradient(x, args):
    """The gradient of `a x^T Q x / 2 + c sum(x^4/4 + x^2/2)` for `args = (a, c)`:
    the quadratic potential for (1, 0), the quartic one for (0, 1). The
    coefficients are traced, so both potentials share one compilation."""
    a, c = args
    return a * (jnp.asarray(Q, dtype=x.dtype) @ x) + c * (x**3 + x)


QUADRATIC, QUARTIC = (1.0, 0.0), (0.0, 1.0)


def langevin_terms(bm, gamma=GAMMA, u=U, grad=mixed_gradient):
    if isinstance(gamma, np.ndarray):
        gamma, u = jnp.asarray(gamma), jnp.asarray(u)
    return dfx.MultiTerm(
        dfx.UnderdampedLangevinDriftTerm(gamma, u, grad),
        dfx.UnderdampedLangevinDiffusionTerm(gamma, u, bm),
    )


def initial_state(dtype=jnp.float64):
    return jnp.asarray(X0, dtype=dtype), jnp.asarray(V0, dtype=dtype)


# ---- a Brownian motion sampled on a grid -----------------------------------------------


class GridPath(dfx.AbstractBrownianPath):
    """Brownian increments and Lévy areas sampled once on the cells of the grid
    `start + i * step`: exactly Brownian motion for solves whose steps are that grid
    (constant steps, forwards or backwards). A query over a cell traversed backwards
    gets the time-reversed values (`W`, `K` negated, `H` kept)."""

    start: float = eqx.field(static=True)
    step: float = eqx.field(static=True)
    W: object
    H: object
    K: object
    levy_area: type = eqx.field(static=True)

    @property
    def t0(self):
        return self.start

    @property
    def t1(self):
        return self.start + self.step * jtu.tree_leaves(self.W)[0].shape[0]

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        if t1 is None:
            raise ValueError("GridPath has increments only.")
        lo = jnp.minimum(t0, t1)
        i = jnp.round((lo - self.start) / self.step).astype(jnp.int32)
        forward = t1 >= t0

        def pick(tree, odd):
            def leaf(a):
                x = a[i]
                return jnp.where(forward | (not odd), x, -x)

            return jtu.tree_map(leaf, tree)

        w = pick(self.W, True)
        if not use_levy:
            return w
        fields = dict(dt=t1 - t0, W=w)
        if issubclass(self.levy_area, dfx.AbstractSpaceTimeLevyArea):
            fields["H"] = pick(self.H, False)
        if issubclass(self.levy_area, dfx.AbstractSpaceTimeTimeLevyArea):
            fields["K"] = pick(self.K, True)
        return self.levy_area(**fields)


def grid_path(key, shape, num, step, levy_area=dfx.SpaceTimeTimeLevyArea, start=0.0):
    """A `GridPath` of `num` cells of width `step`; `shape` a tuple (float64) or a
    PyTree of `jax.ShapeDtypeStruct`s."""
    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
        shape = jax.ShapeDtypeStruct(shape, jnp.float64)
    leaves, treedef = jtu.tree_flatten(shape)
    keys = jr.split(key, 3 * len(leaves)).reshape(3, len(leaves))
    scales = (math.sqrt(step), math.sqrt(step / 12), math.sqrt(step / 720))
    moments = []
    for row, scale in zip(keys, scales, strict=True):
        parts = [
            jnp.asarray(scale, s.dtype) * jr.normal(k, (num, *s.shape), s.dtype)
            for k, s in zip(row, leaves, strict=True)
        ]
        moments.append(jtu.tree_unflatten(treedef, parts))
    return GridPath(start, step, *moments, levy_area=levy_area)


# ---- closed forms for the quadratic potential ---------------------------------------------


def linear_system(gamma=GAMMA, u=U, q=Q):
    """`M` and `S`: the Langevin SDE with `grad_f(x) = Q x` is `dy = M y dt + B dW`
    for `y = (x, v)`, with `S = B B^T`."""
    d = len(gamma)
    m = np.zeros((2 * d, 2 * d))
    m[:d, d:] = np.eye(d)
    m[d:, :d] = -np.diag(u) @ q
    m[d:, d:] = -np.diag(gamma)
    s = np.zeros((2 * d, 2 * d))
    s[d:, d:] = np.diag(2 * gamma * u)
    return m, s


def exact_moments(t, y0=None):
    """Mean and covariance of `y(t) = (x, v)(t)` for the quadratic potential (Van
    Loan's block exponential for the covariance)."""
    y0 = np.concatenate([X0, V0]) if y0 is None else y0
    m, s = linear_system()
    n = m.shape[0]
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n] = -m
    block[:n, n:] = s
    block[n:, n:] = m.T
    e = scipy.linalg.expm(block * t)
    cov = e[n:, n:].T @ e[:n, n:]
    return scipy.linalg.expm(m * t) @ y0, cov


# ---- strong order -----------------------------------------------------------------------------

T_STRONG = 1.0
# Step sizes 1/4 ... 1/64: coarse enough that the errors (1e-2 down to 1e-8) stand
# far above the reference's error (step 1/1024, at least 16^2 times smaller) and
# rounding, fine enough that gamma h and |Q| h^2 are small and the leading error
# term dominates (at h = 1/2 the local slopes of the third-order methods were still
# 2.8 to 3.4).
STRONG_DTS = tuple(2.0**-k for k in range(2, 7))
REFERENCE_DT = 2.0**-10


def _strong_solver_fn(solver, levy_area):
    def one(key, dt, args):
        bm = dfx.VirtualBrownianTree(
            0.0, T_STRONG, tol=2.0**-14, shape=(2,), key=key, levy_area=levy_area
        )
        sol = dfx.diffeqsolve(
            langevin_terms(bm),
            solver,
            0.0,
            T_STRONG,
            dt,
            initial_state(),
            args=args,
            max_steps=int(T_STRONG / REFERENCE_DT) + 2,
        )
        return jnp.concatenate([sol.ys[0][-1], sol.ys[1][-1]])

    return jax.jit(jax.vmap(one, in_axes=(0, None, None)))


def strong_orders(name, n_paths=64):
    """The fitted strong orders on the quadratic and the quartic potential (one
    compilation: the step size and the potential are traced)."""
    run = _strong_solver_fn(getattr(dfx, name)(), LEVY[name])
    keys = jr.split(jr.key(2024), n_paths)
    orders = {}
    for label, potential in (("quadratic", QUADRATIC), ("quartic", QUARTIC)):
        args = tuple(jnp.asarray(a) for a in potential)
        reference = run(keys, jnp.asarray(REFERENCE_DT), args)
        errors = []
        for dt in STRONG_DTS:
            y = run(keys, jnp.asarray(dt), args)
            errors.append(float(jnp.mean(jnp.max(jnp.abs(y - reference), axis=-1))))
        orders[label] = (fitted_order(STRONG_DTS, errors), errors)
    return orders


# Each method's order against the closed form by default: the exact law of its
# second moment (test_weak_order_of_second_moment_is_exact_law), which needs no
# sampling; the strong orders (many paths at several step sizes) are `slow`.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ALIGN", "ShOULD", "QUICSORT"])
def test_strong_order(name):
    for label, (order, errors) in strong_orders(name).items():
        assert abs(order - STRONG_ORDER[name]) <= 0.15, (name, label, order, errors)


# ---- weak order, exactly ------------------------------------------------------------------


class ConstantPath(dfx.AbstractBrownianPath):
    """The same `W`, `H`, `K` for every interval: for reading off one step's affine
    dependence on them."""

    W: jax.Array
    H: jax.Array
    K: jax.Array
    levy_area: type = eqx.field(static=True, default=dfx.SpaceTimeTimeLevyArea)

    @property
    def t0(self):
        return 0.0

    @property
    def t1(self):
        return 10.0

    def evaluate(self, t0, t1=None, left=True, use_levy=False):
        if not use_levy:
            return self.W
        return dfx.SpaceTimeTimeLevyArea(dt=t1 - t0, W=self.W, H=self.H, K=self.K)


def step_matrices(solver, h):
    """`(A, B)` with one step `y1 = A y0 + B (W, H, K)` for the quadratic potential,
    read off the solver (init and step, as a solve runs them) by `jax.jacfwd`."""

    def one_step(y, w, hh, kk):
        terms = langevin_terms(ConstantPath(w, hh, kk))
        y0 = (y[:2], y[2:])
        state = solver.init(terms, 0.0, h, y0, QUADRATIC)
        y1 = solver.step(terms, 0.0, h, y0, QUADRATIC, state, False)[0]
        return jnp.concatenate(y1)

    zero = jnp.zeros(2)
    a, bw, bh, bk = jax.jit(jax.jacfwd(one_step, argnums=(0, 1, 2, 3)))(
        jnp.zeros(4), zero, zero, zero
    )
    return np.asarray(a), np.concatenate([bw, bh, bk], axis=1)


def numerical_moments(solver, h, t):
    """Mean and covariance of the numerical solution at `t`: exact for the method
    (the noise `(W, H, K)` of each step is Gaussian with variances h, h/12, h/720)."""
    a, b = step_matrices(solver, h)
    noise = np.diag(np.repeat([h, h / 12, h / 720], 2))
    mean, cov = np.concatenate([X0, V0]), np.zeros((4, 4))
    for _ in range(int(round(t / h))):
        mean = a @ mean
        cov = a @ cov @ a.T + b @ noise @ b.T
    return mean, cov


@pytest.mark.parametrize("name", SOLVERS)
def test_weak_order_of_second_moment_is_exact_law(name):
    # E[x_1(T)^2] of the method's own law against the closed form: no sampling, so
    # no statistical tolerance. Measured: ALIGN 1.99, ShOULD 2.95, QUICSORT 3.06.
    t = 2.0
    mean_e, cov_e = exact_moments(t)
    truth = mean_e[0] ** 2 + cov_e[0, 0]
    dts = [2.0**-k for k in range(2, 6)]
    errors = []
    for h in dts:
        mean, cov = numerical_moments(getattr(dfx, name)(), h, t)
        errors.append(abs(mean[0] ** 2 + cov[0, 0] - truth))
    order = fitted_order(dts, errors)
    assert abs(order - STRONG_ORDER[name]) <= 0.15, (name, order, errors)
    # And the whole law converges: the finest step's mean and covariance.
    assert np.max(np.abs(mean - mean_e)) < 1e-3
    assert np.max(np.abs(cov - cov_e)) < 1e-3


# ---- the closed form by Monte Carlo ---------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ALIGN", marks=pytest.mark.slow),
        pytest.param("ShOULD", marks=pytest.mark.slow),
        "QUICSORT",
    ],
)
def test_mean_and_covariance_match_closed_form(name):
    # Many sampled paths (UnsafeBrownianPath: constant steps, each interval used
    # once) against the closed form. The method's bias at h = 1/8 is below 1e-3
    # (see the exact-law test); the sampling error of 2^15 paths is about 0.005, so
    # each of the 4 means and 10 covariances must lie within 5 standard errors.
    n, t, h = 2**15, 2.0, 0.125
    solver = getattr(dfx, name)()

    def one(key):
        bm = dfx.UnsafeBrownianPath(shape=(2,), key=key, levy_area=LEVY[name])
        sol = dfx.diffeqsolve(
            langevin_terms(bm), solver, 0.0, t, h, initial_state(), args=QUADRATIC
        )
        return jnp.concatenate([sol.ys[0][-1], sol.ys[1][-1]])

    y = np.asarray(jax.jit(jax.vmap(one))(jr.split(jr.key(7), n)))
    mean_e, cov_e = exact_moments(t)
    mean, cov = y.mean(axis=0), np.cov(y, rowvar=False)
    var = np.diag(cov_e)
    assert np.all(np.abs(mean - mean_e) <= 5 * np.sqrt(var / n)), (mean, mean_e)
    cov_se = np.sqrt((np.outer(var, var) + cov_e**2) / n)
    assert np.all(np.abs(cov - cov_e) <= 5 * cov_se), (cov, cov_e)


# ---- adaptive steps -------------------------------------------------------------------------


def test_adaptive_align_converges_to_a_fine_reference():
    # One compilation: the tolerances are traced, and the reference is the same
    # adaptive solve at a much tighter tolerance.
    t1 = 2.0

    @jax.jit
    def solve(key, tol):
        bm = dfx.VirtualBrownianTree(
            0.0, t1, tol=2.0**-16, shape=(2,), key=key, levy_area=dfx.SpaceTimeLevyArea
        )
        sol = dfx.diffeqsolve(
            langevin_terms(bm),
            dfx.ALIGN(),
            0.0,
            t1,
            0.1,
            initial_state(),
            args=QUARTIC,
            stepsize_controller=dfx.PIDController(rtol=tol, atol=tol),
            max_steps=4096,
        )
        return jnp.concatenate([sol.ys[0][-1], sol.ys[1][-1]]), sol.stats

    key = jr.key(3)
    reference, ref_stats = solve(key, jnp.asarray(1e-6))
    errors, steps = [], []
    for tol in (1e-2, 1e-3, 1e-4):
        y, stats = solve(key, jnp.asarray(tol))
        assert np.all(np.isfinite(np.asarray(y)))
        assert int(stats["num_rejected_steps"]) > 0
        errors.append(float(jnp.max(jnp.abs(y - reference))))
        steps.append(int(stats["num_accepted_steps"]))
    # Measured: errors 2.8e-3, 5.8e-4, 3.9e-5 with 15, 44, 136 steps (the
    # reference: 1340 steps).
    assert errors[1] < 2e-3 and errors[2] < 2e-4, errors
    assert errors[0] > errors[1] > errors[2], errors
    assert steps[0] < steps[1] < steps[2] < int(ref_stats["num_accepted_steps"])


def test_solvers_without_error_estimate_refuse_adaptive_steps():
    bm = grid_path(jr.key(0), (2,), 8, 0.125)
    for solver in (dfx.ShOULD(), dfx.QUICSORT()):
        with pytest.raises(ValueError, match="error estimate"):
            dfx.diffeqsolve(
                langevin_terms(bm),
                solver,
                0.0,
                1.0,
                0.125,
                initial_state(),
                args=QUADRATIC,
                stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-3),
            )


# ---- the terms with generic solvers --------------------------------------------------------


@pytest.mark.slow
def test_euler_and_heun_solve_the_same_sde_and_vmap_equals_a_loop():
    # On 8 Brownian paths, at one fine step: Euler and Heun (strong order 1 for this
    # additive noise) against ALIGN (order 2, error ~1e-6 here) for the quartic
    # potential. Wrong signs or noise scales in the terms would put them 0.1 to 1
    # apart; the methods' own errors are ~2e-3 at this step. The solves are
    # vmapped over the paths' keys, and ALIGN's match a loop of single solves.
    n, h = 512, 2.0**-9
    keys = jr.split(jr.key(11), 8)

    def solve(solver, key):
        bm = grid_path(key, (2,), n, h, dfx.SpaceTimeLevyArea)
        sol = dfx.diffeqsolve(
            langevin_terms(bm), solver, 0.0, n * h, h, initial_state(), args=QUARTIC
        )
        return jnp.concatenate([sol.ys[0][-1], sol.ys[1][-1]])

    results = {
        name: np.asarray(jax.jit(jax.vmap(lambda k, s=solver: solve(s, k)))(keys))
        for name, solver in (
            ("ALIGN", dfx.ALIGN()),
            ("Euler", dfx.Euler()),
            ("Heun", dfx.Heun()),
        )
    }
    spread = np.max(np.abs(results["ALIGN"] - results["ALIGN"].mean(axis=0)))
    assert spread > 0.1  # the paths differ: the comparison is not trivial
    for name in ("Euler", "Heun"):
        error = np.max(np.abs(results[name] - results["ALIGN"]))
        assert error < 1e-2, (name, error)
    single = jax.jit(lambda k: solve(dfx.ALIGN(), k))
    for i in (0, 5):
        np.testing.assert_allclose(
            single(keys[i]), results["ALIGN"][i], rtol=1e-13, atol=1e-13
        )


def test_drift_and_diffusion_terms():
    bm = grid_path(jr.key(0), (2,), 4, 0.25)
    x, v = jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 0.25])
    drift = dfx.UnderdampedLangevinDriftTerm(
        0.5, jnp.asarray([1.0, 2.0]), mixed_gradient
    )
    dx, dv = drift.vf(0.0, (x, v), QUADRATIC)
    np.testing.assert_allclose(dx, v)
    np.testing.assert_allclose(
        dv, -0.5 * v - np.array([1.0, 2.0]) * (Q @ np.asarray(x))
    )
    np.testing.assert_allclose(drift.contr(0.25, 1.0), 0.75)
    out = drift.prod((dx, dv), 0.1)
    np.testing.assert_allclose(out[1], 0.1 * np.asarray(dv))

    diffusion = dfx.UnderdampedLangevinDiffusionTerm(0.5, jnp.asarray([1.0, 2.0]), bm)
    sigma = diffusion.vf(0.0, (x, v), None)
    np.testing.assert_allclose(sigma, np.sqrt(2 * 0.5 * np.array([1.0, 2.0])))
    w = diffusion.contr(0.0, 0.25)
    zero, dv = diffusion.prod(sigma, w)
    np.testing.assert_array_equal(zero, 0.0)
    np.testing.assert_allclose(dv, np.asarray(sigma) * np.asarray(w))
    # The Lévy-area object is accepted as the control too (its `W` is used).
    levy = diffusion.contr(0.0, 0.25, use_levy=True)
    np.testing.assert_allclose(diffusion.prod(sigma, levy)[1], dv)
    assert diffusion.control is bm


# ---- backward in time ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ALIGN", "QUICSORT"])
def test_backward_solve_returns_to_the_start(name):
    # Forwards over [0, 1], then backwards from the end over the same path (the
    # reversed cells: W and K negated, H kept): the inverse flow, to the method's
    # accuracy (about 1e-5 at this step for ALIGN). Taking H with the wrong sign
    # backwards leaves an error of order h (checked: ~1e-2).
    n, h = 64, 2.0**-6
    bm = grid_path(jr.key(5), (2,), n, h, LEVY[name])
    terms = langevin_terms(bm)
    solver = getattr(dfx, name)()
    fwd = dfx.diffeqsolve(terms, solver, 0.0, 1.0, h, initial_state(), args=QUARTIC)
    end = (fwd.ys[0][-1], fwd.ys[1][-1])
    bwd = dfx.diffeqsolve(terms, solver, 1.0, 0.0, -h, end, args=QUARTIC)
    back = np.concatenate([bwd.ys[0][-1], bwd.ys[1][-1]])
    moved = np.max(np.abs(np.concatenate(end) - np.concatenate([X0, V0])))
    assert moved > 0.3
    np.testing.assert_allclose(back, np.concatenate([X0, V0]), atol=1e-4)


# ---- batching, float32, gradients, PyTrees --------------------------------------------------


@pytest.mark.slow
def test_vmap_over_keys_equals_a_loop():
    n, h = 16, 0.0625
    keys = jr.split(jr.key(1), 4)

    @jax.jit
    def solve(key):
        bm = grid_path(key, (2,), n, h, dfx.SpaceTimeTimeLevyArea)
        sol = dfx.diffeqsolve(
            langevin_terms(bm),
            dfx.ShOULD(),
            0.0,
            n * h,
            h,
            initial_state(),
            args=QUARTIC,
        )
        return sol.ys

    batched = jax.jit(jax.vmap(solve))(keys)
    for i, key in enumerate(keys):
        single = solve(key)
        for a, b in zip(single, batched, strict=True):
            np.testing.assert_allclose(a, b[i], rtol=1e-13, atol=1e-13)


@pytest.mark.slow  # float32 SDE states: test_sde.py::test_float32
@pytest.mark.parametrize("name", ["ALIGN", "QUICSORT"])
def test_float32(name):
    n, h = 16, 0.0625
    shape32 = jax.ShapeDtypeStruct((2,), jnp.float32)
    bm32 = grid_path(jr.key(4), shape32, n, h, LEVY[name])
    bm64 = jtu.tree_map(lambda a: a.astype(jnp.float64), bm32)

    def solve(bm, dtype):
        gamma = jnp.asarray(GAMMA, dtype)
        u = jnp.asarray(U, dtype)
        args = tuple(jnp.asarray(a, dtype) for a in QUARTIC)
        # Times of the state's dtype: Python floats would make the solve float64.
        t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, n * h, h))
        sol = dfx.diffeqsolve(
            langevin_terms(bm, gamma, u),
            getattr(dfx, name)(),
            t0,
            t1,
            dt0,
            initial_state(dtype),
            args=args,
        )
        return sol.ys

    ys32, ys64 = solve(bm32, jnp.float32), solve(bm64, jnp.float64)
    for a, b in zip(ys32, ys64, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# Gradients of SDE solves against finite differences on the same path in the default
# run: test_sde.py::test_discrete_adjoints_match_finite_differences.
@pytest.mark.slow
def test_grad_matches_finite_differences_on_the_same_path():
    n, h = 32, 0.0625
    bm = grid_path(jr.key(9), (2,), n, h, dfx.SpaceTimeLevyArea)

    def loss(gamma_scale, quartic):
        gamma = gamma_scale * jnp.asarray(GAMMA)
        sol = dfx.diffeqsolve(
            langevin_terms(bm, gamma=gamma),
            dfx.ALIGN(),
            0.0,
            n * h,
            h,
            initial_state(),
            args=(jnp.asarray(1.0), quartic),
        )
        return jnp.sum(sol.ys[0][-1] ** 2) + jnp.sum(jnp.sin(sol.ys[1][-1]))

    point = (jnp.asarray(1.0), jnp.asarray(0.5))
    # One compilation gives the gradient and, through the values, the differences.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    _, grads = value_and_grad(*point)
    f = lambda *p: value_and_grad(*p)[0]
    eps = 1e-6
    fd_gamma = (f(point[0] + eps, point[1]) - f(point[0] - eps, point[1])) / (2 * eps)
    fd_quartic = (f(point[0], point[1] + eps) - f(point[0], point[1] - eps)) / (2 * eps)
    assert abs(float(grads[0])) > 1e-2 and abs(float(grads[1])) > 1e-2
    np.testing.assert_allclose(grads[0], fd_gamma, rtol=1e-6)
    np.testing.assert_allclose(grads[1], fd_quartic, rtol=1e-6)


# PyTree SDE states in the default run: test_srk.py::test_pytree_state_equals_...
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ALIGN", "ShOULD", "QUICSORT"])
def test_pytree_state_equals_the_stacked_state(name):
    # x = (a, b) with a of shape (2,) and b of shape (1,), gamma a scalar for the
    # first leaf and an array for the second: the same as the stacked problem.
    n, h = 8, 0.125
    shape = (
        jax.ShapeDtypeStruct((2,), jnp.float64),
        jax.ShapeDtypeStruct((1,), jnp.float64),
    )
    bm = grid_path(jr.key(6), shape, n, h, LEVY[name])
    stacked_bm = GridPath(
        0.0,
        h,
        *(jnp.concatenate(m, axis=1) for m in (bm.W, bm.H, bm.K)),
        levy_area=LEVY[name],
    )

    def grad_tree(x, args):
        a, b = x
        return a**3 + jnp.asarray([1.0, 2.0]) * a, b**3 + 0.5 * b

    def grad_flat(x, args):
        return x**3 + jnp.asarray([1.0, 2.0, 0.5]) * x

    gamma_tree = (jnp.asarray(0.7), jnp.asarray([1.3]))
    u_tree = (jnp.asarray(1.1), jnp.asarray(0.9))
    x0 = (jnp.asarray([0.4, -0.3]), jnp.asarray([0.8]))
    v0 = (jnp.asarray([0.1, 0.2]), jnp.asarray([-0.5]))
    solver = getattr(dfx, name)()
    tree = dfx.diffeqsolve(
        langevin_terms(bm, gamma_tree, u_tree, grad_tree), solver, 0.0, 1.0, h, (x0, v0)
    )
    flat = dfx.diffeqsolve(
        langevin_terms(
            stacked_bm,
            jnp.asarray([0.7, 0.7, 1.3]),
            jnp.asarray([1.1, 1.1, 0.9]),
            grad_flat,
        ),
        solver,
        0.0,
        1.0,
        h,
        tuple(jnp.concatenate(p) for p in (x0, v0)),
    )
    for part_tree, part_flat in zip(tree.ys, flat.ys, strict=True):
        joined = jnp.concatenate(part_tree, axis=-1)
        np.testing.assert_allclose(joined, part_flat, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_dense_output_is_linear_between_steps():
    n, h = 8, 0.125
    bm = grid_path(jr.key(8), (2,), n, h, dfx.SpaceTimeLevyArea)
    terms = langevin_terms(bm)
    steps = dfx.diffeqsolve(
        terms,
        dfx.ALIGN(),
        0.0,
        1.0,
        h,
        initial_state(),
        args=QUARTIC,
        saveat=dfx.SaveAt(steps=True),
    )
    ts = jnp.asarray([0.3, 0.55, 0.9])
    dense = dfx.diffeqsolve(
        terms,
        dfx.ALIGN(),
        0.0,
        1.0,
        h,
        initial_state(),
        args=QUARTIC,
        saveat=dfx.SaveAt(ts=ts),
    )
    grid = np.concatenate([[0.0], np.asarray(steps.ts)[:n]])
    for part, part_steps, start in zip(dense.ys, steps.ys, (X0, V0), strict=True):
        values = np.concatenate([start[None], np.asarray(part_steps)[:n]])
        for j in range(2):
            expected = np.interp(np.asarray(ts), grid, values[:, j])
            np.testing.assert_allclose(part[:, j], expected, rtol=1e-13, atol=1e-13)


# ---- the coefficients ----------------------------------------------------------------------


def _exact_coefficients(gamma, h):
    """The closed forms, in 80-digit arithmetic."""
    getcontext().prec = 80
    g, h = Decimal(gamma), Decimal(h)
    al = g * h
    one = Decimal(1)

    def at(theta):
        b = (-al * theta).exp()
        return b, (one - b) / g, (b + al * theta - one) / (g * g * h)

    beta, a, b = at(one)
    beta_half, a_half, b_half = at(one / 2)
    return dict(
        beta=beta,
        a=a,
        b=b,
        aa=a / h,
        chh=6 * (beta * (al + 2) + al - 2) / (al**2 * g),
        ckk=60 * (beta * (al * (al + 6) + 12) - al * (al - 6) - 12) / (al**3 * g),
        beta_half=beta_half,
        a_half=a_half,
        b_half=b_half,
    )


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 1.0])
def test_coefficients_match_high_precision(threshold, dtype):
    # Below |gamma h| = 3 the series is summed (below 1 for the phi's, whatever the
    # threshold): at most 8e-16 relative in float64 and 2.0e-7 in float32 (measured
    # over 200 values of gamma h from 1e-9 to 1e3). Beyond, exp amplifies the
    # rounding of gamma h by |gamma h|. The closed forms from the threshold on, as
    # before, left the K weight 6e-10 off in float64 and 50% off in float32 at
    # gamma h = 0.12.
    solver = dfx.ShOULD(taylor_threshold=threshold)
    eps = float(jnp.finfo(dtype).eps)
    for al in (
        1e-9,
        1e-4,
        0.01,
        0.05,
        0.0999,
        0.1001,
        0.12,
        0.3,
        0.999,
        1.001,
        2.999,
        3.001,
        40.0,
        1e3,
    ):
        gamma, h = (np.asarray(x, dtype) for x in (1.7, al / 1.7))
        mine = solver._coefficients(jnp.asarray(h), jnp.asarray(gamma))
        exact = _exact_coefficients(float(gamma), float(h))
        for key, value in exact.items():
            got, want = float(mine[key]), float(value)
            assert mine[key].dtype == dtype
            if want == 0.0 or (dtype == jnp.float32 and abs(want) < 1e-37):
                # exp(-1000) underflows
                assert got == 0.0, (al, key, got)
                continue
            rel = abs(got - want) / abs(want)
            bound = 10 * eps * max(1.0, al)
            assert rel <= bound, (threshold, al, key, got, want, rel)


def test_half_precision_state_takes_coefficients_computed_in_single_precision():
    # In float16, phi_2 of gamma h = 3e-4 by its closed form is 0 and phi_5
    # overflows: a solve whose closed forms started at the threshold 0 became
    # non-finite. Computed in float32 and rounded, the solve follows the float64 one.
    n, h = 8, 0.125
    gamma, u = np.array([1e-3, 1.5]), np.array([1.0, 0.7])
    bm64 = grid_path(jr.key(6), (2,), n, h, dfx.SpaceTimeTimeLevyArea)
    bm16 = jtu.tree_map(lambda a: a.astype(jnp.float16), bm64)

    def solve(bm, dtype, threshold):
        def grad(x, args):
            return jnp.asarray(Q, dtype=x.dtype) @ x

        terms = langevin_terms(
            bm, jnp.asarray(gamma, dtype), jnp.asarray(u, dtype), grad
        )
        t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, n * h, h))
        solver = dfx.ShOULD(taylor_threshold=threshold)
        return dfx.diffeqsolve(terms, solver, t0, t1, dt0, initial_state(dtype)).ys

    want = solve(bm64, jnp.float64, 0.1)
    for threshold in (0.0, 0.1):
        got = solve(bm16, jnp.float16, threshold)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == jnp.float16
            np.testing.assert_allclose(
                np.asarray(a, np.float64), b, rtol=1e-2, atol=1e-2
            )


# Measured: float16 2.14 to 2.15 epsilons (61 steps), bfloat16 0.91 to 1.17 (40
# steps). Before the update was computed in float32 with float32 coefficients:
# float16 2.06 to 12.1 (ShOULD the most), bfloat16 2.11 to 6.89; five of the six
# cases fail these bounds.
_HALF_BOUNDS = {"float16": 2.5, "bfloat16": 1.5}


@pytest.mark.parametrize(
    "solver, dtype",
    [
        pytest.param(
            solver,
            dtype,
            id=f"{solver}-{jnp.dtype(dtype).name}",
            marks=()
            if (solver, jnp.dtype(dtype).name)
            in {("ShOULD", "float16"), ("ALIGN", "bfloat16")}
            else (pytest.mark.slow,),
        )
        for solver in ("ALIGN", "ShOULD", "QUICSORT")
        for dtype in (jnp.float16, jnp.bfloat16)
    ],
)
def test_half_precision_langevin_steps_are_computed_in_float32(solver, dtype):
    # A half-precision state's step is computed in float32 (its coefficients kept
    # in float32 too) and rounded once: against a float64 solve on the same
    # (rounded) path values and step times, the end is off by about what one
    # rounding of the state per step gives (about 2.1 epsilons in float16 over
    # these 61 steps, measured by rounding a float64 solve's state after each
    # step).
    rms, _ = langevin_half_precision_rms(dfx, solver, dtype)
    assert rms <= _HALF_BOUNDS[jnp.dtype(dtype).name], rms


def test_coefficients_are_kept_for_constant_steps_and_recomputed_otherwise():
    bm = grid_path(jr.key(0), (2,), 8, 0.125, dfx.SpaceTimeLevyArea)
    terms = langevin_terms(bm)
    solver = dfx.ALIGN()
    y0 = initial_state()
    state = solver.init(terms, 0.0, 0.125, y0, QUADRATIC)
    poisoned = eqx.tree_at(
        lambda s: s.coeffs, state, jtu.tree_map(lambda c: 2 * c, state.coeffs)
    )
    fresh = solver.step(terms, 0.125, 0.25, y0, QUADRATIC, state, False)[0]
    # The same step size: the stored coefficients are used (here, wrong ones).
    kept = solver.step(terms, 0.125, 0.25, y0, QUADRATIC, poisoned, False)[0]
    assert not np.allclose(np.asarray(kept[0]), np.asarray(fresh[0]))
    # Another step size: recomputed, whatever is stored.
    other = solver.init(terms, 0.125, 0.1875, y0, QUADRATIC)
    redone = solver.step(terms, 0.125, 0.1875, y0, QUADRATIC, poisoned, False)
    expected = solver.step(terms, 0.125, 0.1875, y0, QUADRATIC, other, False)
    np.testing.assert_allclose(redone[0][0], expected[0][0], rtol=1e-15)
    assert float(redone[3].h) == 0.0625


def test_gradient_is_carried_between_steps_and_recomputed_after_a_jump():
    bm = grid_path(jr.key(0), (2,), 8, 0.125, dfx.SpaceTimeLevyArea)
    terms = langevin_terms(bm)
    solver = dfx.ALIGN()
    y0 = initial_state()
    state = solver.init(terms, 0.0, 0.125, y0, QUARTIC)
    wrong = eqx.tree_at(
        lambda s: s.gradient, state, tuple(0 * g for g in state.gradient)
    )
    fresh = solver.step(terms, 0.0, 0.125, y0, QUARTIC, state, False)
    carried = solver.step(terms, 0.0, 0.125, y0, QUARTIC, wrong, False)
    jumped = solver.step(terms, 0.0, 0.125, y0, QUARTIC, wrong, jnp.asarray(True))
    assert not np.allclose(np.asarray(carried[0][0]), np.asarray(fresh[0][0]))
    np.testing.assert_allclose(jumped[0][0], fresh[0][0], rtol=1e-15)
    # The gradient handed on is that at the step's end.
    end = fresh[0][0]
    np.testing.assert_allclose(
        fresh[3].gradient[0], mixed_gradient(end, QUARTIC), rtol=1e-15
    )


def _sinh_gradient(x, args):
    # A gradient with an operation no other part of a step uses, to count its
    # copies in a program: the gradient of sum(cosh(x)) + x^T Q x / 2.
    return jnp.sinh(x) + jnp.asarray(Q, dtype=x.dtype) @ x


def _count(jaxpr, primitive: str) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == primitive
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                count += _count(getattr(inner, "jaxpr", inner), primitive)
    return count


@pytest.mark.parametrize(
    "name", ["ShOULD", pytest.param("QUICSORT", marks=pytest.mark.slow)]
)
def test_two_gradients_in_a_loop_are_traced_once_and_match_unrolled(name):
    bm = grid_path(jr.key(3), (2,), 16, 0.0625)
    terms = langevin_terms(bm, grad=_sinh_gradient)
    y0 = initial_state()
    copies, finals = {}, {}
    for scan in (None, True, False):
        options = {} if scan is None else {"scan_stages": scan}
        solver = getattr(dfx, name)(**options)
        state = solver.init(terms, 0.0, 0.0625, y0, None)
        step = jax.make_jaxpr(
            lambda y, st, solver=solver: solver.step(
                terms, 0.0, 0.0625, y, None, st, False
            )[0]
        )(y0, state)
        copies[scan] = _count(step.jaxpr, "sinh")
        sol = dfx.diffeqsolve(terms, solver, 0.0, 1.0, 0.0625, y0, args=None)
        finals[scan] = np.concatenate([np.asarray(x[-1]) for x in sol.ys])
    # By default (None: the argument not given) one after the other.
    assert copies == {None: 2, True: 1, False: 2}
    np.testing.assert_allclose(finals[True], finals[False], rtol=1e-13, atol=1e-15)
    assert np.array_equal(finals[None], finals[False])
    with pytest.raises(ValueError, match="scan_stages"):
        getattr(dfx, name)(scan_stages="yes")


# ---- the public face -----------------------------------------------------------------------


def test_orders_levy_areas_and_structure():
    terms = langevin_terms(grid_path(jr.key(0), (2,), 2, 0.5))
    for name, strong in STRONG_ORDER.items():
        solver = getattr(dfx, name)()
        assert solver.strong_order(terms) == strong
        assert solver.order(terms) == int(strong)
        assert solver.error_order(terms) == strong + 0.5
        assert solver.minimal_levy_area is getattr(
            dfx,
            "AbstractSpaceTimeLevyArea"
            if name == "ALIGN"
            else "AbstractSpaceTimeTimeLevyArea",
        )
        assert solver.taylor_threshold == 0.1
        assert isinstance(solver, dfx.AbstractFosterLangevinSRK)
        assert isinstance(solver, dfx.AbstractStratonovichSolver)
        assert solver.interpolation_cls is dfx.LocalLinearInterpolation
    assert isinstance(dfx.ALIGN(), dfx.AbstractAdaptiveSolver)
    assert not isinstance(dfx.ShOULD(), dfx.AbstractAdaptiveSolver)
    assert dfx.ALIGN(taylor_threshold=0.01).taylor_threshold == 0.01
    with pytest.raises(ValueError, match="taylor_threshold"):
        dfx.QUICSORT(taylor_threshold=-1.0)


# ---- errors --------------------------------------------------------------------------------


def _solve(terms, solver=None, y0=None, args=QUADRATIC):
    return dfx.diffeqsolve(
        terms,
        dfx.ALIGN() if solver is None else solver,
        0.0,
        0.5,
        0.125,
        initial_state() if y0 is None else y0,
        args=args,
    )


def test_missing_levy_area_is_named():
    bm = grid_path(jr.key(0), (2,), 4, 0.125, dfx.SpaceTimeLevyArea)
    with pytest.raises(ValueError, match="SpaceTimeTimeLevyArea"):
        _solve(langevin_terms(bm), dfx.QUICSORT())
    # Stepping by hand, without `diffeqsolve`'s check: the step says it too.
    terms = langevin_terms(bm)
    solver = dfx.ShOULD()
    state = solver.init(terms, 0.0, 0.125, initial_state(), QUADRATIC)
    with pytest.raises(ValueError, match="SpaceTimeTimeLevyArea"):
        solver.step(terms, 0.0, 0.125, initial_state(), QUADRATIC, state, False)


def test_shape_and_structure_errors_name_what_is_wrong():
    bm = grid_path(jr.key(0), (2,), 4, 0.125, dfx.SpaceTimeLevyArea)
    with pytest.raises(ValueError, match=r"shape \(3,\)") as info:
        _solve(langevin_terms(bm, gamma=jnp.ones(3)))
    assert isinstance(info.value, RuntimeError)  # Diffrax raises RuntimeError
    with pytest.raises(RuntimeError, match="prefix"):
        _solve(langevin_terms(bm, gamma=(1.0, 2.0), u=1.0))
    with pytest.raises(ValueError, match="grad_f"):
        _solve(langevin_terms(bm, grad=lambda x, args: x[:1]))
    with pytest.raises(ValueError, match="pair"):
        _solve(langevin_terms(bm), y0=jnp.zeros(2))
    with pytest.raises(ValueError, match="same PyTree structure and shapes"):
        _solve(langevin_terms(bm), y0=(jnp.zeros(2), jnp.zeros(3)))
    small = grid_path(jr.key(0), (3,), 4, 0.125, dfx.SpaceTimeLevyArea)
    with pytest.raises(ValueError, match="Brownian motion"):
        _solve(langevin_terms(small, gamma=1.0, u=1.0))


def test_drift_and_diffusion_must_agree():
    bm = grid_path(jr.key(0), (2,), 4, 0.125, dfx.SpaceTimeLevyArea)
    terms = dfx.MultiTerm(
        dfx.UnderdampedLangevinDriftTerm(1.0, 1.0, mixed_gradient),
        dfx.UnderdampedLangevinDiffusionTerm(2.0, 1.0, bm),
    )
    with pytest.raises(ValueError, match="same `gamma`"):
        _solve(terms)


@pytest.mark.slow
def test_traced_drift_and_diffusion_parameters_are_checked_when_run():
    bm = grid_path(jr.key(0), (2,), 4, 0.125, dfx.SpaceTimeLevyArea)

    @jax.jit
    def traced(g):
        t = dfx.MultiTerm(
            dfx.UnderdampedLangevinDriftTerm(g, 1.0, mixed_gradient),
            dfx.UnderdampedLangevinDiffusionTerm(2 * g, 1.0, bm),
        )
        return _solve(t).ys

    with pytest.raises(Exception, match="same `gamma`"):
        jax.block_until_ready(traced(jnp.asarray(1.0)))
    # And agreeing traced parameters pass.
    ok = jax.jit(lambda g: _solve(langevin_terms(bm, gamma=g, u=1.0)).ys)(
        jnp.asarray(1.0)
    )
    assert np.all(np.isfinite(np.asarray(ok[0])))


def test_other_terms_are_refused():
    bm = grid_path(jr.key(0), (2,), 4, 0.125, dfx.SpaceTimeLevyArea)
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: y),
        dfx.UnderdampedLangevinDiffusionTerm(1.0, 1.0, bm),
    )
    with pytest.raises(ValueError, match="term_structure"):
        _solve(terms)
    with pytest.raises(TypeError, match="grad_f"):
        dfx.UnderdampedLangevinDriftTerm(1.0, 1.0, "not callable")
    with pytest.raises(TypeError, match="AbstractBrownianPath"):
        dfx.UnderdampedLangevinDiffusionTerm(1.0, 1.0, jnp.zeros(2))

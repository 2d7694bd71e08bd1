"""The stochastic Runge–Kutta solvers: SEA, SRA1, ShARK, GeneralShARK, SlowRK, SPaRK,
and the engine `AbstractSRK` that runs any `StochasticButcherTableau`.

- Strong orders on the noise classes each method is for (shared harness
  `tests/_sde.py`).
- The tableaus' order conditions, checked on the coefficients alone.
- With zero diffusion each method is its deterministic Runge–Kutta method.
- SPaRK's error estimate drives `PIDController`.
- Transformations (vmap, grad), float32, PyTree states, time-dependent additive
  noise, a user tableau using `K`, and the errors for misuse.
"""

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffeqx as dfx
from _sde import (
    DTS,
    PROBLEMS,
    SDEProblem,
    assert_strong_order,
    brownian,
    fitted_order,
    terms_for,
)
from diffeqx._solver.srk import AdditiveCoeffs, GeneralCoeffs

STA = dfx.SpaceTimeLevyArea
ALL = (dfx.SEA, dfx.SRA1, dfx.ShARK, dfx.GeneralShARK, dfx.SlowRK, dfx.SPaRK)
ADDITIVE = (dfx.SEA, dfx.SRA1, dfx.ShARK)
GENERAL = (dfx.GeneralShARK, dfx.SlowRK, dfx.SPaRK)


# ---- strong orders -------------------------------------------------------------------

# Additive noise with a strongly curved drift. On the shared `additive` problem the
# drift's curvature is small next to the noise (f'' = sin(y) with |y| < 1), so the
# h^1.5 error terms of the order-1.5 methods, which are all f''-terms for additive
# noise (a linear drift makes ShARK exact up to order 2), stay below the
# deterministic h^2 error at every step size we can afford: measured slopes for
# ShARK there were 1.71 for dt in 2^-3..2^-7, 1.60 for 2^-5..2^-9 and 1.67 for
# 2^-6..2^-10. Here f'' = -4 cos(2y) and the noise is larger, and the 1.5 is plain.
_SIGMA_CURVED = np.array([[1.0, 0.3], [-0.4, 0.9]])
ADDITIVE_CURVED = SDEProblem(
    "additive_curved",
    y0=lambda: jnp.asarray([0.5, -0.2]),
    drift=lambda t, y, args: jnp.cos(2.0 * y) + 0.5 * jnp.sin(t),
    diffusion=lambda t, y, args: jnp.asarray(_SIGMA_CURVED),
    bm_shape=(2,),
    noise="additive",
)

_STRONG_CASES = [
    # (solver, problem, expected order, in the default run)
    (dfx.SEA, PROBLEMS["additive"], 1.0, False),
    (dfx.SRA1, ADDITIVE_CURVED, 1.5, False),
    (dfx.ShARK, ADDITIVE_CURVED, 1.5, False),
    (dfx.GeneralShARK, ADDITIVE_CURVED, 1.5, False),
    (dfx.GeneralShARK, PROBLEMS["gbm"], 1.0, False),
    (dfx.GeneralShARK, PROBLEMS["commutative"], 1.0, False),
    (dfx.GeneralShARK, PROBLEMS["general"], 0.5, False),
    (dfx.SlowRK, PROBLEMS["gbm"], 1.5, True),
    (dfx.SlowRK, PROBLEMS["diagonal"], 1.5, False),
    (dfx.SlowRK, PROBLEMS["commutative"], 1.5, False),
    (dfx.SlowRK, PROBLEMS["general"], 0.5, False),
    (dfx.SPaRK, ADDITIVE_CURVED, 1.5, False),
    (dfx.SPaRK, PROBLEMS["diagonal"], 1.0, False),
    (dfx.SPaRK, PROBLEMS["commutative"], 1.0, False),
    (dfx.SPaRK, PROBLEMS["general"], 0.5, False),
]


@pytest.mark.parametrize(
    "solver_cls, problem, expected",
    [
        pytest.param(
            solver,
            problem,
            expected,
            id=f"{solver.__name__}-{problem.name}",
            marks=() if default else pytest.mark.slow,
        )
        for solver, problem, expected, default in _STRONG_CASES
    ],
)
def test_strong_order(solver_cls, problem, expected):
    # All six converge to the Stratonovich solution (the same as Itô's for additive
    # noise).
    assert_strong_order(
        solver_cls(), problem, expected, calculus="stratonovich", levy_area=STA
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "solver_cls, expected",
    [(dfx.SEA, 1.0), (dfx.ShARK, 1.5), (dfx.GeneralShARK, 1.5), (dfx.SPaRK, 1.5)],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_strong_order_backwards_in_time(solver_cls, expected):
    # Solving from t1 back to 0 keeps the strong order: the drift is stepped with
    # its own (negative) control and the reversed path's H is the forward one's.
    # Reference: the same solver with dt = 2^-12, on the same paths.
    problem = ADDITIVE_CURVED
    keys = jr.split(jr.key(5678), 64)

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None))
    def solve(key, dt):
        bm = brownian(problem, key, STA)
        terms = terms_for(problem, bm)
        return dfx.diffeqsolve(
            terms, solver_cls(), problem.t1, 0.0, -dt, problem.y0(), max_steps=2**12 + 2
        ).ys[-1]

    reference = solve(keys, jnp.asarray(2.0**-12))
    errors = [
        float(jnp.mean(jnp.max(jnp.abs(solve(keys, jnp.asarray(dt)) - reference), -1)))
        for dt in DTS
    ]
    order = fitted_order(DTS, errors)
    assert abs(order - expected) <= 0.15, (order, errors)


def test_declared_orders():
    declared = {
        cls.__name__: (cls().order(None), cls().strong_order(None)) for cls in ALL
    }
    assert declared == {
        "SEA": (1, 1),
        "SRA1": (2, 1.5),
        "ShARK": (2, 1.5),
        "GeneralShARK": (2, 0.5),
        "SlowRK": (2, 1.5),
        "SPaRK": (2, 0.5),
    }


# ---- order conditions of the tableaus ------------------------------------------------
#
# Write r^X_j = sum_i a^X_ji for the total weight of the moment X (W or H) in stage
# j. The conditions below come from matching the Stratonovich-Taylor expansion of one
# step of `dy = f dt + g o dW` with the method's, term by term, using
# ∫ (W_s - W_0) ds = h (W/2 + H) and ∫ (s - t0) dW_s = h (W/2 - H).


def _lower(rows, s):
    out = np.zeros((s, s))
    for i, row in enumerate(rows):
        out[i + 1, : i + 1] = row
    return out


def _drift_parts(tableau):
    s = len(tableau.b_sol)
    return np.asarray(tableau.b_sol), np.concatenate([[0.0], tableau.c]), s


@pytest.mark.parametrize("solver_cls", ALL, ids=lambda c: c.__name__)
def test_deterministic_order_conditions(solver_cls):
    tableau = solver_cls.tableau
    b, c, s = _drift_parts(tableau)
    a = _lower(tableau.a, s)
    np.testing.assert_allclose(a.sum(axis=1), c, atol=1e-14)  # consistent nodes
    assert math.isclose(b.sum(), 1.0, abs_tol=1e-14)
    order = solver_cls().order(None)
    if order >= 2:
        assert math.isclose(b @ c, 0.5, abs_tol=1e-14)
    else:
        assert not math.isclose(b @ c, 0.5, abs_tol=1e-3)
    # None of them is third order (which would need b.c^2 = 1/3 and b.A.c = 1/6).
    assert not (math.isclose(b @ c**2, 1 / 3) and math.isclose(b @ a @ c, 1 / 6))


@pytest.mark.parametrize("solver_cls", ADDITIVE, ids=lambda c: c.__name__)
def test_additive_noise_order_conditions(solver_cls):
    tableau = solver_cls.tableau
    assert tableau.is_additive_noise()
    b, _, _ = _drift_parts(tableau)
    a_w, a_h = np.asarray(tableau.coeffs_w.a), np.asarray(tableau.coeffs_hh.a)
    # The noise of the step is exactly g W.
    assert float(tableau.coeffs_w.b_sol) == 1.0
    assert float(tableau.coeffs_hh.b_sol) == 0.0
    # f' g ∫ W ds = f' g h (W/2 + H): matched exactly, in both W and H.
    assert math.isclose(b @ a_w, 0.5, abs_tol=1e-14)
    assert math.isclose(b @ a_h, 1.0, abs_tol=1e-14)
    # (1/2) f''(g, g) ∫ W_s^2 ds has mean h^2/2 f''(g, g)/2; the method's
    # (1/2) sum_j b_j h f''(g, g)(a^W_j W + a^H_j H)^2 has mean
    # h^2/2 f''(g, g) sum_j b_j (a^W_j^2 + a^H_j^2 / 12): matching it is what lifts
    # strong order 1 to 1.5. SEA does not (1/3 instead of 1/2).
    second_moment = b @ (a_w**2 + a_h**2 / 12)
    if solver_cls().strong_order(None) == 1.5:
        assert math.isclose(second_moment, 0.5, abs_tol=1e-14)
    else:
        assert math.isclose(second_moment, 1 / 3, abs_tol=1e-14)


def _noise_parts(tableau, s):
    w, hh = tableau.coeffs_w, tableau.coeffs_hh
    a_w, a_h = _lower(w.a, s), _lower(hh.a, s)
    return np.asarray(w.b_sol), np.asarray(hh.b_sol), a_w, a_h


@pytest.mark.parametrize("solver_cls", GENERAL, ids=lambda c: c.__name__)
def test_general_noise_order_conditions(solver_cls):
    tableau = solver_cls.tableau
    assert not tableau.is_additive_noise()
    b, c, s = _drift_parts(tableau)
    b_w, b_h, a_w, a_h = _noise_parts(tableau, s)
    r_w, r_h = a_w.sum(axis=1), a_h.sum(axis=1)
    close = functools.partial(math.isclose, abs_tol=1e-14)
    # Order 0.5: the noise g W, with no H left over.
    assert close(b_w.sum(), 1.0) and close(b_h.sum(), 0.0)
    # Order 1 for commutative noise: g'g is multiplied by W^2/2 exactly, with no W H
    # or H^2 (the latter would have a non-zero mean).
    assert close(b_w @ r_w, 0.5)
    assert close(b_w @ r_h + b_h @ r_w, 0.0)
    assert close(b_h @ r_h, 0.0)
    # Order 1.5 for additive noise (and the mixed terms of commutative noise):
    # f'g ∫ W ds = h (W/2 + H) f'g and g'f ∫ (s - t0) dW = h (W/2 - H) g'f.
    assert close(b @ r_w, 0.5) and close(b @ r_h, 1.0)
    assert close(b_w @ c, 0.5) and close(b_h @ c, -1.0)


def _weight_three_conditions(tableau):
    """The coefficients of W^3, W^2 H, W H^2, H^3 in the diffusion-only terms
    (1/2) g''(g, g) and g'g'g of one step, minus their values in the expansion of
    the Stratonovich solution (W^3 / 6 each, nothing else)."""
    b, _, s = _drift_parts(tableau)
    b_w, b_h, a_w, a_h = _noise_parts(tableau, s)
    r_w, r_h = a_w.sum(axis=1), a_h.sum(axis=1)
    # g''(g, g)/2: sum_j (b^W_j W + b^H_j H) (r^W_j W + r^H_j H)^2 / 2
    curvature = 0.5 * np.array(
        [
            b_w @ r_w**2,
            b_h @ r_w**2 + 2 * b_w @ (r_w * r_h),
            b_w @ r_h**2 + 2 * b_h @ (r_w * r_h),
            b_h @ r_h**2,
        ]
    )
    # g'g'g: sum_j (b^W_j W + b^H_j H) sum_i (a^W_ji W + a^H_ji H)(r^W_i W + r^H_i H)
    chain = np.array(
        [
            b_w @ a_w @ r_w,
            b_h @ a_w @ r_w + b_w @ a_h @ r_w + b_w @ a_w @ r_h,
            b_h @ a_h @ r_w + b_h @ a_w @ r_h + b_w @ a_h @ r_h,
            b_h @ a_h @ r_h,
        ]
    )
    exact = np.array([1 / 6, 0.0, 0.0, 0.0])
    return curvature - exact, chain - exact


def test_slowrk_weight_three_conditions():
    # Strong order 1.5 for commutative noise needs the diffusion-only terms of
    # weight 3/2 right too: SlowRK has them, GeneralShARK and SPaRK do not.
    curvature, chain = _weight_three_conditions(dfx.SlowRK.tableau)
    np.testing.assert_allclose(curvature, 0.0, atol=1e-14)
    np.testing.assert_allclose(chain, 0.0, atol=1e-14)
    for cls in (dfx.GeneralShARK, dfx.SPaRK):
        curvature, chain = _weight_three_conditions(cls.tableau)
        assert np.max(np.abs(np.concatenate([curvature, chain]))) > 1e-3, cls


def test_spark_error_estimate_weights():
    # The error estimate is a difference of two consistent methods: its weights sum
    # to zero, and the embedded method (b - b_error) is itself consistent.
    tableau = dfx.SPaRK.tableau
    for b_err in (
        tableau.b_error,
        tableau.coeffs_w.b_error,
        tableau.coeffs_hh.b_error,
    ):
        assert math.isclose(np.sum(b_err), 0.0, abs_tol=1e-14)
    embedded = tableau.b_sol - tableau.b_error
    np.testing.assert_allclose(embedded, [0.5, 0.0, 0.5], atol=1e-14)
    np.testing.assert_allclose(
        tableau.coeffs_hh.b_sol - tableau.coeffs_hh.b_error, 0.0, atol=1e-14
    )


def test_levy_areas_and_evaluations():
    for cls in ALL:
        assert cls().minimal_levy_area is dfx.AbstractSpaceTimeLevyArea
        assert isinstance(cls(), dfx.AbstractStratonovichSolver)
        assert isinstance(cls(), dfx.AbstractSRK)
    assert isinstance(dfx.SPaRK(), dfx.AbstractAdaptiveSolver)
    # Evaluations per step: (drift, diffusion) as the docstrings say.
    counts = {}
    for cls in GENERAL:
        tab = cls.tableau
        s = len(tab.b_sol)
        skip_f = np.zeros(s, bool) if tab.ignore_stage_f is None else tab.ignore_stage_f
        skip_g = np.zeros(s, bool) if tab.ignore_stage_g is None else tab.ignore_stage_g
        counts[cls.__name__] = (int(np.sum(~skip_f)), int(np.sum(~skip_g)))
    assert counts == {"GeneralShARK": (2, 3), "SlowRK": (2, 5), "SPaRK": (3, 3)}


# ---- validation of StochasticButcherTableau ------------------------------------------


def _general(s, **kw):
    rows = tuple(np.zeros(i + 1) for i in range(s - 1))
    b = np.full(s, 1.0 / s)
    return (
        dict(
            a=list(rows),
            b_sol=b,
            b_error=None,
            c=np.zeros(s - 1),
            coeffs_w=GeneralCoeffs(a=rows, b_sol=b, b_error=None),
            coeffs_hh=None,
            coeffs_kk=None,
            ignore_stage_f=None,
            ignore_stage_g=None,
        )
        | kw
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(b_sol=np.array([0.5, 0.6])), "sum to 1"),
        (dict(c=np.zeros(2)), "needs 1 rows"),
        (dict(a=[np.zeros(2)]), r"Row 0 .* shape \(1,\)"),
        (dict(b_error=np.zeros(3)), "b_error"),
        (dict(coeffs_hh=AdditiveCoeffs(a=np.zeros(2), b_sol=0.0)), "one kind"),
        (dict(coeffs_w=None), "coeffs_w"),
        (
            dict(coeffs_kk=GeneralCoeffs(a=(np.zeros(1),), b_sol=np.zeros(2))),
            "must also use",
        ),
        (
            dict(
                coeffs_hh=GeneralCoeffs(a=(np.zeros(1), np.zeros(2)), b_sol=np.zeros(3))
            ),
            "3 stages",
        ),
        (dict(b_error=np.array([1.0, -1.0])), "no `b_error`"),
        (dict(ignore_stage_f=np.array([True, False])), "non-zero weight"),
        (dict(ignore_stage_f=np.array([1, 0])), "boolean"),
        (
            dict(
                ignore_stage_f=np.array([True, False]),
                ignore_stage_g=np.array([True, False]),
            ),
            "both skip",
        ),
    ],
)
def test_tableau_validation(change, match):
    with pytest.raises(ValueError, match=match):
        dfx.StochasticButcherTableau(**(_general(2) | change))


def test_coefficient_validation():
    with pytest.raises(ValueError, match="single number"):
        AdditiveCoeffs(a=np.zeros(2), b_sol=np.ones(2))
    with pytest.raises(ValueError, match="one-dimensional"):
        AdditiveCoeffs(a=np.zeros((2, 2)), b_sol=1.0)
    with pytest.raises(ValueError, match="needs 2 rows"):
        GeneralCoeffs(a=(np.zeros(1),), b_sol=np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        GeneralCoeffs(a=(np.zeros(1),), b_sol=np.zeros(2), b_error=np.zeros(3))
    # A valid tableau is accepted and normalised to float arrays.
    tab = dfx.StochasticButcherTableau(**_general(3))
    assert tab.b_sol.dtype == np.float64 and tab.coeffs_w.a[1].shape == (2,)
    assert dfx.ShARK.tableau.num_stages == 2


# ---- deterministic limit -------------------------------------------------------------


def _ode_exact(t):
    # y' = cos(t) y^2, y(0) = 1/2: y = 1 / (2 - sin t).
    return 1.0 / (2.0 - np.sin(t))


# In the default run: SEA (first order), ShARK (the additive-noise engine) and SlowRK
# (the general-noise engine with skipped stages); the others' deterministic order
# conditions are checked on their coefficients above.
@pytest.mark.parametrize(
    "solver_cls",
    [
        pytest.param(
            cls,
            marks=() if cls in (dfx.SEA, dfx.ShARK, dfx.SlowRK) else pytest.mark.slow,
        )
        for cls in ALL
    ],
    ids=lambda c: c.__name__,
)
def test_zero_diffusion_is_deterministic_rk(solver_cls):
    # Zero diffusion: the noise drops out and what is left is the drift's
    # Runge–Kutta method, of order `order()`. The Brownian motion is irrelevant, so
    # the cheap `UnsafeBrownianPath` (constant steps) stands in for it.
    @jax.jit
    @jax.vmap
    def solve(dt):
        bm = dfx.UnsafeBrownianPath(shape=(1,), key=jr.key(0), levy_area=STA)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: jnp.cos(t) * y**2),
            dfx.ControlTerm(lambda t, y, args: jnp.zeros((1, 1)), bm),
        )
        sol = dfx.diffeqsolve(
            terms, solver_cls(), 0.0, 2.0, dt, jnp.asarray([0.5]), max_steps=80
        )
        return sol.ys[-1, 0]

    dts = np.asarray([2.0**-k for k in range(2, 6)])
    errors = np.abs(np.asarray(solve(jnp.asarray(dts))) - _ode_exact(2.0))
    slope = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    assert abs(slope - solver_cls().order(None)) < 0.15, (slope, errors)


# ---- adaptive steps ------------------------------------------------------------------


# SPaRK's adaptive steps against Diffrax's in the default run
# (tests/compat/test_srk.py::test_spark_adaptive).
@pytest.mark.slow
def test_spark_adaptive_error_decreases_with_rtol():
    # Commutative noise, whose exact solution on each path (a function of W(1))
    # is the reference.
    problem = PROBLEMS["commutative"]
    keys = jr.split(jr.key(11), 16)

    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None))
    def solve(key, rtol):
        bm = brownian(problem, key, STA)
        sol = dfx.diffeqsolve(
            terms_for(problem, bm),
            dfx.SPaRK(),
            0.0,
            problem.t1,
            0.1,
            problem.y0(),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            max_steps=2**12,
        )
        exact = problem.exact(
            problem.y0(), bm.evaluate(0.0, problem.t1), problem.t1, "stratonovich"
        )
        stats = sol.stats
        return sol.ys[-1], exact, stats["num_steps"], stats["num_rejected_steps"]

    errors, steps, rejected = [], [], []
    for rtol in (1e-1, 1e-2, 1e-3, 1e-4):
        ys, exact, n, r = solve(keys, jnp.asarray(rtol))
        assert np.all(np.isfinite(np.asarray(ys)))
        errors.append(float(jnp.mean(jnp.max(jnp.abs(ys - exact), axis=-1))))
        steps.append(float(jnp.mean(n)))
        rejected.append(int(jnp.sum(r)))
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.2 * errors[0], errors
    assert all(n1 < n2 for n1, n2 in zip(steps, steps[1:], strict=False)), steps
    # The controller really adapts: it rejects steps.
    assert sum(rejected) > 0, rejected


# ---- transformations, dtypes, PyTrees ------------------------------------------------


def _additive_solve(key, theta, dtype=jnp.float64):
    """ShARK on `ADDITIVE_CURVED` with drift `theta * cos(2y)`. The Brownian motion
    samples in float64 (the default dtype) whatever the state's dtype."""
    bm = dfx.VirtualBrownianTree(
        0.0, 1.0, tol=2.0**-8, shape=(2,), key=key, levy_area=STA
    )
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: args * jnp.cos(2.0 * y)),
        dfx.ControlTerm(lambda t, y, args: jnp.asarray(_SIGMA_CURVED, dtype), bm),
    )
    t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, 1.0, 0.1))
    sol = dfx.diffeqsolve(
        terms,
        dfx.ShARK(),
        t0,
        t1,
        dt0,
        jnp.asarray([0.5, -0.2], dtype),
        args=jnp.asarray(theta, dtype),
        max_steps=16,
    )
    return sol.ys[-1]


_additive_jit = jax.jit(_additive_solve, static_argnums=2)


@pytest.mark.slow  # vmap over keys is also tested for the tree, Langevin and SDE solves
def test_vmap_over_keys_equals_loop():
    keys = jr.split(jr.key(3), 4)
    batched = jax.jit(jax.vmap(_additive_solve, (0, None)))(keys, 0.7)
    looped = jnp.stack([_additive_jit(k, 0.7) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-13, atol=1e-13)
    assert not np.allclose(looped[0], looped[1])  # different paths, different answers


@pytest.mark.slow  # float32 SDE states: test_sde.py::test_float32
def test_float32_state():
    # A float32 state (and times) with a float64 Brownian motion: the increments
    # are cast to the state's dtype, and the result is float32.
    ys32 = _additive_jit(jr.key(4), 0.7, jnp.float32)
    ys64 = _additive_jit(jr.key(4), 0.7)
    assert ys32.dtype == jnp.float32
    np.testing.assert_allclose(ys32, ys64, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("solver_cls", ALL, ids=lambda c: c.__name__)
def test_float32_every_solver(solver_cls):
    # Additive noise for the additive methods, commutative linear noise for the
    # others; float32 throughout (Brownian motion included).
    def drift(t, y, args):
        return jnp.cos(2.0 * y) if solver_cls in ADDITIVE else 0.4 * y

    def diffusion(t, y, args):
        if solver_cls in ADDITIVE:
            return jnp.asarray(_SIGMA_CURVED, y.dtype)
        return y[:, None] * jnp.asarray([[0.5, -0.4]], y.dtype)

    @functools.partial(jax.jit, static_argnums=0)
    def solve(dtype):
        shape = jax.ShapeDtypeStruct((2,), dtype)
        bm = dfx.VirtualBrownianTree(
            0.0, 1.0, tol=2.0**-8, shape=shape, key=jr.key(2), levy_area=STA
        )
        terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
        t0, t1, dt0 = (jnp.asarray(t, dtype) for t in (0.0, 1.0, 0.05))
        y0 = jnp.asarray([0.5, -0.2], dtype)
        return dfx.diffeqsolve(terms, solver_cls(), t0, t1, dt0, y0).ys

    ys32, ys64 = solve(jnp.float32), solve(jnp.float64)
    assert ys32.dtype == jnp.float32
    np.testing.assert_allclose(ys32, ys64, rtol=1e-4, atol=1e-5)


# Gradients of SDE solves against finite differences on the same path in the default
# run: test_sde.py::test_discrete_adjoints_match_finite_differences.
@pytest.mark.slow
def test_grad_matches_finite_differences():
    key = jr.key(7)
    grad = float(
        jax.jit(jax.grad(lambda th: jnp.sum(_additive_solve(key, th) ** 2)))(0.7)
    )
    eps = 1e-5
    plus, minus = (jnp.sum(_additive_jit(key, 0.7 + d) ** 2) for d in (eps, -eps))
    fd = float(plus - minus) / (2 * eps)
    assert math.isfinite(grad) and abs(grad) > 1e-3
    assert abs(grad - fd) <= 1e-6 * abs(fd), (grad, fd)


@pytest.mark.parametrize(
    "solver_cls",
    [
        pytest.param(cls, marks=() if cls is dfx.SPaRK else pytest.mark.slow)
        for cls in GENERAL
    ],
    ids=lambda c: c.__name__,
)
def test_pytree_state_equals_flat_state(solver_cls):
    # The `general` problem with its state split into a tuple of two 1-arrays.
    a = jnp.asarray([[0.0, 0.7], [-0.7, 0.0]])
    b = jnp.asarray([[0.7, 0.0], [0.0, -0.7]])

    def drift_flat(t, y, args):
        return -0.5 * y + 0.2 * jnp.sin(y)

    def diffusion_flat(t, y, args):
        return jnp.stack([a @ y, b @ y], axis=-1)

    def split(y):
        return (y[:1], y[1:])

    def drift_tree(t, y, args):
        return split(drift_flat(t, jnp.concatenate(y), args))

    def diffusion_tree(t, y, args):
        return split(diffusion_flat(t, jnp.concatenate(y), args))

    @jax.jit
    def solve(y0):
        # Both solves take the same steps, so they see the same increments.
        bm = dfx.UnsafeBrownianPath(shape=(2,), key=jr.key(5), levy_area=STA)
        flat = dfx.MultiTerm(
            dfx.ODETerm(drift_flat), dfx.ControlTerm(diffusion_flat, bm)
        )
        tree = dfx.MultiTerm(
            dfx.ODETerm(drift_tree), dfx.ControlTerm(diffusion_tree, bm)
        )
        kwargs = dict(solver=solver_cls(), t0=0.0, t1=1.0, dt0=0.1)
        return (
            dfx.diffeqsolve(flat, y0=y0, **kwargs).ys,
            dfx.diffeqsolve(tree, y0=split(y0), **kwargs).ys,
        )

    flat, tree = solve(jnp.asarray([1.0, 0.5]))
    assert isinstance(tree, tuple) and tree[0].shape == (1, 1)
    np.testing.assert_allclose(
        jnp.concatenate(tree, axis=-1), flat, rtol=1e-13, atol=1e-14
    )


@pytest.mark.slow
def test_pytree_state_additive():
    sigma = jnp.asarray(_SIGMA_CURVED)

    @jax.jit
    def solve():
        bm = dfx.VirtualBrownianTree(
            0.0, 1.0, tol=2.0**-8, shape=(2,), key=jr.key(6), levy_area=STA
        )

        def run(y0, drift, diffusion):
            terms = dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, bm))
            return dfx.diffeqsolve(terms, dfx.ShARK(), 0.0, 1.0, 0.1, y0).ys

        flat = run(
            jnp.asarray([0.5, -0.2]),
            lambda t, y, args: jnp.cos(2.0 * y),
            lambda t, y, args: sigma * (1.0 + t),
        )
        tree = run(
            {"a": jnp.asarray([0.5]), "b": jnp.asarray([-0.2])},
            lambda t, y, args: {k: jnp.cos(2.0 * v) for k, v in y.items()},
            lambda t, y, args: {"a": sigma[:1] * (1.0 + t), "b": sigma[1:] * (1.0 + t)},
        )
        return flat, tree

    flat, tree = solve()
    joined = jnp.concatenate([tree["a"], tree["b"]], axis=-1)
    np.testing.assert_allclose(joined, flat, rtol=1e-13, atol=1e-14)


# ---- time-dependent additive noise ---------------------------------------------------


# ShARK against Diffrax by default (tests/compat/test_srk.py, fixed steps).
@pytest.mark.slow
@pytest.mark.parametrize("solver_cls", ADDITIVE, ids=lambda c: c.__name__)
def test_linear_in_time_additive_noise_is_exact(solver_cls):
    # dy = (alpha + beta t) dW over one step [0, h] has the solution
    # y(h) = y(0) + I with
    # I = ∫ (alpha + beta t) dW = (alpha + beta h) W - beta ∫ W dt
    # and ∫_0^h W dt = h (W/2 + H). The additive methods' correction
    # (g(t1) - g(t0)) (W/2 - H) makes their step exact here, whatever the drift
    # weights: forwards, and backwards from h to 0 (y(0) = y(h) - I), where the
    # reversed path has increment -W and the same H.
    alpha, beta, h = jnp.asarray([0.5, -0.3]), jnp.asarray([1.5, 0.8]), 0.5

    @jax.jit
    def solve_and_exact(y0):
        bm = dfx.VirtualBrownianTree(
            0.0, h, tol=2.0**-6, shape=(2,), key=jr.key(8), levy_area=STA
        )
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: jnp.zeros_like(y)),
            dfx.ControlTerm(lambda t, y, args: jnp.diag(alpha + beta * t), bm),
        )
        forwards = dfx.diffeqsolve(terms, solver_cls(), 0.0, h, h, y0)
        backwards = dfx.diffeqsolve(terms, solver_cls(), h, 0.0, -h, y0)
        levy = bm.evaluate(0.0, h, use_levy=True)
        integral = (alpha + beta * h) * levy.W - beta * h * (levy.W / 2 + levy.H)
        return (
            jnp.stack([forwards.ys[-1], backwards.ys[-1]]),
            jnp.stack([y0 + integral, y0 - integral]),
            jnp.stack([y0 + alpha * levy.W, y0 - (alpha + beta * h) * levy.W]),
            forwards.stats["num_steps"] + backwards.stats["num_steps"],
        )

    ys, exact, uncorrected, num_steps = solve_and_exact(jnp.asarray([1.0, 2.0]))
    assert int(num_steps) == 2
    np.testing.assert_allclose(ys, exact, rtol=1e-14, atol=1e-14)
    # The correction matters: g(t0) W alone is far off.
    assert float(jnp.min(jnp.max(jnp.abs(uncorrected - exact), axis=-1))) > 1e-2


# ---- a user tableau with the space-time-time Lévy area ----------------------------


class _EulerWithK(dfx.AbstractSRK, dfx.AbstractStratonovichSolver):
    # One stage, general noise: y1 = y0 + h f(y0) + g(y0) (W + 2 H + 3 K).
    tableau = dfx.StochasticButcherTableau(
        a=[],
        b_sol=np.array([1.0]),
        b_error=np.array([0.0]),
        c=np.array([]),
        coeffs_w=GeneralCoeffs(a=(), b_sol=np.array([1.0]), b_error=np.array([0.5])),
        coeffs_hh=GeneralCoeffs(a=(), b_sol=np.array([2.0]), b_error=np.array([0.0])),
        coeffs_kk=GeneralCoeffs(a=(), b_sol=np.array([3.0]), b_error=np.array([-1.0])),
        ignore_stage_f=None,
        ignore_stage_g=None,
    )

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5


def test_user_tableau_with_space_time_time_levy_area():
    solver = _EulerWithK()
    assert solver.minimal_levy_area is dfx.AbstractSpaceTimeTimeLevyArea
    g = jnp.asarray([[0.3, 0.1], [-0.2, 0.4]])

    def one_step(levy_area, y0):
        # The same interval twice, so the same sample.
        bm = dfx.UnsafeBrownianPath(shape=(2,), key=jr.key(9), levy_area=levy_area)
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.ControlTerm(lambda t, y, args: g * y[:, None], bm),
        )
        t0, t1 = jnp.asarray(0.0), jnp.asarray(0.5)
        out = solver.step(terms, t0, t1, y0, None, None, False)
        return out, bm.evaluate(t0, t1, use_levy=True)

    y0 = jnp.asarray([1.0, 2.0])
    (y1, y_err, dense, _, result), levy = jax.jit(
        functools.partial(one_step, dfx.SpaceTimeTimeLevyArea)
    )(y0)
    g0 = g * y0[:, None]
    noise = g0 @ (levy.W + 2 * levy.H + 3 * levy.K)
    np.testing.assert_allclose(y1, y0 - 0.5 * y0 + noise, rtol=1e-14)
    np.testing.assert_allclose(y_err, g0 @ (0.5 * levy.W - levy.K), rtol=1e-14)
    assert result == dfx.RESULTS.successful and set(dense) == {"y0", "y1"}
    # A path with H but not K does not do.
    with pytest.raises(ValueError, match="AbstractSpaceTimeTimeLevyArea"):
        jax.eval_shape(functools.partial(one_step, STA), y0)


# ---- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("solver_cls", ALL, ids=lambda c: c.__name__)
def test_brownian_motion_without_levy_area_is_rejected(solver_cls):
    problem = PROBLEMS["gbm"]
    bm = brownian(problem, jr.key(0), dfx.BrownianIncrement)
    with pytest.raises(ValueError) as info:
        dfx.diffeqsolve(
            terms_for(problem, bm), solver_cls(), 0.0, 1.0, 0.1, problem.y0()
        )
    message = str(info.value)
    assert solver_cls.__name__ in message
    assert "SpaceTimeLevyArea" in message and "BrownianIncrement" in message


@pytest.mark.parametrize("solver_cls", ADDITIVE, ids=lambda c: c.__name__)
def test_additive_solver_rejects_state_dependent_diffusion(solver_cls):
    problem = PROBLEMS["gbm"]
    bm = brownian(problem, jr.key(0), STA)
    with pytest.raises(ValueError, match="must not depend on `y`"):
        dfx.diffeqsolve(
            terms_for(problem, bm), solver_cls(), 0.0, 1.0, 0.1, problem.y0()
        )


def test_scan_kind():
    assert dfx.ShARK(scan_kind="lax").scan_kind == "lax"
    with pytest.raises(ValueError, match="scan_kind"):
        dfx.SPaRK(scan_kind="unrolled")

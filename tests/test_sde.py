"""SDE solvers written for drift and diffusion (Euler–Heun, Milstein, reversible
Heun), `HalfSolver`, and the checks `diffeqsolve` makes on SDE solves.

Strong orders are measured against closed-form pathwise solutions (GBM, diagonal and
commutative noise) or fine-step references on the same Brownian paths (additive and
non-commutative noise), with the harness in `tests/_sde.py`.
"""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import diffeqx as dfx
from _sde import (
    PROBLEMS,
    assert_strong_order,
    brownian,
    rounded_path,
    strong_errors,
    terms_for,
)

# (solver, problem, calculus, expected strong order). The orders for commutative
# noise are those of the methods' Milstein-type expansions; for non-commutative
# noise every method here is of order 1/2 (no Lévy area is used).
ORDER_CASES = [
    ("Euler", "additive", "ito", 1.0),
    ("EulerHeun", "commutative", "stratonovich", 1.0),
    ("ItoMilstein", "diagonal", "ito", 1.0),
]
# In the default run, StratonovichMilstein and ReversibleHeun are compared with
# Diffrax (tests/compat/test_sde.py), and ReversibleHeun's adaptive solves with the
# closed form (test_adaptive_sde_solve_converges).
SLOW_ORDER_CASES = [
    ("EulerHeun", "general", "stratonovich", 0.5),
    ("StratonovichMilstein", "commutative", "stratonovich", 1.0),
    ("ReversibleHeun", "additive", "stratonovich", 1.0),
    ("ReversibleHeun", "general", "stratonovich", 0.5),
    ("Euler", "gbm", "ito", 0.5),  # also in test_brownian.py
    ("ItoMilstein", "gbm", "ito", 1.0),
    ("Heun", "gbm", "stratonovich", 1.0),
    ("StratonovichMilstein", "diagonal", "stratonovich", 1.0),
    ("ItoMilstein", "commutative", "ito", 1.0),
    ("ReversibleHeun", "gbm", "stratonovich", 1.0),
    ("Heun", "general", "stratonovich", 0.5),
    ("Euler", "general", "ito", 0.5),
]


@pytest.mark.parametrize("name, problem, calculus, expected", ORDER_CASES)
def test_strong_order(name, problem, calculus, expected):
    assert_strong_order(
        getattr(dfx, name)(), PROBLEMS[problem], expected, calculus=calculus
    )


@pytest.mark.slow
@pytest.mark.parametrize("name, problem, calculus, expected", SLOW_ORDER_CASES)
def test_strong_order_more(name, problem, calculus, expected):
    assert_strong_order(
        getattr(dfx, name)(), PROBLEMS[problem], expected, calculus=calculus
    )


# HalfSolver in the default run: against the closed form on an ODE
# (test_half_solver_on_an_ode_has_local_order_two_error) and against Diffrax on SDEs,
# adaptive too (tests/compat/test_sde.py).
@pytest.mark.slow
def test_half_solver_strong_order_and_half_steps():
    # The result of HalfSolver is the two half steps: its errors at dt are the
    # wrapped solver's at dt/2.
    dts = (2.0**-3, 2.0**-4, 2.0**-5)
    problem = PROBLEMS["commutative"]
    half = strong_errors(
        dfx.HalfSolver(dfx.EulerHeun()), problem, dts, calculus="stratonovich"
    )
    plain = strong_errors(
        dfx.EulerHeun(), problem, [dt / 2 for dt in dts], calculus="stratonovich"
    )
    np.testing.assert_allclose(half, plain, rtol=1e-10)


@pytest.mark.slow
def test_ito_and_stratonovich_solutions_differ_as_they_should():
    # On GBM, Itô Milstein converges to the Itô solution and Stratonovich Milstein
    # to the Stratonovich one: each is far from the other's closed form.
    problem = PROBLEMS["gbm"]
    dts = (2.0**-7,)
    ito = strong_errors(dfx.ItoMilstein(), problem, dts, calculus="ito")
    wrong = strong_errors(dfx.ItoMilstein(), problem, dts, calculus="stratonovich")
    assert ito[0] < 0.01 and wrong[0] > 0.1


# ---- reversibility ------------------------------------------------------------------


def test_reversible_heun_runs_backwards_to_its_start():
    problem = PROBLEMS["general"]
    bm = brownian(problem, jr.key(3), tol=2.0**-10)
    terms = terms_for(problem, bm)
    solver = dfx.ReversibleHeun()
    forward = dfx.diffeqsolve(
        terms,
        solver,
        0.0,
        1.0,
        2.0**-6,
        problem.y0(),
        saveat=dfx.SaveAt(t1=True, solver_state=True),
    )
    y_hat, vf = forward.solver_state
    # Backwards the controls are negated: the stored vector field is reused as is.
    backward = dfx.diffeqsolve(
        terms,
        solver,
        1.0,
        0.0,
        -(2.0**-6),
        forward.ys[-1],
        solver_state=(y_hat, vf),
    )
    np.testing.assert_allclose(backward.ys[-1], problem.y0(), rtol=0, atol=1e-12)


# ---- adaptive steps -----------------------------------------------------------------


@pytest.mark.parametrize(
    "solver",
    [
        pytest.param(dfx.HalfSolver(dfx.EulerHeun()), marks=pytest.mark.slow),
        dfx.ReversibleHeun(),
    ],
)
def test_adaptive_sde_solve_converges(solver):
    problem = PROBLEMS["commutative"]
    keys = jr.split(jr.key(0), 16)

    def final(key, rtol):
        bm = brownian(problem, key, tol=2.0**-12)
        sol = dfx.diffeqsolve(
            terms_for(problem, bm),
            solver,
            0.0,
            1.0,
            0.05,
            problem.y0(),
            stepsize_controller=dfx.PIDController(rtol=rtol, atol=rtol),
            max_steps=4096,
        )
        return sol.ys[-1], bm.evaluate(0.0, 1.0), sol.stats["num_accepted_steps"]

    solve = jax.jit(jax.vmap(final, in_axes=(0, None)))
    errors, steps = [], []
    for rtol in (1e-1, 1e-2, 1e-3):
        y, w, n = solve(keys, rtol)
        exact = jax.vmap(
            lambda w_: problem.exact(problem.y0(), w_, 1.0, "stratonovich")
        )(w)
        errors.append(float(jnp.mean(jnp.abs(y - exact))))
        steps.append(int(jnp.sum(n)))
    assert np.all(np.isfinite(errors))
    assert errors[2] < errors[1] < errors[0], errors
    assert steps[2] > steps[1] > steps[0], steps


def test_half_solver_on_an_ode_has_local_order_two_error():
    # On an ODE, HalfSolver(Euler()) drives a PID controller: the error estimate
    # is |two half steps - one step|, and its order is Euler's plus one.
    solver = dfx.HalfSolver(dfx.Euler())
    term = dfx.ODETerm(lambda t, y, args: -y)
    assert solver.error_order(term) == 2
    sol = dfx.diffeqsolve(
        term,
        solver,
        0.0,
        1.0,
        0.1,
        1.0,
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
    )
    assert sol.result == dfx.RESULTS.successful
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=5e-3)
    # One step is exactly two Euler half steps.
    y1, y_error, _, _, _ = solver.step(term, 0.0, 0.2, 1.0, None, None, False)
    np.testing.assert_allclose(y1, 0.9 * 0.9, rtol=1e-15)
    np.testing.assert_allclose(y_error, abs(0.81 - 0.8), rtol=1e-12)


def test_sde_error_order_is_strong_order_plus_half():
    problem = PROBLEMS["gbm"]
    terms = terms_for(problem, brownian(problem, jr.key(0)))
    assert dfx.ReversibleHeun().error_order(terms) == 1.0
    assert dfx.HalfSolver(dfx.Euler()).error_order(terms) == 1.0
    ode = dfx.ODETerm(lambda t, y, args: y)
    assert dfx.ReversibleHeun().error_order(ode) == 2


# ---- transformations, dtypes, PyTrees -------------------------------------------------


@pytest.mark.slow  # SDE solves under vmap: test_adaptive_sde_solve_converges
def test_vmap_over_keys_equals_a_loop():
    problem = PROBLEMS["diagonal"]

    def final(key):
        bm = brownian(problem, key, tol=2.0**-8)
        return dfx.diffeqsolve(
            terms_for(problem, bm),
            dfx.ItoMilstein(),
            0.0,
            1.0,
            2.0**-5,
            problem.y0(),
        ).ys[-1]

    keys = jr.split(jr.key(9), 4)
    batched = jax.jit(jax.vmap(final))(keys)
    looped = jnp.stack([jax.jit(final)(k) for k in keys])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "solver",
    [
        dfx.EulerHeun(),
        pytest.param(dfx.ItoMilstein(), marks=pytest.mark.slow),
        pytest.param(dfx.StratonovichMilstein(), marks=pytest.mark.slow),
        pytest.param(dfx.ReversibleHeun(), marks=pytest.mark.slow),
    ],
)
def test_float32(solver):
    bm = dfx.VirtualBrownianTree(
        0.0,
        1.0,
        tol=2.0**-6,
        shape=jax.ShapeDtypeStruct((2,), jnp.float32),
        key=jr.key(1),
    )
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.ControlTerm(lambda t, y, args: jnp.diag(0.5 * y), bm),
    )
    y0 = jnp.ones(2, jnp.float32)
    t0, t1, dt0 = (jnp.asarray(t, jnp.float32) for t in (0.0, 1.0, 2.0**-5))
    sol = dfx.diffeqsolve(terms, solver, t0, t1, dt0, y0)
    assert sol.ys.dtype == jnp.float32
    assert np.all(np.isfinite(sol.ys))
    ref = dfx.diffeqsolve(
        terms, solver, 0.0, 1.0, 2.0**-5, y0.astype(jnp.float64)
    ).ys.astype(jnp.float32)
    np.testing.assert_allclose(sol.ys, ref, rtol=1e-4)


@pytest.mark.slow  # PyTree SDE states: test_srk.py::test_pytree_state_equals_flat_state
def test_milstein_on_a_pytree_state_equals_the_stacked_state():
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2.0**-8, shape=(2,), key=jr.key(4))
    a, b = 0.6, -0.3

    def drift(t, y, args):
        return jax.tree.map(lambda x: -0.5 * x, y)

    def tree_diffusion(t, y, args):
        u, v = y
        return (jnp.stack([a * u, b * v]), jnp.stack([b * u, a * v]))

    def flat_diffusion(t, y, args):
        u, v = y
        return jnp.stack([jnp.stack([a * u, b * v]), jnp.stack([b * u, a * v])])

    # (ItoMilstein exercises the PyTree paths of both Milstein corrections.)
    for solver in (dfx.ItoMilstein(),):
        tree = dfx.diffeqsolve(
            dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(tree_diffusion, bm)),
            solver,
            0.0,
            1.0,
            2.0**-5,
            (jnp.asarray(1.0), jnp.asarray(0.5)),
        ).ys
        flat = dfx.diffeqsolve(
            dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(flat_diffusion, bm)),
            solver,
            0.0,
            1.0,
            2.0**-5,
            jnp.asarray([1.0, 0.5]),
        ).ys
        np.testing.assert_allclose(jnp.stack(tree, axis=-1), flat, rtol=1e-13)


# Gradients of SDE solves against finite differences on the same path in the default
# run: test_discrete_adjoints_match_finite_differences (EulerHeun).
@pytest.mark.slow
@pytest.mark.parametrize("solver", [dfx.ItoMilstein(), dfx.ReversibleHeun()])
def test_grad_matches_finite_differences_on_the_same_path(solver):
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2.0**-6, shape=(), key=jr.key(2))

    @jax.jit
    def final(rate):
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -args * y),
            dfx.ControlTerm(lambda t, y, args: 0.5 * jnp.sin(y), bm),
        )
        return dfx.diffeqsolve(terms, solver, 0.0, 1.0, 2.0**-5, 1.0, args=rate).ys[-1]

    grad = jax.jit(jax.grad(final))(0.7)
    eps = 1e-6
    fd = (final(0.7 + eps) - final(0.7 - eps)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


# ---- checks ---------------------------------------------------------------------------


class _NeedsSpaceTime(dfx.AbstractSolver):
    """A user's solver that needs the space-time Lévy area."""

    term_structure = dfx.AbstractTerm
    interpolation_cls = dfx.LocalLinearInterpolation
    minimal_levy_area = dfx.AbstractSpaceTimeLevyArea

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1 = y0 + terms.vf_prod(t0, y0, args, terms.contr(t0, t1))
        return y1, None, dict(y0=y0, y1=y1), None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class _ItoNeedsSpaceTime(_NeedsSpaceTime, dfx.AbstractItoSolver):
    pass


def _scalar_sde(levy_area):
    bm = dfx.VirtualBrownianTree(
        0.0, 1.0, tol=0.01, shape=(), key=jr.key(0), levy_area=levy_area
    )
    return dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -y), dfx.ControlTerm(lambda t, y, args: y, bm)
    )


def test_missing_levy_area_is_named():
    terms = _scalar_sde(dfx.BrownianIncrement)
    with pytest.raises(
        ValueError,
        match=r"_ItoNeedsSpaceTime.*AbstractSpaceTimeLevyArea.*SpaceTimeLevyArea.*levy_area=BrownianIncrement",
    ):
        dfx.diffeqsolve(terms, _ItoNeedsSpaceTime(), 0.0, 1.0, 0.1, 1.0)
    # Wrapped, the wrapped solver's needs count.
    with pytest.raises(ValueError, match="AbstractSpaceTimeLevyArea"):
        dfx.diffeqsolve(terms, dfx.HalfSolver(_ItoNeedsSpaceTime()), 0.0, 1.0, 0.1, 1.0)
    # A richer Lévy area than needed is fine.
    sol = dfx.diffeqsolve(
        _scalar_sde(dfx.SpaceTimeTimeLevyArea), _ItoNeedsSpaceTime(), 0.0, 1.0, 0.1, 1.0
    )
    assert sol.result == dfx.RESULTS.successful


def test_solver_of_unknown_calculus_is_warned_about():
    terms = _scalar_sde(dfx.SpaceTimeLevyArea)
    # The warning comes while tracing: nothing needs to be compiled or run.
    with pytest.warns(UserWarning, match="neither .*AbstractItoSolver"):
        jax.eval_shape(
            lambda: dfx.diffeqsolve(terms, _NeedsSpaceTime(), 0.0, 1.0, 0.1, 1.0)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.eval_shape(
            lambda: dfx.diffeqsolve(
                terms, dfx.HalfSolver(dfx.Euler()), 0.0, 1.0, 0.1, 1.0
            )
        )


def test_euler_with_adaptive_steps_is_refused_on_an_sde():
    terms = _scalar_sde(dfx.BrownianIncrement)
    controller = dfx.PIDController(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="Euler.*adaptive.*HalfSolver"):
        dfx.diffeqsolve(
            terms, dfx.Euler(), 0.0, 1.0, 0.1, 1.0, stepsize_controller=controller
        )
    sol = dfx.diffeqsolve(
        terms,
        dfx.HalfSolver(dfx.Euler()),
        0.0,
        1.0,
        0.1,
        1.0,
        stepsize_controller=controller,
    )
    assert sol.result == dfx.RESULTS.successful


def test_milstein_is_not_an_ode_solver():
    with pytest.raises(ValueError, match="not for ODEs"):
        dfx.ItoMilstein().order(dfx.ODETerm(lambda t, y, args: y))


def test_deprecated_tuple_of_terms_is_accepted_with_a_warning():
    terms = _scalar_sde(dfx.BrownianIncrement)
    expected = dfx.diffeqsolve(terms, dfx.EulerHeun(), 0.0, 1.0, 0.1, 1.0).ys
    with pytest.warns(UserWarning, match="MultiTerm"):
        got = dfx.diffeqsolve(
            tuple(terms.terms), dfx.EulerHeun(), 0.0, 1.0, 0.1, 1.0
        ).ys
    np.testing.assert_array_equal(got, expected)


def test_drift_must_be_an_ode_term():
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=0.01, shape=(2,), key=jr.key(0))
    swapped = dfx.MultiTerm(
        dfx.ControlTerm(lambda t, y, args: jnp.diag(y), bm),
        dfx.ODETerm(lambda t, y, args: -y),
    )
    with pytest.raises(ValueError, match=r"control of `terms.terms\[0\]`"):
        dfx.diffeqsolve(swapped, dfx.ItoMilstein(), 0.0, 1.0, 0.1, jnp.ones(2))


def test_half_solver_needs_a_solver_instance():
    with pytest.raises(TypeError, match="HalfSolver"):
        dfx.HalfSolver(dfx.Euler)
    assert isinstance(dfx.HalfSolver(dfx.Euler()), eqx.Module)


# ---- gradients with every adjoint ----------------------------------------------------


def _sde_loss(params, y0, bm, solver, adjoint, dt):
    a, b = params
    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: -args[0] * y + jnp.sin(y)),
        dfx.ControlTerm(lambda t, y, args: args[1] * jnp.diag(jnp.cos(y)), bm),
    )
    sol = dfx.diffeqsolve(terms, solver, 0.0, 1.0, dt, y0, args=(a, b), adjoint=adjoint)
    return jnp.sum(sol.ys[-1] ** 2)


def _fd(fn, x, eps=1e-6):
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    out = []
    for i in range(flat.shape[0]):
        e = jnp.zeros_like(flat).at[i].set(eps)
        out.append((fn(unravel(flat + e)) - fn(unravel(flat - e))) / (2 * eps))
    return jnp.stack(out)


@pytest.mark.parametrize(
    "adjoint", ["checkpoint", pytest.param("direct", marks=pytest.mark.slow)]
)
def test_discrete_adjoints_match_finite_differences(adjoint):
    # Gradients in the drift parameter, the diffusion parameter and y0, on the
    # same Brownian path: exact derivatives of the discrete solve.
    import jax.flatten_util  # noqa: F401

    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2.0**-6, shape=(2,), key=jr.key(1))
    adj = (
        dfx.RecursiveCheckpointAdjoint()
        if adjoint == "checkpoint"
        else dfx.DirectAdjoint()
    )
    x = ((jnp.asarray(0.7), jnp.asarray(0.4)), jnp.asarray([1.0, 0.5]))

    def loss(x):
        return _sde_loss(x[0], x[1], bm, dfx.EulerHeun(), adj, 2.0**-5)

    # One compilation serves both: the finite differences read the value half. (`x`
    # round-trips through ravel_pytree first, so that the perturbed points have the
    # same dtypes, weak types included, and nothing is compiled twice.)
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    x = unravel(flat)
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    grad = jax.flatten_util.ravel_pytree(value_and_grad(x)[1])[0]
    fd = _fd(lambda z: value_and_grad(z)[0], x)
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


@pytest.mark.parametrize(
    "solver", [dfx.ReversibleHeun(), pytest.param(dfx.Heun(), marks=pytest.mark.slow)]
)
def test_backsolve_adjoint_on_a_stratonovich_sde_converges_to_the_gradient(solver):
    # BacksolveAdjoint solves the Stratonovich adjoint equations backwards on the
    # same Brownian path: its gradients approach the finite differences of the
    # solve as the step shrinks (in drift and diffusion parameters and y0).
    import jax.flatten_util  # noqa: F401

    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2.0**-10, shape=(2,), key=jr.key(1))
    x = ((jnp.asarray(0.7), jnp.asarray(0.4)), jnp.asarray([1.0, 0.5]))

    def loss(x, dt, adjoint):
        return _sde_loss(x[0], x[1], bm, solver, adjoint, dt)

    # The step size is traced: one compilation of the solve (for the finite
    # differences) and one of the backsolve gradient serve both step sizes.
    value = jax.jit(lambda x, dt: loss(x, dt, dfx.RecursiveCheckpointAdjoint()))
    backsolve = jax.jit(jax.grad(lambda x, dt: loss(x, dt, dfx.BacksolveAdjoint())))
    errors = []
    for dt in (jnp.asarray(2.0**-5), jnp.asarray(2.0**-8)):
        fd = _fd(lambda x, dt=dt: value(x, dt), x)
        grad = jax.flatten_util.ravel_pytree(backsolve(x, dt))[0]
        errors.append(float(jnp.max(jnp.abs(grad - fd)) / jnp.max(jnp.abs(fd))))
    assert errors[1] < 2e-3, errors
    assert errors[1] < errors[0] / 4, errors


def test_backsolve_adjoint_refuses_an_ito_solver_on_an_sde():
    bm = dfx.VirtualBrownianTree(0.0, 1.0, tol=2.0**-4, shape=(2,), key=jr.key(1))
    params, y0 = (jnp.asarray(0.7), jnp.asarray(0.4)), jnp.asarray([1.0, 0.5])
    with pytest.raises(ValueError, match="Stratonovich.*`Euler`"):
        jax.grad(_sde_loss)(params, y0, bm, dfx.Euler(), dfx.BacksolveAdjoint(), 0.1)
    with pytest.raises(ValueError, match="backward solver `ItoMilstein`"):
        jax.grad(_sde_loss)(
            params,
            y0,
            bm,
            dfx.Heun(),
            dfx.BacksolveAdjoint(solver=dfx.ItoMilstein()),
            0.1,
        )


@pytest.mark.slow
def test_spark_with_stored_rejected_steps_on_non_commutative_noise():
    # For non-commutative noise, adaptive steps should revisit the ends of rejected
    # steps (`store_rejected_steps`), so that the Brownian path is sampled there.
    # The error against a fine reference on the same paths falls with rtol.
    problem = PROBLEMS["general"]
    keys = jr.split(jr.key(3), 16)

    def final(key, rtol):
        bm = brownian(problem, key, levy_area=dfx.SpaceTimeLevyArea, tol=2.0**-12)
        controller = dfx.ClipStepSizeController(
            dfx.PIDController(rtol=rtol, atol=rtol), store_rejected_steps=32
        )
        sol = dfx.diffeqsolve(
            terms_for(problem, bm),
            dfx.SPaRK(),
            0.0,
            1.0,
            0.05,
            problem.y0(),
            stepsize_controller=controller,
            max_steps=8192,
        )
        return sol.ys[-1], sol.stats["num_rejected_steps"], sol.result

    solve = jax.jit(jax.vmap(final, in_axes=(0, None)))

    def reference(key):
        bm = brownian(problem, key, levy_area=dfx.SpaceTimeLevyArea, tol=2.0**-12)
        sol = dfx.diffeqsolve(
            terms_for(problem, bm),
            dfx.SPaRK(),
            0.0,
            1.0,
            2.0**-11,
            problem.y0(),
            max_steps=2**11 + 2,
        )
        return sol.ys[-1]

    truth = jax.jit(jax.vmap(reference))(keys)
    errors = []
    for rtol in (1e-1, 1e-3):
        y, rejected, result = solve(keys, rtol)
        assert np.all(result == dfx.RESULTS.successful)
        errors.append(float(jnp.mean(jnp.abs(y - truth))))
    assert int(jnp.sum(rejected)) > 0  # rejected steps were revisited
    assert errors[1] < errors[0] / 4, errors


# ---- half precision ------------------------------------------------------------------


def _rounded_path_solve(solver, rounding, dtype, steps=None):
    """256 solves (`vmap` over initial values) of a 2-dimensional SDE driven by
    `rounded_path`, in `dtype`, with diagonal noise (additive for the methods that
    need it); constant steps of 1/16, or `StepTo` the given `steps`. Returns the
    step times and the states at every step."""
    levy = dfx.SpaceTimeLevyArea
    if isinstance(solver, (dfx.GeneralShARK, dfx.SlowRK)):
        levy = dfx.SpaceTimeTimeLevyArea
    matrix = jnp.asarray([[-1.0, 0.3], [-0.2, -0.7]], dtype)
    if isinstance(solver, (dfx.SEA, dfx.SRA1, dfx.ShARK)):
        sigma = jnp.asarray([[0.5, 0.1], [0.0, 0.4]], dtype)

        def diffusion(t, y, args):
            return sigma

    else:

        def diffusion(t, y, args):
            return jnp.diag(jnp.asarray(0.3, dtype) * jnp.cos(y))

    terms = dfx.MultiTerm(
        dfx.ODETerm(lambda t, y, args: matrix @ y + jnp.sin(t).astype(dtype)),
        dfx.ControlTerm(diffusion, rounded_path(dfx, levy, rounding, dtype)),
    )
    if steps is None:
        t0, t1, dt0 = (jnp.asarray(x, dtype) for x in (0.0, 1.0, 0.0625))
        controller = dfx.ConstantStepSize()
    else:
        t0, t1, dt0 = jnp.asarray(steps[0], dtype), jnp.asarray(steps[-1], dtype), None
        controller = dfx.StepTo(ts=jnp.asarray(steps, dtype))
    y0s = np.random.default_rng(0).uniform(-1.5, 1.5, (256, 2))

    def solve(y0):
        return dfx.diffeqsolve(
            terms,
            solver,
            t0,
            t1,
            dt0,
            y0,
            saveat=dfx.SaveAt(steps=True),
            stepsize_controller=controller,
        )

    sol = jax.jit(jax.vmap(solve))(jnp.asarray(y0s, dtype))
    assert sol.ys.dtype == dtype
    num_steps = int(sol.stats["num_steps"][0])
    return np.asarray(sol.ts[0, :num_steps]), np.asarray(sol.ys[:, :num_steps])


def _half_precision_cases():
    # Two in the default run (about 2 s each, mostly compilation), the rest slow.
    default = {("SPaRK", "float16"), ("StratonovichMilstein", "bfloat16")}
    solvers = (dfx.EulerHeun, dfx.StratonovichMilstein, dfx.SRA1, dfx.SPaRK, dfx.SlowRK)
    for cls in solvers:
        for dtype in (jnp.float16, jnp.bfloat16):
            key = (cls.__name__, jnp.dtype(dtype).name)
            marks = () if key in default else (pytest.mark.slow,)
            yield pytest.param(cls(), dtype, marks=marks, id="-".join(key))


@pytest.mark.parametrize("solver, dtype", list(_half_precision_cases()))
def test_half_precision_sde_steps_are_combined_in_float32(solver, dtype):
    # The stages and increments of a step are combined in float32 and rounded to the
    # state's dtype once, as for ordinary Runge-Kutta methods. Against a float64
    # solve on the same (rounded) path values and step times, the root-mean-square
    # relative error at the end is then about an epsilon of the dtype (measured 0.80
    # to 1.08): the rounding of the state once per step, as with Euler's method.
    # Combined in the state's dtype, these methods were 1.2 to 3.0 epsilons off
    # (SPaRK the most).
    times, ys = _rounded_path_solve(solver, dtype, dtype)
    steps = np.concatenate([[0.0], times.astype(np.float64)])
    _, reference = _rounded_path_solve(solver, dtype, jnp.float64, steps)
    ys = ys.astype(np.float64)
    error = np.abs(ys[:, -1] - reference[:, -1]) / np.maximum(
        np.abs(reference[:, -1]), 0.25
    )
    rms = float(np.sqrt(np.mean(error**2))) / float(jnp.finfo(dtype).eps)
    assert rms <= 1.25, rms

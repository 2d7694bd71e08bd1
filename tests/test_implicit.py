"""Implicit solvers (`ImplicitEuler`, `Kvaerno3/4/5`): convergence order, stiff
problems against SciPy's Radau at tight tolerances, nonlinear failures rejecting the
step, tolerances taken from the controller, and `jit`/`vmap`/`grad`."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx
from _jaxpr import equations
from _stiff_problems import (
    ADJOINTS,
    assert_decay_gradients_match_fd,
    assert_robertson_matches_radau,
    decay_solve,
    robertson,
)

scipy_integrate = pytest.importorskip("scipy.integrate")

IMPLICIT = {
    "ImplicitEuler": (dfx.ImplicitEuler, 1),
    "Kvaerno3": (dfx.Kvaerno3, 3),
    "Kvaerno4": (dfx.Kvaerno4, 4),
    "Kvaerno5": (dfx.Kvaerno5, 5),
}
_TIGHT = dfx.VeryChord(rtol=1e-13, atol=1e-13)


def _oscillator(t, y, args):
    # x'' = -x + cos(2t) as a first-order system.
    return jnp.stack([y[1], -y[0] + jnp.cos(2 * t)])


def _oscillator_exact(t):
    return np.array(
        [
            np.cos(t) + (np.cos(t) - np.cos(2 * t)) / 3,
            -np.sin(t) + (-np.sin(t) + 2 * np.sin(2 * t)) / 3,
        ]
    )


def _prothero_robinson(t, y, args):
    # Stiff (eigenvalue -1e4), with solution cos(t) from y(0) = 1.
    return -1e4 * (y - jnp.cos(t)) - jnp.sin(t)


def _slope(hs, errors):
    return np.polyfit(np.log(hs), np.log(errors), 1)[0]


def _final_errors(solver, field, y0, exact, hs, t1=4.0):
    # One compilation for every step size: `dt0` is traced.
    @jax.jit
    def solve(dt0):
        return dfx.diffeqsolve(
            dfx.ODETerm(field), solver, 0.0, t1, dt0, y0, max_steps=1000
        ).ys[-1]

    return [np.max(np.abs(np.asarray(solve(jnp.asarray(h))) - exact(t1))) for h in hs]


@pytest.mark.parametrize("name", list(IMPLICIT))
def test_convergence_order(name):
    cls, order = IMPLICIT[name]
    hs = [0.05, 0.025, 0.0125] if order == 1 else [0.2, 0.1, 0.05, 0.025]
    errors = _final_errors(
        cls(root_finder=_TIGHT),
        _oscillator,
        jnp.array([1.0, 0.0]),
        _oscillator_exact,
        hs,
    )
    assert abs(_slope(hs, errors) - order) < 0.2, errors


@pytest.mark.parametrize("name", ["Kvaerno3", "Kvaerno4", "Kvaerno5"])
def test_stiff_linear_problem_with_steps_far_beyond_the_stiff_scale(name):
    # h * |lambda| from 250 to 2000: explicit methods would blow up. These methods are
    # L-stable and stiffly accurate, so the error stays small; in this regime their
    # order drops to 2 (their stage order plus one), as the theory predicts.
    cls, _ = IMPLICIT[name]
    hs = [0.2, 0.1, 0.05, 0.025]
    errors = _final_errors(
        cls(root_finder=_TIGHT),
        _prothero_robinson,
        jnp.array([1.0]),
        lambda t: np.array([np.cos(t)]),
        hs,
    )
    assert max(errors) < 1e-6, errors
    assert _slope(hs, errors) > 1.8, errors


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Kvaerno3", marks=pytest.mark.slow),
        pytest.param("Kvaerno4", marks=pytest.mark.slow),
        "Kvaerno5",
    ],
)
def test_robertson_against_radau(name):
    cls, _ = IMPLICIT[name]
    assert_robertson_matches_radau(dfx.ODETerm(robertson), cls())


_MU = 1000.0


def _van_der_pol(t, y, args):
    return jnp.stack([y[1], args * (1 - y[0] ** 2) * y[1] - y[0]])


@functools.cache
def _van_der_pol_reference(ts):
    sol = scipy_integrate.solve_ivp(
        lambda t, y: [y[1], _MU * (1 - y[0] ** 2) * y[1] - y[0]],
        (0.0, ts[-1]),
        [2.0, 0.0],
        method="Radau",
        rtol=1e-12,
        atol=1e-12,
        jac=lambda t, y: [
            [0.0, 1.0],
            [-2 * _MU * y[0] * y[1] - 1.0, _MU * (1 - y[0] ** 2)],
        ],
        t_eval=ts,
    )
    return sol.y.T


@pytest.mark.slow  # Kvaerno5 against Radau: test_robertson_against_radau stays
def test_van_der_pol_stiff_against_radau():
    ts = (1.0, 100.0, 500.0, 1000.0)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_van_der_pol),
        dfx.Kvaerno5(),
        0.0,
        ts[-1],
        1e-4,
        jnp.array([2.0, 0.0]),
        args=jnp.asarray(_MU),
        saveat=dfx.SaveAt(ts=jnp.array(ts)),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        max_steps=20_000,
    )
    reference = _van_der_pol_reference(ts)
    np.testing.assert_allclose(np.asarray(sol.ys), reference, rtol=1e-4, atol=1e-6)
    # Stiff: the stability limit of an explicit method would need about a million
    # steps here.
    assert int(sol.stats["num_steps"]) < 5_000


def _cubic_decay(t, y, args):
    # y' = -y^3: y = 1 / sqrt(1 + 2 t) from y(0) = 1. Strongly nonlinear for large y.
    return -args * y**3


def test_failed_nonlinear_solve_rejects_the_step_and_shrinks_it():
    # From y0 = 30 a first step of 1 is far too long for the chord iteration
    # (the Jacobian at the start is -2700 and changes fast), and one iteration is
    # allowed: the root find fails, the step is rejected, and smaller steps succeed.
    y0 = jnp.array([30.0])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_cubic_decay),
        dfx.Kvaerno3(root_find_max_steps=2),
        0.0,
        2.0,
        1.0,
        y0,
        args=jnp.asarray(1.0),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
    )
    assert dfx.is_successful(sol.result)
    assert int(sol.stats["num_rejected_steps"]) > 0
    exact = 30.0 / np.sqrt(1 + 2 * 900.0 * 2.0)
    np.testing.assert_allclose(float(sol.ys[-1, 0]), exact, rtol=1e-4)


def test_failed_nonlinear_solve_with_constant_steps_ends_the_solve():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_cubic_decay),
        dfx.Kvaerno3(root_finder=dfx.VeryChord(rtol=1e-8, atol=1e-8)),
        0.0,
        2.0,
        1.0,
        jnp.array([30.0]),
        args=jnp.asarray(1.0),
        throw=False,
    )
    assert int(sol.result._value) in (
        int(dfx.RESULTS.nonlinear_divergence._value),
        int(dfx.RESULTS.nonlinear_max_steps_reached._value),
    )
    with pytest.raises(Exception, match="(?i)nonlinear|diverge|converge"):
        dfx.diffeqsolve(
            dfx.ODETerm(_cubic_decay),
            dfx.Kvaerno3(root_finder=dfx.VeryChord(rtol=1e-8, atol=1e-8)),
            0.0,
            2.0,
            1.0,
            jnp.array([30.0]),
            args=jnp.asarray(1.0),
        ).ys.block_until_ready()


def test_root_finder_tolerances_come_from_the_controller():
    controller = dfx.PIDController(rtol=1e-5, atol=1e-7)
    from diffeqx._root_finder import resolve_root_finder_tols

    resolved = resolve_root_finder_tols(dfx.Kvaerno5(), controller)
    assert resolved.root_finder.rtol == 1e-5
    assert resolved.root_finder.atol == 1e-7
    assert resolved.root_finder.norm is controller.norm
    # A root finder with its own tolerances keeps them.
    own = dfx.Kvaerno5(root_finder=dfx.VeryChord(rtol=1e-3, atol=1e-4))
    assert resolve_root_finder_tols(own, controller).root_finder.rtol == 1e-3
    # With `ConstantStepSize` there are no tolerances to take: a clear error.
    with pytest.raises(ValueError, match="VeryChord"):
        dfx.diffeqsolve(
            dfx.ODETerm(_cubic_decay),
            dfx.Kvaerno5(),
            0.0,
            1.0,
            0.1,
            jnp.array([1.0]),
            args=jnp.asarray(1.0),
        )


def test_any_optimistix_root_finder():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_prothero_robinson),
        dfx.Kvaerno4(root_finder=optx.Newton(rtol=1e-10, atol=1e-10)),
        0.0,
        1.0,
        0.05,
        jnp.array([1.0]),
    )
    np.testing.assert_allclose(float(sol.ys[-1, 0]), np.cos(1.0), rtol=1e-6)


@ADJOINTS
def test_gradients_match_finite_differences(adjoint):
    # Kvaerno3 compiles in about half the time of Kvaerno5 (same engine).
    assert_decay_gradients_match_fd(decay_solve(dfx.Kvaerno3(), adjoint))


def test_vmap_over_parameters_equals_a_loop():
    solve = jax.jit(decay_solve(dfx.Kvaerno3()))
    rates = jnp.array([1.0, 30.0, 1000.0])
    y0 = jnp.array([1.0, 0.5])
    batched = jax.vmap(solve, in_axes=(0, None))(rates, y0)
    looped = jnp.stack([solve(r, y0) for r in rates])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-8)


@pytest.mark.parametrize("name", [*IMPLICIT, "Kvaerno5-reuse_jacobian"])
def test_float32(name):
    if name == "Kvaerno5-reuse_jacobian":
        solver = dfx.Kvaerno5(reuse_jacobian=True)
    else:
        solver = IMPLICIT[name][0]()
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_prothero_robinson),
        solver,
        jnp.float32(0.0),
        jnp.float32(1.0),
        jnp.float32(0.01),
        jnp.array([1.0], jnp.float32),
        stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
    )
    assert sol.ys.dtype == jnp.float32
    np.testing.assert_allclose(float(sol.ys[-1, 0]), np.cos(1.0), rtol=1e-3)


@pytest.mark.slow  # ~9 s; Rosenbrock's PyTree and dense-output tests stay
def test_pytree_state_and_dense_output():
    def field(t, y, args):
        return {"a": -100.0 * (y["a"] - jnp.cos(t)), "b": y["a"] - y["b"]}

    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Kvaerno4(),
        0.0,
        2.0,
        0.01,
        {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0)},
        saveat=dfx.SaveAt(dense=True, t1=True),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    reference = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5(),
        0.0,
        2.0,
        0.001,
        {"a": jnp.asarray(1.0), "b": jnp.asarray(0.0)},
        saveat=dfx.SaveAt(ts=jnp.linspace(0.1, 1.9, 7)),
        stepsize_controller=dfx.PIDController(rtol=1e-11, atol=1e-11),
        max_steps=100_000,
    )
    for i, t in enumerate(np.linspace(0.1, 1.9, 7)):
        value = sol.evaluate(t)
        for key in ("a", "b"):
            np.testing.assert_allclose(
                float(value[key]), float(reference.ys[key][i]), rtol=1e-5, atol=1e-7
            )


def _reaction_diffusion(n):
    # u_t = 0.1 Laplacian(u) + u (1 - u) on an n x n grid, zero boundary values.
    h = 1.0 / (n + 1)

    def field(t, u, args):
        padded = jnp.pad(u, 1)
        laplacian = (
            padded[:-2, 1:-1]
            + padded[2:, 1:-1]
            + padded[1:-1, :-2]
            + padded[1:-1, 2:]
            - 4 * u
        ) / h**2
        return 0.1 * laplacian + u * (1 - u)

    x = jnp.linspace(h, 1 - h, n)
    u0 = jnp.exp(-50 * ((x[:, None] - 0.5) ** 2 + (x[None, :] - 0.5) ** 2))
    return field, u0


def _shapes(fn, *args):
    return {tuple(v.aval.shape) for eqn in equations(fn, *args) for v in eqn.outvars}


def test_matrix_free_newton_krylov_with_an_iterative_linear_solver():
    import lineax as lx

    n = 8  # 64 unknowns
    field, u0 = _reaction_diffusion(n)

    def solve(linear_solver):
        root_finder = dfx.VeryChord(rtol=1e-8, atol=1e-8, linear_solver=linear_solver)

        def run(u0):
            return dfx.diffeqsolve(
                dfx.ODETerm(field),
                dfx.Kvaerno3(root_finder=root_finder),
                0.0,
                0.5,
                0.01,
                u0,
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
            ).ys[-1]

        return run

    dense = solve(lx.AutoLinearSolver(well_posed=None))
    krylov = solve(lx.GMRES(rtol=1e-10, atol=1e-10))
    np.testing.assert_allclose(
        np.asarray(krylov(u0)), np.asarray(dense(u0)), rtol=1e-6, atol=1e-8
    )
    # GMRES uses Jacobian-vector products only: no n^2 x n^2 matrix is formed.
    assert (n * n, n * n) in _shapes(dense, u0)
    assert not any(len(s) == 2 and s[0] == s[1] == n * n for s in _shapes(krylov, u0))


# Rodas5P against Radau in the default run: test_rosenbrock.py::test_robertson.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Kvaerno5", "Rodas5P"])
def test_hires_against_radau(name):
    from _stiff_problems import HIRES_T1, HIRES_Y0, hires, hires_reference

    sol = dfx.diffeqsolve(
        dfx.ODETerm(hires),
        getattr(dfx, name)(),
        0.0,
        HIRES_T1,
        1e-6,
        jnp.asarray(HIRES_Y0),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-12),
        max_steps=20_000,
    )
    reference = hires_reference()
    # Published values at t = 321.8122 (Hairer & Wanner's test set) agree with this
    # reference; each species to a relative 1e-6.
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), reference, rtol=1e-6)
    np.testing.assert_allclose(reference[0], 0.7371312573325668e-3, rtol=1e-8)


def test_rosenbrock_matrix_free_with_an_iterative_linear_solver():
    import lineax as lx

    n = 8  # 64 unknowns
    field, u0 = _reaction_diffusion(n)

    def solve(linear_solver):
        def run(u0):
            return dfx.diffeqsolve(
                dfx.ODETerm(field),
                dfx.Rodas5P(linear_solver=linear_solver),
                0.0,
                0.5,
                0.01,
                u0,
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
            ).ys[-1]

        return run

    dense = solve(lx.LU())
    krylov = solve(lx.GMRES(rtol=1e-12, atol=1e-12))
    np.testing.assert_allclose(
        np.asarray(krylov(u0)), np.asarray(dense(u0)), rtol=1e-6, atol=1e-8
    )
    assert (n * n, n * n) in _shapes(dense, u0)
    assert not any(len(s) == 2 and s[0] == s[1] == n * n for s in _shapes(krylov, u0))


def _diffusion_1d(t, u, args):
    # Stiff 1-D diffusion with logistic growth: a tridiagonal Jacobian.
    padded = jnp.pad(u, 1)
    return 0.1 * (padded[:-2] - 2 * u + padded[2:]) * (u.shape[0] + 1) ** 2 + u * (
        1 - u
    )


@pytest.mark.parametrize(
    # Kvaerno's root finder with a structured linear solver: the matrix-free
    # Newton–Krylov test stays in the default run.
    "family",
    [pytest.param("Kvaerno5", marks=pytest.mark.slow), "Rodas5P"],
)
def test_structured_tridiagonal_jacobian(family):
    import lineax as lx

    n = 40
    u0 = jnp.sin(jnp.pi * jnp.linspace(0.0, 1.0, n + 2)[1:-1])

    def solver(structured):
        if family == "Rodas5P":
            if structured:
                return dfx.Rodas5P(
                    linear_solver=lx.Tridiagonal(), tags=lx.tridiagonal_tag
                )
            return dfx.Rodas5P()
        if structured:
            return dfx.Kvaerno5(
                root_finder=dfx.with_stepsize_controller_tols(dfx.VeryChord)(
                    linear_solver=lx.Tridiagonal(), tags=lx.tridiagonal_tag
                )
            )
        return dfx.Kvaerno5()

    def run(structured):
        def fn(u0):
            return dfx.diffeqsolve(
                dfx.ODETerm(_diffusion_1d),
                solver(structured),
                0.0,
                0.5,
                1e-3,
                u0,
                stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-9),
            ).ys[-1]

        return fn

    dense, banded = run(False), run(True)
    np.testing.assert_allclose(
        np.asarray(banded(u0)), np.asarray(dense(u0)), rtol=1e-6, atol=1e-8
    )
    # Three diagonals from three Jacobian-vector products: no n x n matrix.
    assert (n, n) in _shapes(dense, u0)
    assert (n, n) not in _shapes(banded, u0)

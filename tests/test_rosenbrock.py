"""Rosenbrock solvers: `Rosenbrock23`, `Rodas4`, `Rodas5P`.

- Empirical order with constant steps on problems with closed-form solutions: the
  forced oscillator of test_convergence.py, and the stiff linear problem
  `y' = -1000 (y - cos t) - sin t` both with a resolved transient and in the stiff
  regime (`h * 1000 >> 1`), where Rodas4 shows the order reduction it is known for.
- Dense output between steps (values and derivatives).
- Robertson's problem to t = 1e5 and Van der Pol (mu = 1000) against SciPy's Radau
  at tight tolerances (a different method and implementation); Robertson's mass.
- `vmap` against a Python loop, `grad` against central differences, float32,
  PyTree states, backwards time, a user-chosen linear solver, and failed steps.
"""

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest
from scipy.integrate import solve_ivp

import diffeqx as dfx
from _stiff_problems import robertson, robertson_reference
from diffeqx._solver.rosenbrock import Rodas4, Rodas5P, Rosenbrock23

SOLVERS = {"Rosenbrock23": Rosenbrock23(), "Rodas4": Rodas4(), "Rodas5P": Rodas5P()}
ORDERS = {"Rosenbrock23": 2, "Rodas4": 4, "Rodas5P": 5}
NAMES = list(SOLVERS)
_TOL = 0.2


def _slope(n_steps, errors):
    slope, _ = np.polyfit(np.log(1.0 / np.asarray(n_steps)), np.log(errors), 1)
    return slope


# --- Forced oscillator: x'' = -x + cos(2t) -----------------------------------------

_OSC_T = 10.0
_OSC_Y0 = np.array([1.0, 0.0])


def _oscillator(t, y, args):
    return jnp.stack([y[1], -y[0] + jnp.cos(2 * t)])


def _oscillator_exact(t):
    position = jnp.cos(t) + (jnp.cos(t) - jnp.cos(2 * t)) / 3
    velocity = -jnp.sin(t) + (-jnp.sin(t) + 2 * jnp.sin(2 * t)) / 3
    return jnp.stack([position, velocity])


# --- Stiff linear problem: y' = -1000 (y - cos t) - sin t ---------------------------

_LAMBDA = 1000.0


def _stiff(t, y, args):
    return -_LAMBDA * (y - jnp.cos(t)) - jnp.sin(t)


def _stiff_exact(t, y0):
    # y0 = 1 gives cos t; otherwise a transient (y0 - 1) exp(-1000 t) decays.
    return jnp.cos(t) + (y0 - 1.0) * jnp.exp(-_LAMBDA * t)


@functools.cache
def _constant_step_solve(name, problem):
    """`(y0, t0, t1, n) -> y(t1)` with `n` constant steps, compiled once per solver and
    problem: the times are traced, so forward and backward solves, and both stiff
    set-ups, share one program."""
    vector_field = {"oscillator": _oscillator, "stiff": _stiff}[problem]

    @jax.jit
    def solve(y0, t0, t1, n):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(vector_field),
            SOLVERS[name],
            t0,
            t1,
            (t1 - t0) / n.astype(jnp.float64),
            y0,
            stepsize_controller=dfx.ConstantStepSize(),
            max_steps=1024,
        )
        return sol.ys[-1]

    return solve


# (problem, y0, t1, exact solution at t1) of each set-up, all from t = 0.
_SETUPS = {
    "oscillator": ("oscillator", _OSC_Y0, _OSC_T, _oscillator_exact(_OSC_T)),
    # t1 = 0.01 spans 10 time constants; the step counts used resolve them.
    "transient": ("stiff", np.array([2.0]), 0.01, _stiff_exact(0.01, 2.0)),
    # y = cos t, with h * 1000 between 8 and 125 for the step counts used.
    "stiff": ("stiff", np.array([1.0]), 2.0, _stiff_exact(2.0, 1.0)),
}


def _errors(name, setup, n_steps):
    problem, y0, t1, exact = _SETUPS[setup]
    solve = _constant_step_solve(name, problem)
    args = (jnp.asarray(y0), jnp.asarray(0.0), jnp.asarray(t1))
    return [
        float(jnp.max(jnp.abs(solve(*args, jnp.asarray(n)) - exact))) for n in n_steps
    ]


@pytest.mark.parametrize("name", NAMES)
def test_order_is_reported(name):
    assert SOLVERS[name].order(dfx.ODETerm(_oscillator)) == ORDERS[name]


def test_error_order():
    term = dfx.ODETerm(_oscillator)
    # Rosenbrock23 advances at order 2, but its estimate (against an order-3
    # solution) is O(h^3).
    assert Rosenbrock23().error_order(term) == 3
    assert Rodas4().error_order(term) == 4
    assert Rodas5P().error_order(term) == 5


@pytest.mark.parametrize("name", NAMES)
def test_order_on_forced_oscillator(name):
    # Measured slopes 2.00, 4.01, 4.97 (n = 64..256).
    n_steps = (64, 128, 256)
    errors = _errors(name, "oscillator", n_steps)
    assert min(errors) > 1e-13, errors
    assert errors == sorted(errors, reverse=True), errors
    slope = _slope(n_steps, errors)
    assert abs(slope - ORDERS[name]) <= _TOL, (name, slope, errors)


@pytest.mark.parametrize("name", ["Rosenbrock23", "Rodas4"])
def test_order_on_stiff_linear_problem_with_transient(name):
    # h * 1000 = 0.5, 0.25, 0.125: the transient is resolved.
    n_steps = (20, 40, 80)
    errors = _errors(name, "transient", n_steps)
    assert min(errors) > 1e-13, errors
    slope = _slope(n_steps, errors)
    assert abs(slope - ORDERS[name]) <= _TOL, (name, slope, errors)


def test_rodas5p_on_stiff_linear_problem_with_transient():
    # On a linear problem Rodas5P does better than its order: its stability function
    # matches exp(z) to O(z^7). Measured slope 5.6 here.
    n_steps = (20, 40, 80)
    errors = _errors("Rodas5P", "transient", n_steps)
    assert min(errors) > 1e-15, errors
    assert errors == sorted(errors, reverse=True), errors
    assert _slope(n_steps, errors) >= 5 - _TOL, errors
    assert errors[0] < 1e-10, errors


def test_stiff_regime():
    """y = cos t with h * 1000 in [8, 125]: the stiff component is not resolved.

    Rosenbrock23 keeps its order 2. Rodas4 shows the order reduction Rodas is known
    for on this (Prothero-Robinson) problem (measured: fitted slope 1.9, from 1.6
    between the largest steps to 2.6 between the smallest) but stays
    accurate; Rodas5P is far more accurate there (measured 3e-9 to 3e-13)."""
    n_steps = (16, 32, 64, 128, 256)
    r23 = _errors("Rosenbrock23", "stiff", n_steps)
    assert abs(_slope(n_steps, r23) - 2) <= _TOL, r23
    rodas4 = _errors("Rodas4", "stiff", n_steps)
    assert rodas4 == sorted(rodas4, reverse=True), rodas4
    assert _slope(n_steps, rodas4) > 1.5, rodas4
    assert max(rodas4) < 3e-6, rodas4
    rodas5p = _errors("Rodas5P", "stiff", n_steps)
    assert rodas5p == sorted(rodas5p, reverse=True), rodas5p
    assert max(rodas5p) < 1e-8, rodas5p
    assert all(a < b for a, b in zip(rodas5p, rodas4, strict=True))


# --- Dense output -------------------------------------------------------------------

_THETAS = (0.37, 0.81)
# Global order of the interpolant's values and derivative between steps (measured:
# 2.00/2.00, 4.00/3.00, 5.00/4.00 over n = 64..256).
_DENSE_ORDERS = {"Rosenbrock23": (2, 2), "Rodas4": (4, 3), "Rodas5P": (5, 4)}


@functools.cache
def _dense_errors(name):
    n_queries = 256

    @jax.jit
    def errors(n):
        dt0 = _OSC_T / n.astype(jnp.float64)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_oscillator),
            SOLVERS[name],
            0.0,
            _OSC_T,
            dt0,
            jnp.asarray(_OSC_Y0),
            saveat=dfx.SaveAt(dense=True, steps=True),
            max_steps=512,
        )
        # At the ends of the steps the interpolant gives the solution.
        at_ends = jnp.where(
            jnp.isfinite(sol.ts)[:, None],
            jax.vmap(sol.evaluate)(jnp.where(jnp.isfinite(sol.ts), sol.ts, 0.0))
            - sol.ys,
            0.0,
        )
        end_error = jnp.max(jnp.abs(at_ends))
        step = (jnp.arange(n_queries) % n).astype(jnp.float64)
        ts = jnp.concatenate([(step + theta) * dt0 for theta in _THETAS])
        exact = jax.vmap(_oscillator_exact)(ts)
        value = jnp.max(jnp.abs(jax.vmap(sol.evaluate)(ts) - exact))
        exact_derivative = jax.vmap(lambda t, y: _oscillator(t, y, None))(ts, exact)
        derivative = jnp.max(jnp.abs(jax.vmap(sol.derivative)(ts) - exact_derivative))
        return value, derivative, end_error

    n_steps = (64, 128, 256)
    out = [tuple(map(float, errors(jnp.asarray(n)))) for n in n_steps]
    values, derivatives, end_errors = zip(*out, strict=True)
    return n_steps, list(values), list(derivatives), list(end_errors)


@pytest.mark.parametrize(
    "name",
    ["Rosenbrock23", pytest.param("Rodas4", marks=pytest.mark.slow), "Rodas5P"],
)
def test_dense_output_order(name):
    n_steps, values, derivatives, end_errors = _dense_errors(name)
    assert max(end_errors) < 1e-14, end_errors
    value_order, derivative_order = _DENSE_ORDERS[name]
    assert abs(_slope(n_steps, values) - value_order) <= _TOL, values
    assert abs(_slope(n_steps, derivatives) - derivative_order) <= _TOL, derivatives


# --- Robertson and Van der Pol against SciPy Radau ----------------------------------


_ROBERTSON_TS = (1e-3, 1.0, 1e2, 1e4, 1e5)


# (rtol, atol, bound on the relative error of every component at every save time).
# Measured: 1.6e-4, 1.3e-7, 2.0e-7.
_ROBERTSON_TOLS = {
    "Rosenbrock23": (1e-6, 1e-10, 1e-3),
    "Rodas4": (1e-8, 1e-12, 2e-6),
    "Rodas5P": (1e-8, 1e-12, 2e-6),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Rosenbrock23", marks=pytest.mark.slow),  # ~4 s, 663 steps
        # Rodas4 against closed forms in the default run: the order tests.
        pytest.param("Rodas4", marks=pytest.mark.slow),
        "Rodas5P",
    ],
)
def test_robertson(name):
    rtol, atol, bound = _ROBERTSON_TOLS[name]
    sol = dfx.diffeqsolve(
        dfx.ODETerm(robertson),
        SOLVERS[name],
        0.0,
        1e5,
        1e-6,
        jnp.array([1.0, 0.0, 0.0]),
        saveat=dfx.SaveAt(ts=jnp.array(_ROBERTSON_TS)),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=20_000,
    )
    assert sol.result == dfx.RESULTS.successful
    ys = np.asarray(sol.ys)
    ref = robertson_reference(_ROBERTSON_TS)
    relative = np.max(np.abs(ys - ref) / np.abs(ref))
    assert relative < bound, relative
    # Rosenbrock methods keep linear invariants: each stage solve maps a vector
    # orthogonal to (1, 1, 1) to one that is too.
    np.testing.assert_allclose(ys.sum(axis=1), 1.0, rtol=0, atol=1e-10)


_VDP_MU = 1000.0
_VDP_TS = np.linspace(0.0, 2.0, 9)[1:]


def _van_der_pol(t, y, args):
    return jnp.stack([y[1], _VDP_MU * ((1 - y[0] ** 2) * y[1] - y[0])])


def _van_der_pol_np(t, y):
    return [y[1], _VDP_MU * ((1 - y[0] ** 2) * y[1] - y[0])]


def _van_der_pol_jac_np(t, y):
    return [
        [0.0, 1.0],
        [_VDP_MU * (-2 * y[0] * y[1] - 1), _VDP_MU * (1 - y[0] ** 2)],
    ]


@functools.cache
def _van_der_pol_reference():
    # rtol = atol = 1e-10 agrees with 1e-12 to 6e-11 (relative) at every save time,
    # in a third of the time.
    ref = solve_ivp(
        _van_der_pol_np,
        (0.0, 2.0),
        [2.0, 0.0],
        method="Radau",
        rtol=1e-10,
        atol=1e-10,
        t_eval=_VDP_TS,
        jac=_van_der_pol_jac_np,
    )
    assert ref.success
    return ref.y.T


# (rtol, atol, bound on the relative error of every component at every save time).
# Measured: 2.2e-4, 8.3e-8, 1.5e-7.
_VDP_TOLS = {
    "Rosenbrock23": (1e-5, 1e-7, 2e-3),
    "Rodas4": (1e-7, 1e-9, 2e-6),
    "Rodas5P": (1e-7, 1e-9, 2e-6),
}


@pytest.mark.parametrize(
    "name",
    # Against Radau by default: test_robertson (Rodas5P).
    [
        pytest.param("Rosenbrock23", marks=pytest.mark.slow),
        pytest.param("Rodas4", marks=pytest.mark.slow),
        pytest.param("Rodas5P", marks=pytest.mark.slow),
    ],
)
def test_van_der_pol(name):
    # Over [0, 2] the solution relaxes onto the slow manifold, drifts along it, and
    # jumps across the fast dynamics twice (near t = 0.83 and t = 1.67).
    rtol, atol, bound = _VDP_TOLS[name]
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_van_der_pol),
        SOLVERS[name],
        0.0,
        2.0,
        1e-6,
        jnp.array([2.0, 0.0]),
        saveat=dfx.SaveAt(ts=_VDP_TS),
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=20_000,
    )
    assert sol.result == dfx.RESULTS.successful
    ref = _van_der_pol_reference()
    relative = np.max(np.abs(np.asarray(sol.ys) - ref) / np.abs(ref))
    assert relative < bound, relative


# --- Transformations, dtypes, PyTrees -----------------------------------------------


def _decay(t, y, args):
    # A stiff, nonlinear, non-autonomous problem with the stiffness as a parameter.
    return -args * (y - jnp.cos(t)) - jnp.sin(t) * jnp.sqrt(jnp.abs(y) + 1.0)


def _solve_decay(solver, rate, controller):
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_decay),
        solver,
        0.0,
        1.0,
        0.01,
        jnp.array([2.0, 0.5]),
        args=rate,
        stepsize_controller=controller,
        max_steps=1000,
    )
    return sol.ys[-1]


_ADAPTIVE = dfx.PIDController(rtol=1e-7, atol=1e-9)


@functools.cache
def _adaptive_decay(solver):
    return jax.jit(lambda rate: _solve_decay(solver, rate, _ADAPTIVE))


@pytest.mark.slow  # implicit solves under vmap: test_implicit.py (Kvaerno3)
def test_vmap_matches_loop():
    rates = jnp.array([1.0, 30.0, 1000.0])
    solve = _adaptive_decay(Rodas4())
    batched = jax.jit(jax.vmap(solve))(rates)
    looped = jnp.stack([solve(r) for r in rates])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-14)


def _check_grad(solver, controller, eps, rtol):
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda rate: jnp.sum(_solve_decay(solver, rate, controller) ** 2)
        )
    )
    rate = jnp.asarray(20.0)
    _, grad = value_and_grad(rate)
    plus, _ = value_and_grad(rate + eps)
    minus, _ = value_and_grad(rate - eps)
    fd = (float(plus) - float(minus)) / (2 * eps)
    assert float(grad) != 0
    np.testing.assert_allclose(float(grad), fd, rtol=rtol)


@pytest.mark.parametrize(
    "name",
    [
        "Rosenbrock23",
        pytest.param("Rodas4", marks=pytest.mark.slow),
        pytest.param("Rodas5P", marks=pytest.mark.slow),
    ],
)
def test_grad_matches_finite_differences(name):
    # Constant steps: the discrete solution is a smooth function of the parameter.
    _check_grad(SOLVERS[name], dfx.ConstantStepSize(), eps=1e-4, rtol=1e-7)


@pytest.mark.slow
def test_grad_adaptive():
    controller = dfx.PIDController(rtol=1e-9, atol=1e-11)
    _check_grad(Rodas4(), controller, eps=1e-3, rtol=1e-5)


# float32 states of implicit solvers by default: test_implicit.py::test_float32.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Rosenbrock23", "Rodas5P"])
def test_float32(name):
    f32 = jnp.float32
    ts = np.array([0.002, 0.005, 0.5, 1.0, 2.0])
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_stiff),
        SOLVERS[name],
        f32(0.0),
        f32(2.0),
        f32(0.01),
        jnp.array([2.0], dtype=f32),
        stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-6),
        saveat=dfx.SaveAt(ts=jnp.asarray(ts, dtype=f32)),
    )
    assert sol.result == dfx.RESULTS.successful
    assert sol.ys.dtype == f32
    exact = np.asarray(_stiff_exact(jnp.asarray(ts), 2.0))[:, None]
    np.testing.assert_allclose(np.asarray(sol.ys, np.float64), exact, atol=1e-3)


def _pytree_field(t, y, args):
    out = _oscillator(t, jnp.stack([y["position"], y["velocity"][0]]), args)
    return {"position": out[0], "velocity": out[1:]}


@pytest.mark.parametrize(
    "name", [pytest.param("Rosenbrock23", marks=pytest.mark.slow), "Rodas5P"]
)
def test_pytree_state(name):
    ts = jnp.linspace(0.0, 3.0, 7)
    t_mid = 1.234

    @jax.jit
    def solve(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_pytree_field),
            SOLVERS[name],
            0.0,
            3.0,
            0.1,
            y0,
            saveat=dfx.SaveAt(ts=ts, dense=True),
            stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-9),
        )
        return sol.ys, sol.evaluate(t_mid), sol.derivative(t_mid)

    ys, mid, mid_derivative = solve(
        {"position": jnp.asarray(1.0), "velocity": jnp.zeros(1)}
    )
    assert ys["position"].shape == (7,)
    assert ys["velocity"].shape == (7, 1)
    assert mid["velocity"].shape == (1,)
    exact = jax.vmap(_oscillator_exact)(ts)
    tol = 1e-4 if name == "Rosenbrock23" else 1e-6
    np.testing.assert_allclose(ys["position"], exact[:, 0], atol=tol)
    np.testing.assert_allclose(ys["velocity"][:, 0], exact[:, 1], atol=tol)
    exact_mid = _oscillator_exact(t_mid)
    np.testing.assert_allclose(mid["position"], exact_mid[0], atol=tol)
    np.testing.assert_allclose(mid["velocity"][0], exact_mid[1], atol=tol)
    # The derivative of the interpolant is the velocity.
    np.testing.assert_allclose(mid_derivative["position"], exact_mid[1], atol=100 * tol)


@pytest.mark.parametrize(
    "name", ["Rosenbrock23", pytest.param("Rodas4", marks=pytest.mark.slow)]
)
def test_backwards_in_time(name):
    # From the exact state at t = 10 back to t = 0, with the forward solve's
    # step size: an error of the same size.
    n = 128
    solve = _constant_step_solve(name, "oscillator")
    y = solve(_oscillator_exact(_OSC_T), jnp.asarray(_OSC_T), jnp.asarray(0.0), n)
    error = float(jnp.max(jnp.abs(y - _oscillator_exact(0.0))))
    forward = _errors(name, "oscillator", (n,))[0]
    assert error < 10 * forward, (error, forward)
    assert error > forward / 10, (error, forward)


def test_user_linear_solver():
    # Any lineax solver: QR instead of the default LU gives the same solution up to
    # rounding.
    n = 64
    default = _constant_step_solve("Rosenbrock23", "oscillator")(
        jnp.asarray(_OSC_Y0), jnp.asarray(0.0), jnp.asarray(_OSC_T), jnp.asarray(n)
    )
    qr = dfx.diffeqsolve(
        dfx.ODETerm(_oscillator),
        Rosenbrock23(linear_solver=lx.QR()),
        0.0,
        _OSC_T,
        _OSC_T / n,
        jnp.asarray(_OSC_Y0),
        stepsize_controller=dfx.ConstantStepSize(),
    )
    np.testing.assert_allclose(qr.ys[-1], default, rtol=1e-12)


# --- Failed steps -------------------------------------------------------------------


def test_singular_matrix_fails_the_step():
    # Rodas4 has gamma = 1/4: y' = 32 y with h = 1/8 makes I / gamma - h J exactly
    # singular, and a step that cannot be rejected ends the solve with that code.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: 32.0 * y),
        Rodas4(),
        0.0,
        1.0,
        0.125,
        jnp.array([1.0]),
        stepsize_controller=dfx.ConstantStepSize(),
        throw=False,
    )
    assert sol.result == dfx.RESULTS.singular


def _nan_above(t, y, args):
    return jnp.where(y > 1.5, jnp.nan, 0.5 * y)


def test_non_finite_vector_field_with_constant_steps():
    # The step into the NaN region cannot be rejected: the solve stops with a
    # failure rather than returning NaN as a success.
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_nan_above),
        Rosenbrock23(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0]),
        stepsize_controller=dfx.ConstantStepSize(),
        throw=False,
    )
    assert sol.result != dfx.RESULTS.successful


def test_non_finite_vector_field_is_rejected():
    # Adaptive steps: non-finite steps are rejected and the step size shrinks, until
    # the solve cannot continue (here the solution reaches the NaN region).
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_nan_above),
        Rodas5P(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0]),
        stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-8),
        throw=False,
        max_steps=200,
    )
    assert sol.result != dfx.RESULTS.successful
    assert sol.stats["num_rejected_steps"] > 0


def _heat(t, u, args):
    # 1-D diffusion with logistic growth: a tridiagonal Jacobian.
    padded = jnp.pad(u, 1)
    n = u.shape[0]
    return 0.1 * (padded[:-2] - 2 * u + padded[2:]) * (n + 1) ** 2 + u * (1 - u)


def _heat_tridiagonal(t, u, args):
    import lineax as lx

    n = u.shape[0]
    c = 0.1 * (n + 1) ** 2
    off = jnp.full(n - 1, c)
    return lx.TridiagonalLinearOperator(-2 * c + 1 - 2 * u, off, off)


def test_user_given_jacobian():
    import lineax as lx

    from _jaxpr import equations

    n = 30
    u0 = jnp.sin(jnp.pi * jnp.linspace(0.0, 1.0, n + 2)[1:-1])

    def solve(solver, t0=0.0, t1=0.5):
        def run(u0):
            return dfx.diffeqsolve(
                dfx.ODETerm(_heat),
                solver,
                t0,
                t1,
                1e-3 if t1 > t0 else -1e-3,
                u0,
                stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-9),
            ).ys[-1]

        return run

    auto = solve(dfx.Rodas5P())(u0)
    dense = dfx.Rodas5P(
        jacobian=lambda t, u, a: jax.jacfwd(lambda v: _heat(t, v, a))(u)
    )
    np.testing.assert_allclose(
        np.asarray(solve(dense)(u0)), np.asarray(auto), rtol=1e-12
    )
    banded = dfx.Rodas5P(jacobian=_heat_tridiagonal, linear_solver=lx.Tridiagonal())
    np.testing.assert_allclose(
        np.asarray(solve(banded)(u0)), np.asarray(auto), rtol=1e-10, atol=1e-12
    )
    shapes = {
        tuple(v.aval.shape) for eqn in equations(solve(banded), u0) for v in eqn.outvars
    }
    assert (n, n) not in shapes


def test_user_given_jacobian_at_the_true_time_backwards():
    # A time-dependent Jacobian: evaluated at the wrong time (the solve loop's
    # reversed time), Rodas5P's answer would change at its order of accuracy.
    def field(t, y, args):
        return jnp.sin(3 * t) * y + jnp.cos(t) * y**2

    def jacobian(t, y, args):
        return jnp.diag(jnp.sin(3 * t) + 2 * jnp.cos(t) * y)

    def solve(solver):
        return dfx.diffeqsolve(
            dfx.ODETerm(field),
            solver,
            2.0,
            0.0,
            -0.1,
            jnp.array([0.3, -0.2]),
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-10),
        ).ys[-1]

    np.testing.assert_allclose(
        np.asarray(solve(dfx.Rodas5P(jacobian=jacobian))),
        np.asarray(solve(dfx.Rodas5P())),
        rtol=1e-12,
    )


def test_user_given_jacobian_errors():
    y0 = jnp.ones(3)
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -y),
            dfx.Rodas5P(jacobian=lambda t, y, a: jnp.eye(2)),
            0.0,
            1.0,
            0.1,
            y0,
        )
    with pytest.raises(ValueError, match="must be an `ODETerm`"):
        dfx.diffeqsolve(
            dfx.MultiTerm(dfx.ODETerm(lambda t, y, a: -y)),
            dfx.Rodas5P(jacobian=lambda t, y, a: -jnp.eye(3)),
            0.0,
            1.0,
            0.1,
            y0,
        )

"""Controlled differential equations: `ControlTerm`, `WeaklyDiagonalControlTerm`,
`to_ode()`, with every explicit solver, `MultiTerm`, vmap and gradients.

Truth: closed forms. For `dy = y (a . dX)` driven by any path `X`,
`y(t) = y(t0) exp(a . (X(t) - X(t0)))`; a constant vector field gives
`y(t) = y(t0) + A (X(t) - X(t0))` exactly. Otherwise central finite differences in
float64, and a Python loop for vmap.
"""

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import diffeqx as dfx

TS = jnp.linspace(0.0, 2.0, 21)
XS = jnp.stack([TS, jnp.sin(3 * TS), jnp.cos(2 * TS) - TS**2 / 4], axis=-1)
WEIGHTS = jnp.array([0.3, -0.5, 0.8])
Y0 = jnp.array([1.0, 2.0])


def _cubic(ts=TS, xs=XS):
    return dfx.CubicInterpolation(ts, dfx.backward_hermite_coefficients(ts, xs))


def _exponential_field(t, y, weights):
    # dy = y (weights . dX): a (state, control) matrix of rank one.
    return y[:, None] * weights[None, :]


def _closed_form(control, t0, t1, y0=Y0, weights=WEIGHTS):
    return y0 * jnp.exp(weights @ control.evaluate(t0, t1))


def _solve(term, solver=None, t0=0.0, t1=2.0, dt0=0.01, y0=Y0, args=WEIGHTS, **kwargs):
    kwargs.setdefault("stepsize_controller", dfx.PIDController(rtol=1e-10, atol=1e-10))
    sol = dfx.diffeqsolve(
        term, solver or dfx.Tsit5(), t0, t1, dt0, y0, args, max_steps=4096, **kwargs
    )
    return sol.ys[-1]


# ---------------------------------------------------------------------------------------
# Against closed forms
# ---------------------------------------------------------------------------------------


def test_cde_driven_by_a_cubic_path_matches_the_closed_form():
    control = _cubic()
    y1 = _solve(dfx.ControlTerm(_exponential_field, control))
    np.testing.assert_allclose(y1, _closed_form(control, 0.0, 2.0), rtol=1e-8)


def test_cde_driven_by_a_linear_path_matches_the_closed_form_with_jump_ts():
    control = dfx.LinearInterpolation(TS, XS)
    controller = dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-10, atol=1e-10), jump_ts=TS
    )
    y1 = _solve(
        dfx.ControlTerm(_exponential_field, control), stepsize_controller=controller
    )
    np.testing.assert_allclose(y1, _closed_form(control, 0.0, 2.0), rtol=1e-8)


def test_constant_vector_field_gives_the_increment_exactly_in_one_euler_step():
    matrix = jnp.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    control = _cubic()
    term = dfx.ControlTerm(lambda t, y, args: matrix, control)
    sol = dfx.diffeqsolve(term, dfx.Euler(), 0.3, 1.7, 1.4, Y0)
    np.testing.assert_allclose(
        sol.ys[-1], Y0 + matrix @ control.evaluate(0.3, 1.7), rtol=1e-14
    )


def test_cde_solved_backwards_in_time_matches_the_closed_form():
    control = _cubic()
    y1 = _solve(dfx.ControlTerm(_exponential_field, control), t0=2.0, t1=0.5, dt0=-0.01)
    np.testing.assert_allclose(y1, _closed_form(control, 2.0, 0.5), rtol=1e-8)


SOLVERS = [
    (dfx.Euler(), 1),
    (dfx.Heun(), 2),
    (dfx.Midpoint(), 2),
    (dfx.Ralston(), 2),
    (dfx.Bosh3(), 3),
    (dfx.Tsit5(), 5),
    (dfx.Dopri5(), 5),
    (dfx.Dopri8(), 8),
]
# A first-order and two high-order solvers in the default run (every solver's own
# order on ODEs is tested in test_convergence.py); the others carry the `slow` marker.
_DEFAULT_SOLVERS = ("Euler", "Tsit5", "Dopri8")


@pytest.mark.parametrize(
    "solver, order",
    [
        pytest.param(
            solver,
            order,
            id=type(solver).__name__,
            marks=()
            if type(solver).__name__ in _DEFAULT_SOLVERS
            else (pytest.mark.slow,),
        )
        for solver, order in SOLVERS
    ],
)
def test_every_explicit_solver_converges_on_a_cde_and_a_multiterm(solver, order):
    # A linear control with steps on its knots: within each step the CDE is an ODE,
    # so each solver converges at its own order.
    control = dfx.LinearInterpolation(TS, XS)
    decay = 0.7
    cde = dfx.ControlTerm(_exponential_field, control)
    drift = dfx.ODETerm(lambda t, y, args: -decay * y)

    @jax.jit
    def errors(dt0):
        step_to = dfx.ConstantStepSize()
        out = []
        for term, extra in ((cde, 0.0), (dfx.MultiTerm(drift, cde), -decay * 2.0)):
            y1 = _solve(term, solver, dt0=dt0, stepsize_controller=step_to)
            exact = Y0 * jnp.exp(WEIGHTS @ control.evaluate(0.0, 2.0) + extra)
            out.append(jnp.max(jnp.abs(y1 - exact)))
        return jnp.stack(out)

    coarse, fine = errors(0.1 / 2), errors(0.1 / 4)
    if order <= 3:
        observed = np.log2(np.asarray(coarse) / np.asarray(fine))
        np.testing.assert_allclose(observed, order, atol=0.25)
    else:
        assert float(jnp.max(fine)) < 1e-7 * 10 ** (5 - order), (coarse, fine)


def test_weakly_diagonal_control_term_matches_the_closed_form():
    control = _cubic(xs=XS[:, :2])
    term = dfx.WeaklyDiagonalControlTerm(lambda t, y, args: y, control)
    y1 = _solve(term)
    np.testing.assert_allclose(y1, Y0 * jnp.exp(control.evaluate(0.0, 2.0)), rtol=1e-8)
    assert not term.is_vf_expensive(0.0, 1.0, Y0, None)


def test_control_given_as_a_function_of_two_times():
    # X(t) = (sin t, t^2): increments given directly.
    path = lambda t: jnp.stack([jnp.sin(t), t**2])
    term = dfx.ControlTerm(
        lambda t, y, args: y[:, None] * jnp.array([[1.0, -0.5]]),
        lambda t0, t1: path(t1) - path(t0),
    )
    y1 = _solve(term, t1=1.3)
    exact = Y0 * jnp.exp(jnp.array([1.0, -0.5]) @ (path(1.3) - path(0.0)))
    np.testing.assert_allclose(y1, exact, rtol=1e-8)


def test_vector_field_may_return_a_lineax_operator():
    control = _cubic(xs=XS[:, :2])
    diagonal = dfx.ControlTerm(lambda t, y, args: lx.DiagonalLinearOperator(y), control)
    weakly = dfx.WeaklyDiagonalControlTerm(lambda t, y, args: y, control)
    np.testing.assert_allclose(_solve(diagonal), _solve(weakly), rtol=1e-12)


def test_pytree_state_with_one_shared_control():
    control = _cubic()
    y0 = {"a": jnp.array([1.0, 2.0]), "b": jnp.asarray(0.5)}

    def field(t, y, weights):
        return {"a": y["a"][:, None] * weights[None, :], "b": y["b"] * -weights}

    sol = dfx.diffeqsolve(
        dfx.ControlTerm(field, control),
        dfx.Tsit5(),
        0.0,
        2.0,
        0.01,
        y0,
        WEIGHTS,
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
    )
    increment = WEIGHTS @ control.evaluate(0.0, 2.0)
    np.testing.assert_allclose(sol.ys["a"][-1], y0["a"] * jnp.exp(increment), rtol=1e-8)
    np.testing.assert_allclose(sol.ys["b"][-1], 0.5 * jnp.exp(-increment), rtol=1e-8)


def test_control_term_vf_prod_is_the_product_of_vf_and_the_control():
    # As Diffrax's: not "expensive", so first-same-as-last methods carry the matrix.
    term = dfx.ControlTerm(_exponential_field, _cubic())
    assert not term.is_vf_expensive(0.0, 1.0, Y0, WEIGHTS)
    np.testing.assert_allclose(
        term.vf_prod(0.5, Y0, WEIGHTS, term.contr(0.5, 0.7)),
        term.prod(term.vf(0.5, Y0, WEIGHTS), term.contr(0.5, 0.7)),
    )


# ---------------------------------------------------------------------------------------
# to_ode
# ---------------------------------------------------------------------------------------


def test_cde_solve_equals_the_ode_solve_of_to_ode():
    control = _cubic()
    term = dfx.ControlTerm(
        lambda t, y, args: jnp.tanh(y)[:, None] * args[None, :], control
    )
    ode = term.to_ode()
    assert isinstance(ode, dfx.ODETerm)
    t = 0.77
    np.testing.assert_allclose(
        ode.vf(t, Y0, WEIGHTS),
        term.vf(t, Y0, WEIGHTS) @ control.derivative(t),
        rtol=1e-14,
    )
    # Both solves at tolerance 1e-10; the Hermite path's second derivative jumps at
    # its knots, which costs the ODE solve some accuracy there.
    y_cde, y_ode = _solve(term), _solve(ode)
    np.testing.assert_allclose(y_cde, y_ode, rtol=1e-7)
    exponential = dfx.ControlTerm(_exponential_field, control).to_ode()
    exact = _closed_form(control, 0.0, 2.0)
    np.testing.assert_allclose(_solve(exponential), exact, rtol=1e-7)


def test_cde_solves_converge_to_the_to_ode_solution_at_second_order():
    # With a general (non-commuting) field the solution depends on the path within
    # each step, which a step of a CDE solve replaces by its chord: the CDE solve
    # converges to the true solution (here the to_ode solve at a tight tolerance) at
    # second order, whatever the Runge–Kutta method.
    control = _cubic()
    term = dfx.ControlTerm(_field, control)
    controller = dfx.ClipStepSizeController(
        dfx.PIDController(rtol=1e-12, atol=1e-12), jump_ts=TS
    )
    exact = _solve(term.to_ode(), args=PARAMS, stepsize_controller=controller)

    @jax.jit
    def error(dt0):
        y1 = _solve(
            term, dt0=dt0, args=PARAMS, stepsize_controller=dfx.ConstantStepSize()
        )
        return jnp.max(jnp.abs(y1 - exact))

    errors = np.array([error(2.0 / n) for n in (100, 200)])
    assert abs(np.log2(errors[0] / errors[1]) - 2) < 0.3, errors
    assert errors[1] < 1e-3


def test_to_ode_of_a_weakly_diagonal_term_multiplies_by_the_derivative():
    control = _cubic(xs=XS[:, :2])
    term = dfx.WeaklyDiagonalControlTerm(lambda t, y, args: jnp.sin(y), control)
    np.testing.assert_allclose(
        term.to_ode().vf(0.4, Y0, None), jnp.sin(Y0) * control.derivative(0.4)
    )
    # The two solves differ by discretisation (the steps cross the spline's knots):
    # 1.3e-7 relative here, in Diffrax too.
    np.testing.assert_allclose(_solve(term), _solve(term.to_ode()), rtol=5e-7)


# ---------------------------------------------------------------------------------------
# vmap and gradients
# ---------------------------------------------------------------------------------------


def _batch(size=6):
    key_ts, key_xs = jax.random.split(jax.random.key(0))
    gaps = jax.random.uniform(key_ts, (size, 15), minval=0.05, maxval=0.2)
    ts = jnp.concatenate([jnp.zeros((size, 1)), jnp.cumsum(gaps, axis=1)], axis=1)
    xs = jax.random.normal(key_xs, (size, 16, 3))
    return ts, xs


def _field(t, h, params):
    matrix, bias = params
    return jnp.tanh((matrix @ h + bias).reshape(2, 3))


def _readout(ts, xs, params):
    """A small neural CDE: the final state of `dh = tanh(W h + b) dX`, in 64 fixed
    steps. (With adaptive steps the result would jump, at the size of the solver's
    error, whenever the accepted steps change: the error estimate of a Runge–Kutta
    method only sees each step's control increment, not the path within the step.)"""
    sol = dfx.diffeqsolve(
        dfx.ControlTerm(_field, _cubic(ts, xs)),
        dfx.Tsit5(),
        ts[0],
        ts[-1],
        (ts[-1] - ts[0]) / 64,
        Y0,
        params,
    )
    return sol.ys[-1]


PARAMS = (
    jnp.array(
        [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.2, 0.1], [0.0, -0.3], [0.6, 0.2]]
    ),
    jnp.array([0.1, -0.1, 0.2, 0.0, 0.3, -0.2]),
)


def test_cde_solve_under_vmap_equals_a_loop_over_the_batch():
    ts, xs = _batch()
    batched = jax.jit(jax.vmap(_readout, in_axes=(0, 0, None)))(ts, xs, PARAMS)
    single = jax.jit(_readout)
    for i in range(ts.shape[0]):
        np.testing.assert_allclose(batched[i], single(ts[i], xs[i], PARAMS), rtol=1e-12)


def _fd_grad(fn, x, h=1e-6):
    x = np.asarray(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = h
        plus, minus = float(fn(jnp.asarray(x + step))), float(fn(jnp.asarray(x - step)))
        grad[index] = (plus - minus) / (2 * h)
    return grad


def test_gradients_wrt_field_parameters_and_data_match_finite_differences():
    ts, xs = _batch(1)
    ts, xs = ts[0], xs[0]
    weights = jnp.array([1.0, -2.0])
    # One compilation serves both: the finite differences read the value half.
    value_and_grad = jax.jit(
        jax.value_and_grad(
            lambda ts, xs, params: weights @ _readout(ts, xs, params), argnums=(1, 2)
        )
    )

    def loss(ts, xs, params):
        return value_and_grad(ts, xs, params)[0]

    grad_xs, grad_params = value_and_grad(ts, xs, PARAMS)[1]
    for i, leaf in enumerate(PARAMS):

        def in_leaf(value, i=i):
            params = tuple(value if j == i else p for j, p in enumerate(PARAMS))
            return loss(ts, xs, params)

        np.testing.assert_allclose(
            grad_params[i], _fd_grad(in_leaf, leaf), rtol=1e-5, atol=1e-8
        )
    # Data: a few entries, at the start, in the middle and at the end.
    entries = [(0, 1), (7, 0), (7, 2), (15, 1)]
    for index in entries:

        def in_entry(value, index=index):
            return loss(ts, xs.at[index].set(value), PARAMS)

        fd = _fd_grad(in_entry, xs[index])
        np.testing.assert_allclose(grad_xs[index], fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------


def test_wrongly_shaped_vector_field_names_all_shapes():
    term = dfx.ControlTerm(lambda t, y, args: jnp.ones((2, 2)), _cubic())
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\).*\(2, 3\).*\(2, 2\)"):
        dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, 1.0, 0.1, Y0)


def test_transposed_vector_field_is_pointed_out():
    term = dfx.ControlTerm(lambda t, y, args: jnp.ones((3, 2)), _cubic())
    with pytest.raises(ValueError, match="transposed"):
        term.vf_prod(0.0, Y0, None, term.contr(0.0, 0.5))
    with pytest.raises(ValueError, match=r"\(2, 3, 2\).*\(3,\)"):
        term.prod(jnp.ones((2, 3, 2)), jnp.ones(3))


def test_weakly_diagonal_term_refuses_a_matrix():
    term = dfx.WeaklyDiagonalControlTerm(lambda t, y, args: jnp.ones((2, 2)), _cubic())
    with pytest.raises(ValueError, match=r"\(2,\).*\(2, 2\).*ControlTerm"):
        term.vf_prod(0.0, Y0, None, jnp.ones(2))


def test_control_must_be_a_path_or_a_function():
    with pytest.raises(TypeError, match="AbstractPath"):
        dfx.ControlTerm(_exponential_field, jnp.ones((10, 3)))
    with pytest.raises(TypeError, match="callable"):
        dfx.ControlTerm(jnp.ones((2, 3)), _cubic())


def test_to_ode_needs_a_control_with_a_derivative():
    term = dfx.ControlTerm(_exponential_field, lambda t0, t1: jnp.ones(3) * (t1 - t0))
    with pytest.raises(ValueError, match="no derivative"):
        term.to_ode().vf(0.0, Y0, WEIGHTS)


def test_a_batch_of_paths_as_control_is_refused_outside_vmap():
    ts, xs = _batch(4)
    paths = jax.vmap(_cubic)(ts, xs)
    term = dfx.ControlTerm(_exponential_field, paths)
    with pytest.raises(ValueError, match=r"batch of paths.*jax\.vmap"):
        dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, 1.0, 0.1, Y0, WEIGHTS)

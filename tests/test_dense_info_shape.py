"""The shapes of an explicit Runge–Kutta step's dense output information, which a
solve needs before its loop (dense output, events, saves deferred under reverse
mode), come from `AbstractERK._dense_info_shape` without tracing the step: they must
be exactly what tracing the step gives, for every term and state a solve accepts."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffeqx as dfx
from diffeqx._solve.setup import _dense_info_shape
from diffeqx._solver.runge_kutta import AbstractERK

_SOLVERS = {
    "Tsit5": dfx.Tsit5(),
    "Dopri5": dfx.Dopri5(),
    "Dopri8": dfx.Dopri8(),
    "Bosh3": dfx.Bosh3(),
    "Heun": dfx.Heun(),
    "Midpoint": dfx.Midpoint(),
    "Ralston": dfx.Ralston(),
    "Tsit5-loop": dfx.Tsit5(scan_stages=True),
    "Tsit5-unrolled": dfx.Tsit5(scan_stages=False),
}


def _problem(kind):
    """`(terms, y0)` of each kind of term and state."""
    if kind == "ode":
        return dfx.ODETerm(lambda t, y, args: -y * args), jnp.array([1.0, 2.0])
    if kind == "float32":
        y0 = jnp.array([1.0, 2.0, 3.0], jnp.float32)
        return dfx.ODETerm(lambda t, y, args: -y), y0
    if kind == "weak":
        # A weakly typed scalar state.
        return dfx.ODETerm(lambda t, y, args: -y), jnp.asarray(1.5)
    if kind == "tree":
        y0 = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((2, 2))}
        field = lambda t, y, args: {"a": -y["a"], "b": y["b"] @ y["b"]}  # noqa: E731
        return dfx.ODETerm(field), y0
    if kind == "cde":
        ts = jnp.linspace(0.0, 1.0, 5)
        path = dfx.LinearInterpolation(ts, jnp.stack([ts, ts**2], axis=-1))
        field = lambda t, y, args: jnp.tanh(y)[:, None] * jnp.ones((3, 2))  # noqa: E731
        return dfx.ControlTerm(field, path), jnp.array([0.1, 0.2, 0.3])
    if kind == "multi":
        terms = dfx.MultiTerm(
            dfx.ODETerm(lambda t, y, args: -y), dfx.ODETerm(lambda t, y, args: y**2)
        )
        return terms, jnp.array([0.5, 0.25])
    raise ValueError(kind)


def _by_tracing(solver, terms, t0, t1, y0, args):
    state = solver.init(terms, t0, t1, y0, args)
    return eqx.filter_eval_shape(
        lambda: solver.step(terms, t0, t1, y0, args, state, jnp.asarray(False))[2]
    )


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a.shape, a.dtype, a.weak_type) == (b.shape, b.dtype, b.weak_type), (
            a,
            b,
        )


@pytest.mark.parametrize("kind", ["ode", "float32", "weak", "tree", "cde", "multi"])
@pytest.mark.parametrize("name", list(_SOLVERS))
def test_dense_info_shape_is_the_traced_steps(name, kind):
    solver = _SOLVERS[name]
    terms, y0 = _problem(kind)
    t0, t1, args = jnp.asarray(0.0), jnp.asarray(0.1), jnp.asarray(2.0)
    assert isinstance(solver, AbstractERK)
    got = _dense_info_shape(solver, terms, t0, t1, y0, args, None, None)
    _assert_same(got, _by_tracing(solver, terms, t0, t1, y0, args))


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_dense_info_shape_under_transformations(transform):
    """Under `jax.vmap` and `jax.grad` the step takes other paths (elementwise
    stage sums, stages compiled unrolled): the shapes are still the traced step's."""
    solver = dfx.Tsit5()
    terms, _ = _problem("ode")
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.1)
    checked = []

    def check(y0, args):
        got = _dense_info_shape(solver, terms, t0, t1, y0, args, None, None)
        _assert_same(got, _by_tracing(solver, terms, t0, t1, y0, args))
        checked.append(True)
        return jnp.sum(y0 * args)

    y0 = jnp.array([1.0, 2.0])
    if transform == "vmap":
        jax.vmap(check, in_axes=(0, None))(jnp.stack([y0, y0]), jnp.asarray(2.0))
    else:
        jax.grad(check, argnums=1)(y0, jnp.asarray(2.0))
    assert checked


def test_a_solver_with_its_own_step_is_traced():
    """A subclass overriding `step` may return other information: its shapes come
    from tracing its step."""

    class Scaled(dfx.Tsit5):
        def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
            y1, error, info, state, result = super().step(
                terms, t0, t1, y0, args, solver_state, made_jump
            )
            return y1, error, dict(info, extra=jnp.zeros(7)), state, result

    terms, y0 = _problem("ode")
    t0, t1, args = jnp.asarray(0.0), jnp.asarray(0.1), jnp.asarray(2.0)
    solver = Scaled()
    got = _dense_info_shape(
        solver,
        terms,
        t0,
        t1,
        y0,
        args,
        solver.init(terms, t0, t1, y0, args),
        jnp.asarray(False),
    )
    assert got["extra"].shape == (7,)


def _decay(**kwargs):
    """`y' = -y` from `[1, 3]` over `[0, 2]`, tightly."""
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        2.0,
        0.1,
        jnp.array([1.0, 3.0]),
        stepsize_controller=dfx.PIDController(rtol=1e-10, atol=1e-10),
        **kwargs,
    )


def test_dense_output_and_events_run_with_the_shapes():
    """End to end: dense output and a located event, values against the closed
    form of `y' = -y`."""
    sol = _decay(saveat=dfx.SaveAt(dense=True))
    np.testing.assert_allclose(
        sol.evaluate(1.3), np.exp(-1.3) * np.array([1, 3]), rtol=1e-8
    )
    event = dfx.Event(
        lambda t, y, args, **kw: y[0] - 0.5,
        root_finder=optx.Newton(rtol=1e-12, atol=1e-12),
    )
    sol = _decay(event=event)
    np.testing.assert_allclose(sol.ts[-1], np.log(2.0), rtol=1e-8)

"""A solve inside a traced function is traced as a nested `jax.jit`: when the
enclosing function is traced again with the solve's inputs unchanged, the solve is
not traced again; what the solve reads of the transformations around it (which
derivatives, the batch size, which inputs `jax.vmap` maps) and its static inputs
(Python-number times) are part of the key, so a different one traces anew."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from diffeqx._solve import setup as solve_setup

_traced = []


def _decay(t, y, args):
    _traced.append(None)  # one entry per trace of the vector field
    return -args * y


def _final(y0, rate, t1=1.0, controller=None):
    controller = controller or dfx.PIDController(rtol=1e-10, atol=1e-12)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_decay),
        dfx.Tsit5(),
        0.0,
        t1,
        0.05,
        y0,
        args=rate,
        stepsize_controller=controller,
    )
    return sol.ys[-1]


def test_enclosing_function_traced_again_does_not_trace_the_solve_again():
    outer_traces = []

    @eqx.filter_jit
    def step(rate, y0, counter):
        outer_traces.append(None)
        loss = lambda r: jnp.sum(_final(y0, r) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(rate), counter + 1

    rate, y0 = jnp.asarray(0.7), jnp.array([1.0, 2.0])
    _traced.clear()
    (value, grad), counter = step(rate, y0, 0)
    first = len(_traced)
    assert first > 0
    # The counter turns from a Python int into an array: `step` is traced again.
    (value_again, grad_again), _ = step(rate, y0, counter)
    assert len(outer_traces) == 2
    assert len(_traced) == first, "the solve was traced again"
    np.testing.assert_array_equal(value_again, value)
    np.testing.assert_array_equal(grad_again, grad)
    # Against the closed form: sum(y0^2) exp(-2 r) and its derivative.
    np.testing.assert_allclose(value, 5.0 * np.exp(-1.4), rtol=1e-9)
    np.testing.assert_allclose(grad, -10.0 * np.exp(-1.4), rtol=1e-8)


def test_each_transformation_traces_its_own_solve():
    # Reusing the trace made without derivatives under `jax.grad` would
    # differentiate a loop that reverse mode cannot go through; each of these
    # programs gets a trace of its own, and the right answer.
    y0, rate = jnp.array([1.0, 2.0]), jnp.asarray(0.5)
    exact = np.exp(-0.5)
    np.testing.assert_allclose(jax.jit(_final)(y0, rate), y0 * exact, rtol=1e-9)
    grad = jax.jit(jax.grad(lambda r: jnp.sum(_final(y0, r))))(rate)
    np.testing.assert_allclose(grad, -3.0 * exact, rtol=1e-8)
    tangent = jax.jit(lambda r: jax.jvp(lambda s: _final(y0, s), (r,), (1.0,)))(rate)
    np.testing.assert_allclose(tangent[1], -y0 * exact, rtol=1e-8)
    hessian = jax.jit(jax.hessian(lambda r: jnp.sum(_final(y0, r))))(rate)
    np.testing.assert_allclose(hessian, 3.0 * exact, rtol=1e-7)
    batched = jax.jit(jax.vmap(_final, in_axes=(None, 0)))(y0, jnp.array([0.5, 1.0]))
    np.testing.assert_allclose(batched, np.outer(np.exp([-0.5, -1.0]), y0), rtol=1e-9)


def test_batch_size_and_mapped_inputs_are_part_of_the_key(monkeypatch):
    # Which inputs `jax.vmap` maps decides how the loop is batched (its condition
    # reduced over the members when the state, field, `args` or times are mapped,
    # and which of its values start mapped): a program mapping other inputs with
    # the same shapes traces the solve anew.
    decisions = []
    original = solve_setup.batched_leaf

    def spy(tree, **options):
        found = original(tree, **options)
        decisions.append(found is not None)
        return found

    monkeypatch.setattr(solve_setup, "batched_leaf", spy)
    y0s = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    rates = jnp.array([0.5, 1.0])
    over_state = jax.jit(jax.vmap(_final, in_axes=(0, None, None)))
    over_rate = jax.jit(jax.vmap(_final, in_axes=(None, 0, None)))
    over_end = jax.jit(jax.vmap(_final, in_axes=(None, None, 0)))

    out = over_state(y0s, jnp.asarray(0.5), jnp.asarray(1.0))
    assert decisions[0] is True
    np.testing.assert_allclose(out, y0s * np.exp(-0.5), rtol=1e-9)
    decisions.clear()
    out = over_rate(y0s[0], rates, jnp.asarray(1.0))
    assert decisions and decisions[0] is True
    np.testing.assert_allclose(out, np.outer(np.exp(-rates), y0s[0]), rtol=1e-9)
    decisions.clear()
    # Only the end time mapped: traced anew (the loop's condition is mapped through
    # each member's end).
    ends = jnp.array([1.0, 2.0])
    out = over_end(y0s[0], jnp.asarray(0.5), ends)
    assert decisions and decisions[0] is True
    np.testing.assert_allclose(out, np.outer(np.exp(-0.5 * ends), y0s[0]), rtol=1e-9)
    # A larger batch traces anew (the solve reads the batch size).
    decisions.clear()
    out = over_state(jnp.tile(y0s, (3, 1)), jnp.asarray(0.5), jnp.asarray(1.0))
    assert decisions
    np.testing.assert_allclose(out, jnp.tile(y0s, (3, 1)) * np.exp(-0.5), rtol=1e-9)


@pytest.mark.parametrize("controller", ["adaptive", "constant"])
def test_python_number_times_are_part_of_the_key(controller):
    controller = (
        dfx.ConstantStepSize()
        if controller == "constant"
        else dfx.PIDController(rtol=1e-10, atol=1e-12)
    )
    y0, rate = jnp.array([1.0, 2.0]), jnp.asarray(0.5)
    tolerance = 1e-9 if isinstance(controller, dfx.PIDController) else 1e-6
    for t1 in (1.0, 2.0, -0.0):
        out = jax.jit(lambda y, r: _final(y, r, t1, controller))(y0, rate)  # noqa: B023
        np.testing.assert_allclose(out, y0 * np.exp(-0.5 * t1), rtol=tolerance)


def test_fields_closing_over_tracers_are_traced_with_their_own_values():
    # A new function (closing over the enclosing function's tracer) each time the
    # enclosing function is traced: never a trace made for another.
    def solve(k, y0):
        term = dfx.ODETerm(lambda t, y, args: -k * y)
        sol = dfx.diffeqsolve(term, dfx.Tsit5(), 0.0, 1.0, 0.01, y0)
        return sol.ys[-1]

    y0 = jnp.array([1.0, 2.0])
    for k in (0.5, 1.5):
        np.testing.assert_allclose(
            jax.jit(solve)(jnp.asarray(k), y0), y0 * np.exp(-k), rtol=1e-9
        )
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda k: jnp.sum(solve(k, y0))))(jnp.asarray(0.5)),
        -3.0 * np.exp(-0.5),
        rtol=1e-8,
    )

"""`SemiImplicitEuler` and `LeapfrogMidpoint` against closed forms: the quantity the
semi-implicit Euler map conserves exactly, the leapfrog recurrence step by step,
transformations (`jit`, `vmap`, `grad` against finite differences), PyTree parts,
float32, resuming, `made_jump`, and the errors for what they cannot do. (Their
convergence orders are in test_convergence.py; the same calls through Diffrax in
tests/compat/test_partitioned.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx

# The harmonic oscillator q' = p, p' = -q, split as the semi-implicit Euler method
# takes it: the position driven by the momentum, the momentum by the position.
OSCILLATOR = (
    dfx.ODETerm(lambda t, p, args: p),
    dfx.ODETerm(lambda t, q, args: -q),
)


def test_semi_implicit_euler_conserves_its_modified_energy_exactly():
    # For q1 = q + h p, p1 = p - h q1, the quantity q² + p² + h q p is invariant (a
    # line of algebra); the energy q² + p² itself then stays within O(h) of its
    # start for ever. Explicit Euler's energy grows by (1 + h²) every step.
    h, n = 0.1, 5000
    sol = dfx.diffeqsolve(
        OSCILLATOR,
        dfx.SemiImplicitEuler(),
        0.0,
        n * h,
        h,
        (jnp.asarray(1.0), jnp.asarray(0.0)),
        saveat=dfx.SaveAt(steps=True),
        max_steps=n,
    )
    q, p = (np.asarray(x) for x in sol.ys)
    modified = q**2 + p**2 + h * q * p
    np.testing.assert_allclose(modified, 1.0, rtol=1e-11)
    energy = q**2 + p**2
    assert np.max(np.abs(energy - 1.0)) < 1.1 * h
    euler = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]])),
        dfx.Euler(),
        0.0,
        n * h,
        h,
        jnp.asarray([1.0, 0.0]),
        max_steps=n,
    )
    np.testing.assert_allclose(
        np.sum(np.asarray(euler.ys[-1]) ** 2), (1 + h**2) ** n, rtol=1e-9
    )


def test_semi_implicit_euler_steps_each_part_from_the_other():
    # One step, by hand: the first part moves with the second's old value, the
    # second with the first's new value; both vector fields at the step's start.
    terms = (
        dfx.ODETerm(lambda t, y2, args: args * y2 + t),
        dfx.ODETerm(lambda t, y1, args: jnp.sin(y1) - t),
    )
    t0, t1, a = 0.3, 0.55, 1.7
    y1_0, y2_0 = 0.4, -1.2
    sol = dfx.diffeqsolve(
        terms, dfx.SemiImplicitEuler(), t0, t1, t1 - t0, (y1_0, y2_0), a
    )
    h = t1 - t0
    y1_1 = y1_0 + h * (a * y2_0 + t0)
    y2_1 = y2_0 + h * (np.sin(y1_1) - t0)
    np.testing.assert_allclose(sol.ys[0][-1], y1_1, rtol=1e-14)
    np.testing.assert_allclose(sol.ys[1][-1], y2_1, rtol=1e-14)


def test_semi_implicit_euler_takes_pytree_parts_under_jit_vmap_and_float32():
    # Positions and momenta as dicts (a 2-D oscillator with two frequencies), a
    # batch of initial conditions, float32; each member equals its own solve, and
    # the modified energy of each coordinate is conserved.
    h, n = 0.05, 200
    omega = {"x": jnp.asarray(1.0, jnp.float32), "y": jnp.asarray(2.0, jnp.float32)}
    terms = (
        dfx.ODETerm(lambda t, p, args: p),
        dfx.ODETerm(lambda t, q, args: jax.tree.map(lambda w, x: -(w**2) * x, args, q)),
    )

    def final(q0):
        y0 = ({"x": q0, "y": 0.5 * q0}, {"x": jnp.zeros_like(q0), "y": q0})
        sol = dfx.diffeqsolve(
            terms,
            dfx.SemiImplicitEuler(),
            jnp.asarray(0.0, jnp.float32),
            jnp.asarray(n * h, jnp.float32),
            jnp.asarray(h, jnp.float32),
            y0,
            omega,
        )
        return jax.tree.map(lambda ys: ys[-1], sol.ys)

    q0s = jnp.asarray([1.0, -0.5, 2.0], jnp.float32)
    batched = jax.jit(jax.vmap(final))(q0s)
    for i, q0 in enumerate(q0s):
        single = final(q0)
        for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
            assert b.dtype == jnp.float32
            np.testing.assert_allclose(b[i], s, rtol=1e-6, atol=1e-6)
    (q, p) = batched
    for name, q_start, p_start in (("x", q0s, 0 * q0s), ("y", 0.5 * q0s, q0s)):
        w = float(omega[name])
        # In the scaled variables (w q, p) the map is the unit-frequency one with
        # step w h.
        start = (w * q_start) ** 2 + p_start**2 + w * h * (w * q_start) * p_start
        end = (w * q[name]) ** 2 + p[name] ** 2 + w * h * (w * q[name]) * p[name]
        np.testing.assert_allclose(end, start, rtol=2e-4)


def test_semi_implicit_euler_gradient_matches_finite_differences():
    def loss(params):
        k, q0 = params
        terms = (
            dfx.ODETerm(lambda t, p, args: p),
            dfx.ODETerm(lambda t, q, args: -args * jnp.sin(q)),
        )
        sol = dfx.diffeqsolve(
            terms, dfx.SemiImplicitEuler(), 0.0, 3.0, 0.05, (q0, jnp.asarray(0.0)), k
        )
        return sol.ys[0][-1] ** 2 + sol.ys[1][-1]

    params = (jnp.asarray(1.3), jnp.asarray(0.8))
    grads = jax.jit(jax.grad(loss))(params)
    eps = 1e-6
    for i in range(2):
        up = tuple(x + eps if j == i else x for j, x in enumerate(params))
        down = tuple(x - eps if j == i else x for j, x in enumerate(params))
        fd = (loss(up) - loss(down)) / (2 * eps)
        np.testing.assert_allclose(grads[i], fd, rtol=1e-6)


def _leapfrog_by_hand(f, ts, y0):
    """y_{n+1} = y_{n-1} + (t_{n+1} - t_{n-1}) f(t_n, y_n), started by one Euler
    step."""
    ys = [y0, y0 + (ts[1] - ts[0]) * f(ts[0], y0)]
    for n in range(1, len(ts) - 1):
        ys.append(ys[n - 1] + (ts[n + 1] - ts[n - 1]) * f(ts[n], ys[n]))
    return np.asarray(ys)


@pytest.mark.parametrize("backwards", [False, True])
def test_leapfrog_is_the_two_step_recurrence_on_uneven_steps(backwards):
    def f(t, y):
        return -2.0 * y + np.cos(3 * t)

    ts = np.asarray([0.0, 0.1, 0.25, 0.3, 0.5, 0.55, 0.8])
    if backwards:
        ts = ts[::-1]
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -2.0 * y + jnp.cos(3 * t)),
        dfx.LeapfrogMidpoint(),
        ts[0],
        ts[-1],
        None,
        jnp.asarray(1.0),
        saveat=dfx.SaveAt(steps=True),
        stepsize_controller=dfx.StepTo(ts=jnp.asarray(ts)),
    )
    expected = _leapfrog_by_hand(f, ts, 1.0)
    np.testing.assert_allclose(sol.ts[: len(ts) - 1], ts[1:], rtol=0, atol=0)
    np.testing.assert_allclose(sol.ys[: len(ts) - 1], expected[1:], rtol=1e-14)


def test_leapfrog_resumes_from_its_state_and_restarts_after_a_jump():
    term = dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -y[0]]))
    y0 = jnp.asarray([1.0, 0.0])
    whole = dfx.diffeqsolve(term, dfx.LeapfrogMidpoint(), 0.0, 2.0, 0.1, y0)
    first = dfx.diffeqsolve(
        term,
        dfx.LeapfrogMidpoint(),
        0.0,
        1.0,
        0.1,
        y0,
        saveat=dfx.SaveAt(t1=True, solver_state=True),
    )
    # The state is the previous point: the step before the last.
    t_prev, y_prev = first.solver_state
    np.testing.assert_allclose(t_prev, 0.9, rtol=1e-14)

    def second(made_jump):
        return dfx.diffeqsolve(
            term,
            dfx.LeapfrogMidpoint(),
            1.0,
            2.0,
            0.1,
            first.ys[-1],
            solver_state=first.solver_state,
            made_jump=made_jump,
        ).ys[-1]

    np.testing.assert_allclose(second(False), whole.ys[-1], rtol=1e-13)
    # After a jump, the first step is Euler's: the same as a fresh start.
    fresh = dfx.diffeqsolve(term, dfx.LeapfrogMidpoint(), 1.0, 2.0, 0.1, first.ys[-1])
    np.testing.assert_allclose(second(True), fresh.ys[-1], rtol=1e-14)
    assert not np.allclose(second(True), second(False), rtol=1e-6, atol=0)


def test_leapfrog_under_vmap_and_grad():
    def final(k, y0):
        term = dfx.ODETerm(lambda t, y, args: jnp.stack([y[1], -args * y[0]]))
        sol = dfx.diffeqsolve(term, dfx.LeapfrogMidpoint(), 0.0, 2.0, 0.02, y0, k)
        return sol.ys[-1, 0]

    y0s = jnp.asarray([[1.0, 0.0], [0.5, 0.3], [-1.0, 0.2]])
    batched = jax.jit(jax.vmap(final, in_axes=(None, 0)))(1.5, y0s)
    for i in range(3):
        np.testing.assert_allclose(batched[i], final(1.5, y0s[i]), rtol=1e-13)
    grad = jax.jit(jax.grad(final))(1.5, y0s[1])
    fd = (final(1.5 + 1e-6, y0s[1]) - final(1.5 - 1e-6, y0s[1])) / 2e-6
    np.testing.assert_allclose(grad, fd, rtol=1e-6)


@pytest.mark.parametrize("solver", [dfx.SemiImplicitEuler(), dfx.LeapfrogMidpoint()])
def test_adaptive_step_sizes_are_refused_with_a_clear_error(solver):
    terms = OSCILLATOR if isinstance(solver, dfx.SemiImplicitEuler) else OSCILLATOR[0]
    y0 = (1.0, 0.0) if isinstance(solver, dfx.SemiImplicitEuler) else 1.0
    with pytest.raises(ValueError, match="no error estimate"):
        dfx.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            0.1,
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-3, atol=1e-6),
        )


def test_semi_implicit_euler_given_one_term_names_the_structure_it_needs():
    with pytest.raises(ValueError, match="SemiImplicitEuler") as info:
        dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.SemiImplicitEuler(),
            0.0,
            1.0,
            0.1,
            1.0,
        )
    assert "AbstractTerm" in str(info.value)

"""`reuse_jacobian=True` on the diagonally implicit methods: one factorised stage
matrix serving several steps. The rule for when a new one is formed, solutions against
independent references (SciPy's Radau, closed forms), recovery when a stale matrix
makes the stage equations fail, and `jit`/`vmap`/`grad`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
from _stiff_problems import (
    ADJOINTS,
    assert_decay_gradients_match_fd,
    assert_robertson_matches_radau,
    decay_solve,
    robertson,
)

scipy_integrate = pytest.importorskip("scipy.integrate")


# One compiled step for each solver, called with array times (eagerly, each call
# would dispatch the stage solves' operations one by one).
_jit_step = eqx.filter_jit(
    lambda solver, terms, t0, t1, y, args, state, made_jump: solver.step(
        terms, t0, t1, y, args, state, made_jump
    )
)


def _step(solver, terms, t0, t1, y, args, state, made_jump):
    return _jit_step(
        solver,
        terms,
        jnp.asarray(t0),
        jnp.asarray(t1),
        y,
        args,
        state,
        jnp.asarray(made_jump),
    )


def _leaves_equal(a, b) -> bool:
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_a_factorisation_is_reused_while_recent_and_for_close_step_sizes():
    solver = dfx.Kvaerno3(
        root_finder=dfx.VeryChord(rtol=1e-10, atol=1e-10), reuse_jacobian=True
    )
    terms = dfx.ODETerm(robertson)
    y = jnp.array([1.0, 0.0, 0.0])
    h = 1e-3
    state = solver.init(terms, 0.0, h, y, None)

    def step(t0, dt, jacobian, made_jump=False):
        # Kvaerno3 is first same as last: its state also carries the last stage's
        # vector field, beside the factorisation.
        y1, _, _, new_state, result = _step(
            solver,
            terms,
            t0,
            t0 + dt,
            y,
            None,
            eqx_replace(state, jacobian=jacobian),
            made_jump,
        )
        assert result == dfx.RESULTS.successful
        return y1, new_state.jacobian

    # The first step forms its own.
    _, first = step(0.0, h, state.jacobian)
    assert int(first.age) == 1 and float(first.step_size) == pytest.approx(h)
    # Same step size, and within 20% of it: reused, unchanged.
    _, second = step(h, h, first)
    assert int(second.age) == 2
    assert _leaves_equal(second.chord_state, first.chord_state)
    _, third = step(2 * h, 1.15 * h, second)
    assert int(third.age) == 3
    assert _leaves_equal(third.chord_state, first.chord_state)
    # A step size 30% larger than the one it was formed for: a new one.
    _, fourth = step(2 * h, 1.3 * h, second)
    assert int(fourth.age) == 1
    assert float(fourth.step_size) == pytest.approx(1.3 * h)
    assert not _leaves_equal(fourth.chord_state, first.chord_state)
    # A jump in the vector field, or 20 steps of use: a new one.
    _, jumped = step(2 * h, h, second, made_jump=True)
    assert int(jumped.age) == 1
    _, old = step(2 * h, h, eqx_replace(second, age=jnp.asarray(20, jnp.int32)))
    assert int(old.age) == 1


def eqx_replace(module, **changes):
    names = list(changes)
    return eqx.tree_at(
        lambda m: [getattr(m, n) for n in names], module, [changes[n] for n in names]
    )


@pytest.mark.parametrize("name", ["Kvaerno5", "KenCarp4"])
def test_robertson_against_radau(name):
    terms = dfx.ODETerm(robertson)
    if name.startswith("KenCarp"):
        terms = dfx.MultiTerm(dfx.ODETerm(lambda t, y, a: jnp.zeros_like(y)), terms)
    assert_robertson_matches_radau(terms, getattr(dfx, name)(reuse_jacobian=True))


_N = 20  # grid points: 40 unknowns


def _brusselator(t, y, args):
    # 1-D Brusselator (Hairer & Wanner, Solving ODEs II, IV.1), Dirichlet boundaries.
    u, v = y[:_N], y[_N:]
    h2 = (1.0 / (_N + 1)) ** 2

    def laplacian(w, edge):
        padded = jnp.concatenate([jnp.array([edge]), w, jnp.array([edge])])
        return (padded[2:] - 2 * w + padded[:-2]) / h2

    du = 1 + u * u * v - 4 * u + args * laplacian(u, 1.0)
    dv = 3 * u - u * u * v + args * laplacian(v, 3.0)
    return jnp.concatenate([du, dv])


def _brusselator_y0():
    x = np.arange(1, _N + 1) / (_N + 1)
    return np.concatenate([1 + np.sin(2 * np.pi * x), np.full(_N, 3.0)])


def test_a_reused_factorisation_solves_the_stage_equations_to_the_same_tolerance():
    # The chord matrix only steers the iteration: a step taken with a reused one
    # agrees with a step taken with a fresh one to the root finder's tolerance.
    root_finder = dfx.VeryChord(rtol=1e-11, atol=1e-11)
    terms = dfx.ODETerm(_brusselator)
    y = jnp.asarray(_brusselator_y0())
    t0, h = 0.1, 1e-2
    fresh = dfx.Kvaerno5(root_finder=root_finder)
    y_fresh = _step(fresh, terms, t0, t0 + h, y, 0.02, None, False)[0]
    reusing = dfx.Kvaerno5(root_finder=root_finder, reuse_jacobian=True)
    # A factorisation formed at a nearby state (as a previous step's would be) for
    # a 10% smaller step size.
    formed = _step(
        reusing,
        terms,
        t0 - 0.9 * h,
        t0,
        y * 1.001,
        0.02,
        reusing.init(terms, t0 - 0.9 * h, t0, y, 0.02),
        False,
    )[3]
    # Its vector field at the start is `y`'s (the step that formed the
    # factorisation ended elsewhere).
    formed = eqx_replace(formed, vf=(terms.vf(t0, y, 0.02),))
    y_reused, _, _, state, result = _step(
        reusing, terms, t0, t0 + h, y, 0.02, formed, False
    )
    assert result == dfx.RESULTS.successful
    assert int(state.jacobian.age) == 2  # it was reused
    np.testing.assert_allclose(np.asarray(y_reused), np.asarray(y_fresh), rtol=1e-9)


def _brusselator_reference(alpha, t1):
    def field(t, y):
        return np.asarray(_brusselator(t, jnp.asarray(y), alpha))

    sol = scipy_integrate.solve_ivp(
        field,
        (0.0, t1),
        _brusselator_y0(),
        method="Radau",
        rtol=1e-11,
        atol=1e-11,
        jac=lambda t, y: np.asarray(
            jax.jacfwd(lambda z: _brusselator(t, z, alpha))(jnp.asarray(y))
        ),
    )
    assert sol.success
    return sol.y[:, -1]


def _brusselator_solve(solver):
    @jax.jit
    def solve(alpha):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_brusselator),
            solver,
            0.0,
            2.0,
            1e-3,
            jnp.asarray(_brusselator_y0()),
            args=alpha,
            stepsize_controller=dfx.PIDController(rtol=1e-7, atol=1e-7),
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return solve


@pytest.mark.slow  # the Robertson cases above check the same against Radau
def test_brusselator_against_radau_in_as_many_steps():
    alpha = 0.02
    reference = _brusselator_reference(alpha, 2.0)
    y_reused, steps_reused = _brusselator_solve(dfx.Kvaerno3(reuse_jacobian=True))(
        jnp.asarray(alpha)
    )
    y_fresh, steps_fresh = _brusselator_solve(dfx.Kvaerno3())(jnp.asarray(alpha))
    np.testing.assert_allclose(np.asarray(y_reused), reference, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(y_fresh), reference, rtol=2e-5)
    # Reuse changes the iteration, not the accuracy the controller asks for.
    assert abs(int(steps_reused) - int(steps_fresh)) <= 0.05 * int(steps_fresh)


def _switching(t, y, args):
    # Stiffness switching on within t in [0.45, 0.55], from rate 1 to rate 1e5: a
    # Jacobian formed before the switch is far from the one after it. The solution
    # is cos(t) from y(0) = 1 whatever the rate.
    rate = 1.0 + 1e5 * (1 + jnp.tanh((t - 0.5) / 0.01)) / 2
    return -rate * (y - jnp.cos(t)) - jnp.sin(t)


def test_stage_failure_with_a_stale_factorisation_is_retried_with_a_new_one():
    sol = dfx.diffeqsolve(
        dfx.ODETerm(_switching),
        dfx.Kvaerno5(reuse_jacobian=True),
        0.0,
        1.0,
        0.01,
        jnp.array([1.0]),
        saveat=dfx.SaveAt(ts=jnp.linspace(0.0, 1.0, 11)),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    assert sol.result == dfx.RESULTS.successful
    # The accuracy of the same solve without reuse (1.4e-5: the switch makes the
    # global error ~1e3 times the local tolerance either way).
    np.testing.assert_allclose(
        np.asarray(sol.ys[:, 0]), np.cos(np.linspace(0.0, 1.0, 11)), atol=2e-5
    )


def test_constant_steps_form_a_factorisation_every_step():
    # With constant steps a failed stage cannot be retried, so nothing is reused:
    # the solve is the one without reuse, to the last bit.
    def solve(reuse):
        return dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -1e4 * (y - jnp.cos(t)) - jnp.sin(t)),
            dfx.Kvaerno3(
                root_finder=dfx.VeryChord(rtol=1e-10, atol=1e-10),
                reuse_jacobian=reuse,
            ),
            0.0,
            1.0,
            0.01,
            jnp.array([1.0]),
        ).ys

    ys = np.asarray(solve(True))
    np.testing.assert_array_equal(ys, np.asarray(solve(False)))
    np.testing.assert_allclose(ys[-1, 0], np.cos(1.0), atol=1e-6)


@ADJOINTS
def test_gradients_match_finite_differences(adjoint):
    assert_decay_gradients_match_fd(
        decay_solve(dfx.Kvaerno3(reuse_jacobian=True), adjoint)
    )


def test_forward_mode_matches_finite_differences():
    solve = jax.jit(decay_solve(dfx.Kvaerno3(reuse_jacobian=True)))
    rate, y0 = jnp.asarray(5.0), jnp.array([1.0, -2.0])
    _, tangent = jax.jvp(lambda r: solve(r, y0), (rate,), (jnp.asarray(1.0),))
    eps = 1e-5
    fd = (solve(rate + eps, y0) - solve(rate - eps, y0)) / (2 * eps)
    np.testing.assert_allclose(float(tangent), float(fd), rtol=1e-4, atol=1e-9)


def test_vmap_over_parameters_equals_a_loop_and_the_closed_form():
    solve = jax.jit(
        lambda rate: dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, a: -a * (y - jnp.cos(t)) - jnp.sin(t)),
            dfx.Kvaerno5(reuse_jacobian=True),
            0.0,
            2.0,
            0.01,
            jnp.array([1.0]),
            args=rate,
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
        ).ys[-1, 0]
    )
    rates = jnp.array([1.0, 300.0, 1e5])
    batched = jax.vmap(solve)(rates)
    looped = jnp.stack([solve(r) for r in rates])
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(batched), np.cos(2.0), atol=1e-7)


# float32: tests/test_implicit.py::test_float32[Kvaerno5-reuse_jacobian].


def test_a_method_with_a_jacobian_per_stage_refuses_reuse():
    class PerStage(dfx.AbstractDIRK, dfx.AbstractAdaptiveSolver):
        tableau = dfx.Kvaerno3.tableau
        calculate_jacobian = dfx.CalculateJacobian.every_stage
        interpolation_cls = dfx.ThirdOrderHermitePolynomialInterpolation.from_k
        root_finder: object = dfx.VeryChord(rtol=1e-6, atol=1e-6)
        root_find_max_steps: int = 10
        reuse_jacobian: bool = True

        def order(self, terms):
            return 3

    with pytest.raises(ValueError, match="reuse_jacobian=True.*every_stage"):
        PerStage()

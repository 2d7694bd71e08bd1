"""`SemiImplicitEuler` and `LeapfrogMidpoint` through Diffrax and diffeqx: the same
step times, states, dense output, statistics, solver state and gradients; and a
`made_jump` passed in to resume a solve with constant steps reaching the first step,
as in Diffrax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx

diffrax = pytest.importorskip("diffrax")

LIBS = (diffrax, diffeqx)


def _pendulum_terms(lib):
    # q' = p, p' = -k sin(q) + forcing(t): the position driven by the momentum, the
    # momentum by the position; PyTree parts (a dict of two pendulums).
    return (
        lib.ODETerm(lambda t, p, args: p),
        lib.ODETerm(
            lambda t, q, args: jax.tree.map(
                lambda k, x: -k * jnp.sin(x) + 0.1 * jnp.cos(t).astype(x.dtype),
                args,
                q,
            )
        ),
    )


def _outputs(lib, sol, points):
    return dict(
        ts=sol.ts,
        ys=sol.ys,
        dense=jax.vmap(sol.evaluate)(points),
        steps=(sol.stats["num_steps"], sol.stats["num_accepted_steps"]),
        result=sol.result == lib.RESULTS.successful,
    )


def _assert_same(ours, theirs, rtol):
    leaves_ours, tree_ours = jax.tree.flatten(ours)
    leaves_theirs, tree_theirs = jax.tree.flatten(theirs)
    assert tree_ours == tree_theirs
    for a, b in zip(leaves_ours, leaves_theirs, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], rtol=rtol, atol=rtol)


@pytest.mark.parametrize(
    "backwards, dtype, vmapped",
    [
        (False, "float64", False),
        (True, "float64", True),
        pytest.param(False, "float32", True, marks=pytest.mark.slow),
    ],
)
def test_semi_implicit_euler_same_as_diffrax(backwards, dtype, vmapped):
    dtype = jnp.dtype(dtype)
    t0, t1 = (3.0, 0.0) if backwards else (0.0, 3.0)
    args = {"a": jnp.asarray(1.0, dtype), "b": jnp.asarray(2.5, dtype)}

    def run(lib, scale):
        y0 = (
            {"a": scale * jnp.asarray(0.8, dtype), "b": jnp.asarray(-0.3, dtype)},
            {"a": jnp.asarray(0.0, dtype), "b": scale * jnp.asarray(0.5, dtype)},
        )
        sol = lib.diffeqsolve(
            _pendulum_terms(lib),
            lib.SemiImplicitEuler(),
            jnp.asarray(t0, dtype),
            jnp.asarray(t1, dtype),
            jnp.asarray(0.07 if t1 > t0 else -0.07, dtype),
            y0,
            args,
            saveat=lib.SaveAt(steps=True, dense=True),
            max_steps=64,
        )
        points = jnp.linspace(t0, t1, 9, dtype=dtype)
        return _outputs(lib, sol, points)

    scales = jnp.asarray([1.0, 0.7], dtype)
    outs = {}
    for lib in LIBS:
        fn = jax.jit(jax.vmap(lambda s, lib=lib: run(lib, s))) if vmapped else None
        outs[lib.__name__] = (
            fn(scales) if vmapped else jax.jit(run, static_argnums=0)(lib, scales[0])
        )
    rtol = 1e-13 if dtype == jnp.float64 else 2e-6
    _assert_same(outs["diffeqx"], outs["diffrax"], rtol)


def test_semi_implicit_euler_same_gradient_as_diffrax():
    def loss(lib, k):
        sol = lib.diffeqsolve(
            _pendulum_terms(lib),
            lib.SemiImplicitEuler(),
            0.0,
            2.0,
            0.05,
            ({"a": jnp.asarray(0.8)}, {"a": jnp.asarray(0.1)}),
            {"a": k},
        )
        return sol.ys[0]["a"][-1] + sol.ys[1]["a"][-1] ** 2

    grads = [jax.jit(jax.grad(lambda k, lib=lib: loss(lib, k)))(1.3) for lib in LIBS]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12)


@pytest.mark.parametrize("controller", ["constant", "stepto", "backwards"])
def test_leapfrog_midpoint_same_as_diffrax(controller):
    def run(lib):
        term = lib.ODETerm(
            lambda t, y, args: jnp.stack([y[1], -args * y[0] + jnp.sin(2 * t)])
        )
        t0, t1, dt0 = (2.0, 0.0, -0.15) if controller == "backwards" else (0, 2, 0.15)
        kwargs = {}
        if controller == "stepto":
            kwargs["stepsize_controller"] = lib.StepTo(
                ts=jnp.asarray([0.0, 0.1, 0.35, 0.4, 0.9, 1.3, 1.35, 2.0])
            )
            dt0 = None
        sol = lib.diffeqsolve(
            term,
            lib.LeapfrogMidpoint(),
            t0,
            t1,
            dt0,
            jnp.asarray([1.0, 0.0]),
            2.0,
            saveat=lib.SaveAt(steps=True, dense=True, solver_state=True),
            max_steps=32,
            **kwargs,
        )
        out = _outputs(lib, sol, jnp.linspace(t0, t1, 11))
        out["solver_state"] = sol.solver_state
        return out

    _assert_same(run(diffeqx), run(diffrax), 1e-13)


def test_leapfrog_midpoint_same_gradient_as_diffrax():
    def loss(lib, k):
        term = lib.ODETerm(lambda t, y, args: jnp.stack([y[1], -args * y[0]]))
        sol = lib.diffeqsolve(
            term, lib.LeapfrogMidpoint(), 0.0, 3.0, 0.05, jnp.asarray([1.0, 0.0]), k
        )
        return sol.ys[-1, 0]

    grads = [jax.jit(jax.grad(lambda k, lib=lib: loss(lib, k)))(1.7) for lib in LIBS]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-12)


def _forced_decay(t, y, args):
    return -args * y + jnp.sin(t)


def _resumed(lib, solver, controller, made_jump):
    """A solve resumed past a change in the vector field (its `args`), with the
    solver state of the first part and `made_jump`. (One vector field for every
    call: a repeated call compiles nothing.)"""
    term = lib.ODETerm(_forced_decay)
    first = lib.diffeqsolve(
        term,
        getattr(lib, solver)(),
        0.0,
        1.0,
        0.1,
        jnp.asarray([1.0, 0.5]),
        1.0,
        saveat=lib.SaveAt(t1=True, solver_state=True),
    )
    stepsize_controller = (
        lib.ConstantStepSize()
        if controller == "constant"
        else lib.PIDController(rtol=1e-3, atol=1e-6)
    )
    sol = lib.diffeqsolve(
        term,
        getattr(lib, solver)(),
        1.0,
        2.0,
        0.1,
        first.ys[-1],
        3.0,
        solver_state=first.solver_state,
        made_jump=made_jump,
        stepsize_controller=stepsize_controller,
    )
    return np.asarray(sol.ys[-1]), int(sol.stats["num_steps"])


@pytest.mark.parametrize(
    "solver, controller",
    [
        ("Tsit5", "constant"),
        ("ReversibleHeun", "pid"),
        # (ReversibleHeun with constant steps: also in the next test.)
        pytest.param("ReversibleHeun", "constant", marks=pytest.mark.slow),
        pytest.param("Tsit5", "pid", marks=pytest.mark.slow),
    ],
)
def test_made_jump_passed_in_reaches_the_first_step(solver, controller):
    # `made_jump=True` (an array, as `SaveAt(made_jump=True)` returns it): the first
    # step evaluates afresh what the solver state kept (Tsit5's first-same-as-last
    # value, ReversibleHeun's vector field), and, if it is rejected, so does its
    # retry. diffeqx used to drop `made_jump` with a controller that never jumps,
    # and after a rejected step with one that does.
    ours = {}
    for made_jump in (False, True):
        ours[made_jump] = _resumed(diffeqx, solver, controller, jnp.asarray(made_jump))
        theirs = _resumed(diffrax, solver, controller, jnp.asarray(made_jump))
        np.testing.assert_allclose(ours[made_jump][0], theirs[0], rtol=1e-12)
        assert ours[made_jump][1] == theirs[1]
    # The jump changes the answer (the stale value is not what is evaluated afresh).
    assert not np.allclose(ours[False][0], ours[True][0], rtol=1e-7, atol=0)


def test_made_jump_as_a_python_true_applies_to_the_first_step_only():
    # Listed difference (docs/migration.md): with a controller that never jumps,
    # Diffrax 0.7.2 keeps a Python `True` for every step (it resolves `made_jump`
    # at trace time), so ReversibleHeun re-evaluates its vector field at every step
    # and becomes another method; an array `True` applies to the first step, as
    # diffeqx does with either.
    ours = _resumed(diffeqx, "ReversibleHeun", "constant", True)
    first_only = _resumed(diffrax, "ReversibleHeun", "constant", jnp.asarray(True))
    every_step = _resumed(diffrax, "ReversibleHeun", "constant", True)
    np.testing.assert_allclose(ours[0], first_only[0], rtol=1e-13)
    assert not np.allclose(ours[0], every_step[0], rtol=1e-4, atol=0)


def _oscillator(t, y, args):
    return jnp.stack([y[1], -args * y[0]])


def test_leapfrog_after_a_jump_steps_from_the_jump():
    # Listed difference (docs/migration.md): resumed with `made_jump=True`,
    # Diffrax's LeapfrogMidpoint still reaches back to the previous point; diffeqx's
    # takes an Euler step from the jump, the same as a fresh start from there.
    def resumed(lib, made_jump, fresh=False):
        term = lib.ODETerm(_oscillator)  # one field for all: no call compiles twice
        first = lib.diffeqsolve(
            term,
            lib.LeapfrogMidpoint(),
            0.0,
            1.0,
            0.1,
            jnp.asarray([1.0, 0.0]),
            1.0,
            saveat=lib.SaveAt(t1=True, solver_state=True),
        )
        kwargs = {} if fresh else dict(solver_state=first.solver_state)
        return lib.diffeqsolve(
            term,
            lib.LeapfrogMidpoint(),
            1.0,
            2.0,
            0.1,
            first.ys[-1],
            4.0,
            made_jump=made_jump,
            **kwargs,
        ).ys[-1]

    jump, no_jump = jnp.asarray(True), jnp.asarray(False)
    theirs_without_jump = resumed(diffrax, no_jump)
    np.testing.assert_allclose(resumed(diffrax, jump), theirs_without_jump, rtol=1e-14)
    np.testing.assert_allclose(
        resumed(diffeqx, jump), resumed(diffeqx, None, fresh=True), rtol=1e-14
    )
    np.testing.assert_allclose(
        resumed(diffeqx, no_jump), theirs_without_jump, rtol=1e-13
    )

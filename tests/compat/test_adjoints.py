"""`BacksolveAdjoint` against Diffrax's `BacksolveAdjoint`.

Where Diffrax supports the call (gradients with respect to `y0` and `args`, saving
states at `t0`, `ts` and `t1`), the same call goes through both libraries. Both solve
the same continuous adjoint equations backwards, segment by segment between the save
times, each segment resuming the solver and controller states of the one before, so
they take the same backward steps and their gradients agree to rounding.

`SaveAt(fn=...)` and `SaveAt(subs=...)` are extensions: Diffrax's `BacksolveAdjoint`
refuses them (as it refuses gradients with respect to `t0`, `t1` and `ts`). They are
compared with Diffrax's `BacksolveAdjoint` on the equivalent loss that saves the
states at the merged save times and applies `fn` to them afterwards.
"""

import pytest

diffrax = pytest.importorskip("diffrax")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402

TOL = 1e-10
TS = np.array([0.36, 0.71, 1.04])
Y0 = jnp.array([1.0, -0.5])
ARGS = {"a": jnp.array([0.7, 1.3]), "b": jnp.array(0.4)}


def _field(t, y, args):
    return -args["a"] * y + args["b"] * jnp.sin(y[::-1]) + 0.5 * jnp.cos(2.0 * t)


def _solve(lib, saveat, y0, args, backwards, dtype=jnp.float64):
    t0, t1 = (1.31, 0.1) if backwards else (0.1, 1.31)
    controller = lib.PIDController(rtol=TOL, atol=TOL)
    return lib.diffeqsolve(
        lib.ODETerm(_field),
        lib.Tsit5(),
        jnp.asarray(t0, dtype),
        jnp.asarray(t1, dtype),
        None,
        y0,
        args,
        saveat=saveat,
        stepsize_controller=controller,
        adjoint=lib.BacksolveAdjoint(stepsize_controller=controller),
        max_steps=256,
    )


def _weighted(x):
    weights = jnp.arange(1.0, x.size + 1.0, dtype=x.dtype).reshape(x.shape)
    return jnp.sum(weights * x**2 / x.size)


def _grads(loss):
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0, ARGS)
    return np.concatenate([np.ravel(np.asarray(g)) for g in jax.tree.leaves(grads)])


def _save_times(backwards, which):
    ts = TS[::-1] if backwards else TS
    return jnp.asarray(ts[1:] if which == "ts" else ts)


SAVES = {
    "t1": lambda lib, ts: lib.SaveAt(t1=True),
    "ts": lambda lib, ts: lib.SaveAt(ts=ts),
    "t0-ts-t1": lambda lib, ts: lib.SaveAt(t0=True, ts=ts, t1=True),
}


@pytest.mark.parametrize(
    "save, backwards",
    [
        # By default the case with every kind of save, backwards; the rest are slow.
        pytest.param(
            save,
            backwards,
            id=f"{save}-{'bwd' if backwards else 'fwd'}",
            marks=()
            if (save, backwards) == ("t0-ts-t1", True)
            else (pytest.mark.slow,),
        )
        for save in SAVES
        for backwards in (False, True)
    ],
)
def test_backsolve_same_gradients_as_diffrax(save, backwards):
    ts = _save_times(backwards, save)

    def loss(lib):
        def f(y0, args):
            sol = _solve(lib, SAVES[save](lib, ts), y0, args, backwards)
            return _weighted(sol.ys)

        return f

    expected = _grads(loss(diffrax))
    actual = _grads(loss(diffeqx))
    np.testing.assert_allclose(actual, expected, rtol=1e-11, atol=1e-13)


# Euler (no solver state), Heun, and Bosh3 (first same as last, resumed across
# segments); Heun in the slow run.
@pytest.mark.parametrize(
    "solver", ["Euler", pytest.param("Heun", marks=pytest.mark.slow), "Bosh3"]
)
def test_backsolve_with_constant_steps_takes_diffraxs_backward_steps(solver):
    # Constant steps that do not divide the segments between the save times: each
    # backward segment continues the step sizes of the one before (as Diffrax's
    # does), rather than starting again from `dt0`. Restarting gave gradients 2e-2
    # (Euler) to 6e-6 (Bosh3) relative away from Diffrax's. The vector field is
    # evaluated no more often than in Diffrax (counted with a callback, which keeps
    # every evaluation in the program; measured: 30 and 30 with Euler, 94 and 104
    # with Bosh3): diffeqx used to evaluate it at `t0` and at the save times too, for
    # derivatives with respect to those times, which are not asked for here.
    evaluations = []

    def counted(t, y, args):
        jax.debug.callback(lambda: evaluations.append(None))
        return _field(t, y, args)

    def loss(lib):
        def f(y0, args):
            sol = lib.diffeqsolve(
                lib.ODETerm(counted),
                getattr(lib, solver)(),
                jnp.asarray(0.0),
                jnp.asarray(2.0),
                jnp.asarray(0.15),
                y0,
                args,
                saveat=lib.SaveAt(ts=jnp.array([0.0, 0.6, 1.5, 2.0])),
                adjoint=lib.BacksolveAdjoint(),
            )
            return _weighted(sol.ys)

        return f

    expected = _grads(loss(diffrax))
    jax.effects_barrier()
    expected_count, evaluations[:] = len(evaluations), []
    actual = _grads(loss(diffeqx))
    jax.effects_barrier()
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-14)
    assert 0 < len(evaluations) <= expected_count


def _save_fn(t, y, args):
    return {"u": jnp.sin(y) * t, "v": y[0] * y[1] * args["b"]}


def test_backsolve_fn_and_subs_match_diffrax_on_the_equivalent_loss():
    # diffeqx: the states at t1 and `fn` at ts, as two outputs.
    def extension(y0, args):
        saveat = diffeqx.SaveAt(
            subs=[
                diffeqx.SubSaveAt(t1=True),
                diffeqx.SubSaveAt(ts=jnp.asarray(TS), fn=_save_fn),
            ]
        )
        sol = _solve(diffeqx, saveat, y0, args, False)
        final, saved = sol.ys
        return _weighted(final) + sum(_weighted(x) for x in jax.tree.leaves(saved))

    # Diffrax: the states at ts and t1, with `fn` applied afterwards.
    def equivalent(y0, args):
        sol = _solve(
            diffrax, diffrax.SaveAt(ts=jnp.asarray(TS), t1=True), y0, args, False
        )
        saved = jax.vmap(_save_fn, in_axes=(0, 0, None))(sol.ts[:-1], sol.ys[:-1], args)
        return _weighted(sol.ys[-1:]) + sum(
            _weighted(x) for x in jax.tree.leaves(saved)
        )

    expected = _grads(equivalent)
    actual = _grads(extension)
    np.testing.assert_allclose(actual, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "saveat",
    [
        pytest.param(
            lambda lib: lib.SaveAt(t1=True, fn=_save_fn),
            id="fn",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            lambda lib: lib.SaveAt(
                subs=[lib.SubSaveAt(t1=True), lib.SubSaveAt(ts=jnp.asarray(TS))]
            ),
            id="subs",
        ),
    ],
)
def test_diffrax_refuses_what_diffeqx_backsolve_extends(saveat):
    # A documented extension: if Diffrax starts accepting these, compare them here
    # call by call instead.
    def loss(lib, y0):
        sol = _solve(lib, saveat(lib), y0, ARGS, False)
        return sum(jnp.sum(x) for x in jax.tree.leaves(sol.ys))

    with pytest.raises(NotImplementedError, match="BacksolveAdjoint"):
        jax.grad(lambda y0: loss(diffrax, y0))(Y0)
    grad = jax.jit(jax.grad(lambda y0: loss(diffeqx, y0)))(Y0)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    "kwargs",
    [
        lambda lib: dict(saveat=lib.SaveAt(dense=True)),
        lambda lib: dict(saveat=lib.SaveAt(steps=True)),
        lambda lib: dict(event=lib.Event(lambda t, y, args, **kw: y - 0.5)),
    ],
    ids=["dense", "steps", "event"],
)
def test_backsolve_refuses_what_diffrax_refuses_with_the_same_error_class(kwargs):
    # Diffrax raises NotImplementedError; diffeqx's error is also a ValueError.
    for lib in (diffeqx, diffrax):
        with pytest.raises(NotImplementedError):
            lib.diffeqsolve(
                lib.ODETerm(lambda t, y, args: -y),
                lib.Tsit5(),
                0.0,
                1.0,
                0.1,
                jnp.array(1.0),
                adjoint=lib.BacksolveAdjoint(),
                **kwargs(lib),
            )
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        diffeqx.diffeqsolve(
            diffeqx.ODETerm(lambda t, y, args: -y),
            diffeqx.Tsit5(),
            0.0,
            1.0,
            0.1,
            jnp.array(1.0),
            adjoint=diffeqx.BacksolveAdjoint(),
            **kwargs(diffeqx),
        )


def test_backsolve_gradient_with_respect_to_python_float_args_matches_diffrax():
    # Under `eqx.filter_jit(jax.grad(...))`, Python floats in `args` reach the
    # forward pass as typed Python floats; diffeqx's closure-converted terms had
    # seen arrays there, and failed.
    grads = {}
    for lib in (diffeqx, diffrax):

        @eqx.filter_jit
        @jax.grad
        def run(p, lib=lib):
            y0, args = p
            sol = lib.diffeqsolve(
                lib.ODETerm(lambda t, y, a: -a[0] * y * a[1]),
                lib.Heun(),
                0,
                1,
                0.01,
                y0,
                args,
                adjoint=lib.BacksolveAdjoint(),
            )
            return sol.ys.sum()

        grads[lib.__name__] = run((jnp.array([1.0, 2.0]), (0.5, 0.1)))
    for ours, theirs in zip(
        jax.tree.leaves(grads["diffeqx"]),
        jax.tree.leaves(grads["diffrax"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-10)


def test_backsolve_differentiates_closed_over_values_that_diffrax_refuses():
    # Diffrax's BacksolveAdjoint raises JAX's CustomVJPException for a gradient
    # with respect to a value a plain-function vector field closes over (Diffrax's
    # own test_adjoint.py::test_closure_errors). diffeqx converts the closure and
    # gives the gradient both libraries give when the same value is passed as
    # `args`.
    a = jnp.array([0.7, 1.3])

    def loss(lib, a, closed):
        def field(t, y, args):
            coefficient = a if closed else args
            return -coefficient * y + 0.4 * jnp.sin(y[::-1])

        sol = lib.diffeqsolve(
            lib.ODETerm(field),
            lib.Heun(),
            0.0,
            1.0,
            0.05,
            Y0,
            None if closed else a,
            adjoint=lib.BacksolveAdjoint(),
        )
        return jnp.sum(sol.ys**2)

    with pytest.raises(Exception, match="closed-over value"):
        jax.jit(jax.grad(lambda a: loss(diffrax, a, True)))(a)
    closed = jax.jit(jax.grad(lambda a: loss(diffeqx, a, True)))(a)
    for lib in (diffeqx, diffrax):
        via_args = jax.jit(jax.grad(lambda a, lib=lib: loss(lib, a, False)))(a)
        np.testing.assert_allclose(closed, via_args, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("saveat", ["t1", "ts"])
def test_default_adjoint_beyond_its_every_step_bound_same_gradient_as_diffrax(
    saveat, monkeypatch
):
    """The default adjoint where every step's state does not fit its bound (here,
    the bound set to 0): diffeqx's loop keeping a few thinned states (8 for
    `max_steps=64`, fewer than the solve's steps) against Diffrax's treeverse
    checkpoints: the same loss and gradient, to the rounding of recomputed steps."""
    from diffeqx import _eager
    from diffeqx._adjoint import checkpoint

    monkeypatch.setattr(checkpoint, "_EVERY_STEP_BYTES", 0)
    _eager.forget_traces()
    ts = jnp.linspace(0.0, 3.0, 7)
    y0 = jnp.asarray([1.0, 0.5, -0.3])

    def loss(lib):
        def fn(scale, y0):
            sol = lib.diffeqsolve(
                lib.ODETerm(lambda t, y, a: -a * y + jnp.sin(t) * y[::-1]),
                lib.Tsit5(),
                0.0,
                3.0,
                0.1,
                y0,
                args=scale,
                saveat=lib.SaveAt(ts=ts) if saveat == "ts" else lib.SaveAt(t1=True),
                stepsize_controller=lib.PIDController(rtol=1e-7, atol=1e-7),
                max_steps=64,
            )
            return jnp.sum(sol.ys**2), sol.stats["num_steps"]

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))

    (value, steps), grads = loss(diffeqx)(0.7, y0)
    (want_value, want_steps), want_grads = loss(diffrax)(0.7, y0)
    assert int(steps) == int(want_steps) > 8
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10)

"""Constant steps with `SaveAt(ts=...)`: diffeqx runs them as its fixed-step scan,
writing each step's requested times in the step (known times: a block of writes;
traced or dense ones: a loop in the step), where Diffrax runs its while loop; with
traced end times, diffeqx's general loop. The same call gives the same times, saved
values, counts, result and gradients."""

import pytest

diffrax = pytest.importorskip("diffrax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffeqx  # noqa: E402

TS = np.linspace(0.0, 3.0, 31)  # at the step ends of 0.1, and between them
BETWEEN = np.sort(np.random.default_rng(1).uniform(0.0, 3.0, 17))


def _field(t, y, args):
    return jnp.stack([args * y[1], -y[0] + jnp.sin(t) * y[1]])


def _solve(lib, solver, ts, args, y0, adjoint=None):
    sol = lib.diffeqsolve(
        lib.ODETerm(_field),
        getattr(lib, solver)(),
        0.0,
        3.0,
        0.1,
        y0,
        args=args,
        saveat=lib.SaveAt(ts=ts, t1=True),
        adjoint=lib.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
    )
    return sol.ts, sol.ys, sol.stats["num_steps"], sol.stats["num_accepted_steps"]


def _compare(ours, theirs, rtol=1e-12):
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(theirs[1]), rtol=rtol)
    for a, b in zip(ours[2:], theirs[2:], strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("solver", ["Tsit5", "Heun", "Euler"])
@pytest.mark.parametrize("times", ["step ends", "between", "traced"])
def test_constant_step_saves_match_diffrax(solver, times):
    ts = BETWEEN if times == "between" else TS
    y0 = jnp.array([1.0, 0.5])
    out = {}
    for lib in (diffeqx, diffrax):
        if times == "traced":
            fn = jax.jit(lambda ts, y, lib=lib: _solve(lib, solver, ts, 0.8, y))
            out[lib.__name__] = fn(jnp.asarray(ts), y0)
        else:
            fn = jax.jit(lambda y, lib=lib: _solve(lib, solver, ts, 0.8, y))
            out[lib.__name__] = fn(y0)
    _compare(out["diffeqx"], out["diffrax"])


@pytest.mark.parametrize("times", ["known", "traced"])
def test_batched_constant_step_saves_and_gradients_match_diffrax(times):
    # Under reverse mode diffeqx interpolates the requested times after its scan.
    y0s = jnp.stack([jnp.array([1.0, 0.5]), jnp.array([0.2, -1.0]), jnp.ones(2)])
    out, grads = {}, {}
    for lib in (diffeqx, diffrax):

        def batched(args, ts, lib=lib):
            return jax.vmap(lambda y: _solve(lib, "Tsit5", ts, args, y))(y0s)

        def loss(args, ts, batched=batched):
            return jnp.sum(jnp.sin(batched(args, ts)[1]))

        if times == "known":
            out[lib.__name__] = jax.jit(lambda a, b=batched: b(a, TS))(0.8)
            grads[lib.__name__] = jax.jit(jax.grad(lambda a, f=loss: f(a, TS)))(0.8)
        else:
            ts = jnp.asarray(TS)
            out[lib.__name__] = jax.jit(batched)(0.8, ts)
            grads[lib.__name__] = jax.jit(jax.grad(loss))(0.8, ts)
    _compare(out["diffeqx"], out["diffrax"])
    np.testing.assert_allclose(grads["diffeqx"], grads["diffrax"], rtol=1e-10)


def test_constant_step_saves_forward_mode_matches_diffrax():
    # Forward mode through the loop that saves traced times in each step (Diffrax
    # needs `ForwardMode` for it).
    y0 = jnp.array([1.0, 0.5])
    tangents = {}
    for lib in (diffeqx, diffrax):

        def saved(args, ts, lib=lib):
            return _solve(lib, "Tsit5", ts, args, y0, lib.ForwardMode())[1]

        tangents[lib.__name__] = jax.jit(
            lambda a, ts, saved=saved: jax.jvp(lambda a: saved(a, ts), (a,), (1.0,))
        )(0.8, jnp.asarray(TS))
    for a, b in zip(tangents["diffeqx"], tangents["diffrax"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


@pytest.mark.parametrize("times", ["on the grid", "four in one step"])
def test_batched_saves_when_dt0_does_not_divide_the_interval_match_diffrax(times):
    # `dt0 = 0.35` over [0, 3]: nine steps, the first of 0.35, then ending at
    # 3 k / 9. On that grid diffeqx writes one time a step (the first saved from
    # `y0`); four times in the third step, (2/3, 1], a block of four (counted on
    # multiples of `dt0`, two blocks of two, and two of the times were lost).
    if times == "on the grid":
        ts = np.concatenate([[0.0, 0.35], 3.0 * np.arange(2, 10) / 9])
    else:
        ts = np.array([0.0, 0.68, 0.69, 0.72, 0.8, 3.0])
    y0s = jnp.stack([jnp.array([1.0, 0.5]), jnp.array([0.2, -1.0])])
    out, grads = {}, {}
    for lib in (diffeqx, diffrax):

        def batched(args, lib=lib):
            def single(y0):
                sol = lib.diffeqsolve(
                    lib.ODETerm(_field), lib.Heun(), 0.0, 3.0, 0.35, y0, args=args,
                    saveat=lib.SaveAt(ts=ts),
                )  # fmt: skip
                return sol.ts, sol.ys, sol.stats["num_steps"]

            return jax.vmap(single)(y0s)

        out[lib.__name__] = jax.jit(batched)(0.8)
        grads[lib.__name__] = jax.jit(
            jax.grad(lambda a, b=batched: jnp.sum(jnp.sin(b(a)[1])))
        )(0.8)
    _compare(out["diffeqx"], out["diffrax"])
    np.testing.assert_allclose(grads["diffeqx"], grads["diffrax"], rtol=1e-10)


def test_batched_constant_steps_to_traced_ends_match_diffrax():
    # Each member's own end time (traced): the general loop rather than the
    # fixed-step scan; members stop after different numbers of steps, the step
    # holding those that have finished (diffeqx's stored loop under `jax.grad`).
    t1s = jnp.array([1.5, 3.0, 2.2])
    y0s = jnp.stack([jnp.array([1.0, 0.5]), jnp.array([0.2, -1.0]), jnp.ones(2)])
    out, grads = {}, {}
    for lib in (diffeqx, diffrax):

        def batched(args, lib=lib):
            def single(y0, t1):
                sol = lib.diffeqsolve(
                    lib.ODETerm(_field), lib.Tsit5(), 0.0, t1, 0.1, y0, args=args,
                    saveat=lib.SaveAt(ts=t1 * jnp.linspace(0.0, 1.0, 7)),
                    max_steps=64,
                )  # fmt: skip
                return sol.ts, sol.ys, sol.stats["num_steps"]

            return jax.vmap(single)(y0s, t1s)

        out[lib.__name__] = jax.jit(batched)(0.8)
        grads[lib.__name__] = jax.jit(
            jax.grad(lambda a, b=batched: jnp.sum(jnp.sin(b(a)[1])))
        )(0.8)
    _compare(out["diffeqx"], out["diffrax"])
    np.testing.assert_array_equal(out["diffeqx"][2], [15, 30, 22])
    np.testing.assert_allclose(grads["diffeqx"], grads["diffrax"], rtol=1e-10)

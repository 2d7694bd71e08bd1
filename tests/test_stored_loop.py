"""The default adjoint's loop that stores every step's state (`_adjoint/stored.py`):
used where `max_steps` states fit its bound, with the gradients of `DirectAdjoint`
and of Equinox's checkpointed loop, for every kind of saved output, under `jax.vmap`
and to second order, in fewer equations than Equinox's loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx
import diffeqx._adjoint.base as adjoint_base
import diffeqx._adjoint.checkpoint as checkpoint
import diffeqx._adjoint.stored as stored
from diffeqx import _eager
from diffeqx._profile import count_equations

SAVEATS = {
    "ts": lambda: dfx.SaveAt(ts=jnp.linspace(0.0, 5.0, 7)),
    "steps": lambda: dfx.SaveAt(steps=True),
    "dense": lambda: dfx.SaveAt(t1=True, dense=True),
    "event": lambda: dfx.SaveAt(t1=True),
}


def _loss(p, adjoint, saveat="ts", max_steps=64, solver=None, dtype=jnp.float64):
    scale = jnp.asarray(p, dtype)

    def field(t, y, args):
        # `scale` is closed over (a traced value the loop must differentiate), `args`
        # passed.
        return -args * y + scale * jnp.sin(t).astype(dtype) * y[::-1]

    event = None
    if saveat == "event":
        event = dfx.Event(lambda t, y, args, **kw: y[0] - 0.3)
    sol = dfx.diffeqsolve(
        dfx.ODETerm(field),
        dfx.Tsit5() if solver is None else solver,
        jnp.asarray(0.0, dtype),
        jnp.asarray(5.0, dtype),
        jnp.asarray(0.1, dtype),
        jnp.asarray([1.0, 2.0], dtype) * scale,
        args=scale,
        saveat=SAVEATS[saveat](),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
        adjoint=adjoint,
        max_steps=max_steps,
        event=event,
        throw=False,
    )
    ys = jnp.where(jnp.isfinite(sol.ys), sol.ys, 0)
    ts = jnp.where(jnp.isfinite(sol.ts), sol.ts, 0)
    value = jnp.sum(ys**2) + jnp.sum(ts).astype(dtype)
    if saveat == "dense":
        value = value + jnp.sum(sol.evaluate(1.7) ** 2)
    return value


@pytest.fixture
def uses(monkeypatch):
    """Records the `max_steps` of each stored loop built (with its `slots`, where it
    keeps fewer states than steps)."""
    built = []
    real = stored.stored_while_loop

    def spy(*args, **kwargs):
        slots = kwargs.get("slots")
        built.append(
            kwargs["max_steps"] if slots is None else (kwargs["max_steps"], slots)
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(stored, "stored_while_loop", spy)
    _eager.forget_traces()
    return built


def _equinox_loop(monkeypatch):
    monkeypatch.setattr(
        adjoint_base.HeldMembersLoop, "for_body", lambda self, held: self.fallback
    )
    _eager.forget_traces()


@pytest.mark.parametrize("saveat", list(SAVEATS))
def test_gradient_is_direct_adjoint_s_for_every_saved_output(saveat, uses):
    grad = jax.grad(_loss)
    got = grad(0.7, dfx.RecursiveCheckpointAdjoint(), saveat)
    assert uses == [64]
    want = grad(0.7, dfx.DirectAdjoint(), saveat)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    if saveat != "ts":
        return  # the saved step times move with the parameter
    # And the derivative: a central difference (which also sees the step sizes
    # change with the parameter, as the discrete gradient does not: 1e-5 apart).
    h = 1e-6
    fd = (
        _loss(0.7 + h, dfx.DirectAdjoint(), saveat)
        - _loss(0.7 - h, dfx.DirectAdjoint(), saveat)
    ) / (2 * h)
    np.testing.assert_allclose(got, fd, rtol=1e-4)


def _steps(p):
    y0 = jnp.asarray([1.0, 2.0]) * p
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -args * y + args * jnp.sin(t) * y[::-1]),
        dfx.Tsit5(),
        0.0,
        5.0,
        0.1,
        y0,
        args=jnp.asarray(p),
        stepsize_controller=dfx.PIDController(rtol=1e-5, atol=1e-5),
    )
    return sol.stats["num_steps"]


@pytest.mark.parametrize(
    "saveat",
    # (The other outputs take ~6 s each on 2 cores: in the slow run.)
    [s if s == "ts" else pytest.param(s, marks=pytest.mark.slow) for s in SAVEATS],
)
def test_thinned_store_beyond_the_bound_and_the_same_gradient(
    saveat, uses, monkeypatch
):
    """Beyond the bound on storing every step's state, the loop keeps about
    `sqrt(max_steps)` states (8 for 64 steps, fewer than this solve takes, so
    it thins them and recomputes steps), with `DirectAdjoint`'s gradient for every
    kind of saved output; with explicit `checkpoints`, Equinox's checkpointed loop,
    to rounding."""
    assert int(_steps(0.7)) > 8
    monkeypatch.setattr(checkpoint, "_EVERY_STEP_BYTES", 0)
    _eager.forget_traces()
    got = jax.grad(_loss)(0.7, dfx.RecursiveCheckpointAdjoint(), saveat)
    assert uses == [(64, 8)]
    want = jax.grad(_loss)(0.7, dfx.DirectAdjoint(), saveat)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    explicit = jax.grad(_loss)(
        0.7, dfx.RecursiveCheckpointAdjoint(checkpoints=8), saveat
    )
    assert uses == [(64, 8)]  # not built again
    np.testing.assert_allclose(got, explicit, rtol=1e-12)
    if saveat == "ts":
        # A batch whose members take different numbers of steps: to the rounding of
        # the recomputed steps, which under `vmap` are compiled in another context
        # than the forward pass's (Equinox's loop with 8 checkpoints: 3e-11).
        ps = jnp.asarray([0.5, 0.7, 0.9])
        batched = jax.vmap(jax.grad(_loss), in_axes=(0, None))
        np.testing.assert_allclose(
            batched(ps, dfx.RecursiveCheckpointAdjoint()),
            batched(ps, dfx.DirectAdjoint()),
            rtol=1e-9,
        )


_PS = jnp.asarray([0.5, 0.7, 0.9])
_ADJOINT, _DIRECT = dfx.RecursiveCheckpointAdjoint(), dfx.DirectAdjoint()


def test_gradient_of_a_batch(uses):
    # `jax.grad` of a `jax.vmap`: the step holds the members that have finished.
    def total(ps, adj):
        return jnp.sum(jax.vmap(lambda p: _loss(p, adj, "steps"))(ps))

    np.testing.assert_allclose(
        jax.grad(total)(_PS, _ADJOINT), jax.grad(total)(_PS, _DIRECT), rtol=1e-10
    )
    assert uses == [64]


@pytest.mark.parametrize("saveat", ["ts", "dense", "event"])
def test_batch_of_gradients(uses, saveat):
    # `jax.vmap` of `jax.grad`: the `jax.vmap` is outside the derivative, and the
    # step still holds the members that have finished (they take 12, 11 and 14
    # steps).
    assert [int(_steps(p)) for p in _PS] == [12, 11, 14]
    got = jax.vmap(jax.grad(_loss), in_axes=(0, None, None))(_PS, _ADJOINT, saveat)
    assert uses == [64]
    # (With the event, `DirectAdjoint`'s batched gradient is 5e-10 from the
    # members' own, the root found in a batch rounding differently; this one 5e-11.)
    rtol = 1e-9 if saveat == "event" else 1e-10
    np.testing.assert_allclose(
        got,
        jax.vmap(jax.grad(_loss), in_axes=(0, None, None))(_PS, _DIRECT, saveat),
        rtol=rtol,
    )
    single = [jax.grad(_loss)(p, _ADJOINT, saveat) for p in _PS]
    np.testing.assert_allclose(got, single, rtol=rtol)


def test_second_derivatives(uses):
    # Forward over reverse.
    np.testing.assert_allclose(
        jax.hessian(_loss)(0.7, _ADJOINT), jax.hessian(_loss)(0.7, _DIRECT), rtol=1e-9
    )
    assert uses == [64]


def test_implicit_solver(uses):
    # An implicit solver: loops inside the step.
    kvaerno = dfx.Kvaerno5()
    np.testing.assert_allclose(
        jax.grad(_loss)(0.7, _ADJOINT, solver=kvaerno),
        jax.grad(_loss)(0.7, _DIRECT, solver=kvaerno),
        rtol=1e-10,
    )
    assert uses == [64]


def test_float32_gradient(uses):
    p = jnp.float32(0.7)
    got = jax.grad(_loss)(
        p, dfx.RecursiveCheckpointAdjoint(), "steps", dtype=jnp.float32
    )
    want = jax.grad(_loss)(p, dfx.DirectAdjoint(), "steps", dtype=jnp.float32)
    assert got.dtype == jnp.float32
    assert uses == [64]
    # Two programs, rounded differently: an adaptive float32 solve may then take
    # other steps (measured 6e-4 apart under the test run's XLA options, 1e-7 with
    # XLA's defaults).
    np.testing.assert_allclose(got, want, rtol=2e-3)


def test_fewer_equations_than_equinox_s_loop(monkeypatch):
    # Equinox's checkpointed loop also takes a forward-mode derivative of the whole
    # step, to find which of its outputs are perturbed; measured 1,266 equations
    # against 1,629 (the loop's own machinery 223 against 729); on 2026-12-07, 1,531
    # against 1,793 (the backward pass then reading each stored state in a branch
    # of its own, 7 equations more).
    def total():
        _eager.forget_traces()
        grad = jax.grad(_loss)
        jaxpr = jax.make_jaxpr(grad)(0.7, dfx.RecursiveCheckpointAdjoint())
        return sum(count_equations(jaxpr).values())

    ours = total()
    _equinox_loop(monkeypatch)
    theirs = total()
    assert ours <= 0.88 * theirs, (ours, theirs)


def _buffer_loop(theta, buf0, weights, loop):
    """A loop writing `x**2` at every other step into a buffer (each slot at most
    once), with a loss of the final buffer and state."""

    def cond(carry):
        return carry[0] < 5

    def body(carry):
        i, x, buf = carry
        x = jnp.sin(theta * x) + 0.1 * i
        buf = buf.at[i].set(x * x, pred=i % 2 == 0)
        return i + 1, x, buf

    init = (jnp.asarray(0), jnp.cos(theta), buf0)
    if loop is None:  # plain Python, the reference
        i, x, buf = init
        while cond((i, x, buf)):
            i, x, buf_new = body((i, x, _PlainBuffer(buf)))
            buf = buf_new.array
    else:
        _, x, buf = loop(cond, body, init, max_steps=8, buffers=lambda c: c[2])
    return jnp.sum(buf * weights) + x


class _PlainBuffer:
    def __init__(self, array):
        self.array = array

    @property
    def at(self):
        buffer = self

        class _At:
            def __getitem__(self, i):
                class _Set:
                    def set(self, x, pred=True):
                        old = buffer.array[i]
                        return _PlainBuffer(
                            buffer.array.at[i].set(jnp.where(pred, x, old))
                        )

                return _Set()

        return _At()


@pytest.mark.parametrize("wrt", ["theta", "buffer", "both"])
def test_buffer_cotangents_with_and_without_the_initial_buffer(wrt):
    """The stored loop's gradient through a buffer written at some steps: with
    respect to what the steps compute (the buffers' cotangents then stay the final
    ones, as each slot is written once), to the initial buffer (whose unwritten
    slots pass their cotangent through, the written ones none), and to both; equal
    to the gradient of the same loop run in plain Python."""
    weights = jnp.arange(1.0, 9.0)
    buf0 = jnp.linspace(-1.0, 1.0, 8)
    argnums = {"theta": 0, "buffer": 1, "both": (0, 1)}[wrt]
    stored_loop = stored.stored_while_loop
    got = jax.grad(_buffer_loop, argnums)(0.7, buf0, weights, stored_loop)
    want = jax.grad(_buffer_loop, argnums)(0.7, buf0, weights, None)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)
    if wrt == "buffer":
        # Slots 0, 2 and 4 are written: no cotangent reaches their initial values.
        np.testing.assert_array_equal(got[np.array([0, 2, 4])], 0.0)


def _long_loop(theta, buf0, loop, iterations=37):
    """A loop of `iterations` steps writing its state into a buffer at every third
    step, with a loss of the final buffer and state."""
    weights = jnp.linspace(0.5, 2.0, buf0.shape[0])

    def cond(carry):
        return carry[0] < iterations

    def body(carry):
        i, x, buf = carry
        x = jnp.sin(theta * x) + 0.01 * i * x[::-1]
        buf = buf.at[i // 3].set(x[0] * x[1], pred=i % 3 == 0)
        return i + 1, x, buf

    init = (jnp.asarray(0), jnp.stack([jnp.cos(theta), 0.3]), buf0)
    if loop is None:
        i, x, buf = init
        while cond((i, x, buf)):
            i, x, buf_new = body((i, x, _PlainBuffer(buf)))
            buf = buf_new.array
    else:
        _, x, buf = loop(cond, body, init, buffers=lambda c: c[2])
    return jnp.sum(buf * weights) + jnp.sum(x**2)


@pytest.mark.parametrize("slots", [None, 2, 4, 6, 8, 40])
@pytest.mark.parametrize("iterations", [1, 5, 37])
def test_thinned_store_gives_the_gradient(slots, iterations):
    """With `slots`, the loop keeps at most that many states, thinning them as it
    goes, and recomputes the iterations between them in the backward pass: the
    gradient (with respect to what the steps close over and to the initial buffer)
    is that of the same loop in plain Python, for loops shorter and longer than the
    slots, and at most `max_steps` long."""
    buf0 = jnp.linspace(-1.0, 1.0, 16)
    max_steps = 64

    def loop(*args, **kwargs):
        return stored.stored_while_loop(
            *args, max_steps=max_steps, slots=slots, **kwargs
        )

    for argnums in (0, (0, 1)):
        got = jax.grad(_long_loop, argnums)(0.7, buf0, loop, iterations)
        want = jax.grad(_long_loop, argnums)(0.7, buf0, None, iterations)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    value = jax.jit(lambda t: _long_loop(t, buf0, loop, iterations))(0.7)
    np.testing.assert_allclose(value, _long_loop(0.7, buf0, None, iterations))


def test_thinned_store_checks_its_slots():
    with pytest.raises(ValueError, match="slots"):
        stored.stored_while_loop(
            lambda c: False,
            lambda c: c,
            0.0,
            max_steps=8,
            buffers=lambda c: [],
            slots=3,
        )


def test_which_outputs_of_a_program_depend_on_its_inputs():
    # `stop_gradient`, integer and boolean values cut the dependence; calls,
    # branches and loops are followed inside; anything else is assumed to depend.
    def program(x, y, z):
        a = jax.lax.stop_gradient(x) * y  # on y only
        n = jnp.floor(x).astype(jnp.int32)  # integer: on nothing
        b = jax.lax.cond(n > 0, lambda u, v: u, lambda u, v: u + 1.0, z, x)  # z only
        c = jax.lax.fori_loop(0, 3, lambda i, c: (c[0] * 2.0, c[1] + c[0]), (y, z))
        d = jax.lax.scan(lambda c, t: (c + t, c * 0.0), x, jnp.ones(2))[1]  # x only
        e = jax.jit(lambda u, v: u * 2.0)(x, y)  # x only
        f = jax.nn.relu(y)  # a custom derivative: y
        return a, n, b, c[0], c[1], d, e, f

    closed = jax.make_jaxpr(program)(1.5, 2.0, 3.0)
    on_x = stored._depends(closed.jaxpr, [True, False, False])
    on_y = stored._depends(closed.jaxpr, [False, True, False])
    on_z = stored._depends(closed.jaxpr, [False, False, True])
    assert on_x == [False, False, False, False, False, True, True, False]
    assert on_y == [True, False, False, True, True, False, False, True]
    assert on_z == [False, False, True, False, True, False, False, False]


@pytest.mark.parametrize("wrt", ["p", "t1"])
def test_times_carry_cotangents_only_where_differentiated(monkeypatch, wrt):
    # Under `jax.grad` of a `jax.vmap`, the loop's times carry cotangents only where
    # `t1` is differentiated (the controller's factor stops gradients); the
    # gradients are `DirectAdjoint`'s either way.
    masks = []
    real = stored._perturbed_leaves

    def spy(*args):
        masks.append(real(*args))
        return masks[-1]

    monkeypatch.setattr(stored, "_perturbed_leaves", spy)
    _eager.forget_traces()

    def loss(p, t1, adjoint):
        def one(scale):
            sol = dfx.diffeqsolve(
                dfx.ODETerm(lambda t, y, a: -a * y + jnp.sin(t) * y[::-1]),
                dfx.Tsit5(), 0.0, t1, 0.1, jnp.array([1.0, 2.0]) * scale, args=p,
                saveat=dfx.SaveAt(ts=t1 * jnp.linspace(0.1, 1.0, 5)),
                stepsize_controller=dfx.PIDController(rtol=1e-6, atol=1e-6),
                adjoint=adjoint, max_steps=64,
            )  # fmt: skip
            return jnp.sum(sol.ys**2)

        return jnp.sum(jax.vmap(one)(jnp.array([1.0, 0.5, 2.0])))

    argnum = 0 if wrt == "p" else 1
    got = jax.grad(loss, argnum)(0.7, 3.0, dfx.RecursiveCheckpointAdjoint())
    expected = jax.grad(loss, argnum)(0.7, 3.0, dfx.DirectAdjoint())
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert len(masks) == 1
    # The packed floating scalars (times, step size, the controller's memory) are
    # the first leaf of the loop's state.
    assert masks[0][0] == (wrt == "t1")
    assert any(masks[0][1:])

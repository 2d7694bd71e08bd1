"""Reverse-mode memory of the default adjoint and of `BacksolveAdjoint` is bounded, not
proportional to the number of steps (read from XLA's compiled memory statistics, which
on CPU are the peak the executable can use: its buffers are all assigned at compile
time)."""

import jax
import jax.numpy as jnp
import pytest

import diffeqx as dfx
from diffeqx._adjoint import checkpoint as checkpoint_module

STATE_SIZE = 64
STORAGE_BYTES = checkpoint_module._STORAGE_BYTES


def _grad_temp_bytes(max_steps, checkpoints, dt0):
    def loss(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: -y),
            dfx.Tsit5(),
            0.0,
            1.0,
            dt0,
            y0,
            max_steps=max_steps,
            adjoint=dfx.RecursiveCheckpointAdjoint(checkpoints=checkpoints),
        )
        return jnp.sum(sol.ys)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(STATE_SIZE)).compile()
    return _temp_bytes(compiled)


def _temp_bytes(compiled):
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory statistics")
    return stats.temp_size_in_bytes


def test_checkpointed_grad_memory_does_not_grow_with_steps():
    # 10,000 steps of a 64-float64 state would be 5 MB if every step were stored.
    small = _grad_temp_bytes(max_steps=1_000, checkpoints=50, dt0=1e-3)
    large = _grad_temp_bytes(max_steps=10_000, checkpoints=50, dt0=1e-4)
    stored_every_step = 10_000 * STATE_SIZE * 8
    # (Constant steps run on the fixed-step path, whose memory is a few kilobytes: a
    # little bookkeeping may differ between the two, hence the absolute slack.)
    assert large <= 1.1 * small + 16 * 1024
    assert large < stored_every_step / 10


def test_default_checkpoints_grow_sublinearly_with_max_steps(monkeypatch):
    # The blocks themselves (a short solve would otherwise store every step: see the
    # next test).
    monkeypatch.setattr(checkpoint_module, "_STORAGE_BYTES", 0)
    small = _grad_temp_bytes(max_steps=1_000, checkpoints=None, dt0=1e-3)
    large = _grad_temp_bytes(max_steps=100_000, checkpoints=None, dt0=1e-5)
    # 100x the steps must cost far less than 100x the memory.
    assert large < 20 * small


def _nonlinear_grad(num_steps, storage=None, monkeypatch=None, run=True):
    """Compiled memory and (if `run`) gradient of `jax.grad` through `num_steps`
    constant Tsit5 steps of a nonlinear field with the default adjoint (whose reverse
    pass must keep values of every step: a linear field's needs none)."""
    if storage is not None:
        monkeypatch.setattr(checkpoint_module, "_STORAGE_BYTES", storage)

    def loss(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(lambda t, y, args: jnp.sin(y) - 0.1 * y),
            dfx.Tsit5(),
            0.0,
            1.0,
            1.0 / num_steps,
            y0,
            max_steps=num_steps,
        )
        return jnp.sum(sol.ys**2)

    y0 = jnp.linspace(0.5, 1.0, STATE_SIZE)
    compiled = jax.jit(jax.grad(loss)).lower(y0).compile()
    return _temp_bytes(compiled), compiled(y0) if run else None


def test_default_stores_every_fixed_step_only_within_its_bound(monkeypatch):
    # A short fixed-step solve keeps what its steps' backward pass needs rather than
    # recomputing them: more memory than the blocks, the same gradient.
    stored, grad = _nonlinear_grad(1_000)
    blocks, grad_blocks = _nonlinear_grad(1_000, 0, monkeypatch)
    assert stored > 1_000 * STATE_SIZE * 8
    assert stored > 4 * blocks
    assert jnp.allclose(grad, grad_blocks, rtol=1e-12, atol=0)
    # A long one would need far more than the bound (and so would every step's
    # state, about 1 kB a step): blocks of about sqrt(50,000) steps, whose memory
    # stays far below both.
    long, _ = _nonlinear_grad(50_000, STORAGE_BYTES, monkeypatch, run=False)
    assert 50_000 * stored / 1_000 > 2 * STORAGE_BYTES  # (what storing would need)
    assert 50_000 * 1_000 > 2 * STORAGE_BYTES  # (every step's state)
    assert long < STORAGE_BYTES / 8
    # The bound holds where keeping the values would exceed it. With 2**20 bytes
    # allowed: 10 steps keep theirs; 400 steps (keeping them would take about 1.2 MB,
    # from the 1,000 above) keep every step's state instead, about 1 kB a step,
    # recomputing one step at a time; 5,000 steps (5 MB of states) run in blocks.
    small_bound = 2**20
    under, _ = _nonlinear_grad(10, small_bound, monkeypatch, run=False)
    states, _ = _nonlinear_grad(400, small_bound, monkeypatch, run=False)
    over, _ = _nonlinear_grad(5_000, small_bound, monkeypatch, run=False)
    assert under <= small_bound
    assert 400 * stored / 1_000 > small_bound
    assert 400 * STATE_SIZE * 8 < states <= small_bound / 2
    assert states < 400 * stored / 1_000 / 2
    assert over <= small_bound / 2


def test_fixed_step_blocks_of_one_step_give_the_same_gradient(monkeypatch):
    # Blocks of one step (every step's state kept, each step recomputed once) against
    # keeping every step's values: the same gradient.
    stored, grad = _nonlinear_grad(400)
    states, grad_states = _nonlinear_grad(400, 2**20, monkeypatch)
    assert states < stored / 2
    assert jnp.allclose(grad, grad_states, rtol=1e-12, atol=0)


# ---- adaptive steps: the solve loop proper (not the constant-step path) ---------------
#
# 32 oscillators whose frequency grows with their amplitude: a nonlinear field (so a
# reverse pass that stored every step would have to keep every state), with a closed
# form, because each oscillator's amplitude is conserved and it turns at the frequency
# of its initial amplitude. A `PIDController` at rtol = atol = 1e-8 takes about 23.5
# steps per unit of time, so t1 = 42 and t1 = 425 give about 1,000 and 10,000 steps.

OSCILLATORS = STATE_SIZE // 2
FREQUENCIES = jnp.linspace(1.0, 2.0, OSCILLATORS)
SHORT_T1, LONG_T1 = 42.0, 425.0
SMALL_MAX_STEPS = 2_048
MAX_STEPS = 16_384


def _frequency(q, p):
    return FREQUENCIES * (1 + 0.25 * (q**2 + p**2))


def _oscillators(t, y, args):
    q, p = y[:OSCILLATORS], y[OSCILLATORS:]
    frequency = _frequency(q, p)
    return jnp.concatenate([frequency * p, -frequency * q])


def _oscillators_exact(y0, t1):
    q, p = y0[:OSCILLATORS], y0[OSCILLATORS:]
    angle = _frequency(q, p) * t1
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return jnp.concatenate([q * cos + p * sin, p * cos - q * sin])


def _adaptive_grad(adjoint, t1, max_steps):
    """Compiled memory of `jax.grad` of an adaptive solve; the number of steps the
    solve took; and the gradient's error against the closed form, relative to its
    largest entry."""

    def loss(y0):
        sol = dfx.diffeqsolve(
            dfx.ODETerm(_oscillators),
            dfx.Tsit5(),
            0.0,
            t1,
            0.01,
            y0,
            stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
            max_steps=max_steps,
            adjoint=adjoint,
        )
        return jnp.sum(sol.ys), sol.stats["num_steps"]

    y0 = jnp.linspace(0.5, 1.0, STATE_SIZE)
    compiled = jax.jit(jax.grad(loss, has_aux=True)).lower(y0).compile()
    grad, num_steps = compiled(y0)
    exact = jax.grad(lambda y: jnp.sum(_oscillators_exact(y, t1)))(y0)
    error = float(jnp.max(jnp.abs(grad - exact)) / jnp.max(jnp.abs(exact)))
    return _temp_bytes(compiled), int(num_steps), error


def _check_steps(short_steps, long_steps):
    assert 900 <= short_steps <= 1_100
    assert 9_000 <= long_steps <= 11_000


@pytest.mark.parametrize(
    "adjoint",
    [
        pytest.param(
            dfx.RecursiveCheckpointAdjoint(),
            id="RecursiveCheckpointAdjoint",
            marks=pytest.mark.slow,  # ~15 s; the checkpointed-loop memory test stays
        ),
        pytest.param(
            dfx.BacksolveAdjoint(), id="BacksolveAdjoint", marks=pytest.mark.slow
        ),
    ],
)
def test_adaptive_grad_memory_does_not_grow_with_steps(adjoint):
    short, short_steps, short_error = _adaptive_grad(adjoint, SHORT_T1, MAX_STEPS)
    long, long_steps, long_error = _adaptive_grad(adjoint, LONG_T1, MAX_STEPS)
    _check_steps(short_steps, long_steps)
    # The gradients are right (the long solve's phase error grows with t1).
    assert short_error < 1e-4
    assert long_error < 1e-2
    # Ten times the steps, the same memory, and far less than keeping one state per
    # step (5 MB here; a reverse pass that keeps everything needs several per step).
    assert long <= 1.05 * short
    assert long < long_steps * STATE_SIZE * 8 / 10


@pytest.mark.slow
def test_adaptive_grad_memory_with_fixed_checkpoints_ignores_max_steps():
    adjoint = dfx.RecursiveCheckpointAdjoint(checkpoints=64)
    short, short_steps, _ = _adaptive_grad(adjoint, SHORT_T1, SMALL_MAX_STEPS)
    long, long_steps, _ = _adaptive_grad(adjoint, LONG_T1, MAX_STEPS)
    _check_steps(short_steps, long_steps)
    # 8x the step budget and 10x the steps taken: the memory of 64 checkpoints.
    assert long <= 1.05 * short


def test_backsolve_grad_memory_ignores_max_steps():
    # (The backward solve takes more steps than the forward one: a budget of 1,024
    # would not do.)
    small_budget, _, _ = _adaptive_grad(
        dfx.BacksolveAdjoint(), SHORT_T1, SMALL_MAX_STEPS
    )
    large_budget, _, _ = _adaptive_grad(dfx.BacksolveAdjoint(), SHORT_T1, MAX_STEPS)
    assert large_budget <= 1.05 * small_budget


def test_memory_statistics_see_per_step_storage():
    # The control for the tests above: a reverse pass through a plain `lax.scan` keeps
    # every one of its 10,000 states, and the statistics show it.
    def loss(y0):
        def step(y, _):
            return y + 1e-3 * _oscillators(0.0, y, None), None

        y1, _ = jax.lax.scan(step, y0, None, length=10_000)
        return jnp.sum(y1)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(STATE_SIZE)).compile()
    assert _temp_bytes(compiled) >= 10_000 * STATE_SIZE * 8


def test_default_stores_every_adaptive_step_only_within_its_bound(monkeypatch):
    # With `checkpoints=None`, a loop whose `max_steps` states fit in
    # `_EVERY_STEP_BYTES` stores every step's state (a smaller program, the same
    # gradient); above the bound, the checkpoints of Equinox's default.
    default = dfx.RecursiveCheckpointAdjoint()
    t1 = 10.0  # about 235 steps
    stored, steps, error = _adaptive_grad(default, t1, 1_000)
    assert 200 <= steps <= 300 and error < 1e-5
    assert stored >= 1_000 * STATE_SIZE * 8  # one state per step of `max_steps`
    assert stored <= checkpoint_module._EVERY_STEP_BYTES
    # The same solve with the bound set below it: checkpoints, far less memory.
    monkeypatch.setattr(checkpoint_module, "_EVERY_STEP_BYTES", 1_000 * STATE_SIZE)
    jax.clear_caches()  # the solve is otherwise reused as compiled with the default
    checkpointed, _, checkpointed_error = _adaptive_grad(default, t1, 1_000)
    assert checkpointed < stored / 4
    # The same gradient, to the rounding of steps recomputed in another program
    # (7e-10 of the gradient's largest entry here).
    assert abs(checkpointed_error - error) < 1e-8


def test_fixed_step_storage_estimate_tracks_compiled_memory(monkeypatch):
    # What the fixed-step path counts as kept for the backward pass (the values of
    # the step's linearisation, times the steps and the batch) against XLA's compiled
    # temporary memory when they are kept: the same order (the estimate counts some
    # values XLA does not keep, e.g. an input kept as it is).
    from diffeqx._solve import fixed

    counted = []
    original = fixed._stored_bytes
    monkeypatch.setattr(
        fixed, "_stored_bytes", lambda *a: counted.append(original(*a)) or counted[-1]
    )
    temp, _ = _nonlinear_grad(1_000, run=False)
    assert len(counted) == 1
    assert 0.5 * temp <= counted[0] <= 3 * temp

    # A network in the field, under `jax.vmap` (the batch is counted).
    counted.clear()
    weights = jnp.linspace(-1.0, 1.0, 16 * 4).reshape(16, 4)

    def field(t, y, args):
        return jnp.tanh(args @ jnp.tanh(weights @ y))

    def loss(args, y0):
        sol = dfx.diffeqsolve(dfx.ODETerm(field), dfx.Tsit5(), 0.0, 1.0, 0.05, y0, args)
        return jnp.sum(sol.ys**2)

    y0s = jnp.linspace(0.1, 1.0, 8 * 4).reshape(8, 4)
    batched = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    compiled = jax.jit(batched).lower(weights.T / 4, y0s).compile()
    assert len(counted) == 1
    assert 0.5 * _temp_bytes(compiled) <= counted[0] <= 3 * _temp_bytes(compiled)

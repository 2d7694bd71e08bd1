"""Reverse-mode memory of the default adjoint is bounded by its checkpoints, not by the
number of steps (read from XLA's compiled memory statistics)."""

import jax
import jax.numpy as jnp
import pytest

import diffeqx as dfx

STATE_SIZE = 64


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
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory statistics")
    return stats.temp_size_in_bytes


def test_checkpointed_grad_memory_does_not_grow_with_steps():
    # 10,000 steps of a 64-float64 state would be 5 MB if every step were stored.
    small = _grad_temp_bytes(max_steps=1_000, checkpoints=50, dt0=1e-3)
    large = _grad_temp_bytes(max_steps=10_000, checkpoints=50, dt0=1e-4)
    stored_every_step = 10_000 * STATE_SIZE * 8
    assert large <= 1.1 * small
    assert large < stored_every_step / 10


def test_default_checkpoints_grow_sublinearly_with_max_steps():
    small = _grad_temp_bytes(max_steps=1_000, checkpoints=None, dt0=1e-3)
    large = _grad_temp_bytes(max_steps=100_000, checkpoints=None, dt0=1e-5)
    # 100x the steps must cost far less than 100x the memory.
    assert large < 20 * small

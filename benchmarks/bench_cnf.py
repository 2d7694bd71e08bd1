"""Compile time of a continuous-normalising-flow training step, with Diffrax alongside.

    python benchmarks/bench_cnf.py [--no-diffrax]

A workload the core benchmarks do not cover: the vector field's exact log-density
change is the trace of its Jacobian (a `jax.vmap` of VJPs inside the field), the
flow has two blocks solved one after the other backwards in time with `Tsit5` and 10
constant steps each, the loss is a `jax.vmap` over a batch of 64 points, and its
gradient is taken with the default adjoint inside a `lax.fori_loop` over two
minibatches, all under one `equinox.filter_jit`.

For each library, the step is traced and lowered, then compiled by XLA (cold caches),
twice: first with the step counter a Python integer, then with it an array, as
happens after the first step of a training loop (the second call compiles again).
The second trace shows whether anything traced the first time is reused.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.lax as lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from bench_core import libraries_and_run_time  # noqa: E402

BATCH = 64
MINIBATCHES = 2
BLOCKS = 2
WIDTH = 16


class Field(eqx.Module):
    """An MLP in (y, t): the flow's velocity."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(jnp.concatenate([y, jnp.reshape(t, (1,))]))


def _with_log_density(t, state, field):
    """The flow's velocity and the change of its log-density: minus the trace of
    the velocity's Jacobian, formed from one VJP per dimension."""
    y, _ = state
    velocity, pullback = jax.vjp(lambda x: field(t, x, None), y)
    (jacobian,) = jax.vmap(pullback)(jnp.eye(y.shape[0], dtype=y.dtype))
    return velocity, -jnp.trace(jacobian)


def training_step(lib):
    def log_likelihood(fields, x):
        state = (x, jnp.zeros((), x.dtype))
        for field in reversed(fields):
            sol = lib.diffeqsolve(
                lib.ODETerm(_with_log_density),
                lib.Tsit5(),
                0.5,
                0.0,
                -0.05,
                state,
                field,
            )
            state = jax.tree.map(lambda leaf: leaf[-1], sol.ys)
        y, change = state
        return change - 0.5 * jnp.sum(y**2)

    def loss(fields, batch):
        return -jnp.mean(jax.vmap(lambda x: log_likelihood(fields, x))(batch))

    @eqx.filter_jit
    def step(fields, data, counter):
        def minibatch(i, carry):
            total, grads = carry
            batch = lax.dynamic_slice_in_dim(data, (counter + i) * BATCH, BATCH)
            value, g = eqx.filter_value_and_grad(loss)(fields, batch)
            return total + value, jax.tree.map(jnp.add, grads, g)

        zeros = jax.tree.map(jnp.zeros_like, eqx.filter(fields, eqx.is_array))
        return lax.fori_loop(0, MINIBATCHES, minibatch, (0.0, zeros))

    return step


def main(argv=None) -> int:
    _, libraries = libraries_and_run_time(__doc__, argv)
    keys = jr.split(jr.key(0), BLOCKS + 1)
    fields = [
        Field(eqx.nn.MLP(3, 2, WIDTH, 2, activation=jnp.tanh, key=k))
        for k in keys[:BLOCKS]
    ]
    data = jr.normal(keys[-1], (4 * BATCH * MINIBATCHES, 2))
    print(f"jax {jax.__version__} on {jax.default_backend()}; float32")
    print(
        f"{'library':8s} {'counter':8s} {'trace s':>8s} {'xla s':>7s} {'total s':>8s}"
    )
    totals = {}
    for name, lib in libraries.items():
        step = training_step(lib)
        jax.clear_caches()
        for label, counter in (("int", 0), ("array", jnp.asarray(0))):
            start = time.perf_counter()
            lowered = step.lower(fields, data, counter)
            traced = time.perf_counter() - start
            start = time.perf_counter()
            lowered.compile()
            compiled = time.perf_counter() - start
            totals[name, label] = traced + compiled
            print(
                f"{name:8s} {label:8s} {traced:8.2f} {compiled:7.2f} "
                f"{traced + compiled:8.2f}"
            )
    if "diffrax" in libraries:
        for label in ("int", "array"):
            ratio = totals["diffeqx", label] / totals["diffrax", label]
            print(f"compile, counter {label}: diffeqx / diffrax = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

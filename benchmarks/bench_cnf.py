"""Compile and run time of a continuous-normalising-flow training step, with Diffrax alongside.

    python benchmarks/bench_cnf.py [--no-diffrax] [--width N] [--depth N]

A workload the core benchmarks do not cover: the vector field's exact log-density
change is the trace of its Jacobian (a `jax.vmap` of VJPs inside the field), the
flow has two blocks solved one after the other backwards in time with `Tsit5` and 10
constant steps each, the loss is a `jax.vmap` over a batch of 64 points, and its
gradient is taken with the default adjoint inside a `lax.fori_loop` over two
minibatches, all under one `equinox.filter_jit`.

The network is an MLP of `--width` (default 64) and `--depth` (default 3) hidden
layers, as in Diffrax's published example of this model.

For each library, the step is traced and lowered, then compiled by XLA (cold caches),
twice: first with the step counter a Python integer, then with it an array, as
happens after the first step of a training loop (the second call compiles again).
The second trace shows whether anything traced the first time is reused. Then the
second program's steady run time is measured (the libraries taking turns), with its
temporary memory as XLA's compiled statistics give it.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import argparse  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.lax as lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from _timing import time_runs  # noqa: E402
from bench_core import load_libraries  # noqa: E402

BATCH = 64
MINIBATCHES = 2
BLOCKS = 2


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    options = parser.parse_args(argv)
    libraries = load_libraries(options.no_diffrax)
    keys = jr.split(jr.key(0), BLOCKS + 1)
    fields = [
        Field(
            eqx.nn.MLP(3, 2, options.width, options.depth, activation=jnp.tanh, key=k)
        )
        for k in keys[:BLOCKS]
    ]
    data = jr.normal(keys[-1], (4 * BATCH * MINIBATCHES, 2))
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; float32; MLP width "
        f"{options.width}, depth {options.depth}"
    )
    print(
        f"{'library':8s} {'counter':8s} {'trace s':>8s} {'xla s':>7s} {'total s':>8s}"
        f" {'temp MB':>8s}"
    )
    totals, runners = {}, {}
    for name, lib in libraries.items():
        step = training_step(lib)
        jax.clear_caches()
        for label, counter in (("int", 0), ("array", jnp.asarray(0))):
            start = time.perf_counter()
            lowered = step.lower(fields, data, counter)
            traced = time.perf_counter() - start
            start = time.perf_counter()
            compiled = lowered.compile()
            xla = time.perf_counter() - start
            totals[name, label] = traced + xla
            # (An `equinox` compiled function holds JAX's as `.compiled`.)
            stats = getattr(compiled, "compiled", compiled).memory_analysis()
            temp = float("nan") if stats is None else stats.temp_size_in_bytes / 1e6
            print(
                f"{name:8s} {label:8s} {traced:8.2f} {xla:7.2f} {traced + xla:8.2f}"
                f" {temp:8.1f}"
            )
        runners[name] = (compiled, (fields, data, jnp.asarray(0)))
    _, runs = time_runs(runners, min_time_s=options.min_run_time)
    for name, run in runs.items():
        print(f"{name:8s} run {1e3 * run.median_s:8.2f} ms (median of {run.repeats})")
    if "diffrax" in libraries:
        for label in ("int", "array"):
            ratio = totals["diffeqx", label] / totals["diffrax", label]
            print(f"compile, counter {label}: diffeqx / diffrax = {ratio:.2f}x")
        ratio = runs["diffeqx"].median_s / runs["diffrax"].median_s
        print(f"run: diffeqx / diffrax = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

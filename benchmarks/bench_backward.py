"""The cost of the backward pass relative to the forward pass, with the default adjoint.

    python benchmarks/bench_backward.py [--no-diffrax]

For each neural-ODE loss below, the forward pass alone (`loss`) and the loss with its
gradient (`eqx.filter_value_and_grad(loss)`) are compiled and timed (median of repeated
calls through `jax.jit`, libraries taking turns); backward / forward is
`(t_grad - t_loss) / t_loss`.
The losses (float64, Tsit5, `PIDController(rtol=1e-6, atol=1e-6)`,
`RecursiveCheckpointAdjoint()`, an MLP of width 64 and depth 2):

- `single`: one trajectory, 50 saves (bench_core.py's (d));
- `batch256`: 256 trajectories as one (256, 2) state, 50 saves (bench_core.py's (g));
- `vmap32`: 32 trajectories under `jax.vmap`, 50 saves (bench_adjoint.py's (a)).

Under each loss, the row `field` times the vector field alone, on the state of that
loss (`(2,)`, `(256, 2)`, `(32, 2)`): 200 evaluations in a `lax.fori_loop`, and 200
`jax.vjp`s (evaluation and transposition, cotangents for the parameters and the
state). Its `bwd/fwd` is the VJP's time over the evaluation's: what a backward pass
that re-evaluates the field at each stage (as recursive checkpointing does) costs per
evaluation the forward pass makes, before any cost of the loop.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from _problems import (  # noqa: E402
    BatchedField,
    Config,
    _neural_ode_data,
    neural_ode_solve,
)
from _timing import Runner, time_runs  # noqa: E402
from bench_core import libraries_and_run_time  # noqa: E402


def _solve_ys(lib, field, y0, ts):
    return neural_ode_solve(lib, field, y0, ts).ys


def losses(lib, config):
    field, y0, ts, target = _neural_ode_data(config)
    y0s = jax.random.uniform(
        jax.random.key(1), (256, 2), config.dtype, minval=-1.0, maxval=1.0
    )
    decay = jnp.exp(-0.1 * ts)[:, None, None]

    def single(field, y0, ts, target):
        return jnp.mean((_solve_ys(lib, field, y0, ts) - target) ** 2)

    def batch256(field, y0s, ts):
        ys = _solve_ys(lib, BatchedField(field), y0s, ts)
        return jnp.mean((ys - decay * y0s[None]) ** 2)

    def vmap32(field, y0s, ts):
        ys = jax.vmap(lambda y0: _solve_ys(lib, field, y0, ts))(y0s)
        return jnp.mean((ys - jnp.moveaxis(decay * y0s[None], 1, 0)) ** 2)

    return {
        "single": (single, (field, y0, ts, target)),
        "batch256": (batch256, (field, y0s, ts)),
        "vmap32": (vmap32, (field, y0s[:32], ts)),
    }


FIELD_EVALUATIONS = 200


def field_runners(config, name):
    """The vector field of loss `name` alone: `FIELD_EVALUATIONS` evaluations, and as
    many VJPs (see the module's docstring)."""
    field, y0, _, _ = _neural_ode_data(config)
    if name != "single":
        rows = 256 if name == "batch256" else 32
        field = BatchedField(field)
        y0 = jax.random.uniform(jax.random.key(1), (rows, 2), config.dtype)
    params, static = eqx.partition(field, eqx.is_array)
    t = jnp.zeros((), config.dtype)
    step = jnp.asarray(1e-3, config.dtype)

    def apply(params, y):
        return eqx.combine(params, static)(t, y, None)

    def evaluations(params, y):
        def body(_, y):
            return y + step * apply(params, y)

        return jax.lax.fori_loop(0, FIELD_EVALUATIONS, body, y)

    def vjps(params, y):
        def body(_, carry):
            y, total = carry
            out, pullback = jax.vjp(apply, params, y)
            d_params, d_y = pullback(out)
            return y + step * d_y, jax.tree.map(jnp.add, total, d_params)

        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, FIELD_EVALUATIONS, body, (y, zeros))

    args = (params, y0)
    return (Runner(evaluations, args), args), (Runner(vjps, args), args)


def main(argv=None) -> int:
    options, libraries = libraries_and_run_time(__doc__, argv)
    config = Config(dtype=jnp.float64, batch_size=1)
    print(f"jax {jax.__version__} on {jax.default_backend()}; float64")
    print(
        f"{'loss':10s} {'library':8s} {'forward ms':>11s} {'fwd+bwd ms':>11s} "
        f"{'bwd/fwd':>8s}"
    )
    for name in ("single", "batch256", "vmap32"):
        runners = {}
        for lib_name, lib in libraries.items():
            loss, args = losses(lib, config)[name]
            runners[f"{lib_name}/forward"] = (Runner(loss, args), args)
            grad = eqx.filter_value_and_grad(loss)
            runners[f"{lib_name}/grad"] = (Runner(grad, args), args)
        runners["field/forward"], runners["field/grad"] = field_runners(config, name)
        _, runs = time_runs(runners, min_time_s=options.min_run_time)
        evaluation = runs["field/forward"].median_s
        vjp = runs["field/grad"].median_s
        print(
            f"{name:10s} {'field':8s} {1e3 * evaluation:11.3f} {1e3 * vjp:11.3f} "
            f"{vjp / evaluation:7.2f}x"
        )
        for lib_name in libraries:
            forward = runs[f"{lib_name}/forward"].median_s
            both = runs[f"{lib_name}/grad"].median_s
            print(
                f"{name:10s} {lib_name:8s} {1e3 * forward:11.3f} {1e3 * both:11.3f} "
                f"{(both - forward) / forward:7.2f}x"
            )
    print(
        "target: backward <= 3x forward with the default adjoint. field: the vector "
        f"field alone, {FIELD_EVALUATIONS} evaluations (forward ms) and as many VJPs "
        "(fwd+bwd ms); its bwd/fwd is VJP over evaluation"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

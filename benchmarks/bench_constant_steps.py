"""Constant steps saving at requested times, batched: a neural ODE's forward pass and
training gradient with `SaveAt(ts=...)`, with Diffrax alongside.

    python benchmarks/bench_constant_steps.py [--no-diffrax] [--min-run-time S]

The problem (float32): a 16-dimensional state whose vector field is an MLP of the
time and the state (width 16, one hidden layer, SiLU, tanh at the end), 63 constant
`ReversibleHeun` steps of 1 from 0 to 63, saved at the 64 times 0, 1, ..., 63, for
1,024 initial states (`jax.vmap`). Rows:

- "forward, known ts": the save times a constant array (known when the solve is
  traced);
- "forward, traced ts": the save times an argument of the jitted function;
- "grad, known ts" / "grad, traced ts": the gradient of the mean square of the saved
  states with respect to the MLP, with the default adjoint.

The first row also times a hand-written `lax.scan` doing the same arithmetic and
saving every step (`hand_written`), and prints each library's run time over it.

Compile (trace + lower + XLA, cold caches) and run (median of repeated calls, the
libraries taking turns) are timed separately, as in `_timing.py`; ratios are
diffeqx over Diffrax.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from _timing import compile_once, time_runs  # noqa: E402
from bench_core import libraries_and_run_time  # noqa: E402

BATCH, DIM, STEPS = 1024, 16, 63


def _solve(lib, mlp, y0, ts):
    def field(t, y, args):
        return args(jnp.concatenate([t[None], y]))

    sol = lib.diffeqsolve(
        lib.ODETerm(field),
        lib.ReversibleHeun(),
        0.0,
        float(STEPS),
        1.0,
        y0,
        args=mlp,
        saveat=lib.SaveAt(ts=ts),
    )
    return sol.ys


def build(lib, row: str):
    """`(fn, args)` of a row for `lib`."""
    known = np.linspace(0.0, float(STEPS), STEPS + 1, dtype=np.float32)
    mlp = eqx.nn.MLP(
        DIM + 1,
        DIM,
        16,
        1,
        activation=jax.nn.silu,
        final_activation=jnp.tanh,
        key=jr.key(0),
    )
    y0s = jr.normal(jr.key(1), (BATCH, DIM))

    def forward(mlp, y0s, ts):
        return jax.vmap(lambda y0: _solve(lib, mlp, y0, ts))(y0s)

    def loss(mlp, y0s, ts):
        return jnp.mean(forward(mlp, y0s, ts) ** 2)

    fn = forward if row.startswith("forward") else eqx.filter_grad(loss)
    if row.endswith("known ts"):
        return (lambda mlp, y0s: fn(mlp, y0s, known)), (mlp, y0s)
    return fn, (mlp, y0s, jnp.asarray(known))


def hand_written(mlp, y0s):
    """The forward pass as a hand-written `lax.scan`: `ReversibleHeun`'s arithmetic
    (equal to Diffrax's solve to the bit in float64), saving every step's state as
    the scan's output. The floor for a library's fixed-step loop."""

    def field(t, y):
        return mlp(jnp.concatenate([t[None], y]))

    def single(y0):
        def step(carry, index):
            y, y_hat, f_hat = carry
            t1 = (index + 1).astype(y0.dtype)
            y_hat1 = 2 * y - y_hat + f_hat
            f_hat1 = field(t1, y_hat1)
            y1 = y + 0.5 * (f_hat + f_hat1)
            return (y1, y_hat1, f_hat1), y1

        f0 = field(jnp.zeros((), y0.dtype), y0)
        _, ys = jax.lax.scan(step, (y0, y0, f0), jnp.arange(STEPS))
        return jnp.concatenate([y0[None], ys])

    return jax.vmap(single)(y0s)


ROWS = ("forward, known ts", "forward, traced ts", "grad, known ts", "grad, traced ts")


def main(argv=None) -> int:
    options, libraries = libraries_and_run_time(__doc__, argv)
    print(
        f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); float32; libraries: {', '.join(libraries)}"
    )
    table, notes = [], []
    for row in ROWS:
        runners, compiles = {}, {}
        for name, lib in libraries.items():
            print(f"compiling {row} / {name} ...", flush=True)
            fn, args = build(lib, row)
            runners[name], compiles[name] = compile_once(fn, args)
        if row == "forward, known ts":
            # The same steps and saves as a hand-written scan.
            fn, args = build(libraries["diffeqx"], row)
            runners["lax.scan"], compiles["lax.scan"] = compile_once(hand_written, args)
        _, runs = time_runs(
            {name: (runner, runner.args) for name, runner in runners.items()},
            min_time_s=options.min_run_time,
        )
        for name in runners:
            ratios = ("-", "-")
            if name == "diffeqx" and "diffrax" in runs:
                ratios = (
                    f"{runs[name].median_s / runs['diffrax'].median_s:.2f}x",
                    f"{compiles[name].total_s / compiles['diffrax'].total_s:.2f}x",
                )
            table.append(
                (row, name, compiles[name].total_s, runs[name].median_s * 1e3, *ratios)
            )
        if "lax.scan" in runs:
            floor = runs["lax.scan"].median_s
            notes.append(
                f"{row}: run over the hand-written lax.scan: "
                + ", ".join(
                    f"{name} {runs[name].median_s / floor:.2f}x"
                    for name in runners
                    if name != "lax.scan"
                )
            )
    print()
    header = (
        f"{'row':<20} {'library':<8} {'compile s':>9} {'run ms':>8} "
        f"{'run/diffrax':>12} {'compile/diffrax':>16}"
    )
    print(header)
    print("-" * len(header))
    for row, name, compile_s, run_ms, run_ratio, compile_ratio in table:
        print(
            f"{row:<20} {name:<8} {compile_s:>9.2f} {run_ms:>8.2f} "
            f"{run_ratio:>12} {compile_ratio:>16}"
        )
    print(
        "compile s: trace + lower + XLA compile, cold caches; run ms: median steady "
        "run; ratios: diffeqx over diffrax (targets: run <= 0.8x, compile <= 0.5x)."
    )
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

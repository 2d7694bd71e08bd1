"""What JAX's persistent compilation cache saves: the compile time of the same solve
in a first process (cold cache) and in a second one (reading the cache).

    python benchmarks/compile_cache.py [--cache-dir DIR]

Each measurement runs in a fresh Python process: `eqx.filter_jit(fn).lower(...)` and
`.compile()` are timed for a Lotka–Volterra Tsit5 solve (100 saves) and the gradient
of a neural-ODE loss (MLP 64 x 2, 50 saves), each with `throw=True` and
`throw=False`, first with an empty cache directory, then again reading it. (JAX does
not cache programs that call back to the host, as the runtime error of `throw=True`
does.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, {here!r})
import jax
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
import equinox as eqx
import jax.numpy as jnp
from bench_core import import_diffeqx
from _problems import NeuralField, lotka_volterra
import jax.random as jr
lib = import_diffeqx()


def lv(throw):
    def solve(y0, args):
        return lib.diffeqsolve(
            lib.ODETerm(lotka_volterra), lib.Tsit5(), 0.0, 20.0, 0.1, y0, args,
            saveat=lib.SaveAt(ts=jnp.linspace(0.0, 20.0, 100)),
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8), throw=throw,
        ).ys
    return solve, (jnp.array([10.0, 10.0]), jnp.array([0.5, 0.02, 0.4, 0.02]))


def neural_grad(throw):
    mlp = eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=jr.key(0))
    field = NeuralField(jnp.array([[-0.1, -1.0], [1.0, -0.1]]), mlp)
    ts = jnp.linspace(0.0, 10.0, 50)

    @eqx.filter_grad
    def loss(field, y0):
        ys = lib.diffeqsolve(
            lib.ODETerm(field), lib.Tsit5(), 0.0, 10.0, 0.1, y0,
            saveat=lib.SaveAt(ts=ts),
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6), throw=throw,
        ).ys
        return jnp.sum(ys ** 2)
    return loss, (field, jnp.array([1.0, 0.5]))


out = {{}}
for name, build in (("LV Tsit5 solve", lv), ("neural ODE grad", neural_grad)):
    for throw in (True, False):
        fn, args = build(throw)
        start = time.perf_counter()
        lowered = eqx.filter_jit(fn).lower(*args)
        lowered_at = time.perf_counter()
        lowered.compile()
        out[f"{{name}}, throw={{throw}}"] = (lowered_at - start, time.perf_counter() - lowered_at)
print(json.dumps(out))
"""


def _run(cache: str) -> dict:
    code = WORKER.format(here=HERE, cache=cache)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="default: a new temporary directory")
    options = parser.parse_args(argv)
    cache = options.cache_dir or tempfile.mkdtemp(prefix="diffeqx-jax-cache-")
    first, second = _run(cache), _run(cache)
    print(f"persistent compilation cache in {cache}")
    print(f"{'solve':32s} {'process':9s} {'trace+lower s':>14s} {'XLA s':>7s}")
    for name in first:
        for label, result in (("first", first), ("second", second)):
            lower_s, xla_s = result[name]
            print(f"{name:32s} {label:9s} {lower_s:14.2f} {xla_s:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

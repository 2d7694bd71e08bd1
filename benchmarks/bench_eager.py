"""Calls outside `jax.jit`: the time of a first call in a fresh process (compilation
included) and of repeated calls, with Diffrax alongside.

    python benchmarks/bench_eager.py [--no-diffrax] [--repeats N]

Many scripts and notebooks call `diffeqsolve` directly, without `jax.jit`. The first
call of each problem below (tracing, compiling and running) is timed in a fresh
Python process per library (the backend started and the library imported before
the clock starts). Repeated identical calls with new array values are then timed in
one process holding both libraries, their calls taking turns (so that a slower or
busier spell of the machine falls on both alike): the median per library.
Problems (float64):

- `solve`: Lotka–Volterra, Tsit5, `PIDController(rtol=1e-8, atol=1e-8)`, 100 saves;
- `vmap`: the same under an eager `jax.vmap` over 8 initial conditions;
- `grad`: an eager `jax.grad` of the summed saves with respect to the parameters;
- `constant steps`: Euler, 1,000 constant steps of 0.01;
- `dense`: a solve with `SaveAt(dense=True)`, then `Solution.evaluate` at one time
  (the evaluation alone is timed in the repeated calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, {here!r})
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import importlib
from bench_core import import_diffeqx
from _problems import lotka_volterra
libs = [
    import_diffeqx() if name == "diffeqx" else importlib.import_module(name)
    for name in {libraries!r}
]
jnp.ones(2).block_until_ready()

ts = jnp.linspace(0.0, 20.0, 100)
params = jnp.array([0.5, 0.02, 0.4, 0.02])


def make(lib, problem):
    def solve(y0, p):
        return lib.diffeqsolve(
            lib.ODETerm(lotka_volterra), lib.Tsit5(), 0.0, 20.0, 0.1, y0, p,
            saveat=lib.SaveAt(ts=ts),
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
        ).ys

    def vmapped(y0, p):
        y0s = jnp.stack([y0 * (1 + 0.1 * i) for i in range(8)])
        return jax.vmap(solve, (0, None))(y0s, p)

    def grad(y0, p):
        return jax.grad(lambda q: jnp.sum(solve(y0, q)))(p)

    def constant(y0, p):
        return lib.diffeqsolve(
            lib.ODETerm(lotka_volterra), lib.Euler(), 0.0, 10.0, 0.01, y0, p
        ).ys

    dense_sol = {{}}

    def dense(y0, p):
        if "sol" not in dense_sol:
            dense_sol["sol"] = lib.diffeqsolve(
                lib.ODETerm(lotka_volterra), lib.Tsit5(), 0.0, 20.0, 0.1, y0, p,
                saveat=lib.SaveAt(dense=True),
                stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
            )
        return dense_sol["sol"].evaluate(7.5 + float(y0[0]) / 100)

    return {{"solve": solve, "vmap": vmapped, "grad": grad, "constant steps": constant,
            "dense": dense}}[problem]


fns = [make(lib, {problem!r}) for lib in libs]
start = time.perf_counter()
for fn in fns:
    jax.block_until_ready(fn(jnp.array([10.0, 10.0]), params))
first = time.perf_counter() - start
times = [[] for _ in fns]
for i in range({repeats}):
    y0 = jnp.array([10.0 + i + 1, 10.0])
    for fn, spent in zip(fns, times):
        start = time.perf_counter()
        jax.block_until_ready(fn(y0, params))
        spent.append(time.perf_counter() - start)
print(json.dumps(dict(first_s=first, repeat_ms=[1e3 * statistics.median(t) if t else None for t in times])))
"""

PROBLEMS = ("solve", "vmap", "grad", "constant steps", "dense")


def _run(libraries: list[str], problem: str, repeats: int) -> dict:
    code = WORKER.format(
        here=HERE, libraries=libraries, problem=problem, repeats=repeats
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--repeats", type=int, default=200)
    options = parser.parse_args(argv)
    libraries = ["diffeqx"]
    if not options.no_diffrax:
        try:
            import diffrax  # noqa: F401
        except ImportError:
            print("diffrax is not importable: running diffeqx alone.")
        else:
            libraries.append("diffrax")
    import jax

    print(
        f"jax {jax.__version__}; float64; first call: a fresh process per library; "
        f"repeated calls: both libraries in one process, taking turns, median of "
        f"{options.repeats}"
    )
    results = {}
    for problem in PROBLEMS:
        for lib in libraries:
            results[lib, problem] = {"first_s": _run([lib], problem, 0)["first_s"]}
        repeated = _run(libraries, problem, options.repeats)["repeat_ms"]
        for lib, ms in zip(libraries, repeated, strict=True):
            results[lib, problem]["repeat_ms"] = ms
    print(f"{'problem':16s} {'library':9s} {'first call s':>13s} {'repeat ms':>10s}")
    for problem in PROBLEMS:
        for lib in libraries:
            r = results[lib, problem]
            print(f"{problem:16s} {lib:9s} {r['first_s']:13.3f} {r['repeat_ms']:10.2f}")
    if "diffrax" in libraries:
        print("\nRatios diffeqx / diffrax")
        print(f"{'problem':16s} {'first call':>11s} {'repeat':>8s}")
        for problem in PROBLEMS:
            ours, theirs = results["diffeqx", problem], results["diffrax", problem]
            print(
                f"{problem:16s} {ours['first_s'] / theirs['first_s']:10.2f}x "
                f"{ours['repeat_ms'] / theirs['repeat_ms']:7.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

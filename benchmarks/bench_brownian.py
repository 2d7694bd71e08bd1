"""Brownian-motion benchmarks: querying a path step by step, and Euler–Maruyama on it.

    python benchmarks/bench_brownian.py [--quick] [--dtype float32|float64]

Problems, each 10,000 consecutive steps of dt = 1e-4 on [0, 1] with a scalar Brownian
motion, inside one jitted function (key in, final value out):

- query loop: a `lax.scan` whose body adds `bm.evaluate(t_n, t_n + dt)`;
- Euler–Maruyama: `diffeqsolve(MultiTerm(ODETerm(mu y), ControlTerm(sigma y, bm)),
  Euler(), 0, 1, dt, 1)` (geometric Brownian motion, mu = -1, sigma = 0.5).

Paths: `VirtualBrownianTree` with tol = 1e-3 and tol = dt/2 = 5e-5 (also with Lévy
areas in the query loop), and `UnsafeBrownianPath`. Baselines: a hand-written
`lax.scan` over increments pre-sampled with `jax.random.normal` (the sampling is inside
the timed function), doing the same arithmetic. When diffrax is importable the same
problems run with its paths (and its `diffeqsolve`), in the same process.

Compile (trace + lower + XLA, cold caches) and run (median of repeated calls of the
compiled function) are measured separately, as in `_timing.py`.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from _timing import compile_once, time_runs  # noqa: E402
from bench_core import load_libraries  # noqa: E402

STEPS = 10_000
DT = 1e-4
MU, SIGMA = -1.0, 0.5


def presampled_queries(key, dtype):
    increments = jr.normal(key, (STEPS,), dtype) * jnp.sqrt(jnp.asarray(DT, dtype))
    return jax.lax.scan(lambda c, dw: (c + dw, None), jnp.zeros((), dtype), increments)[
        0
    ]


def presampled_euler_maruyama(key, dtype):
    increments = jr.normal(key, (STEPS,), dtype) * jnp.sqrt(jnp.asarray(DT, dtype))
    dt = jnp.asarray(DT, dtype)

    def step(y, dw):
        return y + MU * y * dt + SIGMA * y * dw, None

    return jax.lax.scan(step, jnp.ones((), dtype), increments)[0]


def make_path(lib, kind, key, dtype):
    shape = jax.ShapeDtypeStruct((), dtype)
    if kind == "unsafe":
        return lib.UnsafeBrownianPath(shape, key)
    tol, levy = kind
    levy_area = getattr(lib, levy)
    return lib.VirtualBrownianTree(0.0, 1.0, tol, shape, key, levy_area=levy_area)


def query_loop(lib, kind, dtype):
    use_levy = kind != "unsafe" and kind[1] != "BrownianIncrement"

    def fn(key):
        bm = make_path(lib, kind, key, dtype)

        def body(total, n):
            t = n * DT
            out = bm.evaluate(t, t + DT, use_levy=use_levy)
            if use_levy:
                out = sum(
                    jax.tree_util.tree_leaves((out.W, out.H, getattr(out, "K", 0)))
                )
            return total + jnp.asarray(out, dtype), None

        steps = jnp.arange(STEPS, dtype=jnp.float64 if dtype == jnp.float64 else dtype)
        return jax.lax.scan(body, jnp.zeros((), dtype), steps)[0]

    return fn


def euler_maruyama(lib, kind, dtype):
    def fn(key):
        bm = make_path(lib, kind, key, dtype)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: MU * y),
            lib.ControlTerm(lambda t, y, args: SIGMA * y, bm),
        )
        sol = lib.diffeqsolve(
            terms, lib.Euler(), 0.0, 1.0, DT, jnp.ones((), dtype), max_steps=STEPS + 16
        )
        return sol.ys[-1]

    return fn


def describe(kind) -> str:
    if kind == "unsafe":
        return "UnsafeBrownianPath"
    tol, levy = kind
    short = {"BrownianIncrement": "W", "SpaceTimeLevyArea": "W,H"}
    return f"VBT tol={tol:g} ({short.get(levy, 'W,H,K')})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--no-diffrax", action="store_true")
    options = parser.parse_args(argv)
    if options.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(options.dtype)
    libraries = load_libraries(options.no_diffrax)
    min_time = 0.2 if options.quick else 1.0
    key = jr.key(0)
    print(
        f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); dtype {options.dtype}; "
        f"{STEPS} steps of dt={DT:g}; libraries: {', '.join(libraries)}"
    )

    tols = [1e-3, DT / 2]
    kinds = [(tol, "BrownianIncrement") for tol in tols] + ["unsafe"]
    levy_kinds = [(DT / 2, "SpaceTimeLevyArea"), (DT / 2, "SpaceTimeTimeLevyArea")]
    problems = {
        "query loop": (query_loop, kinds + ([] if options.quick else levy_kinds)),
        "Euler-Maruyama": (euler_maruyama, kinds),
    }
    baselines = {
        "query loop": presampled_queries,
        "Euler-Maruyama": presampled_euler_maruyama,
    }
    rows = []
    for problem, (builder, problem_kinds) in problems.items():
        runners, compiles = {}, {}
        baseline = lambda key, f=baselines[problem]: f(key, dtype)  # noqa: E731
        compiled, timing = compile_once(baseline, (key,))
        runners["scan"], compiles["scan"] = (compiled, (key,)), timing
        for kind in problem_kinds:
            for name, lib in libraries.items():
                label = f"{name}: {describe(kind)}"
                print(f"compiling {problem} / {label} ...", flush=True)
                try:
                    compiled, timing = compile_once(builder(lib, kind, dtype), (key,))
                except Exception as error:  # e.g. a Lévy area diffrax's path lacks
                    print(f"  skipped: {type(error).__name__}: {str(error)[:100]}")
                    continue
                runners[label], compiles[label] = (compiled, (key,)), timing
        _, runs = time_runs(runners, min_time_s=min_time)
        for label, run in runs.items():
            other = label.replace("diffeqx:", "diffrax:")
            vs_diffrax = (
                f"{run.median_s / runs[other].median_s:.3f}x"
                if label.startswith("diffeqx:") and other in runs
                else "-"
            )
            rows.append(
                (
                    problem,
                    label,
                    compiles[label].total_s,
                    run.median_s * 1e3,
                    run.min_s * 1e3,
                    run.median_s / STEPS * 1e9,
                    run.median_s / runs["scan"].median_s,
                    run.min_s / runs["scan"].min_s,
                    vs_diffrax,
                )
            )

    print()
    print(
        f"{'problem':<15} {'path':<40} {'compile s':>9} {'run ms':>8} {'min ms':>8} "
        f"{'ns/step':>8} {'/scan':>8} {'min/scan':>9} {'/diffrax':>9}"
    )
    print("-" * 123)
    for problem, label, compile_s, run_ms, min_ms, per_step, *ratios in rows:
        vs_scan, vs_scan_min, vs_diffrax = ratios
        print(
            f"{problem:<15} {label:<40} {compile_s:>9.2f} {run_ms:>8.2f} {min_ms:>8.2f} "
            f"{per_step:>8.0f} {vs_scan:>7.1f}x {vs_scan_min:>8.1f}x {vs_diffrax:>9}"
        )
    print(
        "compile s: trace + lower + XLA compile, cold caches; run ms / min ms: median "
        "and fastest steady run; ns/step: from the median; /scan, min/scan: run time "
        "(median, fastest) over the hand-written scan over pre-sampled increments (its "
        "sampling included); /diffrax: diffeqx over diffrax with the same path "
        "(medians)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

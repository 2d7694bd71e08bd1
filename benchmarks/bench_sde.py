"""SDE benchmarks: Euler–Maruyama against a hand-written scan, an adaptive solve with
a Lévy-area solver, and the gradient of a neural SDE, with Diffrax alongside.

    python benchmarks/bench_sde.py [--quick] [--no-diffrax] [--diffrax-batch]
                                   [--only PART,...]

Problems (float64):

- (a)/(b) Euler–Maruyama, 10,000 constant steps of dt = 1e-4 on geometric Brownian
  motion (mu = -1, sigma = 0.5), on `UnsafeBrownianPath` and on
  `VirtualBrownianTree(tol=1e-3)`, for 1 path and for 1,000 paths (`vmap` over keys).
  Baseline: a `lax.scan` over increments pre-sampled with `jax.random.normal` (the
  sampling inside the timed function), doing the same arithmetic. Diffrax runs the
  tree on one path, and on 1,000 only with `--diffrax-batch` (slow). Its
  `UnsafeBrownianPath` needs `DirectAdjoint` in Diffrax 0.7.2, which is what it is
  given here.
- (c) an adaptive SDE solve: `SPaRK()` with `PIDController(rtol=1e-3, atol=1e-3)` on
  a `VirtualBrownianTree(tol=1e-5, levy_area=SpaceTimeLevyArea)`, a 4-dimensional
  system with general noise, `t1 = 5`, for 64 paths (`vmap` over keys); steps are
  summed over the paths (the libraries' trees sample different paths from a key);
  and the same for one path without `jax.vmap` ("adaptive 1 path").
- (d) the gradient of a neural SDE loss: drift and diffusion MLPs (width 32, two
  hidden layers), state of 4 and Brownian motion of 4, `ReversibleHeun`, 100 constant
  steps on a `VirtualBrownianTree`, loss the mean square of the final state over 32
  paths (`vmap` over keys), `jax.grad` with respect to both MLPs with the default
  adjoint.
- (e) the same gradient with the times taken from the data, as in Diffrax's neural
  SDE example: each path's times `ts` (64 of them, 0 to 63) are an input array, the
  tree is `VirtualBrownianTree(ts[0], ts[-1], tol=0.5, ...)`, the solve runs from
  `ts[0]` to `ts[-1]` in 63 unit steps and saves at `ts`; loss the mean square of
  the saved states. The tree's depth is then known only at run time.

Compile (trace + lower + XLA, cold caches) and run (median of repeated calls) are
timed separately, as in `_timing.py`; ratios are diffeqx over the scan or Diffrax.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from _timing import compile_once, time_runs  # noqa: E402
from bench_core import load_libraries  # noqa: E402

STEPS = 10_000
DT = 1e-4
MU, SIGMA = -1.0, 0.5
BATCH = 1_000


def scan_euler_maruyama(key):
    increments = jr.normal(key, (STEPS,)) * jnp.sqrt(jnp.asarray(DT))

    def step(y, dw):
        return y + MU * y * DT + SIGMA * y * dw, None

    return jax.lax.scan(step, jnp.ones(()), increments)[0]


def euler_maruyama(lib, path):
    def fn(key):
        if path == "unsafe":
            bm = lib.UnsafeBrownianPath((), key)
        else:
            bm = lib.VirtualBrownianTree(0.0, 1.0, 1e-3, (), key)
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: MU * y),
            lib.ControlTerm(lambda t, y, args: SIGMA * y, bm),
        )
        extra = {}
        if path == "unsafe" and lib.__name__ == "diffrax":
            extra["adjoint"] = lib.DirectAdjoint()
        sol = lib.diffeqsolve(
            terms,
            lib.Euler(),
            0.0,
            1.0,
            DT,
            jnp.ones(()),
            max_steps=STEPS + 16,
            **extra,
        )
        return sol.ys[-1]

    return fn


def batched(fn):
    return lambda keys: jax.vmap(fn)(keys)


_A = jnp.array([[-1.0, 0.5, 0.0, 0.2], [-0.5, -1.0, 0.3, 0.0], [0.0, -0.3, -0.8, 0.4],
                [-0.2, 0.0, -0.4, -0.6]])  # fmt: skip


ADAPTIVE_PATHS = 64


def adaptive_one(lib):
    """(c) for one path (no `jax.vmap`): on CPU, compiled as one kernel."""

    def one(key):
        bm = lib.VirtualBrownianTree(
            0.0, 5.0, 1e-5, (4,), key, levy_area=lib.SpaceTimeLevyArea
        )
        terms = lib.MultiTerm(
            lib.ODETerm(lambda t, y, args: _A @ y + jnp.sin(y)),
            lib.ControlTerm(lambda t, y, args: 0.3 * jnp.outer(jnp.cos(y), y), bm),
        )
        sol = lib.diffeqsolve(
            terms,
            lib.SPaRK(),
            0.0,
            5.0,
            0.05,
            jnp.ones(4),
            stepsize_controller=lib.PIDController(rtol=1e-3, atol=1e-3),
            max_steps=4096,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    return one


def adaptive(lib):
    one = adaptive_one(lib)

    def fn(key):
        # Step counts depend on the path, and the two libraries' trees sample
        # different paths from one key: compare totals over several paths.
        ys, steps = jax.vmap(one)(jr.split(key, ADAPTIVE_PATHS))
        return ys, jnp.sum(steps)

    return fn


def neural_sde(lib):
    def fn(models, keys):
        drift, diffusion = models

        def one(key):
            bm = lib.VirtualBrownianTree(0.0, 1.0, 1e-2, (4,), key)
            terms = lib.MultiTerm(
                lib.ODETerm(lambda t, y, args: drift(y)),
                lib.ControlTerm(lambda t, y, args: diffusion(y).reshape(4, 4), bm),
            )
            sol = lib.diffeqsolve(
                terms, lib.ReversibleHeun(), 0.0, 1.0, 0.01, jnp.ones(4), max_steps=128
            )
            return jnp.sum(sol.ys[-1] ** 2)

        return jnp.mean(jax.vmap(one)(keys))

    return eqx.filter_grad(fn)


TIMES = 64


def neural_sde_traced(lib):
    def fn(models, keys, times):
        drift, diffusion = models

        def one(key, ts):
            bm = lib.VirtualBrownianTree(ts[0], ts[-1], 0.5, (4,), key)
            terms = lib.MultiTerm(
                lib.ODETerm(lambda t, y, args: drift(y)),
                lib.ControlTerm(lambda t, y, args: diffusion(y).reshape(4, 4), bm),
            )
            sol = lib.diffeqsolve(
                terms,
                lib.ReversibleHeun(),
                ts[0],
                ts[-1],
                1.0,
                jnp.ones(4),
                saveat=lib.SaveAt(ts=ts),
                max_steps=TIMES,
            )
            return jnp.mean(sol.ys**2)

        return jnp.mean(jax.vmap(one)(keys, times))

    return eqx.filter_grad(fn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--diffrax-batch", action="store_true")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated parts of problem names: run only those problems",
    )
    options = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    libraries = load_libraries(options.no_diffrax)
    min_time = 0.2 if options.quick else 1.0
    key, keys = jr.key(0), jr.split(jr.key(1), BATCH)
    print(
        f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); float64; libraries: {', '.join(libraries)}"
    )
    mk = jr.split(jr.key(2), 2)
    models = (
        eqx.nn.MLP(4, 4, 32, 2, activation=jnp.tanh, key=mk[0]),
        eqx.nn.MLP(
            4, 16, 32, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=mk[1]
        ),
    )
    groups = []  # (problem, {label: (fn, args)}, baseline label or None)
    em1 = {"scan": (scan_euler_maruyama, (key,))}
    em_batch = {"scan": (batched(scan_euler_maruyama), (keys,))}
    for name, lib in libraries.items():
        for path in ("unsafe", "tree"):
            em1[f"{name}: {path}"] = (euler_maruyama(lib, path), (key,))
            if name == "diffeqx" or options.diffrax_batch:
                em_batch[f"{name}: {path}"] = (
                    batched(euler_maruyama(lib, path)),
                    (keys,),
                )
    groups.append(("EM x1", em1, "scan"))
    groups.append((f"EM x{BATCH}", em_batch, "scan"))
    groups.append(
        (
            "adaptive SPaRK",
            {n: (adaptive(lib), (key,)) for n, lib in libraries.items()},
            None,
        )
    )
    groups.append(
        (
            "adaptive 1 path",
            {n: (adaptive_one(lib), (key,)) for n, lib in libraries.items()},
            None,
        )
    )
    groups.append(
        (
            "neural SDE grad",
            {n: (neural_sde(lib), (models, keys[:32])) for n, lib in libraries.items()},
            None,
        )
    )
    times = jnp.broadcast_to(jnp.linspace(0.0, TIMES - 1.0, TIMES), (32, TIMES))
    groups.append(
        (
            "neural SDE ts",
            {
                n: (neural_sde_traced(lib), (models, keys[:32], times))
                for n, lib in libraries.items()
            },
            None,
        )
    )
    if options.only:
        wanted = options.only.split(",")
        groups = [g for g in groups if any(w in g[0] for w in wanted)]

    rows = []
    for problem, entries, baseline in groups:
        runners, compiles = {}, {}
        for label, (fn, args) in entries.items():
            print(f"compiling {problem} / {label} ...", flush=True)
            try:
                compiled, timing = compile_once(fn, args)
            except Exception as error:
                print(f"  skipped: {type(error).__name__}: {str(error)[:120]}")
                continue
            runners[label], compiles[label] = (compiled, args), timing
        outputs, runs = time_runs(runners, min_time_s=min_time, min_repeats=3)
        alone = runs
        if baseline in runners and len(runners) > 1:
            # The scan and diffeqx timed by themselves: a slow Diffrax run between
            # their calls disturbs small runs (caches), and not alike.
            _, alone = time_runs(
                {k: v for k, v in runners.items() if not k.startswith("diffrax")},
                min_time_s=min_time,
                min_repeats=3,
            )
        for label, run in runs.items():
            other = label.replace("diffeqx", "diffrax")
            vs_diffrax = run_ratio = compile_ratio = "-"
            if label.startswith("diffeqx") and other in runs:
                run_ratio = f"{run.median_s / runs[other].median_s:.2f}x"
                compile_ratio = (
                    f"{compiles[label].total_s / compiles[other].total_s:.2f}x"
                )
                vs_diffrax = "yes"
            vs_scan = (
                f"{alone[label].median_s / alone[baseline].median_s:.2f}x"
                if baseline in alone and label in alone and label != baseline
                else "-"
            )
            steps = "-"
            if problem.startswith("adaptive"):
                steps = str(int(outputs[label][1]))
            rows.append(
                (
                    problem,
                    label,
                    compiles[label].total_s,
                    run.median_s * 1e3,
                    steps,
                    vs_scan,
                    run_ratio,
                    compile_ratio,
                )  # fmt: skip
            )
            del vs_diffrax

    print()
    header = (
        f"{'problem':<16} {'library: path':<18} {'compile s':>9} {'run ms':>10} "
        f"{'steps':>6} {'/scan':>7} {'run/diffrax':>12} {'compile/diffrax':>16}"
    )
    print(header)
    print("-" * len(header))
    for problem, label, compile_s, run_ms, steps, vs_scan, run_r, comp_r in rows:
        print(
            f"{problem:<16} {label:<18} {compile_s:>9.2f} {run_ms:>10.2f} {steps:>6} "
            f"{vs_scan:>7} {run_r:>12} {comp_r:>16}"
        )
    print(
        "compile s: trace + lower + XLA compile, cold caches; run ms: median steady "
        "run; /scan: run time over the hand-written scan over pre-sampled increments "
        "(sampling included), the two timed by themselves; run/diffrax, compile/diffrax: diffeqx over diffrax on "
        "the same problem (targets: EM on UnsafeBrownianPath <= 1.2x scan, on "
        "VirtualBrownianTree <= 5x scan; adaptive and neural SDE run <= 0.8x and "
        "compile <= 0.5x diffrax)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How the run time of a small adaptive solve grows with the number of saved times.

    python benchmarks/bench_saves.py [--no-diffrax] [--min-run-time S]

Lotka-Volterra (bench_core.py's (a): Tsit5, `PIDController(rtol=1e-8, atol=1e-8)`,
225 steps over [0, 100], float64) with `SaveAt(ts=jnp.linspace(0, 100, n))` for
several `n`, and with `SaveAt(t1=True)`. The steps are the same for every `n`, so
the differences are the cost of saving. Both libraries' programs are timed taking
turns (median of repeated calls through `jax.jit`).

On a CPU the per-step cost is not proportional to the saves. XLA's CPU runtime runs
a loop body's operations one after another in the calling thread only when every
buffer they touch is at most 512 bytes (or when there are at most 8 operations);
otherwise it schedules them as a dependency graph, which may hand work to other
threads. The output buffers of `n` saves of a 2-vector in float64 are larger than
512 bytes from `n = 33` (`ys`, 16 bytes a save) and from `n = 65` (`ts`).
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

from _problems import _lotka_volterra_solver  # noqa: E402
from _timing import Runner, time_runs  # noqa: E402
from bench_core import libraries_and_run_time  # noqa: E402

COUNTS = (2, 16, 31, 33, 63, 65, 100, 1000)


def main(argv=None) -> int:
    options, libraries = libraries_and_run_time(__doc__, argv)
    y0 = jnp.array([10.0, 10.0])
    params = jnp.array([0.1, 0.02, 0.4, 0.02])
    print(f"jax {jax.__version__} on {jax.default_backend()}; float64")
    header = f"{'saves':>6s} " + " ".join(f"{name + ' ms':>12s}" for name in libraries)
    if len(libraries) > 1:
        header += f" {'ratio':>7s}"
    print(header + f" {'steps':>6s}")
    for count in ("t1",) + COUNTS:
        ts = jnp.linspace(0.0, 100.0, 2 if count == "t1" else count)
        runners = {
            name: (
                Runner(
                    _lotka_volterra_solver(lib, None, count == "t1"), (y0, params, ts)
                ),
                (y0, params, ts),
            )
            for name, lib in libraries.items()
        }
        outputs, timings = time_runs(runners, min_time_s=options.min_run_time)
        steps = {int(out[1]["num_steps"]) for out in outputs.values()}
        times = [timings[name].median_s * 1e3 for name in libraries]
        row = f"{count!s:>6s} " + " ".join(f"{t:12.4f}" for t in times)
        if len(times) > 1:
            row += f" {times[0] / times[1]:6.2f}x"
        print(row + f" {'/'.join(map(str, sorted(steps))):>6s}", flush=True)
    print(
        "saves: the n of SaveAt(ts=linspace(0, 100, n)), or t1 for SaveAt(t1=True); "
        "ms: median run; ratio: diffeqx / diffrax; steps: taken (the same for all)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Event benchmark: a bouncing ball, each flight ended by a root-found event.

    python benchmarks/bench_events.py [--batch N] [--no-diffrax]

Times compile (trace + lower + XLA) and steady run separately, for one flight and for
a `vmap`ped batch of flights from different heights, and compares with diffrax in the
same process when it is installed (ratios diffeqx / diffrax; targets: run <= 0.8x,
compile <= 0.5x). Float64.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import optimistix as optx  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _timing import compile_once, time_runs  # noqa: E402

import diffeqx  # noqa: E402

G = 9.81


def _field(t, y, args):
    return jnp.stack([y[1], -G])


def _height(t, y, args, **kwargs):
    return y[0]


def build(lib, batch):
    event = lib.Event(_height, root_finder=optx.Newton(rtol=1e-10, atol=1e-10))

    def flight(h):
        sol = lib.diffeqsolve(
            lib.ODETerm(_field),
            lib.Tsit5(),
            0.0,
            100.0,
            0.05,
            jnp.stack([h, jnp.zeros_like(h)]),
            event=event,
            stepsize_controller=lib.PIDController(rtol=1e-8, atol=1e-8),
        )
        return sol.ts[-1], sol.ys[-1]

    if batch:
        heights = jnp.linspace(1.0, 20.0, batch)
        return jax.vmap(flight), (heights,)
    return flight, (jnp.asarray(10.0),)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--no-diffrax", action="store_true")
    options = parser.parse_args()
    libs = {"diffeqx": diffeqx}
    if not options.no_diffrax:
        try:
            import diffrax

            libs["diffrax"] = diffrax
        except ImportError:
            print("diffrax not installed: diffeqx timings only")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float64")
    rows = []
    for case, batch in (("one flight", 0), (f"vmap x{options.batch}", options.batch)):
        compiled, compile_s = {}, {}
        for name, lib in libs.items():
            fn, args = build(lib, batch)
            compiled[name], timing = compile_once(fn, args)
            compiled[name] = (compiled[name], args)
            compile_s[name] = timing.total_s
        outputs, runs = time_runs(compiled, min_time_s=0.5)
        t_true = jnp.sqrt(2 * build(diffeqx, batch)[1][0] / G)
        for name in libs:
            t_event = outputs[name][0]
            error = float(jnp.max(jnp.abs(t_event - t_true)))
            rows.append((case, name, compile_s[name], runs[name].median_s, error))
    print(
        f"{'case':14s} {'library':8s} {'compile s':>10s} {'run ms':>9s} {'|t - t*|':>9s}"
    )
    for case, name, comp, run, err in rows:
        print(f"{case:14s} {name:8s} {comp:10.2f} {1e3 * run:9.3f} {err:9.1e}")
    if "diffrax" in libs:
        print("\nratios diffeqx / diffrax (targets: compile <= 0.5x, run <= 0.8x)")
        by = {(c, n): (comp, run) for c, n, comp, run, _ in rows}
        for case in dict.fromkeys(c for c, *_ in rows):
            a, b = by[(case, "diffeqx")], by[(case, "diffrax")]
            print(f"{case:14s} compile {a[0] / b[0]:.2f}x  run {a[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()

"""Large stiff systems: the 2-D Brusselator on an N x N grid (2 N^2 unknowns), dense
Jacobians against matrix-free (Krylov) and IMEX solves.

    python benchmarks/bench_stiff_pde.py [--grids 16,32,64,256] [--dense-max 8192]
        [--reuse-max 2048] [--methods ...] [--large-methods "KenCarp4 IMEX GMRES"]
        [--json PATH]

The problem (Hairer & Wanner, Solving ODEs II, BRUSS-2D with homogeneous Neumann
boundaries):

    u_t = 1 + u^2 v - 4.4 u + alpha Lap u,   v_t = 3.4 u - u^2 v + alpha Lap v,

alpha = 0.02 on the unit square, t in [0, 1], with u(0) = 22 y (1 - y)^1.5 and
v(0) = 27 x (1 - x)^1.5. The diffusion is what makes it stiff (eigenvalues to
-8 alpha N^2: -655 on 64 x 64, -10,486 on 256 x 256).

Methods, all at rtol = atol = 1e-5, float64:
- `Kvaerno5` with the default dense chord iteration (an n x n Jacobian, LU-factored
  once per step), only where n <= --dense-max;
- `Kvaerno5` and `Kvaerno3` dense with `reuse_jacobian=True` (one factorisation
  kept across steps), and `Kvaerno3` dense without, only where n <= --reuse-max;
- `Kvaerno5` with `VeryChord(linear_solver=lineax.GMRES(...))`: matrix-free;
- `Rodas5P` with `lineax.GMRES`: matrix-free Rosenbrock;
- `KenCarp4` IMEX: the reaction explicit, the diffusion implicit with GMRES.

GMRES (restart 40) solves to a relative 1e-5. Above 64 x 64 only the methods in
--large-methods run (each matrix-free solve there takes minutes on a 2-core CPU).

For each: compile time, steady run time (median of the runs that fit in --min-run-time, at
least one), steps, the memory XLA allocates
for the compiled solve (arguments, outputs and temporaries, from
`compiled.memory_analysis()`), and the largest difference from the most accurate
solve of the same grid. The dense Jacobian's own size, 8 n^2 bytes, is printed for
every grid (137 GB at 256 x 256: not run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import diffeqx as dfx  # noqa: E402

ALPHA = 0.02
T1 = 1.0
TOL = 1e-5


def laplacian(w, n):
    # Homogeneous Neumann boundaries by reflecting the edge values.
    p = jnp.pad(w, 1, mode="edge")
    return (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * w) * (
        (n + 1) ** 2
    )


def diffusion(n):
    def field(t, y, args):
        u, v = y
        return jnp.stack([ALPHA * laplacian(u, n), ALPHA * laplacian(v, n)])

    return field


def reaction(t, y, args):
    u, v = y
    uuv = u * u * v
    return jnp.stack([1 + uuv - 4.4 * u, 3.4 * u - uuv])


def whole(n):
    diff = diffusion(n)

    def field(t, y, args):
        return diff(t, y, args) + reaction(t, y, args)

    return field


def initial(n):
    x = (jnp.arange(n) + 0.5) / n
    u = jnp.broadcast_to((22 * x * (1 - x) ** 1.5)[:, None], (n, n))
    v = jnp.broadcast_to((27 * x * (1 - x) ** 1.5)[None, :], (n, n))
    return jnp.stack([u, v])


def gmres():
    # Inexact Newton: the linear systems to a relative 1e-5 (the chord iteration's
    # own test decides convergence of the stage equations).
    return lx.GMRES(rtol=1e-5, atol=1e-9, restart=40, max_steps=2000)


def methods(n):
    krylov = dfx.with_stepsize_controller_tols(dfx.VeryChord)(linear_solver=gmres())
    return {
        "Kvaerno5 dense": (dfx.ODETerm(whole(n)), dfx.Kvaerno5()),
        "Kvaerno5 dense reuse": (
            dfx.ODETerm(whole(n)),
            dfx.Kvaerno5(reuse_jacobian=True),
        ),
        "Kvaerno3 dense": (dfx.ODETerm(whole(n)), dfx.Kvaerno3()),
        "Kvaerno3 dense reuse": (
            dfx.ODETerm(whole(n)),
            dfx.Kvaerno3(reuse_jacobian=True),
        ),
        "Kvaerno5 GMRES": (dfx.ODETerm(whole(n)), dfx.Kvaerno5(root_finder=krylov)),
        "Rodas5P GMRES": (dfx.ODETerm(whole(n)), dfx.Rodas5P(linear_solver=gmres())),
        "KenCarp4 IMEX GMRES": (
            dfx.MultiTerm(dfx.ODETerm(reaction), dfx.ODETerm(diffusion(n))),
            dfx.KenCarp4(root_finder=krylov),
        ),
    }


def run(n, name, terms, solver, min_time_s):
    def solve(y0):
        sol = dfx.diffeqsolve(
            terms,
            solver,
            0.0,
            T1,
            1e-4,
            y0,
            stepsize_controller=dfx.PIDController(rtol=TOL, atol=TOL),
            max_steps=10_000,
        )
        return sol.ys[-1], sol.stats["num_steps"]

    y0 = initial(n)
    start = time.perf_counter()
    compiled = jax.jit(solve).lower(y0).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    bytes_ = None
    if memory is not None:
        bytes_ = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
        )
    times = []
    while sum(times) < min_time_s or not times:
        start = time.perf_counter()
        y, steps = jax.block_until_ready(compiled(y0))
        times.append(time.perf_counter() - start)
    return dict(
        grid=n,
        unknowns=2 * n * n,
        method=name,
        compile_s=compile_s,
        run_s=float(np.median(times)),
        steps=int(steps),
        memory_mb=None if bytes_ is None else bytes_ / 2**20,
        y=np.asarray(y),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="16,32,64,256")
    parser.add_argument("--dense-max", type=int, default=8192)
    parser.add_argument(
        "--reuse-max",
        type=int,
        default=2048,
        help="the largest n for the dense rows other than 'Kvaerno5 dense'",
    )
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the method names (default: all)",
    )
    parser.add_argument(
        "--large-methods",
        default="KenCarp4 IMEX GMRES",
        help="the methods run on grids above 64 x 64 (comma-separated)",
    )
    parser.add_argument("--json", default=None)
    options = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.default_backend()}; float64")
    records = []
    for n in (int(g) for g in options.grids.split(",")):
        unknowns = 2 * n * n
        print(
            f"\n{n} x {n} grid, {unknowns} unknowns; a dense Jacobian would take "
            f"{8 * unknowns**2 / 1e9:.3g} GB",
            flush=True,
        )
        rows = []
        for name, (terms, solver) in methods(n).items():
            if options.methods and name not in options.methods.split(","):
                continue
            if n > 64 and name not in options.large_methods.split(","):
                print(f"  {name}: not run (grids above 64 x 64: --large-methods)")
                continue
            if "dense" in name and unknowns > options.dense_max:
                print(f"  {name}: not run (n > --dense-max={options.dense_max})")
                continue
            if (
                "dense" in name
                and name != "Kvaerno5 dense"
                and unknowns > options.reuse_max
            ):
                print(f"  {name}: not run (n > --reuse-max={options.reuse_max})")
                continue
            row = run(n, name, terms, solver, options.min_run_time)
            rows.append(row)
            print(
                f"  {name:22s} compile {row['compile_s']:6.2f} s  run "
                f"{row['run_s']:8.3f} s  steps {row['steps']:4d}  memory "
                f"{row['memory_mb']:9.1f} MB",
                flush=True,
            )
        # Agreement: against the solve of the same grid with the most steps.
        best = max(rows, key=lambda r: r["steps"])["y"]
        for row in rows:
            row["max_diff"] = float(np.max(np.abs(row.pop("y") - best)))
            print(f"  {row['method']:22s} max |y - y_most_steps| {row['max_diff']:.1e}")
        records += rows
    if options.json:
        with open(options.json, "w") as file:
            json.dump(records, file, indent=1)
        print(f"wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

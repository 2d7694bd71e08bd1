"""Stiff benchmark: Robertson, Van der Pol (mu = 1000) and HIRES, at two tolerances.

    python benchmarks/bench_stiff.py [--only robertson,vdp,hires] [--rtols 1e-6,1e-8]
        [--solvers Kvaerno5,...] [--diffrax-solvers Kvaerno5,KenCarp4] [--no-diffrax] [--no-scipy] [--json PATH]
        [--plot PNG] [--from-json PATH]

For each problem and tolerance it runs diffeqx's implicit, IMEX and Rosenbrock solvers
(the IMEX `KenCarp4` with the whole field as its implicit term), Diffrax's `Kvaerno5` and
`KenCarp4` (when installed) and SciPy's `solve_ivp` with `LSODA`, `BDF` and `Radau`
(when installed; its field is the same formula in NumPy, and it estimates Jacobians
by finite differences, its default), and
reports compile time (diffeqx and Diffrax: trace + lower + XLA, cold caches), the
steady run time (median; SciPy: one call, which includes its Python overhead, as a
user sees it), steps, and the relative error at the final time against a reference
from SciPy's `Radau` at `rtol=1e-13` with the exact Jacobian. Float64 on the default
device. `--plot` saves a work-precision plot (error against run time, every method
through its tolerances) when matplotlib is installed. Ratios: diffeqx / Diffrax for the methods both have, and best diffeqx / LSODA
(target: faster than LSODA at the same accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from _timing import compile_once, time_runs  # noqa: E402

import diffeqx  # noqa: E402
from diffeqx._profile import count_executions  # noqa: E402


def robertson(t, y, args, xp=jnp):
    y1, y2, y3 = y[0], y[1], y[2]
    return xp.stack(
        [
            -0.04 * y1 + 1e4 * y2 * y3,
            0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
            3e7 * y2**2,
        ]
    )


def van_der_pol(t, y, args, xp=jnp):
    return xp.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])


def hires(t, y, args, xp=jnp):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return xp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            280.0 * y6 * y8 - 1.81 * y7,
            -280.0 * y6 * y8 + 1.81 * y7,
        ]
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str
    title: str
    field: Callable
    y0: tuple
    t1: float
    dt0: float
    atol_scale: float  # atol = rtol * atol_scale


PROBLEMS = (
    Problem(
        "robertson",
        "Robertson, t in [0, 1e5]",
        robertson,
        (1.0, 0.0, 0.0),
        1e5,
        1e-6,
        1e-4,
    ),
    Problem(
        "vdp",
        "Van der Pol mu=1000, t in [0, 1000]",
        van_der_pol,
        (2.0, 0.0),
        1000.0,
        1e-6,
        1.0,
    ),
    Problem(
        "hires",
        "HIRES, t in [0, 321.8122]",
        hires,
        (1.0, 0, 0, 0, 0, 0, 0, 0.0057),
        321.8122,
        1e-6,
        1e-4,
    ),
)


def _numpy_field(problem):
    # Plain NumPy: SciPy calls the field from Python at every evaluation.
    return lambda t, y: problem.field(t, y, None, xp=np)


def _numpy_jacobian(problem):
    fn = jax.jit(jax.jacfwd(lambda y: problem.field(0.0, y, None)))
    return lambda t, y: np.asarray(fn(jnp.asarray(y)))


def reference(problem):
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        _numpy_field(problem),
        (0.0, problem.t1),
        np.asarray(problem.y0, dtype=np.float64),
        method="Radau",
        rtol=1e-13,
        atol=1e-13 * problem.atol_scale,
        jac=_numpy_jacobian(problem),
    )
    return sol.y[:, -1]


def _error(y, ref) -> float:
    # Relative to each component's size, ignoring components far below the others.
    scale = np.maximum(np.abs(ref), 1e-8 * np.max(np.abs(ref)))
    return float(np.max(np.abs(np.asarray(y) - ref) / scale))


def _zero(t, y, args):
    return jnp.zeros_like(y)


def _terms(lib, solver, problem):
    """IMEX methods get the whole field as their implicit term (a zero explicit
    term): these problems are stiff throughout."""
    if type(solver).__name__.startswith(("KenCarp", "Sil")):
        return lib.MultiTerm(lib.ODETerm(_zero), lib.ODETerm(problem.field))
    return lib.ODETerm(problem.field)


def library_case(lib, solver, problem, rtol):
    terms = _terms(lib, solver, problem)

    def solve(y0):
        sol = lib.diffeqsolve(
            terms,
            solver,
            0.0,
            problem.t1,
            problem.dt0,
            y0,
            stepsize_controller=lib.PIDController(
                rtol=rtol, atol=rtol * problem.atol_scale
            ),
            max_steps=100_000,
            throw=False,
        )
        return (
            sol.ys[-1],
            sol.stats["num_steps"],
            sol.stats["num_rejected_steps"],
            sol.result == lib.RESULTS.successful,
        )

    return solve, (jnp.asarray(problem.y0, dtype=jnp.float64),)


def factorisations_per_step(lib, name, problem) -> int:
    """LU factorisations in one step attempt of diffeqx's `name` (each follows one
    Jacobian): counted in the step's program, with a root finder given its own
    tolerances."""
    cls = getattr(lib, name)
    if hasattr(cls, "root_finder") or name.startswith(("Kvaerno", "KenCarp", "Sil")):
        solver = cls(root_finder=lib.VeryChord(rtol=1e-6, atol=1e-6))
    else:
        solver = cls()
    terms = _terms(lib, solver, problem)
    y0 = jnp.asarray(problem.y0, dtype=jnp.float64)
    t0, t1 = jnp.asarray(0.0), jnp.asarray(1e-3)

    def step(y):
        state = solver.init(terms, t0, t1, y, None)
        return solver.step(terms, t0, t1, y, None, state, False)[0]

    # Each `lu`, times the lengths of the scans (stage loops) around it.
    return count_executions(jax.make_jaxpr(step)(y0), "lu")


def run_scipy(method, problem, rtol) -> dict:
    from scipy.integrate import solve_ivp

    field = _numpy_field(problem)
    best = None
    for _ in range(3):
        start = time.perf_counter()
        sol = solve_ivp(
            field,
            (0.0, problem.t1),
            np.asarray(problem.y0, dtype=np.float64),
            method=method,
            rtol=rtol,
            atol=rtol * problem.atol_scale,
        )
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return dict(
        run_ms=1e3 * best,
        steps=int(sol.t.shape[0] - 1),
        y=sol.y[:, -1],
        nfev=int(sol.nfev),
        njev=int(sol.njev),
        nlu=int(sol.nlu),
        success=bool(sol.success),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="robertson,vdp,hires")
    parser.add_argument("--rtols", default="1e-6,1e-8")
    parser.add_argument(
        "--solvers",
        default="Kvaerno3,Kvaerno4,Kvaerno5,KenCarp4,Rosenbrock23,Rodas4,Rodas5P",
    )
    parser.add_argument(
        "--diffrax-solvers",
        default="Kvaerno5,KenCarp4",
        help="Diffrax's solvers to run alongside (those it shares with diffeqx)",
    )
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--no-scipy", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--plot",
        default=None,
        help="save a work-precision plot (error against run time) as this PNG, "
        "when matplotlib is installed",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="plot (and print) the records of an earlier --json run without running",
    )
    return parser.parse_args(argv)


def work_precision_plot(records, path) -> None:
    """Error against run time, one panel per problem, one line per solver through
    its tolerances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in records))
    fig, axes = plt.subplots(1, len(problems), figsize=(5 * len(problems), 4))
    axes = np.atleast_1d(axes)
    for ax, problem in zip(axes, problems, strict=True):
        rows = [r for r in records if r["problem"] == problem]
        for key in dict.fromkeys((r["library"], r["solver"]) for r in rows):
            line = sorted(
                (r for r in rows if (r["library"], r["solver"]) == key),
                key=lambda r: r["rtol"],
                reverse=True,
            )
            style = {"diffeqx": "-o", "diffrax": "--s", "scipy": ":^"}[key[0]]
            ax.loglog(
                [r["run_ms"] for r in line],
                [max(r["error"], 1e-16) for r in line],
                style,
                label=f"{key[0]} {key[1]}",
            )
        ax.set_title(problem)
        ax.set_xlabel("run time (ms)")
        ax.set_ylabel("relative error at the final time")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    options = parse_args(argv)
    if options.from_json:
        with open(options.from_json) as file:
            records = json.load(file)
        _print(records)
        if options.plot:
            work_precision_plot(records, options.plot)
        return 0
    try:
        import diffrax
    except ImportError:
        diffrax = None
    if options.no_diffrax:
        diffrax = None
    have_scipy = not options.no_scipy
    if have_scipy:
        try:
            import scipy  # noqa: F401
        except ImportError:
            have_scipy = False
    keys = options.only.split(",")
    rtols = [float(x) for x in options.rtols.split(",")]
    names = options.solvers.split(",")
    print(f"jax {jax.__version__} on {jax.default_backend()}; float64")
    records = []
    for problem in (p for p in PROBLEMS if p.key in keys):
        print(f"reference for {problem.key} ...", flush=True)
        ref = reference(problem)
        for rtol in rtols:
            runners, meta = {}, {}
            cases = [("diffeqx", name, getattr(diffeqx, name)()) for name in names]
            if diffrax is not None:
                cases += [
                    ("diffrax", name, getattr(diffrax, name)())
                    for name in options.diffrax_solvers.split(",")
                ]
            for lib_name, name, solver in cases:
                lib = diffeqx if lib_name == "diffeqx" else diffrax
                fn, args = library_case(lib, solver, problem, rtol)
                compiled, timing = compile_once(fn, args)
                runners[(lib_name, name)] = (compiled, args)
                meta[(lib_name, name)] = timing
            outputs, runs = time_runs(runners, min_time_s=options.min_run_time)
            for (lib_name, name), output in outputs.items():
                y, steps, rejected, success = output
                # Counted for diffeqx only: its step program performs every LU it
                # holds. (Diffrax's holds one in a branch that runs once per step
                # and another that does not run, so a count of its program
                # overstates its work.)
                lu = None
                if lib_name == "diffeqx":
                    lu = factorisations_per_step(diffeqx, name, problem) * int(steps)
                records.append(
                    dict(
                        problem=problem.key,
                        rtol=rtol,
                        library=lib_name,
                        solver=name,
                        compile_s=meta[(lib_name, name)].total_s,
                        run_ms=1e3 * runs[(lib_name, name)].median_s,
                        steps=int(steps),
                        rejected=int(rejected),
                        lu=lu,
                        error=_error(y, ref) if bool(success) else float("inf"),
                    )
                )
            if have_scipy:
                for method in ("LSODA", "BDF", "Radau"):
                    out = run_scipy(method, problem, rtol)
                    records.append(
                        dict(
                            problem=problem.key,
                            rtol=rtol,
                            library="scipy",
                            solver=method,
                            compile_s=None,
                            run_ms=out["run_ms"],
                            steps=out["steps"],
                            rejected=None,
                            lu=out["nlu"],
                            jac=out["njev"],
                            error=_error(out["y"], ref),
                        )
                    )
    _print(records)
    if options.json:
        with open(options.json, "w") as file:
            json.dump(records, file, indent=1)
        print(f"wrote {options.json}")
    if options.plot:
        try:
            work_precision_plot(records, options.plot)
        except ImportError:
            print("matplotlib is not installed: no plot")
    return 0


def _print(records) -> None:
    header = (
        f"{'problem':10s} {'rtol':>6s} {'library':8s} {'solver':10s} {'compile s':>9s} "
        f"{'run ms':>9s} {'steps':>6s} {'rej':>5s} {'LU':>6s} {'rel error':>9s}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
        rejected = "-" if r["rejected"] is None else str(r["rejected"])
        lu = "-" if r.get("lu") is None else str(r["lu"])
        error = "FAILED" if r["error"] == float("inf") else f"{r['error']:9.1e}"
        print(
            f"{r['problem']:10s} {r['rtol']:6.0e} {r['library']:8s} {r['solver']:10s} "
            f"{compile_s:>9s} {r['run_ms']:9.2f} {r['steps']:6d} {rejected:>5s} "
            f"{lu:>6s} {error:>9s}"
        )
    print(
        "compile: trace + lower + XLA, cold caches; run: median steady run (SciPy: best "
        "of 3 calls, Python overhead included); rel error: max over components of "
        "|y - ref| / |ref| at the final time, ref from SciPy Radau at rtol 1e-13; LU: "
        "LU factorisations (each after one Jacobian; diffeqx: per step attempt, "
        "counted in the step's program, times the steps; SciPy: its nlu); "
        "FAILED: the solve did not succeed (throw=False)."
    )
    print("\nRatios")
    groups = {}
    for r in records:
        groups.setdefault((r["problem"], r["rtol"]), []).append(r)
    for (problem, rtol), rows in groups.items():
        by = {(r["library"], r["solver"]): r for r in rows}
        parts = []
        for name in dict.fromkeys(r["solver"] for r in rows):
            ours, theirs = by.get(("diffeqx", name)), by.get(("diffrax", name))
            if not (ours and theirs):
                continue
            if theirs["error"] == float("inf"):
                parts.append(f"{name}: Diffrax's solve FAILED")
                continue
            parts.append(
                f"{name} vs Diffrax: run {ours['run_ms'] / theirs['run_ms']:.2f}x, "
                f"compile {ours['compile_s'] / theirs['compile_s']:.2f}x, steps "
                f"{ours['steps']}/{theirs['steps']}"
            )
        lsoda = by.get(("scipy", "LSODA"))
        candidates = [r for r in rows if r["library"] == "diffeqx"]
        if lsoda and candidates:
            fast = [r for r in candidates if r["error"] <= 2 * lsoda["error"]]
            if fast:
                best = min(fast, key=lambda r: r["run_ms"])
                parts.append(
                    f"best diffeqx at LSODA's accuracy ({best['solver']}) vs LSODA: run "
                    f"{best['run_ms'] / lsoda['run_ms']:.2f}x"
                )
            else:
                parts.append("no diffeqx method as accurate as LSODA")
        print(f"{problem:10s} rtol {rtol:.0e}: " + "; ".join(parts))


if __name__ == "__main__":
    sys.exit(main())

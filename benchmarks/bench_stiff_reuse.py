"""`reuse_jacobian=True` against the default on the small stiff problems of
`bench_stiff.py` (Robertson, Van der Pol mu=1000, HIRES; 2 to 8 unknowns).

    python benchmarks/bench_stiff_reuse.py

For each problem, rtol (1e-6, 1e-8) and method (Kvaerno5, KenCarp4, Kvaerno3):
steps, rejected steps, the relative error at the final time against SciPy's Radau
(rtol 1e-13) and the best of 7 steady runs, with and without reuse. The large
systems, where reuse pays, are in `bench_stiff_pde.py`.
"""

import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from bench_stiff import PROBLEMS, _error, library_case, reference  # noqa: E402

import diffeqx as dfx  # noqa: E402


def main() -> int:
    print(f"jax {jax.__version__} on {jax.default_backend()}; float64")
    print("problem     rtol  method    reuse  steps  rej  rel error  run ms  ratio")
    for problem in PROBLEMS:
        ref = reference(problem)
        for rtol in (1e-6, 1e-8):
            for name in ("Kvaerno5", "KenCarp4", "Kvaerno3"):
                best = {}
                for reuse in (False, True):
                    solver = getattr(dfx, name)(reuse_jacobian=reuse)
                    solve, args = library_case(dfx, solver, problem, rtol)
                    compiled = jax.jit(solve)
                    y, steps, rejected, _ = jax.block_until_ready(compiled(*args))
                    times = []
                    for _ in range(7):
                        start = time.perf_counter()
                        jax.block_until_ready(compiled(*args))
                        times.append(time.perf_counter() - start)
                    best[reuse] = min(times)
                    ratio = f"{best[True] / best[False]:.2f}x" if reuse else ""
                    print(
                        f"{problem.key:10s} {rtol:5.0e} {name:9s} {reuse!s:5s} "
                        f"{int(steps):6d} {int(rejected):4d} "
                        f"{_error(y, ref):10.1e} {best[reuse] * 1e3:7.2f}  {ratio}",
                        flush=True,
                    )
    print("ratio: run time with reuse / without")
    return 0


if __name__ == "__main__":
    sys.exit(main())

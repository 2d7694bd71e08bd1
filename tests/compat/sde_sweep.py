"""A sweep of SDE solves through Diffrax and diffeqx: a random sample of `SDECase`s
(see `_sde_harness.py`), each run through both libraries on the same deterministic
driving path and compared, printing the differences.

    python -m tests.compat.sde_sweep [--seed N] [--cases N]

A case that Diffrax refuses (raises for) is counted as refused when diffeqx refuses
it too, and reported when diffeqx runs it; a case that Diffrax runs and diffeqx
refuses is reported as a difference. A compared case is `same` when every output
agrees to the harness's tolerance (`_harness.TOLERANCE`); `values differ` when the
step counts, result codes, shapes and `inf` padding agree but some times or values
differ by more (the largest relative differences are printed); `differs` otherwise.
"""

import argparse
import itertools
import random

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402

import diffeqx  # noqa: E402

from ._harness import diff_outputs  # noqa: E402
from ._sde_harness import (  # noqa: E402
    LEVY_AREAS,
    NOISES,
    SDE_CONTROLLERS,
    SDE_SAVEATS,
    SDE_SOLVERS,
    SDECase,
    known_difference,
    solve_sde,
)
from .sweep import _largest_relative  # noqa: E402

AXES = dict(
    solver=SDE_SOLVERS,
    noise=NOISES,
    levy_area=LEVY_AREAS,
    controller=SDE_CONTROLLERS,
    saveat=SDE_SAVEATS,
    backwards=(False, True),
    dtype=("float64", "float32"),
    vmap=(False, True),
)


def run_case(case: SDECase) -> tuple[str, list[str], dict]:
    """`(status, lines, largest)`: status is `same`, `values differ`, `differs`,
    `refused` (by both) or `refused by diffrax only` / `refused by diffeqx only`;
    `largest`, for a compared case, the largest relative differences of the saved
    times and values."""
    try:
        with jax.numpy_dtype_promotion("standard"):
            expected = solve_sde(diffrax, case)
    except Exception as error:  # noqa: BLE001 - Diffrax's refusal
        theirs = f"{type(error).__name__}: {str(error)[:200]}"
        try:
            solve_sde(diffeqx, case)
        except Exception as ours:  # noqa: BLE001
            return (
                "refused",
                [
                    f"diffrax {theirs}",
                    f"diffeqx {type(ours).__name__}: {str(ours)[:200]}",
                ],
                {},
            )
        return "refused by diffrax only", [f"diffrax {theirs}"], {}
    try:
        actual = solve_sde(diffeqx, case)
    except Exception as error:  # noqa: BLE001 - any refusal is a difference
        return "refused by diffeqx only", [
            f"{type(error).__name__}: {str(error)[:300]}"
        ]
    problems = diff_outputs(expected, actual, case.dtype)
    largest = _largest_relative(expected, actual)
    if not problems:
        return "same", [], largest
    # Within any tolerance: only the structure, counts, codes and `inf` padding.
    structural = diff_outputs(expected, actual, case.dtype, (0.0, np.inf))
    if structural:
        return "differs", problems, largest
    sizes = ", ".join(f"{k} {v:.1e}" for k, v in largest.items())
    lines = [f"largest relative differences: {sizes}", *problems]
    return "values differ", lines, largest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=100)
    options = parser.parse_args(argv)
    product = [SDECase(*values) for values in itertools.product(*AXES.values())]
    cases = random.Random(options.seed).sample(product, options.cases)
    tally: dict[str, int] = {}
    for index, case in enumerate(cases):
        status, lines, _ = run_case(case)
        listed = known_difference(case)
        if status in ("differs", "values differ") and listed:
            status = f"differs (listed: {listed})"
        tally[status] = tally.get(status, 0) + 1
        print(f"{index} {case}: {status}", flush=True)
        if status != "same":
            for line in lines:
                print("    " + line[:300])
        jax.clear_caches()
    print(", ".join(f"{n} {status}" for status, n in sorted(tally.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sampled implicit and IMEX solves through Diffrax and diffeqx (see `_harness.py` and
the wider `python -m tests.compat.sweep --implicit`): `ImplicitEuler`, `Kvaerno3/4/5`,
`KenCarp3/4/5` and `Sil3` (the IMEX methods on the vector field split into two
halves), each with `optimistix.Newton` or `optimistix.Chord` as its root finder, on
the axes of the explicit cases: problem, controller, `SaveAt`, direction of time,
dtype, `jax.vmap`, an event, and a solve resumed from the state of an earlier one.
Both libraries then iterate identically, so the steps, decisions and result codes
are the same and the values agree to rounding (amplified by the stopping tolerance
of the iteration: `tolerance`).

Not sampled:
- the solvers' default root finder `VeryChord`, whose stopping test differs from
  Diffrax's on purpose (docs/migration.md; `test_implicit.py` compares its accuracy
  and step counts);
- the KenCarp methods in float32 saving at given times (`SaveAt(ts=...)`, alone or
  with others, or through `fn` or `subs`), which Diffrax 0.7.2 refuses with x64
  enabled (a dtype promotion error where its step interpolates to a save time;
  `test_kencarp_float32_saves_that_diffrax_refuses`);
- float32 at the tightest tolerance (`pid_tight`, rtol 1e-5): there the error
  estimate is mostly rounding noise, and the steps follow it;
- the case in `DIFFRAX_EVENT_ROOT_FIND_FAILS`, a listed difference.
"""

import itertools
import random

import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402

from ._harness import (  # noqa: E402
    IMEX_SOLVERS,
    IMPLICIT_SOLVERS,
    Case,
    diff_outputs,
    sampled_params,
    solve,
)
from .test_solves import AXES, diffrax_accepts  # noqa: E402

NUM_CASES = 40
# Two by default (an IMEX method with Chord under `vmap`, a Kvaerno method with
# Newton), for the default run's length; the rest are `slow`.
DEFAULT_CASES = 2
ROOT_FINDERS_SAMPLED = ("newton", "chord")
# Documented on the migration page ("Root finding for an event near a step
# boundary"): Diffrax's Newton iteration for the event reaches its limit and the
# solve ends with `nonlinear_max_steps_reached`; diffeqx locates the event.
DIFFRAX_EVENT_ROOT_FIND_FAILS = (
    "lin1-KenCarp4/chord-clip_jump-subs-bwd-float64-vmap-real-fresh",
)


def tolerance(case: Case) -> tuple[float, float]:
    """(rtol, atol) for the times and values. The iteration stops at 1e-9 (float64)
    or 1e-5 (float32) of its tolerance-scaled correction, and the two libraries'
    iterates agree to rounding, which the adaptive step sizes follow through their
    error estimates (measured in float64: up to 2e-9 relative under `vmap`).
    KenCarp5's `a_76` differs from Diffrax's in the 11th digit (docs/migration.md):
    3e-8 in the step times at rtol 1e-5. In float32 an adaptive step size moves with
    the last digits of the stages (up to 2e-3 relative, the same steps), as for the
    explicit solvers at loose tolerances."""
    adaptive = case.controller not in ("const", "stepto")
    if case.dtype == "float32":
        return (1e-2, 1e-3) if adaptive else (1e-4, 1e-5)
    if case.solver.startswith("KenCarp5"):
        return (1e-6, 1e-9)
    return (1e-8, 1e-10)


_SAVES_AT_GIVEN_TIMES = ("ts", "mixed", "fn", "subs")


def _diffrax_runs(case: Case) -> bool:
    if not diffrax_accepts(case):
        return False
    kencarp = case.solver.startswith("KenCarp")
    if kencarp and case.dtype == "float32" and case.saveat in _SAVES_AT_GIVEN_TIMES:
        return False
    if case.dtype == "float32" and case.controller == "pid_tight":
        return False
    return True


def _sampled() -> list[Case]:
    axes = dict(AXES)
    axes["solver"] = tuple(
        f"{solver}/{finder}"
        for solver in IMPLICIT_SOLVERS + IMEX_SOLVERS
        for finder in ROOT_FINDERS_SAMPLED
    )
    product = [Case(*values) for values in itertools.product(*axes.values())]
    sample = random.Random(3).sample(product, 4 * NUM_CASES)
    return [
        case
        for case in sample
        if _diffrax_runs(case) and str(case) not in DIFFRAX_EVENT_ROOT_FIND_FAILS
    ][:NUM_CASES]


CASES = _sampled()


@pytest.mark.parametrize("case", sampled_params(CASES, DEFAULT_CASES))
def test_sampled_implicit_case(case):
    expected = solve(diffrax, case)
    actual = solve(diffeqx, case)
    problems = diff_outputs(expected, actual, case.dtype, tolerance(case))
    assert not problems, f"{case}\n" + "\n".join(problems)


def test_sample_covers_every_solver_and_root_finder():
    solvers = {case.solver for case in CASES}
    assert {s.partition("/")[0] for s in solvers} == set(
        IMPLICIT_SOLVERS + IMEX_SOLVERS
    )
    assert {s.partition("/")[2] for s in solvers} == set(ROOT_FINDERS_SAMPLED)
    for axis in ("controller", "saveat", "backwards", "dtype", "vmap", "resume"):
        assert {getattr(case, axis) for case in CASES} == set(AXES[axis]), axis


@pytest.mark.slow
def test_kencarp_float32_saves_that_diffrax_refuses():
    """With x64 enabled, Diffrax 0.7.2 refuses a KenCarp solve in float32 that saves
    at given times (a dtype promotion error where its step interpolates to a save
    time); diffeqx solves it, to the accuracy its tolerance gives (against the same
    solve in float64)."""
    case = Case("lin2", "KenCarp4/newton", "pid", "ts", dtype="float32")
    with pytest.raises(ValueError, match="dtype"):
        solve(diffrax, case)
    ours = solve(diffeqx, case)
    reference = solve(diffeqx, Case(**{**case.__dict__, "dtype": "float64"}))
    assert bool(ours["result"][0]) and bool(reference["result"][0])  # successful
    np.testing.assert_allclose(ours["ys"], reference["ys"], rtol=1e-3, atol=1e-4)


def test_harness_root_finders_are_the_ones_named():
    """The harness builds what the case names (a guard on the sampled cases above)."""
    from ._harness import make_solver

    solver = make_solver(diffeqx, "Kvaerno3/newton", jnp.float64)
    assert isinstance(solver.root_finder, optx.Newton)
    assert solver.root_finder.rtol == 1e-9
    solver = make_solver(diffeqx, "KenCarp4/chord", jnp.float32)
    assert isinstance(solver.root_finder, optx.Chord)
    assert solver.root_finder.rtol == 1e-5

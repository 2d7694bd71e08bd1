"""Sampled controlled differential equations through Diffrax and diffeqx (see
`_harness.py` and the wider `python -m tests.compat.sweep --cde`): a `ControlTerm`
driven by a `LinearInterpolation` or by a `CubicInterpolation` of
`backward_hermite_coefficients`, with every explicit solver, on the axes of the ODE
cases (controller, `SaveAt`, direction of time, dtype, `jax.vmap`, an event, a
resumed solve). The same answer to the harness's tolerance, as for ODEs.
"""

import itertools
import random

import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402

from ._harness import (  # noqa: E402
    CDE_PROBLEMS,
    Case,
    diff_outputs,
    sampled_params,
    solve,
    tolerance_for,
)
from .test_solves import AXES, diffrax_accepts  # noqa: E402

NUM_CASES = 30
DEFAULT_CASES = 2


def _sampled() -> list[Case]:
    axes = dict(AXES, problem=CDE_PROBLEMS)
    product = [Case(*values) for values in itertools.product(*axes.values())]
    sample = random.Random(6).sample(product, 3 * NUM_CASES)
    return [case for case in sample if diffrax_accepts(case)][:NUM_CASES]


CASES = _sampled()


@pytest.mark.parametrize("case", sampled_params(CASES, DEFAULT_CASES))
def test_sampled_cde_case(case):
    expected = solve(diffrax, case)
    actual = solve(diffeqx, case)
    problems = diff_outputs(expected, actual, case.dtype, tolerance_for(case))
    assert not problems, f"{case}\n" + "\n".join(problems)


def test_sample_covers_both_paths_and_every_solver():
    assert {case.problem for case in CASES} == set(CDE_PROBLEMS)
    assert {case.solver for case in CASES} == set(AXES["solver"])
    for axis in ("controller", "saveat", "backwards", "dtype", "vmap", "event"):
        assert {getattr(case, axis) for case in CASES} == set(AXES[axis]), axis


def test_harness_builds_a_control_term_on_the_named_path():
    """A guard on the sampled cases above: the term is what the case names."""
    import jax.numpy as jnp

    from ._harness import make_term, problem

    field, _, _ = problem("cde_cubic", jnp.float64)
    term = make_term(diffeqx, field, "Tsit5", "cde_cubic", jnp.float64)
    assert isinstance(term, diffeqx.ControlTerm)
    assert isinstance(term.control, diffeqx.CubicInterpolation)
    term = make_term(diffeqx, field, "Tsit5", "cde_linear", jnp.float64)
    assert isinstance(term.control, diffeqx.LinearInterpolation)

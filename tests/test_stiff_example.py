"""The stiff-chemistry example (examples/stiff_chemistry.py): Robertson's reaction to
t = 1e5 with Kvaerno5 matches SciPy's Radau at rtol 1e-12, conserves mass, and runs
its command line."""

import importlib.util
import pathlib

import numpy as np

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "stiff_chemistry.py"

# SciPy `solve_ivp(method="Radau", rtol=1e-12, atol=1e-16)` with the exact Jacobian,
# at t = 1e5 (tests/test_implicit.py computes the same reference at test time).
_REFERENCE_AT_1E5 = np.array(
    [1.7865921142322484e-02, 7.2747514685287488e-08, 9.8213400611016433e-01]
)


def _load():
    spec = importlib.util.spec_from_file_location("stiff_chemistry", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stiff_chemistry_example(capsys):
    example = _load()
    sol = example.main([])
    out = capsys.readouterr().out
    assert "steps:" in out
    ys = np.asarray(sol.ys)
    np.testing.assert_allclose(ys[-1], _REFERENCE_AT_1E5, rtol=1e-5)
    np.testing.assert_allclose(ys.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    assert int(sol.stats["num_steps"]) < 500

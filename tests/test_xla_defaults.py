"""The test run compiles with XLA's older CPU emitters, which compile faster
(`tests/conftest.py`); users get XLA's defaults. This runs the default float32
compatibility cases, the ones most sensitive to rounding (an adaptive float32 solve's
steps follow the last digits of its error estimate), in a fresh process with XLA's
defaults: diffeqx must give Diffrax's answers there too."""

import pytest

from _xla_defaults import run_pytest_with_xla_defaults

pytest.importorskip("diffrax")


def test_float32_compat_cases_match_diffrax_with_xlas_default_code_generator():
    done = run_pytest_with_xla_defaults(
        "tests/compat/test_solves.py",
        "-k",
        "test_same_answer_as_diffrax and float32",
    )
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    # At least the four default float32 cases ran (and none was skipped).
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 4 and "skipped" not in summary, report

"""The test run compiles with XLA's older CPU emitters, which compile faster
(`tests/conftest.py`); users get XLA's defaults. This runs the default float32
compatibility cases, the ones most sensitive to rounding (an adaptive float32 solve's
steps follow the last digits of its error estimate), in a fresh process with XLA's
defaults: diffeqx must give Diffrax's answers there too."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("diffrax")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _without_emitter_choice(flags: str) -> str:
    return " ".join(f for f in flags.split() if "xla_cpu_use_fusion_emitters" not in f)


def test_float32_compat_cases_match_diffrax_with_xlas_default_code_generator():
    env = dict(os.environ)
    env["XLA_FLAGS"] = _without_emitter_choice(env.get("XLA_FLAGS", ""))
    env["DIFFEQX_TEST_XLA_DEFAULTS"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:xdist",
        "tests/compat/test_solves.py",
        "-k",
        "test_same_answer_as_diffrax and float32",
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    report = done.stdout[-4000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    # At least the four default float32 cases ran (and none was skipped).
    summary = done.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 4 and "skipped" not in summary, report

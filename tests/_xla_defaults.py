"""Running part of the test suite in a fresh process with XLA's default CPU code
generator: the test run compiles with the older emitters (`conftest.py`), while users
get XLA's defaults."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_pytest_with_xla_defaults(
    *arguments: str, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`pytest -q <arguments>` in a fresh process on CPU with XLA's default code
    generator, output captured; `subprocess.TimeoutExpired` after `timeout`
    seconds."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if "xla_cpu_use_fusion_emitters" not in f
    )
    env["DIFFEQX_TEST_XLA_DEFAULTS"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "no:xdist", *arguments]
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )

import os

# ---- XLA's CPU code generator for the test run ----------------------------------------
#
# Most of the default run is XLA compiling the programs the tests build (measured on
# 2 cores: 805 of 1,248 worker-seconds, over 3,106 compilations). XLA's default CPU
# code generator sends every fused kernel through an MLIR pipeline of its own; its
# older emitters, still selectable, generate code for the same fused kernels in less
# time (measured:
# the default run, 1,397 tests with 2 workers on 2 cores, took 446 s with them and
# 637 s with XLA's defaults; both pass).
# The run uses the older emitters unless `DIFFEQX_TEST_XLA_DEFAULTS` is set (or
# `XLA_FLAGS` already chooses). `tests/test_xla_defaults.py` runs the compatibility
# cases most sensitive to rounding in a process with XLA's defaults, which is what
# users get. Set here, before JAX creates its CPU client, which reads `XLA_FLAGS`.
_OLDER_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if not os.environ.get("DIFFEQX_TEST_XLA_DEFAULTS") and (
    "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + _OLDER_EMITTERS
    ).strip()

import jax  # noqa: E402

# Tests compare against float64 references; float32 behaviour is tested with explicit
# float32 inputs.
jax.config.update("jax_enable_x64", True)
# No implicit dtype promotion anywhere: careful users (and Diffrax's own tests) turn this
# on, so every internal operation must cast explicitly.
jax.config.update("jax_numpy_dtype_promotion", "strict")
# No implicit rank promotion either, as in Diffrax's own tests: users who set it get a
# library that never relies on it (the Brownian tree did, until 2026-12-05).
jax.config.update("jax_numpy_rank_promotion", "raise")


# ---- memory maps of compiled programs -------------------------------------------------
#
# Every program XLA compiles for the CPU keeps a few memory mappings of its own, and
# JAX keeps compiled programs in its caches. Most tests here call solvers eagerly
# (outside `jax.jit`) with vector fields defined in the test, and each such call
# compiles programs that stay cached: about 100 mappings per solve (Diffrax's: about
# 180). A long test session then reaches Linux's limit on mappings per process
# (`vm.max_map_count`, 65,530 by default), where a compilation fails and the process
# crashes while reporting it (measured: the slow `vmap` cases of
# tests/compat/test_solves.py, run in one process, crashed at 65,000 mappings). The
# caches are cleared when the count passes a third of the limit (checked every few
# tests, as reading it costs a few milliseconds).

import gc  # noqa: E402

import pytest  # noqa: E402

from diffeqx import _eager  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_traces_when_patched(request):
    # A solve traced inside `jax.jit` is traced as a nested `jax.jit` whose trace is
    # kept (as an eager call's program is) and reused by a later trace with the same
    # key. A test that patches a setting read while tracing (not part of the key)
    # starts and ends with none kept.
    patched = "monkeypatch" in request.fixturenames
    if patched:
        _eager.forget_traces()
    yield
    if patched:
        _eager.forget_traces()


_MAPS = "/proc/self/maps"
_CHECK_EVERY = 8
_tests_run = 0


def _max_maps() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as file:
            return int(file.read())
    except (OSError, ValueError):
        return 65530


_MAPS_LIMIT = _max_maps() // 3


def _memory_maps() -> int:
    with open(_MAPS, "rb") as file:
        return sum(1 for _ in file)


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
    yield
    global _tests_run
    _tests_run += 1
    if _tests_run % _CHECK_EVERY or not os.path.exists(_MAPS):
        return
    if _memory_maps() > _MAPS_LIMIT:
        jax.clear_caches()
        gc.collect()

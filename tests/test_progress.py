"""Progress meters report the fraction of [t0, t1] done, under jit and vmap."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx


def _solve(y0, t1, meter, **kwargs):
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -y),
        dfx.Tsit5(),
        0.0,
        t1,
        0.01,
        y0,
        progress_meter=meter,
        **kwargs,
    )


def _percentages(text):
    return [float(line.rstrip("%")) for line in text.split() if line.endswith("%")]


def test_text_progress_meter_prints_increasing_percentages_under_jit(capfd):
    meter = dfx.TextProgressMeter(minimum_increase=0.2)
    sol = jax.jit(lambda y0: _solve(y0, 1.0, meter))(jnp.ones(2))
    jax.effects_barrier()
    printed = _percentages(capfd.readouterr().out)
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-6)
    assert printed[-1] == 100.0
    assert printed == sorted(printed)
    # Reports only when progress grew by the minimum increase: about 1 / 0.2 of them.
    assert 4 <= len(printed) <= 7


def test_text_progress_meter_reports_slowest_member_once_under_vmap(capfd):
    meter = dfx.TextProgressMeter(minimum_increase=0.25)
    solve = jax.jit(jax.vmap(lambda y0, t1: _solve(y0, t1, meter)))
    sol = solve(jnp.ones((3, 2)), jnp.array([1.0, 2.0, 3.0]))
    jax.effects_barrier()
    printed = _percentages(capfd.readouterr().out)
    np.testing.assert_allclose(
        sol.ys[:, -1, 0], np.exp(-np.array([1.0, 2.0, 3.0])), rtol=1e-6
    )
    assert printed == sorted(printed)
    assert printed[-1] == 100.0
    assert len(printed) <= 6  # one line per report, not one per member


def test_progress_meter_does_not_change_the_solution(capfd):
    plain = _solve(jnp.ones(2), 1.0, dfx.NoProgressMeter())
    metered = _solve(jnp.ones(2), 1.0, dfx.TextProgressMeter())
    np.testing.assert_array_equal(plain.ys, metered.ys)
    assert plain.stats["num_steps"] == metered.stats["num_steps"]


def test_no_progress_meter_prints_nothing(capfd):
    _solve(jnp.ones(2), 1.0, dfx.NoProgressMeter())
    jax.effects_barrier()
    assert capfd.readouterr().out == ""


def test_tqdm_progress_meter_runs_to_completion(capfd):
    pytest.importorskip("tqdm")
    sol = jax.jit(lambda y0: _solve(y0, 1.0, dfx.TqdmProgressMeter()))(jnp.ones(2))
    jax.effects_barrier()
    err = capfd.readouterr().err
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-6)
    assert "100.00%" in err


def test_tqdm_progress_meter_without_tqdm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        dfx.TqdmProgressMeter()


def test_progress_meter_argument_is_checked():
    with pytest.raises(TypeError, match="progress_meter"):
        _solve(jnp.ones(2), 1.0, "text")

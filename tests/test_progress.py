"""Progress meters report the fraction of [t0, t1] done, under jit, vmap and grad."""

import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffeqx as dfx


def _solve(y0, t1, meter, a=1.0, dt0=0.1, **kwargs):
    return dfx.diffeqsolve(
        dfx.ODETerm(lambda t, y, args: -args * y),
        dfx.Tsit5(),
        0.0,
        t1,
        dt0,
        y0,
        args=a,
        progress_meter=meter,
        **kwargs,
    )


def _printed(capfd):
    jax.effects_barrier()
    return capfd.readouterr().out.split()


TENTHS = [f"{10 * k}.00%" for k in range(11)]


def test_text_progress_meter_prints_start_each_increase_and_end(capfd):
    sol = _solve(jnp.ones(2), 1.0, dfx.TextProgressMeter())
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-6)
    # Steps of 10%, each more than the default 2%: one line each, 100% once.
    assert _printed(capfd) == TENTHS


def test_text_progress_meter_prints_only_increases_above_the_minimum(capfd):
    _solve(jnp.ones(2), 1.0, dfx.TextProgressMeter(minimum_increase=0.25))
    # A line once progress has grown by more than 25%, and at 100%.
    assert _printed(capfd) == ["0.00%", "30.00%", "60.00%", "90.00%", "100.00%"]


def test_text_progress_meter_is_the_same_under_jit(capfd):
    jax.jit(lambda y0: _solve(y0, 1.0, dfx.TextProgressMeter()))(jnp.ones(2))
    assert _printed(capfd) == TENTHS


@pytest.mark.slow  # tests/compat/test_progress.py covers grad by default
def test_text_progress_meter_reports_once_under_grad(capfd):
    # The backward pass recomputes the steps; it must not report them again.
    def loss(a):
        return jnp.sum(_solve(jnp.ones(2), 1.0, dfx.TextProgressMeter(), a=a).ys)

    grad = jax.grad(loss)(1.0)
    np.testing.assert_allclose(grad, -2 * np.exp(-1.0), rtol=1e-6)
    assert _printed(capfd) == TENTHS


def test_text_progress_meter_under_vmap_follows_the_slowest_member(capfd):
    meter = dfx.TextProgressMeter(minimum_increase=0.25)
    jax.jit(jax.vmap(lambda t1: _solve(jnp.ones(2), t1, meter)))(jnp.array([1.0, 2.0]))
    batched = _printed(capfd)
    # The slower member (t1 = 2) progresses by less each step: the batch prints
    # exactly what that member alone prints. (`t1` as an array, a value the program
    # computes with as in the batch; a Python number would be compiled in, and the
    # progress fractions rounded otherwise.)
    _solve(jnp.ones(2), jnp.asarray(2.0), meter)
    single = _printed(capfd)
    assert batched == single
    assert single[0] == "0.00%" and single[-1] == "100.00%" and len(single) == 5


def test_text_progress_meter_ends_at_100_when_the_solve_stops_early(capfd):
    sol = _solve(jnp.ones(2), 1.0, dfx.TextProgressMeter(), max_steps=5, throw=False)
    assert sol.result == dfx.RESULTS.max_steps_reached
    assert _printed(capfd) == TENTHS[:6] + ["100.00%"]


def test_progress_meter_does_not_change_the_solution(capfd):
    plain = _solve(jnp.ones(2), 1.0, dfx.NoProgressMeter())
    metered = _solve(jnp.ones(2), 1.0, dfx.TextProgressMeter())
    np.testing.assert_array_equal(plain.ys, metered.ys)
    assert plain.stats["num_steps"] == metered.stats["num_steps"]


def test_no_progress_meter_prints_nothing(capfd):
    _solve(jnp.ones(2), 1.0, dfx.NoProgressMeter())
    assert _printed(capfd) == []


def test_progress_meter_signatures():
    text = inspect.signature(dfx.TextProgressMeter).parameters
    assert list(text) == ["minimum_increase"]
    assert text["minimum_increase"].default == 0.02
    tqdm = inspect.signature(dfx.TqdmProgressMeter).parameters
    assert list(tqdm) == ["refresh_steps"]
    assert tqdm["refresh_steps"].default == 20


@pytest.mark.parametrize(
    "refresh_steps, frames",
    [
        (1, TENTHS + ["100.00%"]),
        (5, ["0.00%", "10.00%", "60.00%", "100.00%"]),
        (20, ["0.00%", "10.00%", "100.00%"]),
    ],
)
def test_tqdm_progress_meter_refreshes_every_refresh_steps(
    capfd, refresh_steps, frames
):
    pytest.importorskip("tqdm")
    meter = dfx.TqdmProgressMeter(refresh_steps=refresh_steps)
    sol = _solve(jnp.ones(2), 1.0, meter)
    jax.effects_barrier()
    err = capfd.readouterr().err
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-6)
    # One frame when the bar opens, one per refresh (after steps 1, 1 + refresh_steps,
    # ...: 10% of the solve per step), one when it closes.
    drawn = [frame.split("|")[0].strip() for frame in err.split("\r") if "|" in frame]
    assert drawn == frames


def test_tqdm_progress_meter_checks_refresh_steps():
    pytest.importorskip("tqdm")
    with pytest.raises(ValueError, match="refresh_steps"):
        dfx.TqdmProgressMeter(refresh_steps=0)


def test_tqdm_progress_meter_without_tqdm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ImportError, match="pip install tqdm"):
        dfx.TqdmProgressMeter()
    # Diffrax raises a ValueError here: code written for it catches this one too.
    with pytest.raises(ValueError, match="pip install tqdm"):
        dfx.TqdmProgressMeter()


def test_progress_meter_argument_is_checked():
    with pytest.raises(TypeError, match="progress_meter"):
        _solve(jnp.ones(2), 1.0, "text")

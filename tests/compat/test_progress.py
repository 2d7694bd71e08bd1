"""Progress meters print what Diffrax's print for the same solve: the same lines from
`TextProgressMeter` (under jit, grad and vmap too) and the same bar states from
`TqdmProgressMeter(refresh_steps=...)`; and the meters have Diffrax's signatures."""

import inspect

import jax
import jax.numpy as jnp
import pytest

diffrax = pytest.importorskip("diffrax")

import diffeqx  # noqa: E402


def _solve(lib, meter, t0=0.0, t1=1.0, dt0=0.1, pid=False, a=1.0, **kwargs):
    controller = (
        lib.PIDController(rtol=1e-4, atol=1e-6) if pid else lib.ConstantStepSize()
    )
    return lib.diffeqsolve(
        lib.ODETerm(lambda t, y, args: -args * y),
        lib.Tsit5(),
        t0,
        t1,
        dt0,
        jnp.ones(2),
        args=a,
        stepsize_controller=controller,
        progress_meter=meter,
        **kwargs,
    )


def _output(capfd, run, lib):
    capfd.readouterr()
    run(lib)
    jax.effects_barrier()
    captured = capfd.readouterr()
    return captured.out.split(), captured.err


CASES = {
    "constant": lambda lib: _solve(lib, lib.TextProgressMeter()),
    "minimum_increase": lambda lib: _solve(
        lib, lib.TextProgressMeter(minimum_increase=0.1), dt0=0.03
    ),
    "pid": lambda lib: _solve(lib, lib.TextProgressMeter(), t1=5.0, pid=True),
    "backwards": lambda lib: _solve(
        lib, lib.TextProgressMeter(), t0=1.0, t1=0.0, dt0=-0.1
    ),
    "max_steps": lambda lib: _solve(
        lib, lib.TextProgressMeter(), max_steps=5, throw=False
    ),
    "t0_equals_t1": lambda lib: _solve(lib, lib.TextProgressMeter(), t1=0.0),
    "grad": lambda lib: jax.jit(
        jax.grad(
            lambda a: jnp.sum(
                _solve(lib, lib.TextProgressMeter(), t1=3.0, pid=True, a=a).ys
            )
        )
    )(1.0),
    "vmap": lambda lib: jax.jit(
        jax.vmap(
            lambda a, t1: _solve(
                lib, lib.TextProgressMeter(0.1), t1=t1, dt0=0.05, pid=True, a=a
            )
        )
    )(jnp.array([1.0, 3.0]), jnp.array([0.5, 2.0])),
}


@pytest.mark.parametrize(
    "name",
    [
        "constant",
        "grad",
        # Under vmap by default: test_progress.py (the slowest member's progress).
        pytest.param("pid", marks=pytest.mark.slow),
        pytest.param("vmap", marks=pytest.mark.slow),
        pytest.param("minimum_increase", marks=pytest.mark.slow),
        pytest.param("backwards", marks=pytest.mark.slow),
        pytest.param("max_steps", marks=pytest.mark.slow),
        pytest.param("t0_equals_t1", marks=pytest.mark.slow),
    ],
)
def test_text_progress_meter_prints_what_diffrax_prints(capfd, name):
    expected, _ = _output(capfd, CASES[name], diffrax)
    actual, _ = _output(capfd, CASES[name], diffeqx)
    assert expected[0] == "0.00%" and expected[-1] == "100.00%"
    assert actual == expected


@pytest.mark.parametrize("refresh_steps", [1, 5])
def test_tqdm_progress_meter_draws_what_diffrax_draws(capfd, refresh_steps):
    pytest.importorskip("tqdm")

    def run(lib):
        _solve(lib, lib.TqdmProgressMeter(refresh_steps=refresh_steps))

    def bar_states(err):
        return [
            frame.split("|")[0].strip() for frame in err.split("\r") if "|" in frame
        ]

    _, expected = _output(capfd, run, diffrax)
    _, actual = _output(capfd, run, diffeqx)
    assert bar_states(actual) == bar_states(expected)
    assert len(bar_states(expected)) > 2


@pytest.mark.parametrize("name", ["TextProgressMeter", "TqdmProgressMeter"])
def test_progress_meter_signatures_match_diffrax(name):
    expected = inspect.signature(getattr(diffrax, name)).parameters
    actual = inspect.signature(getattr(diffeqx, name)).parameters
    assert list(actual) == list(expected)
    for param in expected:
        assert actual[param].default == expected[param].default
        assert actual[param].kind == expected[param].kind

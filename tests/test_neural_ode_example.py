"""The neural-ODE example (examples/neural_ode.py), in a smaller version: fitted to a
few short spiral trajectories for a few dozen steps, its loss must fall well below
where it started, with each adjoint method the example offers."""

import importlib.util
import math
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "neural_ode.py"

SMALL = dict(
    num_trajectories=32,
    steps=60,
    batch_size=16,
    length=20,
    horizon=2.0,
    learning_rate=1e-2,
    width=16,
    seed=0,
    log=False,
)


def _load_example():
    spec = importlib.util.spec_from_file_location("neural_ode_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_learns(result):
    history = result["history"]
    assert len(history) == SMALL["steps"], result
    assert all(math.isfinite(value) for value in history), result
    assert math.isfinite(result["final_loss"]), result
    # On the whole data set, and at the end of the training curve itself.
    assert result["final_loss"] < 0.5 * result["initial_loss"], result
    assert history[-1] < 0.5 * history[0], result


@pytest.mark.slow
def test_small_neural_ode_fits_spiral_with_recursive_checkpointing():
    example = _load_example()
    _check_learns(example.main(adjoint="recursive", **SMALL))


@pytest.mark.slow
def test_small_neural_ode_fits_spiral_with_backsolve_adjoint():
    example = _load_example()
    _check_learns(example.main(adjoint="backsolve", **SMALL))


def test_unknown_adjoint_is_rejected():
    example = _load_example()
    with pytest.raises(ValueError, match="unknown adjoint"):
        example.make_adjoint("nonsense")

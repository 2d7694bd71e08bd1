"""The neural-CDE example (examples/neural_cde.py), in a smaller version: it must learn
to tell clockwise from anticlockwise spirals, from irregular samples with missing
values. Slow (about 40 s): it trains a model."""

import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "neural_cde.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("neural_cde_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_small_neural_cde_learns_spiral_direction_quickly():
    example = _load_example()
    result = example.main(num_train=64, num_test=128, steps=25, seed=0, log=False)
    assert result["accuracy"] >= 0.9, result

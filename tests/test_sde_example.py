"""The SDE example (examples/sde.py): Ornstein–Uhlenbeck paths from ShARK have the
closed-form mean and variance, within sampling error."""

import importlib.util
import pathlib

import numpy as np

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "sde.py"


def _load():
    spec = importlib.util.spec_from_file_location("sde_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sde_example(capsys):
    example = _load()
    n = 2000
    ts, paths = example.main(["--paths", str(n)])
    assert "sample mean" in capsys.readouterr().out
    mean, variance = (np.asarray(m) for m in example.exact_moments(ts))
    sample_mean = np.asarray(paths).mean(axis=0)
    sample_var = np.asarray(paths).var(axis=0)
    # Standard errors of the sample mean and variance of a normal sample; 5 of them
    # (a false failure about once in a million runs per time, for a fixed seed never).
    se_mean = np.sqrt(variance / n)
    se_var = variance * np.sqrt(2 / (n - 1))
    assert np.all(np.abs(sample_mean - mean) <= 5 * se_mean + 1e-12)
    assert np.all(np.abs(sample_var - variance) <= 5 * se_var + 1e-12)
    # And not trivially: the variance grows from zero to its stationary value.
    assert sample_var[0] == 0 and sample_var[-1] > 0.08

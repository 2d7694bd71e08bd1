"""Sharding: a batch of initial conditions spread over 4 host CPU devices with a
`Mesh` and a `NamedSharding` on the batch axis solves to the unsharded answer.

The device count must be fixed before JAX initialises, and pytest has long since
imported JAX, so the check runs in a fresh interpreter with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and reports back as JSON. It
uses the functions of `examples/sharded_batch.py`, so the example is tested too.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import sharded_batch as example  # also enables float64

mesh = example.make_mesh()
y0s = example.initial_conditions(10)  # not a multiple of 4: padded to 12
ys, padded_size = example.solve_sharded(y0s, mesh)
sharded = np.asarray(ys)[:10]
reference = example.solve_on_one_device(y0s)

# Truth for a few members: each one solved alone, without vmap or sharding.
alone = [
    np.asarray(example.solve_one(y0, example.PARAMS, example.SAVE_TIMES))
    for y0 in y0s[[0, 9]]
]
shards = ys.addressable_shards
# The example as a user runs it (prints first), with the batch size checked above:
# it pads the same way and reuses the solves compiled above.
example.main(["--batch-size", "10"])
print(json.dumps({
    "device_count": jax.device_count(),
    "padded_size": padded_size,
    "shape": list(ys.shape),
    "spec_is_batch": ys.sharding.spec == PartitionSpec(example.BATCH_AXIS),
    "is_named": isinstance(ys.sharding, NamedSharding),
    "shard_devices": sorted(shard.device.id for shard in shards),
    "shard_rows": [shard.data.shape[0] for shard in shards],
    "max_abs_reference": float(np.max(np.abs(reference))),
    "max_diff_unsharded": float(np.max(np.abs(sharded - reference))),
    "max_diff_alone": float(np.max(np.abs(sharded[[0, 9]] - np.stack(alone)))),
    "padding_copies_last": bool(np.array_equal(np.asarray(ys)[10:], np.asarray(ys)[[9, 9]])),
    "all_finite": bool(np.all(np.isfinite(sharded))),
}))
"""


def _run_with_four_cpu_devices(script: pathlib.Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, str(script), str(ROOT / "examples")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    script = tmp_path_factory.mktemp("sharding") / "check_sharding.py"
    script.write_text(_CHECK)
    completed = _run_with_four_cpu_devices(script)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def report(completed):
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_subprocess_sees_four_cpu_devices(report):
    assert report["device_count"] == 4


def test_sharded_batch_is_split_evenly_over_the_four_devices(report):
    assert report["padded_size"] == 12
    assert report["shape"] == [12, 11, 2]
    assert report["is_named"] and report["spec_is_batch"]
    assert report["shard_devices"] == [0, 1, 2, 3]
    assert report["shard_rows"] == [3, 3, 3, 3]


def test_sharded_solve_equals_the_unsharded_solve(report):
    # Slices of different widths may round differently in the last bit; anything
    # beyond a few ulps of the solution's size would be a real difference.
    assert report["all_finite"]
    scale = report["max_abs_reference"]
    assert report["max_diff_unsharded"] <= 1e-13 * scale
    assert report["max_diff_alone"] <= 1e-13 * scale


def test_padding_members_are_copies_of_the_last_member(report):
    assert report["padding_copies_last"]


def test_sharded_batch_example_runs_on_four_devices(completed):
    output = completed.stdout
    assert "devices: 4 (cpu) over 1 process(es)" in output
    assert "padded to 12 (3 per device)" in output
    difference = float(output.split("max |sharded - single device|:")[1].split()[0])
    assert difference <= 1e-12

"""Solve a batch of initial conditions sharded across every available device.

A batch of Lotka–Volterra initial conditions is split along its batch axis over a
one-dimensional device mesh: each device solves its slice with `jax.vmap`, all at
once, and the result stays sharded the same way. The sharded answer is then checked
against the same batch solved on a single device.

The code only asks JAX for its devices, so the same script runs unchanged on one CPU,
on several GPUs, and on several hosts:

    python examples/sharded_batch.py                     # whatever devices JAX finds
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python examples/sharded_batch.py                 # simulate 4 devices on a CPU
    python examples/sharded_batch.py --distributed       # multi-host: run once per host

With `--distributed`, `jax.distributed.initialize()` is called first (it reads the
cluster from the environment, e.g. under SLURM, or from JAX's coordinator variables);
`jax.devices()` then lists the devices of every host, and each process provides the
slices of the batch that live on its own devices.
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import diffeqx as dfx  # noqa: E402

BATCH_AXIS = "batch"
PARAMS = np.array([0.1, 0.02, 0.4, 0.02])  # alpha, beta, gamma, delta
SAVE_TIMES = np.linspace(0.0, 50.0, 11)


def lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y[0], y[1]
    return jnp.stack(
        [
            alpha * prey - beta * prey * predator,
            -gamma * predator + delta * prey * predator,
        ]
    )


def solve_one(y0, params, ts):
    """One member of the batch: the populations at the times `ts`."""
    sol = dfx.diffeqsolve(
        dfx.ODETerm(lotka_volterra),
        dfx.Tsit5(),
        t0=ts[0],
        t1=ts[-1],
        dt0=0.1,
        y0=y0,
        args=params,
        saveat=dfx.SaveAt(ts=ts),
        stepsize_controller=dfx.PIDController(rtol=1e-8, atol=1e-8),
    )
    return sol.ys


# y0 is batched; the parameters and save times are shared by every member.
solve_batch = jax.vmap(solve_one, in_axes=(0, None, None))


def initial_conditions(batch_size: int, seed: int = 0) -> np.ndarray:
    """The same batch on every host: prey and predators each in [5, 20)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(5.0, 20.0, size=(batch_size, 2))


def pad_to_multiple(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Pads the batch axis to a multiple of the device count by repeating the last
    member, so that every device gets an equal, valid slice. (Padding with copies,
    not zeros, keeps the extra members as cheap as real ones: a `vmap`ped solve runs
    until its slowest member finishes.)"""
    extra = -len(batch) % multiple
    return np.concatenate([batch, np.repeat(batch[-1:], extra, axis=0)])


def make_mesh() -> Mesh:
    """A one-dimensional mesh over every device of every process."""
    return Mesh(np.array(jax.devices()), (BATCH_AXIS,))


def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array with the given sharding, built from the host copy: each process
    supplies only the pieces that live on its own devices."""
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def solve_sharded(y0s: np.ndarray, mesh: Mesh) -> tuple[jax.Array, int]:
    """Solves the (padded) batch with its members spread over `mesh`; returns the
    sharded `ys` of shape (padded batch, times, 2) and the padded batch size."""
    padded = pad_to_multiple(y0s, mesh.size)
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    solve = jax.jit(solve_batch, out_shardings=batch_sharding)
    ys = solve(
        to_global(padded, batch_sharding),
        to_global(PARAMS, replicated),
        to_global(SAVE_TIMES, replicated),
    )
    return ys, len(padded)


def solve_on_one_device(y0s: np.ndarray) -> np.ndarray:
    """The reference: the whole batch on this process's first device."""
    device = jax.local_devices()[0]
    args = [jax.device_put(x, device) for x in (y0s, PARAMS, SAVE_TIMES)]
    return np.asarray(jax.jit(solve_batch)(*args))


def to_host(array: jax.Array) -> np.ndarray:
    """The full value on every host (a no-op gather with a single process)."""
    if jax.process_count() == 1:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host runs)",
    )
    options = parser.parse_args(argv)
    if options.distributed:
        jax.distributed.initialize()

    mesh = make_mesh()
    y0s = initial_conditions(options.batch_size)
    start = time.perf_counter()
    ys, padded_size = solve_sharded(y0s, mesh)
    ys.block_until_ready()
    elapsed = time.perf_counter() - start

    sharded = to_host(ys)[: options.batch_size]  # drop the padding
    reference = solve_on_one_device(y0s)
    difference = float(np.max(np.abs(sharded - reference)))

    if jax.process_index() == 0:
        kinds = sorted({device.device_kind for device in jax.devices()})
        print(
            f"devices: {jax.device_count()} ({', '.join(kinds)}) over "
            f"{jax.process_count()} process(es)"
        )
        print(
            f"batch: {options.batch_size} initial conditions, padded to "
            f"{padded_size} ({padded_size // mesh.size} per device)"
        )
        print(f"output sharding: {ys.sharding.spec}, shape {ys.shape}")
        print(f"sharded solve (compile + run): {elapsed:.2f} s")
        print(f"max |sharded - single device|: {difference:.3e}")
        prey, predator = sharded[0, -1]
        print(
            f"member 0 at t = {SAVE_TIMES[-1]:g}: prey {prey:.6f}, "
            f"predators {predator:.6f}"
        )


if __name__ == "__main__":
    main()

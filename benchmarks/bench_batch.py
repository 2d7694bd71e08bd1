"""Batch benchmarks: a 10,000-member `jax.vmap` solve, and its scaling over devices.

    python benchmarks/bench_batch.py [--quick] [--batch-size N] [--devices 1,2,4]
                                     [--json PATH] [--no-diffrax] [--skip-scaling]

1. **batch**: Lotka–Volterra with `Tsit5`, `PIDController(rtol=1e-8, atol=1e-8)`,
   t in [0, 100], `SaveAt(ts=...)` at 100 points (problem (a) of `bench_core.py`),
   under `jax.vmap` over 10,000 initial conditions. Compile time and steady run time
   for diffeqx and, when it is importable, diffrax in the same process; the ratios
   diffeqx / diffrax are printed next to their targets (run <= 0.8x, compile <= 0.5x).
2. **scaling**: the same batch sharded along its batch axis over 1, 2 and 4 host CPU
   devices (a `Mesh` and a `NamedSharding`, the batch padded to a multiple of the
   device count). The device count is fixed when JAX starts, so each count runs in its
   own subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`; on a
   GPU machine the subprocesses use the GPUs that JAX finds instead (up to N). The
   results of every device count are checked against the single-device result.
The bouncing-ball event benchmark (issue 6, part 7) is `bench_events.py`.

Timing follows `bench_core.py` (see `_timing.py`): compile = trace + lower + XLA
compile from cold caches (minimum over repeats), run = median of steady calls.
Host devices share the machine's cores: on a machine with C cores, more than C
simulated devices cannot be faster than C.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _problems import Config, build_lotka_volterra_vmap  # noqa: E402
from _report import TARGETS, _milliseconds, _print_table, _seconds, _times  # noqa: E402
from _timing import compile_once, fastest, time_runs  # noqa: E402
from bench_core import (  # noqa: E402
    _describe,
    import_diffeqx,
    load_libraries,
    relative_difference,
    step_counts,
)

BATCH_AXIS = "batch"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--batch-size", type=int, help="initial conditions (10,000)")
    parser.add_argument(
        "--devices", default="1,2,4", help="device counts for the scaling part"
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--compile-repeats", type=int, help="compile each case this often, keep the min"
    )
    parser.add_argument("--min-run-time", type=float, help="seconds of timed runs")
    parser.add_argument("--no-diffrax", action="store_true", help="skip diffrax")
    parser.add_argument("--skip-batch", action="store_true", help="skip part 1")
    parser.add_argument("--skip-scaling", action="store_true", help="skip part 2")
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    # Internal: run one device count of the scaling part (in a subprocess).
    parser.add_argument("--scaling-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save-ys", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 1000 if args.quick else 10_000
    if args.compile_repeats is None:
        args.compile_repeats = 1 if args.quick else 2
    if args.min_run_time is None:
        args.min_run_time = 0.5 if args.quick else 2.0
    args.device_counts = [int(n) for n in args.devices.split(",") if n]
    return args


# ---- 1. the batch against diffrax ----------------------------------------------------


def measure_batch(libraries: dict, options) -> list[dict]:
    """Compile (in turns, rotating the order) and time each library on the batch."""
    names = list(libraries)
    records = {name: {"library": name} for name in names}
    cases, compiled, timings = {}, {}, {name: [] for name in names}
    for round_index in range(options.compile_repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if "error" in records[name]:
                continue
            try:
                case = build_lotka_volterra_vmap(libraries[name], None, options.config)
                cases[name] = case
                compiled[name], timing = compile_once(case.fn, case.args)
                timings[name].append(timing)
            except Exception as error:
                records[name]["error"] = _describe(error)
                compiled.pop(name, None)
    runners = {name: (compiled[name], cases[name].args) for name in compiled}
    outputs, runs = time_runs(runners, min_time_s=options.min_run_time)
    for name, run in runs.items():
        timing = fastest(timings[name])
        records[name].update(
            compile_s=timing.total_s,
            lower_s=timing.lower_s,
            compile_cpu_s=min(t.cpu_s for t in timings[name]),
            run_ms=1e3 * run.median_s,
            run_min_ms=1e3 * run.min_s,
            run_repeats=run.repeats,
            **step_counts(cases[name].stats(outputs[name])),
        )
    if "diffeqx" in outputs and "diffrax" in outputs:
        ours, theirs = (cases[n].value(outputs[n]) for n in ("diffeqx", "diffrax"))
        records["diffeqx"]["rel_diff"] = relative_difference(ours, theirs)
    return [records[name] for name in names]


def print_batch_report(records: list[dict], options) -> None:
    print()
    print(f"1. LV Tsit5 1e-8 under vmap x{options.batch_size}")
    header = ["library", "", "trace s", "compile s", "cpu s", "run ms", "steps"]
    header += ["acc/rej", "rel diff"]
    rows = []
    for record in records:
        if "error" in record:
            rows.append([record["library"], "", "FAILED", *["-"] * 6])
            print(f"  {record['library']}: {record['error']}")
            continue
        relative = record.get("rel_diff")
        rows.append(
            [
                record["library"],
                "",
                _seconds(record["lower_s"]),
                _seconds(record["compile_s"]),
                _seconds(record["compile_cpu_s"]),
                _milliseconds(record["run_ms"]),
                str(record["steps"]),
                f"{record['accepted']}/{record['rejected']}",
                "-" if relative is None else f"{relative:.1e}",
            ]
        )
    _print_table(header, rows)
    by_name = {r["library"]: r for r in records if "error" not in r}
    if "diffeqx" in by_name and "diffrax" in by_name:
        ours, theirs = by_name["diffeqx"], by_name["diffrax"]
        ratio = lambda field: ours[field] / theirs[field]
        print()
        print("Ratios diffeqx / diffrax ('ok' meets the target)")
        _print_table(
            ["measure", "", "ratio", "target"],
            [
                [
                    "compile",
                    "",
                    _times(ratio("compile_s"), TARGETS["compile"]),
                    "0.50x",
                ],
                [
                    "compile cpu",
                    "",
                    _times(ratio("compile_cpu_s"), TARGETS["compile"]),
                    "0.50x",
                ],
                ["run", "", _times(ratio("run_ms"), TARGETS["run"]), "0.80x"],
                ["steps", "", _times(ratio("steps"), TARGETS["steps"]), "1.00x"],
            ],
        )


# ---- 2. scaling over devices ------------------------------------------------------


def _pad_batch(y0s, multiple: int):
    """Pads the batch to a multiple of the device count with copies of the last
    member (valid and no slower than real members)."""
    extra = -y0s.shape[0] % multiple
    return jnp.concatenate([y0s, jnp.repeat(y0s[-1:], extra, axis=0)])


def scaling_worker(options) -> dict:
    """One device count, in a process started with that many host devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    count = options.scaling_worker
    devices = jax.devices()[:count]
    if len(devices) != count:
        raise SystemExit(f"asked for {count} devices, JAX has {jax.device_count()}")
    lib = import_diffeqx()
    case = build_lotka_volterra_vmap(lib, None, options.config)
    y0s, params, ts = case.args
    mesh = Mesh(np.array(devices), (BATCH_AXIS,))
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (
        jax.device_put(_pad_batch(y0s, count), batch_sharding),
        jax.device_put(params, replicated),
        jax.device_put(ts, replicated),
    )
    timings = []
    for _ in range(options.compile_repeats):
        compiled, timing = compile_once(case.fn, args)
        timings.append(timing)
    outputs, runs = time_runs(
        {"diffeqx": (compiled, args)}, min_time_s=options.min_run_time
    )
    ys, stats = outputs["diffeqx"]
    if options.save_ys:
        np.save(options.save_ys, np.asarray(ys)[: options.batch_size])
    timing, run = fastest(timings), runs["diffeqx"]
    return {
        "devices": count,
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "padded_batch": int(args[0].shape[0]),
        "output_spec": str(ys.sharding.spec) if hasattr(ys, "sharding") else "-",
        "compile_s": timing.total_s,
        "run_ms": 1e3 * run.median_s,
        "run_min_ms": 1e3 * run.min_s,
        "run_repeats": run.repeats,
        "max_steps_per_member": int(np.max(np.asarray(stats["num_steps"]))),
    }


def _worker_command(count: int, options, save_ys: str) -> list[str]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--scaling-worker",
        str(count),
    ]
    command += ["--batch-size", str(options.batch_size), "--dtype", options.dtype]
    command += ["--compile-repeats", str(options.compile_repeats)]
    command += ["--min-run-time", str(options.min_run_time), "--save-ys", save_ys]
    return command


def measure_scaling(options) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as directory:
        reference = None
        for count in options.device_counts:
            print(f"running scaling on {count} device(s) ...", flush=True)
            env = dict(os.environ)
            env["XLA_FLAGS"] = (
                env.get("XLA_FLAGS", "")
                + f" --xla_force_host_platform_device_count={count}"
            ).strip()
            save_ys = os.path.join(directory, f"ys_{count}.npy")
            completed = subprocess.run(
                _worker_command(count, options, save_ys),
                env=env,
                capture_output=True,
                text=True,
            )
            if completed.returncode != 0:
                tail = completed.stderr.strip().splitlines()[-1:] or ["?"]
                results.append({"devices": count, "error": tail[0][:200]})
                continue
            record = json.loads(completed.stdout.strip().splitlines()[-1])
            ys = np.load(save_ys)
            if reference is None:
                reference = ys
            record["rel_diff_vs_first"] = float(
                np.max(np.abs(ys - reference)) / np.max(np.abs(reference))
            )
            results.append(record)
    return results


def print_scaling_report(results: list[dict], options) -> None:
    print()
    first = next((r for r in results if "error" not in r), None)
    kind = "?" if first is None else f"{first['platform']}: {first['device_kind']}"
    print(
        f"2. Scaling: the x{options.batch_size} batch sharded over devices ({kind}; "
        f"{os.cpu_count()} CPU cores)"
    )
    header = ["devices", "", "batch", "compile s", "run ms", "speed-up", "efficiency"]
    header += ["rel diff"]
    rows = []
    for record in results:
        if "error" in record:
            rows.append([str(record["devices"]), "", "FAILED", *["-"] * 5])
            print(f"  {record['devices']} device(s): {record['error']}")
            continue
        speedup = first["run_ms"] / record["run_ms"]
        scale = record["devices"] / first["devices"]
        rows.append(
            [
                str(record["devices"]),
                "",
                str(record["padded_batch"]),
                _seconds(record["compile_s"]),
                _milliseconds(record["run_ms"]),
                f"{speedup:.2f}x",
                f"{speedup / scale:.0%}",
                f"{record['rel_diff_vs_first']:.1e}",
            ]
        )
    _print_table(header, rows)
    print(
        "speed-up: run time on the first device count / run time here; efficiency: "
        "speed-up / (device-count ratio). rel diff: max|ys - ys_first| / max|ys_first|."
    )


# ---- main ---------------------------------------------------------------------------


def _set_dtype(options) -> None:
    if options.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    options.config = Config(
        dtype=getattr(jnp, options.dtype), batch_size=options.batch_size
    )


def main(argv=None) -> int:
    options = parse_args(argv)
    _set_dtype(options)
    if options.scaling_worker is not None:
        print(json.dumps(scaling_worker(options)))
        return 0

    started = time.perf_counter()
    print(
        f"jax {jax.__version__} on {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}); dtype {options.dtype}; batch "
        f"{options.batch_size}; compile repeats {options.compile_repeats}"
    )
    payload = {"batch": None, "scaling": None}
    failed = False
    if not options.skip_batch:
        libraries = load_libraries(options.no_diffrax)
        for name, lib in libraries.items():
            print(f"  {name}: {getattr(lib, '__file__', '?')}")
        print("running the batch ...", flush=True)
        payload["batch"] = measure_batch(libraries, options)
        failed |= any(
            "error" in r for r in payload["batch"] if r["library"] == "diffeqx"
        )
    if not options.skip_scaling:
        payload["scaling"] = measure_scaling(options)
        failed |= any("error" in r for r in payload["scaling"])
    if payload["batch"] is not None:
        print_batch_report(payload["batch"], options)
    if payload["scaling"] is not None:
        print_scaling_report(payload["scaling"], options)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if options.json:
        with open(options.json, "w") as file:
            json.dump(payload, file, indent=2)
        print(f"wrote {options.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

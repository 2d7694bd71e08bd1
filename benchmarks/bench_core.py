"""Core benchmarks: compile time, run time, steps and vector-field evaluations.

    python benchmarks/bench_core.py [--quick] [--only NAME[,NAME...]] [--json PATH]

Problems (see README.md): (a) Lotka–Volterra with Tsit5, (b) Lorenz with Dopri8,
(c) a `jax.vmap` of (a) over many initial conditions, (d) the gradient of a neural-ODE
loss, (e) 10,000 fixed RK4 / Euler steps against a hand-written `lax.scan`, (f)
Lotka–Volterra at rtol 1e-6 with 100 saves over about 100 steps, (g) the gradient of a
neural-ODE loss over 256 trajectories solved as one (256, 2) state, (h) the gradient
of a loss over a `jax.vmap` of 256 Lotka–Volterra solves, (i) a `jax.vmap` of the
gradient of (h)'s loss for each solve (per-member gradients).
When diffrax is importable, every problem is also run with diffrax in the same process,
and the ratios diffeqx / diffrax are printed next to their targets.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import (  # noqa: E402
    make_parser,
    parse_with_defaults,
    select_problems,
    write_json,
)
from _problems import PROBLEMS, Config, build_fixed_euler  # noqa: E402
from _report import print_report, ratio_rows  # noqa: E402
from _timing import EvalCounter, compile_once, fastest, time_runs  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(
        __doc__.splitlines()[0],
        only_help="problem letters (a-i) or names, comma-separated; repeatable",
        batch_help="initial conditions in (c)",
        dtype="float64",
        fevals_help="count vector-field evaluations in an extra, untimed run per case "
        "(default: on, off with --quick; (d) always counts, as it needs that run)",
    )
    return parse_with_defaults(parser, argv, batch_size=(100, 1000))


def import_diffeqx():
    try:
        return importlib.import_module("diffeqx")
    except ImportError:  # not installed: use this checkout's src/
        sys.path.insert(1, os.path.join(os.path.dirname(HERE), "src"))
        return importlib.import_module("diffeqx")


def load_libraries(skip_diffrax: bool) -> dict:
    libraries = {"diffeqx": import_diffeqx()}
    if not skip_diffrax:
        try:
            libraries["diffrax"] = importlib.import_module("diffrax")
        except ImportError:
            print("diffrax is not importable: running diffeqx alone.")
    return libraries


def libraries_and_run_time(doc: str, argv=None):
    """The options `--no-diffrax` and `--min-run-time` (seconds of timed runs,
    default 1) of a benchmark script described by `doc`, and the libraries to run:
    `(options, libraries)`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    options = parser.parse_args(argv)
    return options, load_libraries(options.no_diffrax)


def warm_up(libraries: dict, config) -> None:
    """Pay one-time costs (backend start-up, lazy imports) before anything is timed."""
    for name, lib in libraries.items():
        try:
            case = build_fixed_euler(lib, None, config)
            jax.block_until_ready(jax.jit(case.fn)(*case.args))
        except Exception as error:  # the problems themselves will report it
            print(f"  warm-up with {name} failed: {_describe(error)}")


def relative_difference(value, reference) -> float:
    """max |value - reference| / max |reference| over all leaves."""
    leaves = jax.tree_util.tree_leaves(value)
    ref_leaves = jax.tree_util.tree_leaves(reference)
    numerator = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves, ref_leaves, strict=True)
    )
    scale = max(float(jnp.max(jnp.abs(b))) for b in ref_leaves)
    return numerator / scale if scale > 0 else numerator


def step_counts(stats: dict) -> dict:
    """Totals over a batch (for a single solve these are the plain counts)."""
    return {
        "steps": int(np.sum(stats["num_steps"])),
        "accepted": int(np.sum(stats["num_accepted_steps"])),
        "rejected": int(np.sum(stats["num_rejected_steps"])),
    }


def measure_problem(problem, libraries: dict, options) -> list[dict]:
    names = list(libraries) + (["scan"] if problem.with_scan else [])
    modules = {**libraries, "scan": None}
    records = {name: {"problem": problem.key, "library": name} for name in names}
    cases, compiled, timings = _compile_all(problem, names, modules, records, options)
    runners = {name: (compiled[name], cases[name].args) for name in compiled}
    outputs, runs = _time_all(runners, records, options)
    values = {}
    for name, run in runs.items():
        record, case = records[name], cases[name]
        compile_timing = fastest(timings[name])
        record.update(
            lower_s=compile_timing.lower_s,
            xla_s=compile_timing.xla_s,
            compile_s=compile_timing.total_s,
            compile_all_s=[round(timing.total_s, 4) for timing in timings[name]],
            compile_cpu_s=min(timing.cpu_s for timing in timings[name]),
            first_run_ms=1e3 * run.first_s,
            run_ms=1e3 * run.median_s,
            run_min_ms=1e3 * run.min_s,
            run_repeats=run.repeats,
        )
        try:
            values[name] = case.value(outputs[name])
            _count_steps(problem, modules[name], case, outputs[name], record, options)
        except Exception as error:
            record["error"] = _describe(error)
    reference = "scan" if problem.with_scan else "diffrax"
    for name, value in values.items():
        if name != reference and reference in values and "error" not in records[name]:
            try:
                difference = relative_difference(value, values[reference])
            except Exception as error:  # e.g. outputs of different structure
                records[name]["error"] = _describe(error)
            else:
                records[name]["rel_diff"] = difference
    return [records[name] for name in names]


def _compile_all(problem, names, modules, records, options):
    """Build and compile every library's case; the libraries take turns, in an order
    that rotates between rounds, so that none always compiles first."""
    cases, compiled, timings = {}, {}, {name: [] for name in names}
    for round_index in range(options.compile_repeats):
        shift = (round_index + problem.index) % len(names)
        for name in names[shift:] + names[:shift]:
            if "error" in records[name]:
                continue
            try:
                cases[name] = problem.build(modules[name], None, options.config)
                compiled[name], timing = compile_once(cases[name].fn, cases[name].args)
                timings[name].append(timing)
            except Exception as error:  # report it and carry on with the rest
                records[name]["error"] = _describe(error)
                compiled.pop(name, None)
    return cases, compiled, timings


def _time_all(runners, records, options):
    try:
        return time_runs(runners, min_time_s=options.min_run_time)
    except Exception:  # find the culprit: time each runner alone
        outputs, runs = {}, {}
        for name, runner in runners.items():
            try:
                output, run = time_runs({name: runner}, min_time_s=options.min_run_time)
                outputs.update(output)
                runs.update(run)
            except Exception as error:
                records[name]["error"] = _describe(error)
        return outputs, runs


def _count_steps(problem, lib, case, output, record, options) -> None:
    """Steps from the solution's stats; field evaluations from a counting run."""
    if not options.fevals and case.stats is not None:
        record.update(step_counts(case.stats(output)), fevals=None)
        return
    counter = EvalCounter()  # a separate, untimed run
    counting_case = problem.build(lib, counter, options.config)
    counted_output = counter.run(counting_case.fn, counting_case.args)
    stats = counting_case.stats(counted_output)
    record.update(step_counts(stats), fevals=counter.count)


def _describe(error: Exception) -> str:
    if os.environ.get("BENCH_TRACEBACK"):
        traceback.print_exception(error)
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:200]}"


def environment(libraries: dict, options) -> dict:
    info = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "device_count": jax.device_count(),
        "dtype": options.dtype,
        "quick": options.quick,
        "batch_size": options.batch_size,
        "compile_repeats": options.compile_repeats,
    }
    for name, lib in libraries.items():
        info[f"{name}_version"] = getattr(lib, "__version__", "unknown")
        info[f"{name}_path"] = getattr(lib, "__file__", "unknown")
    diffeqx, diffrax = libraries["diffeqx"], libraries.get("diffrax")
    info["diffeqx_is_diffrax"] = bool(
        diffrax is not None
        and getattr(diffeqx, "diffeqsolve", None) is diffrax.diffeqsolve
    )
    return info


def main(argv=None) -> int:
    options = parse_args(argv)
    if options.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    problems = select_problems(PROBLEMS, options.only)
    libraries = load_libraries(options.no_diffrax)
    config = Config(dtype=getattr(jnp, options.dtype), batch_size=options.batch_size)
    options.config = config
    info = environment(libraries, options)
    print(
        f"jax {info['jax']} on {info['backend']} ({info['device']}); "
        f"dtype {options.dtype} (x64 {'on' if options.dtype == 'float64' else 'off'}); "
        f"vmap batch {options.batch_size}; compile repeats {options.compile_repeats}"
    )
    for name in libraries:
        print(f"  {name}: {info[f'{name}_path']}")
    if options.compile_repeats == 1:
        print("  note: one compile per case: compile times are rough (use >= 2).")
    if info["diffeqx_is_diffrax"]:
        print("  note: diffeqx resolves to diffrax (shim): ratios should be ~1.")
    started = time.perf_counter()
    warm_up(libraries, config)
    records = []
    for problem in problems:
        print(f"running {problem.key} ...", flush=True)
        records.extend(measure_problem(problem, libraries, options))
    info["wall_s"] = time.perf_counter() - started
    print_report(records, problems, info)
    if options.json:
        payload = {"environment": info, "results": records}
        payload["ratios"] = ratio_rows(records, problems)
        write_json(options.json, payload)
    failed = [r for r in records if "error" in r and r["library"] == "diffeqx"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

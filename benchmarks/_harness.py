"""What the benchmark scripts share beyond timing: their command line, the choice of
problems, measuring one problem in every library, and writing the JSON record."""

from __future__ import annotations

import argparse
import json

from _timing import EvalCounter, compile_once, fastest, time_runs


def make_parser(
    description: str, *, only_help: str, batch_help: str, dtype: str, fevals_help: str
) -> argparse.ArgumentParser:
    """The options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--only", action="append", default=[], help=only_help)
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
    parser.add_argument("--dtype", choices=("float64", "float32"), default=dtype)
    parser.add_argument("--batch-size", type=int, help=batch_help)
    parser.add_argument(
        "--compile-repeats", type=int, help="compile each case this often, keep the min"
    )
    parser.add_argument("--min-run-time", type=float, help="seconds of timed runs")
    parser.add_argument("--no-diffrax", action="store_true", help="skip diffrax")
    parser.add_argument(
        "--fevals", action=argparse.BooleanOptionalAction, help=fevals_help
    )
    return parser


def parse_with_defaults(parser, argv, *, batch_size: tuple[int, int]):
    """Parses `argv`; options left unset get their `--quick` or full-run default
    (`batch_size` is `(quick, full)`)."""
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = batch_size[0] if args.quick else batch_size[1]
    if args.compile_repeats is None:
        args.compile_repeats = 1 if args.quick else 2
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else 1.0
    if args.fevals is None:
        args.fevals = not args.quick
    return args


def wanted_names(only: list[str], known: set[str]) -> set[str]:
    """The names given with `--only` (comma-separated, repeatable), checked."""
    wanted = {name.strip() for item in only for name in item.split(",") if name}
    if wanted - known:
        raise SystemExit(
            f"--only: unknown {sorted(wanted - known)}; choose from {sorted(known)}"
        )
    return wanted


def problem_names(problems) -> set[str]:
    return {p.key for p in problems} | {p.letter for p in problems}


def chosen(problems, wanted: set[str]) -> list:
    """The problems named (by key or letter) in `wanted`."""
    return [p for p in problems if p.key in wanted or p.letter in wanted]


def select_problems(problems, only: list[str]) -> list:
    """The problems chosen with `--only`; all of them when none are named."""
    wanted = wanted_names(only, problem_names(problems))
    return chosen(problems, wanted) if wanted else list(problems)


def measure(problem, libraries: dict, options) -> list[dict]:
    """Compiles (`options.compile_repeats` times, libraries taking turns) and runs
    `problem` in every library; records times, step counts, evaluation counts (from
    a separate counting run when `options.fevals`) and the relative difference of
    diffeqx's value from diffrax's."""
    # Imported here: `bench_core` itself uses this module's command-line helpers.
    from bench_core import _describe, relative_difference, step_counts

    names = list(libraries)
    records = {name: {"problem": problem.key, "library": name} for name in names}
    cases, compiled, timings = {}, {}, {name: [] for name in names}
    for round_index in range(options.compile_repeats):
        shift = (round_index + problem.index) % len(names)
        for name in names[shift:] + names[:shift]:
            if "error" in records[name]:
                continue
            try:
                cases[name] = problem.build(libraries[name], None, options.config)
                compiled[name], timing = compile_once(cases[name].fn, cases[name].args)
                timings[name].append(timing)
            except Exception as error:  # report it and carry on with the rest
                records[name]["error"] = _describe(error)
                compiled.pop(name, None)
    runners = {name: (compiled[name], cases[name].args) for name in compiled}
    outputs, runs = time_runs(runners, min_time_s=options.min_run_time)
    values = {}
    for name, run in runs.items():
        compile_timing = fastest(timings[name])
        records[name].update(
            lower_s=compile_timing.lower_s,
            xla_s=compile_timing.xla_s,
            compile_s=compile_timing.total_s,
            compile_all_s=[round(t.total_s, 4) for t in timings[name]],
            compile_cpu_s=min(t.cpu_s for t in timings[name]),
            first_run_ms=1e3 * run.first_s,
            run_ms=1e3 * run.median_s,
            run_min_ms=1e3 * run.min_s,
            run_repeats=run.repeats,
            steps=None,
            accepted="-",
            rejected="-",
            fevals=None,
        )
        case = cases[name]
        values[name] = case.value(outputs[name])
        if case.stats is None:
            continue
        if options.fevals:  # a separate, untimed run with a counting field
            counter = EvalCounter()
            counting = problem.build(libraries[name], counter, options.config)
            counted = counter.run(counting.fn, counting.args)
            records[name].update(
                step_counts(counting.stats(counted)), fevals=counter.count
            )
        else:
            records[name].update(step_counts(case.stats(outputs[name])))
    if "diffrax" in values and "diffeqx" in values:
        records["diffeqx"]["rel_diff"] = relative_difference(
            values["diffeqx"], values["diffrax"]
        )
    return [records[name] for name in names]


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as file:
        json.dump(payload, file, indent=2, default=str)
    print(f"wrote {path}")

"""Adjoint benchmarks: a batched neural-ODE training step through each reverse-mode
adjoint, and second derivatives through the default adjoint.

    python benchmarks/bench_adjoint.py [--quick] [--only NAME[,NAME...]] [--json PATH]

Problems (see README.md): the loss and gradient (`eqx.filter_value_and_grad`) of a
neural ODE fitted to a batch of trajectories, with (a) `RecursiveCheckpointAdjoint`,
(b) `BacksolveAdjoint` (with the forward solve's controller, and with
`adjoint_rms_seminorm` for the backward solve); and (c) the Hessian of a Lotka–Volterra
fitting loss with respect to its four parameters, by `jax.hessian` and by
`jax.jacrev(jax.grad(...))` through the default adjoint.
When diffrax is importable, (a) and (b) also run with diffrax's same adjoint in the same
process and the ratios diffeqx / diffrax are printed. For (c) diffrax is tried with its
default adjoint (and reported as not supported when that raises) and timed with its
`DirectAdjoint`, the adjoint it offers for second derivatives, as a reference (each
derivative, `jax.hessian` and `jax.jacrev(jax.grad(...))`, against the same one).
Timing, fairness and columns are as in `bench_core.py` (see README.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from _harness import (  # noqa: E402
    chosen,
    make_parser,
    measure,
    parse_with_defaults,
    problem_names,
    wanted_names,
    write_json,
)
from _problems import (  # noqa: E402
    Case,
    NeuralField,
    lotka_volterra,
    neural_ode_solve,
)
from _report import (  # noqa: E402
    _milliseconds,
    _print_table,
    _seconds,
    _times,
    print_report,
    ratio_rows,
)
from _timing import compile_once, fastest, time_runs  # noqa: E402
from bench_core import (  # noqa: E402
    _describe,
    environment,
    load_libraries,
    relative_difference,
    step_counts,
)

NUM_TIMES = 50  # save points of the neural ODE
WIDTH, DEPTH = 64, 2
HESSIAN_MAX_STEPS = 4096


@dataclasses.dataclass(frozen=True)
class AdjointConfig:
    dtype: object
    batch_size: int


# ---- (a), (b): a batched neural-ODE training step ------------------------------------


def neural_ode_data(config: AdjointConfig):
    """Initial conditions, save times, targets and the (identical) initial model.

    The targets are damped rotations, y(t) = exp(-t/10) R(t) y0; the model is that
    rotation's linear field plus an MLP (tanh), whose output perturbs it."""
    ts = jnp.linspace(0.0, 10.0, NUM_TIMES, dtype=config.dtype)
    y0s = jr.uniform(
        jr.key(1), (config.batch_size, 2), config.dtype, minval=-1.0, maxval=1.0
    )
    cos, sin = jnp.cos(ts), jnp.sin(ts)
    rotation = jnp.stack([jnp.stack([cos, -sin], -1), jnp.stack([sin, cos], -1)], -2)
    damping = jnp.exp(-0.1 * ts)[:, None]
    targets = damping * jnp.einsum("tij,bj->bti", rotation, y0s)
    mlp = eqx.nn.MLP(
        2, 2, WIDTH, DEPTH, activation=jnp.tanh, dtype=config.dtype, key=jr.key(0)
    )
    linear = jnp.array([[-0.1, -1.0], [1.0, -0.1]], dtype=config.dtype)
    return NeuralField(linear, mlp), y0s, ts, targets


def _adjoint(lib, kind: str):
    if kind == "checkpoint":
        return lib.RecursiveCheckpointAdjoint()
    if kind == "backsolve":
        return lib.BacksolveAdjoint()
    if kind == "backsolve_seminorm":
        controller = lib.PIDController(
            rtol=1e-6, atol=1e-6, norm=lib.adjoint_rms_seminorm
        )
        return lib.BacksolveAdjoint(stepsize_controller=controller)
    raise ValueError(kind)


def _build_training_step(kind: str):
    def build(lib, counter, config) -> Case:
        adjoint = _adjoint(lib, kind)

        def loss_and_stats(field, y0s, ts, targets):
            field = field if counter is None else counter.wrap(field)

            def one(y0, target):
                sol = neural_ode_solve(lib, field, y0, ts, adjoint)
                stats = {
                    key: sol.stats[key]
                    for key in (
                        "num_steps",
                        "num_accepted_steps",
                        "num_rejected_steps",
                    )
                }
                return jnp.mean((sol.ys - target) ** 2), stats

            losses, stats = jax.vmap(one)(y0s, targets)
            return jnp.mean(losses), stats

        value_and_grad = eqx.filter_value_and_grad(loss_and_stats, has_aux=True)
        return Case(
            value_and_grad,
            neural_ode_data(config),
            value=lambda output: (output[0][0], output[1]),
            stats=lambda output: output[0][1],
        )

    return build


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str
    letter: str
    title: str
    build: Callable[..., Case]
    index: int = 0
    with_scan: bool = False


TRAINING_PROBLEMS = (
    Problem(
        "neural_ode_checkpoint",
        "a",
        "a: RecursiveCheckpoint",
        _build_training_step("checkpoint"),
        0,
    ),
    Problem(
        "neural_ode_backsolve",
        "b",
        "b: Backsolve",
        _build_training_step("backsolve"),
        1,
    ),
    Problem(
        "neural_ode_backsolve_seminorm",
        "b",
        "b: Backsolve seminorm",
        _build_training_step("backsolve_seminorm"),
        2,
    ),
)
HESSIAN_KEY = "lv_hessian"


# ---- (c): the Hessian of a Lotka–Volterra fitting loss -------------------------------

TRUE_PARAMS = (0.5, 0.02, 0.4, 0.02)  # alpha, beta, gamma, delta


def _lotka_volterra_loss(lib, adjoint, saveat_kind: str):
    """The mean squared misfit of a Lotka–Volterra solve to data, as a function of the
    four parameters; the data are 20 observations (`SaveAt(ts=...)`), or the final
    state alone (`SaveAt(t1=True)`)."""

    def solve(params, ts):
        saveat = lib.SaveAt(t1=True) if saveat_kind == "t1" else lib.SaveAt(ts=ts)
        return lib.diffeqsolve(
            lib.ODETerm(lotka_volterra),
            lib.Tsit5(),
            t0=0.0,
            t1=20.0,
            dt0=0.1,
            y0=jnp.array([10.0, 10.0], dtype=ts.dtype),
            args=params,
            saveat=saveat,
            stepsize_controller=lib.PIDController(rtol=1e-6, atol=1e-6),
            adjoint=adjoint,
            max_steps=HESSIAN_MAX_STEPS,
        )

    def loss(params, ts, data):
        return jnp.mean((solve(params, ts).ys - data) ** 2)

    return loss, solve


@dataclasses.dataclass(frozen=True)
class HessianCase:
    name: str  # shown in the table
    library: str  # "diffeqx" or "diffrax"
    adjoint: str  # the adjoint's class name
    derivative: str  # "hessian" or "jacrev(grad)"
    saveat: str  # "ts" or "t1"
    reference: bool = False  # the case the others are compared against


HESSIAN_CASES = (
    HessianCase("hessian, SaveAt(t1)", "diffeqx", "RecursiveCheckpointAdjoint", "hessian", "t1"),
    HessianCase("hessian, SaveAt(ts)", "diffeqx", "RecursiveCheckpointAdjoint", "hessian", "ts"),
    HessianCase("jacrev(grad), SaveAt(ts)", "diffeqx", "RecursiveCheckpointAdjoint", "jacrev(grad)", "ts"),
    HessianCase("hessian, SaveAt(t1)", "diffrax", "RecursiveCheckpointAdjoint", "hessian", "t1"),
    HessianCase("hessian, SaveAt(ts)", "diffrax", "RecursiveCheckpointAdjoint", "hessian", "ts"),
    HessianCase("jacrev(grad), SaveAt(ts)", "diffrax", "RecursiveCheckpointAdjoint", "jacrev(grad)", "ts"),
    HessianCase("hessian, SaveAt(ts)", "diffeqx", "DirectAdjoint", "hessian", "ts"),
    HessianCase("hessian, SaveAt(t1)", "diffrax", "DirectAdjoint", "hessian", "t1", True),
    HessianCase("hessian, SaveAt(ts)", "diffrax", "DirectAdjoint", "hessian", "ts", True),
    HessianCase("jacrev(grad), SaveAt(ts)", "diffrax", "DirectAdjoint", "jacrev(grad)", "ts"),
)  # fmt: skip


def _hessian_function(lib, case: HessianCase):
    loss, _ = _lotka_volterra_loss(lib, getattr(lib, case.adjoint)(), case.saveat)
    if case.derivative == "hessian":
        return jax.hessian(loss)
    return jax.jacrev(jax.grad(loss))


def _hessian_args(lib, saveat_kind: str, dtype):
    """Parameters 10 % off the truth, the observation times, and the data."""
    true_params = jnp.array(TRUE_PARAMS, dtype=dtype)
    ts = jnp.linspace(0.0, 20.0, 20, dtype=dtype)
    _, solve = _lotka_volterra_loss(lib, lib.RecursiveCheckpointAdjoint(), saveat_kind)
    data = jax.jit(lambda p, t: solve(p, t).ys)(true_params, ts)
    return 1.1 * true_params, ts, data


def measure_hessians(libraries: dict, options) -> list[dict]:
    cases = [c for c in HESSIAN_CASES if c.library in libraries]
    records = {
        c: {
            "problem": HESSIAN_KEY,
            "library": c.library,
            "adjoint": c.adjoint,
            "case": c.name,
        }
        for c in cases
    }
    compiled, args, timings = {}, {}, {c: [] for c in cases}
    for round_index in range(options.compile_repeats):
        shift = round_index % len(cases)
        for case in cases[shift:] + cases[:shift]:
            if "error" in records[case]:
                continue
            lib = libraries[case.library]
            try:
                args[case] = _hessian_args(lib, case.saveat, options.config.dtype)
                fn = _hessian_function(lib, case)
                compiled[case], timing = compile_once(fn, args[case])
                timings[case].append(timing)
            except Exception as error:
                records[case]["error"] = _describe(error)
                compiled.pop(case, None)
    runners = {case: (compiled[case], args[case]) for case in compiled}
    outputs, runs = time_runs(runners, min_time_s=options.min_run_time)
    for case, run in runs.items():
        compile_timing = fastest(timings[case])
        records[case].update(
            lower_s=compile_timing.lower_s,
            xla_s=compile_timing.xla_s,
            compile_s=compile_timing.total_s,
            compile_all_s=[round(t.total_s, 4) for t in timings[case]],
            compile_cpu_s=min(t.cpu_s for t in timings[case]),
            first_run_ms=1e3 * run.first_s,
            run_ms=1e3 * run.median_s,
            run_min_ms=1e3 * run.min_s,
            run_repeats=run.repeats,
        )
        params, ts, _ = args[case]
        records[case].update(_forward_step_counts(libraries[case.library], params, ts))
    _compare_hessians(cases, records, outputs)
    return [records[case] for case in cases]


def _forward_step_counts(lib, params, ts) -> dict:
    _, solve = _lotka_volterra_loss(lib, lib.RecursiveCheckpointAdjoint(), "ts")
    return step_counts(jax.jit(lambda p, t: solve(p, t).stats)(params, ts))


def _compare_hessians(cases, records, outputs) -> None:
    """Relative differences against the reference Hessian of the same loss (the same
    save specification); without diffrax, against diffeqx's DirectAdjoint."""
    for saveat in ("ts", "t1"):
        reference = next(
            (c for c in cases if c.saveat == saveat and c.reference and c in outputs),
            None,
        )
        if reference is None:
            reference = next(
                (
                    c
                    for c in cases
                    if c.saveat == saveat
                    and c.adjoint == "DirectAdjoint"
                    and c in outputs
                ),
                None,
            )
        for case in cases:
            if case.saveat != saveat or case not in outputs or case == reference:
                continue
            if reference is not None:
                records[case]["rel_diff"] = relative_difference(
                    outputs[case], outputs[reference]
                )
        if reference is not None:
            for case in cases:
                if case.saveat == saveat and case in outputs:
                    records[case]["reference"] = (
                        f"{reference.library} {reference.adjoint}"
                    )


def print_hessians(records: list[dict]) -> None:
    print()
    print(
        "(c) Hessian of a Lotka–Volterra fitting loss w.r.t. its 4 parameters "
        f"(Tsit5, PIDController(rtol=1e-6, atol=1e-6), max_steps={HESSIAN_MAX_STEPS})"
    )
    header = ["derivative", "library", "adjoint", "compile s", "cpu s", "run ms"]
    header += ["steps", "rel diff"]
    rows, notes = [], []
    for record in records:
        cells = [record["case"], record["library"], record["adjoint"]]
        if "error" in record:
            status = "not supported" if record["library"] == "diffrax" else "FAILED"
            rows.append(cells + [status, "-", "-", "-", "-"])
            notes.append(
                f"{record['library']} {record['adjoint']}, {record['case']}: "
                f"{status} ({record['error']})"
            )
            continue
        relative = record.get("rel_diff")
        rows.append(
            cells
            + [
                _seconds(record["compile_s"]),
                _seconds(record["compile_cpu_s"]),
                _milliseconds(record["run_ms"]),
                str(record["steps"]),
                "-" if relative is None else f"{relative:.1e}",
            ]
        )
    _print_table(header, rows)
    reference_names = sorted({r["reference"] for r in records if "reference" in r})
    print(
        "steps: of the forward solve. rel diff: against the "
        + (" / ".join(reference_names) if reference_names else "(no reference)")
        + " Hessian of the same loss. jacrev(grad): reverse over reverse mode."
    )
    for line in notes:
        print("  " + line)
    references = {
        r["case"]: r
        for r in records
        if r["library"] == "diffrax"
        and r["adjoint"] == "DirectAdjoint"
        and "error" not in r
    }
    ours = [r for r in records if r["library"] == "diffeqx" and "error" not in r]
    if references and ours:
        print("Ratios diffeqx / diffrax DirectAdjoint (same derivative, same SaveAt):")
        for record in ours:
            theirs = references.get(record["case"])
            if theirs is None:
                continue
            print(
                f"  {record['adjoint']}, {record['case']}: compile "
                f"{_times(record['compile_s'] / theirs['compile_s'])}, compile cpu "
                f"{_times(record['compile_cpu_s'] / theirs['compile_cpu_s'])}, run "
                f"{_times(record['run_ms'] / theirs['run_ms'])}"
            )


# ---- running --------------------------------------------------------------------------


def parse_args(argv=None):
    parser = make_parser(
        __doc__.splitlines()[0],
        only_help=f"letters (a-c) or names ({HESSIAN_KEY} for c), comma-separated",
        batch_help="initial conditions in (a), (b)",
        dtype="float64",
        fevals_help="count vector-field evaluations in (a), (b) in an extra, untimed "
        "run (default: on, off with --quick)",
    )
    return parse_with_defaults(parser, argv, batch_size=(8, 32))


def select(only: list[str]):
    wanted = wanted_names(only, problem_names(TRAINING_PROBLEMS) | {"c", HESSIAN_KEY})
    if not wanted:
        return list(TRAINING_PROBLEMS), True
    return chosen(TRAINING_PROBLEMS, wanted), bool(wanted & {"c", HESSIAN_KEY})


def main(argv=None) -> int:
    options = parse_args(argv)
    if options.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    training, hessians = select(options.only)
    libraries = load_libraries(options.no_diffrax)
    dtype = getattr(jnp, options.dtype)
    options.config = AdjointConfig(dtype=dtype, batch_size=options.batch_size)
    info = environment(libraries, options)
    print(
        f"jax {info['jax']} on {info['backend']} ({info['device']}); dtype "
        f"{options.dtype}; neural ODE batch {options.batch_size} x {NUM_TIMES} save "
        f"times; compile repeats {options.compile_repeats}"
    )
    for name in libraries:
        print(f"  {name}: {info[f'{name}_path']}")
    if options.compile_repeats == 1:
        print("  note: one compile per case: compile times are rough (use >= 2).")
    started = time.perf_counter()
    for lib in libraries.values():  # warm-up: backend start, lazy imports
        _, solve = _lotka_volterra_loss(lib, lib.RecursiveCheckpointAdjoint(), "t1")
        ts = jnp.linspace(0.0, 1.0, 2, dtype=dtype)
        jax.block_until_ready(jax.jit(solve)(jnp.array(TRUE_PARAMS, dtype), ts).ys)
    records = []
    for problem in training:
        print(f"running {problem.key} ...", flush=True)
        try:
            records.extend(measure(problem, libraries, options))
        except Exception as error:
            records.append(
                {
                    "problem": problem.key,
                    "library": "diffeqx",
                    "error": _describe(error),
                }
            )
    hessian_records = []
    if hessians:
        print(f"running {HESSIAN_KEY} ...", flush=True)
        hessian_records = measure_hessians(libraries, options)
    info["wall_s"] = time.perf_counter() - started
    if training:
        print_report(records, training, info)
        print(
            "(a), (b): loss and gradient w.r.t. the model, Tsit5, PIDController(rtol="
            "1e-6, atol=1e-6); steps summed over the batch (forward solves); fevals: "
            "batched field evaluations, forward and backward passes."
        )
    if hessians:
        if not training:
            print(
                f"\nResults ({info['dtype']}, {info['backend']}: {info['device']}; "
                f"jax {info['jax']}; total {info['wall_s']:.0f} s)"
            )
        print_hessians(hessian_records)
    if options.json:
        payload = {"environment": info, "results": records}
        payload["ratios"] = ratio_rows(records, training)
        payload["hessian"] = hessian_records
        write_json(options.json, payload)
    failed = [
        r
        for r in records + hessian_records
        if "error" in r and r["library"] == "diffeqx"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

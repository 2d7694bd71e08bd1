"""CDE benchmarks: cubic-path construction and a batched neural CDE, forward and gradient.

    python benchmarks/bench_cde.py [--quick] [--only NAME[,NAME...]] [--json PATH]

Problems: (a) Hermite cubic coefficients with backward differences and the
`CubicInterpolation` for a batch of series, under `jax.vmap`; (b) the forward pass of a
neural CDE (`ControlTerm` with an `eqx.nn.MLP` vector field driven by that path, `Tsit5`,
`PIDController(rtol=1e-3, atol=1e-6, dtmax=span/32)`) over the batch, path construction included; (c)
the loss and its gradient with respect to the network (`RecursiveCheckpointAdjoint`).
When diffrax is importable, every problem also runs with diffrax in the same process
and the ratios diffeqx / diffrax are printed next to their targets. After the table,
(b)'s floor: its network alone, evaluated as often as the solve does, in a `lax.scan`. Timing, fairness and
columns are as in `bench_core.py` (see README.md).
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
    make_parser,
    measure,
    parse_with_defaults,
    select_problems,
    write_json,
)
from _problems import Case  # noqa: E402
from _report import print_report, ratio_rows  # noqa: E402
from _timing import time_runs  # noqa: E402
from bench_core import (  # noqa: E402
    _describe,
    environment,
    load_libraries,
)

NUM_TIMES = 64  # observations per series
CHANNELS = 3  # time, x, y
HIDDEN = 8
WIDTH = 64
DEPTH = 2


@dataclasses.dataclass(frozen=True)
class CDEConfig:
    dtype: object
    batch_size: int


# ---- data and model (identical for both libraries) ------------------------------------


def make_series(config: CDEConfig):
    """Irregularly sampled noisy spirals, (batch, times) and (batch, times, 3)."""
    key_gaps, key_phase, key_noise = jr.split(jr.key(0), 3)
    shape = (config.batch_size, NUM_TIMES - 1)
    gaps = jr.uniform(key_gaps, shape, config.dtype, minval=0.2, maxval=1.0)
    zeros = jnp.zeros((config.batch_size, 1), config.dtype)
    ts = jnp.concatenate([zeros, jnp.cumsum(gaps, axis=1)], axis=1)
    ts = 4 * jnp.pi * ts / ts[:, -1:]
    phase = jr.uniform(key_phase, (config.batch_size, 1), config.dtype) * 2 * jnp.pi
    sign = jnp.where(jnp.arange(config.batch_size) % 2 == 0, 1.0, -1.0)[:, None]
    angle = sign * 2 * ts + phase
    radius = jnp.exp(-0.3 * ts)
    xy = radius[..., None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    xy = xy + 0.05 * jr.normal(key_noise, xy.shape, config.dtype)
    ys = jnp.concatenate([ts[..., None] / 4, xy], axis=-1).astype(config.dtype)
    labels = (sign[:, 0] < 0).astype(config.dtype)
    return ts, ys, labels


class MatrixField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, h, args):
        return self.mlp(h).reshape(HIDDEN, CHANNELS)


class Model(eqx.Module):
    initial: eqx.nn.Linear
    field: Callable
    readout: eqx.nn.Linear


def make_model(config: CDEConfig) -> Model:
    key_initial, key_field, key_readout = jr.split(jr.key(1), 3)
    mlp = eqx.nn.MLP(
        HIDDEN,
        HIDDEN * CHANNELS,
        WIDTH,
        DEPTH,
        activation=jax.nn.softplus,
        final_activation=jnp.tanh,
        dtype=config.dtype,
        key=key_field,
    )
    return Model(
        eqx.nn.Linear(CHANNELS, HIDDEN, dtype=config.dtype, key=key_initial),
        MatrixField(mlp),
        eqx.nn.Linear(HIDDEN, "scalar", dtype=config.dtype, key=key_readout),
    )


def _logit(lib, model, field, ts, ys):
    control = lib.CubicInterpolation(ts, lib.backward_hermite_coefficients(ts, ys))
    sol = lib.diffeqsolve(
        lib.ControlTerm(field, control),
        lib.Tsit5(),
        t0=ts[0],
        t1=ts[-1],
        dt0=(ts[-1] - ts[0]) / 32,
        y0=model.initial(control.evaluate(ts[0])),
        # Capped steps (as in examples/neural_cde.py): at least 32 per series.
        stepsize_controller=lib.PIDController(
            rtol=1e-3, atol=1e-6, dtmax=(ts[-1] - ts[0]) / 32
        ),
        adjoint=lib.RecursiveCheckpointAdjoint(),
        max_steps=1024,
    )
    stats = {key: sol.stats[key] for key in ("num_steps", "num_accepted_steps")}
    stats["num_rejected_steps"] = sol.stats["num_rejected_steps"]
    return model.readout(sol.ys[-1]), stats


def _batched_logits(lib, counter):
    def logits(model, ts, ys):
        field = model.field if counter is None else counter.wrap(model.field)
        one = lambda t, y: _logit(lib, model, field, t, y)
        return jax.vmap(one)(ts, ys)

    return logits


# ---- the problems ---------------------------------------------------------------------


def build_cubic_path(lib, counter, config) -> Case:
    ts, ys, _ = make_series(config)

    def paths(ts, ys):
        build = lambda t, y: lib.CubicInterpolation(
            t, lib.backward_hermite_coefficients(t, y)
        )
        return jax.vmap(build)(ts, ys).coeffs

    return Case(paths, (ts, ys), value=lambda output: output)


def build_forward(lib, counter, config) -> Case:
    ts, ys, _ = make_series(config)
    logits = _batched_logits(lib, counter)
    return Case(
        logits,
        (make_model(config), ts, ys),
        value=lambda output: output[0],
        stats=lambda output: output[1],
    )


def build_gradient(lib, counter, config) -> Case:
    ts, ys, labels = make_series(config)
    logits = _batched_logits(lib, counter)

    def loss(model, ts, ys, labels):
        values, stats = logits(model, ts, ys)
        bce = jnp.mean(jax.nn.softplus(values) - labels * values)
        return bce, stats

    value_and_grad = eqx.filter_value_and_grad(loss, has_aux=True)
    return Case(
        value_and_grad,
        (make_model(config), ts, ys, labels),
        value=lambda output: (output[0][0], output[1]),
        stats=lambda output: output[0][1],
    )


@dataclasses.dataclass(frozen=True)
class Problem:
    key: str
    letter: str
    title: str
    build: Callable[..., Case]
    index: int = 0
    with_scan: bool = False


PROBLEMS = (
    Problem("cubic_path", "a", "a: cubic path x B", build_cubic_path, 0),
    Problem("neural_cde_forward", "b", "b: neural CDE fwd", build_forward, 1),
    Problem("neural_cde_grad", "c", "c: neural CDE grad", build_gradient, 2),
)


# ---- the network alone: a floor for (b)'s run time ------------------------------------


def network_floor(config: CDEConfig, evaluations: int, options) -> float:
    """Run time of (b)'s vector field alone: `evaluations` batched evaluations of the
    network, each contracted with a control vector (what a `ControlTerm` step
    computes per stage), in a `lax.scan` with no solver around it. No solver that
    evaluates the field as often can run faster than this."""
    model = make_model(config)
    state = jnp.zeros((config.batch_size, HIDDEN), config.dtype)
    control = jnp.full((config.batch_size, CHANNELS), 0.1, config.dtype)

    @eqx.filter_jit
    def fields_only(model, state, control):
        field = jax.vmap(model.field, in_axes=(None, 0, None))

        def body(h, _):
            k = jnp.einsum("bij,bj->bi", field(0.0, h, None), control)
            return h + 0.01 * k, None

        return jax.lax.scan(body, state, None, length=evaluations)[0]

    runners = {"network": (fields_only, (model, state, control))}
    _, runs = time_runs(runners, min_time_s=options.min_run_time)
    return 1e3 * runs["network"].median_s


# ---- measuring ------------------------------------------------------------------------


def parse_args(argv=None):
    parser = make_parser(
        __doc__.splitlines()[0],
        only_help="a-c or names",
        batch_help="series per batch",
        dtype="float32",
        fevals_help="count vector-field evaluations in an extra, untimed run "
        "(default: on, off with --quick)",
    )
    return parse_with_defaults(parser, argv, batch_size=(32, 128))


def main(argv=None) -> int:
    options = parse_args(argv)
    if options.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    problems = select_problems(PROBLEMS, options.only)
    libraries = load_libraries(options.no_diffrax)
    dtype = getattr(jnp, options.dtype)
    options.config = CDEConfig(dtype=dtype, batch_size=options.batch_size)
    info = environment(libraries, options)
    print(
        f"jax {info['jax']} on {info['backend']} ({info['device']}); dtype "
        f"{options.dtype}; batch {options.batch_size} series x {NUM_TIMES} times x "
        f"{CHANNELS} channels; compile repeats {options.compile_repeats}"
    )
    started = time.perf_counter()
    for name, lib in libraries.items():  # warm-up: backend start, lazy imports
        case = build_cubic_path(lib, None, CDEConfig(dtype, 2))
        jax.block_until_ready(jax.jit(case.fn)(*case.args))
        del name
    records = []
    for problem in problems:
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
    info["wall_s"] = time.perf_counter() - started
    print_report(records, problems, info)
    print(
        "(a) returns the coefficients; (b) one logit per series; (c) the loss and its "
        "gradient. steps/fevals: summed over the batch / batched evaluations."
    )
    forward = {
        r["library"]: r
        for r in records
        if r["problem"] == "neural_cde_forward" and "error" not in r
    }
    if forward.get("diffeqx", {}).get("fevals"):
        evaluations = forward["diffeqx"]["fevals"]
        floor_ms = network_floor(options.config, evaluations, options)
        line = (
            f"(b) floor: the network alone, {evaluations} batched evaluations in a "
            f"lax.scan: {floor_ms:.3f} ms"
        )
        for name, record in forward.items():
            line += f"; {name} {floor_ms / record['run_ms']:.2f}x of its run"
        print(line)
        info["network_floor_ms"] = floor_ms
    if options.json:
        payload = {"environment": info, "results": records}
        payload["ratios"] = ratio_rows(records, problems)
        write_json(options.json, payload)
    failed = [r for r in records if "error" in r and r["library"] == "diffeqx"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

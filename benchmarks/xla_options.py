"""XLA's CPU compile time with and without its MLIR fusion emitters, per benchmark row.

    python benchmarks/xla_options.py [--only KEY[,KEY...]] [--repeats N]

On CPU, most of XLA's compile time goes to generating code for each fused kernel of
the program; by default each kernel goes through XLA's MLIR fusion emitters. The
compiler option `xla_cpu_use_fusion_emitters=False` selects XLA's older emitters
instead. It is an option of one compilation, not of the process:

    jax.jit(f).lower(*args).compile(compiler_options={...})
    jax.jit(f, compiler_options={...})

For each row (the rows of `compile_profile.py`, diffeqx only) this prints the lowering
time (the same either way), the XLA compile time with the default emitters and with
the option (minimum over repeats, cold caches), and the median run time of each
compiled program, so that the trade can be judged per program.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import compile_profile  # noqa: E402

OPTION = {"xla_cpu_use_fusion_emitters": False}
DEFAULT_ROWS = (
    "core_lotka_volterra",
    "core_lorenz",
    "core_neural_ode_grad",
    "core_neural_ode_batch_grad",
    "cde_neural_cde_forward",
    "events_one",
    "adjoint_neural_ode_checkpoint",
)


def measure(fn, args, options, repeats: int) -> dict:
    lower_s = xla_s = float("inf")
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        lowered = eqx.filter_jit(fn).lower(*args)
        lowered_at = time.perf_counter()
        compiled = (
            lowered.compile(compiler_options=options)
            if options
            else (lowered.compile())
        )
        done_at = time.perf_counter()
        lower_s = min(lower_s, lowered_at - start)
        xla_s = min(xla_s, done_at - lowered_at)
    jax.block_until_ready(compiled(*args))
    times = []
    budget = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - budget < 1.0 and len(times) < 500):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return dict(lower_s=lower_s, xla_s=xla_s, run_s=statistics.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(DEFAULT_ROWS))
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args(argv)
    wanted = options.only.split(",")
    rows = {row.key: row for row in compile_profile.rows(1000)}
    unknown = [key for key in wanted if key not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {sorted(rows)}")
    print(f"jax {jax.__version__} on {jax.default_backend()}; option: {OPTION}")
    header = (
        f"{'row':34s} {'lower s':>8s} {'xla s':>7s} {'xla s opt':>10s} {'xla':>6s} "
        f"{'run ms':>9s} {'run ms opt':>11s} {'run':>6s}"
    )
    print(header)
    print("-" * len(header))
    for key in wanted:
        row = rows[key]
        fn, args = row.build(compile_profile.diffeqx)
        base = measure(fn, args, None, options.repeats)
        opt = measure(fn, args, OPTION, options.repeats)
        print(
            f"{row.title:34s} {base['lower_s']:8.2f} {base['xla_s']:7.2f} "
            f"{opt['xla_s']:10.2f} {opt['xla_s'] / base['xla_s']:5.2f}x "
            f"{base['run_s'] * 1e3:9.3f} {opt['run_s'] * 1e3:11.3f} "
            f"{opt['run_s'] / base['run_s']:5.2f}x",
            flush=True,
        )
    print(
        "lower s: trace + lower; xla s: XLA compile, default emitters; xla s opt: with "
        "the option; run ms: median run of each compiled program; the x columns: "
        "with the option over without."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

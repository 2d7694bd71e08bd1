"""Where compile time goes: program size per part of the solve, and trace, lowering
and XLA compile times, for every benchmark row (and for any function of yours).

    python benchmarks/compile_profile.py [--only KEY[,KEY...]] [--json PATH]
        [--no-diffrax] [--repeats N]

For each row it reports

- the jaxpr's equation count: in total, and per part of the solve (`setup`, `step`,
  `vector_field`, `controller`, `save`, `events`, `progress`, `loop`, `adjoint`,
  `solution`, and `outside` for the user's own code around the solve), counted by
  `diffeqx._profile.count_equations` from the named scopes diffeqx traces its parts
  in (nested loop bodies and branches included, backward passes attributed too);
- the trace time (`jax.make_jaxpr`), the lowering time (trace + lowering to
  StableHLO) and the XLA compile time, each from cold caches, minimum over repeats;
- the program's size: StableHLO operations, and instructions of the optimised HLO
  XLA produces.

When diffrax is importable the same rows are profiled with it (totals only: its
equations are not attributed to parts) and the ratios are printed.

With `--llvm N` it instead compiles each row once in a fresh process with XLA's dumps
on, and lists the LLVM code XLA's CPU backend generated: its total size, the number
of kernel modules, and the N largest kernels with the shapes they compute. On CPU,
generating and optimising that code is most of XLA's compile time, and a kernel far
larger than its neighbours (e.g. a small array copied into another layout, which
LLVM unrolls element by element) is worth finding.

Your own function: `from compile_profile import profile, print_profile` (with
`benchmarks/` on `sys.path`), then `print_profile(profile(fn, args))`; `fn(*args)` must
be traceable by `eqx.filter_jit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bench_adjoint  # noqa: E402
import bench_cde  # noqa: E402
import bench_events  # noqa: E402
import bench_sde  # noqa: E402
from _problems import PROBLEMS as CORE_PROBLEMS, Config  # noqa: E402
from bench_core import environment, import_diffeqx, load_libraries  # noqa: E402

diffeqx = import_diffeqx()
from diffeqx._profile import PARTS, count_equations  # noqa: E402

# Short column names for the parts, in `PARTS` order.
SHORT = dict(
    setup="setup",
    step="step",
    vector_field="vf",
    controller="ctrl",
    save="save",
    events="event",
    progress="prog",
    loop="loop",
    adjoint="adj",
    solution="sol",
    outside="user",
)


def _count_hlo_instructions(text: str) -> int:
    return sum(1 for line in text.splitlines() if " = " in line and "ENTRY" not in line)


# Operations of the optimised HLO that XLA's CPU backend compiles into kernels of
# their own when they are not inside a fusion.
_KERNEL_OPS = re.compile(
    r"\s(fusion|copy|dot|custom-call|convolution|sort|scatter|gather|reduce|"
    r"reduce-window|select-and-scatter|fft|transpose|concatenate|pad|slice|"
    r"dynamic-slice|dynamic-update-slice|broadcast|iota|reverse|rng)\("
)


def _count_kernels(text: str) -> int:
    """Kernels of the optimised HLO: fused computations, and operations that are
    not in one (counted in every non-fused computation: the entry, loop bodies and
    conditions, branches). On CPU, generating code for them is most of XLA's compile
    time."""
    fused, computations, current = set(), {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            words = line.split()
            current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            computations[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None and " = " in line:
            computations[current].append(line)
            if " fusion(" in line:
                fused.update(re.findall(r"calls=%?([\w.\-]+)", line))
            fused.update(re.findall(r"to_apply=%?([\w.\-]+)", line))
    return sum(
        1
        for name, lines in computations.items()
        if name not in fused
        for line in lines
        if _KERNEL_OPS.search(line.split(" = ", 1)[1])
    )


def _count_stablehlo_ops(text: str) -> int:
    return sum(1 for line in text.splitlines() if " = " in line)


def profile(fn: Callable, args: tuple, *, repeats: int = 1) -> dict:
    """Equation counts per part, trace/lower/compile times (from cold caches, min over
    `repeats`) and program sizes of `fn(*args)`."""
    best: dict = {}
    for _ in range(repeats):
        jax.clear_caches()
        start = time.perf_counter()
        closed, *_ = eqx.filter_make_jaxpr(fn)(*args)
        trace_s = time.perf_counter() - start
        jax.clear_caches()
        start = time.perf_counter()
        lowered = eqx.filter_jit(fn).lower(*args)
        lower_s = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        xla_s = time.perf_counter() - start
        for key, value in dict(trace_s=trace_s, lower_s=lower_s, xla_s=xla_s).items():
            best[key] = min(best.get(key, value), value)
    parts = count_equations(closed)
    hlo = compiled.compiled.as_text()
    return dict(
        equations=sum(parts.values()),
        parts=parts,
        **best,
        compile_s=best["lower_s"] + best["xla_s"],
        stablehlo_ops=_count_stablehlo_ops(lowered.as_text()),
        hlo_instructions=_count_hlo_instructions(hlo),
        kernels=_count_kernels(hlo),
    )


def print_profile(result: dict) -> None:
    """One function's profile, readably."""
    print(
        f"{result['equations']} equations; trace {result['trace_s']:.2f} s, lower "
        f"{result['lower_s']:.2f} s, XLA {result['xla_s']:.2f} s; "
        f"{result['stablehlo_ops']} StableHLO ops, "
        f"{result['hlo_instructions']} optimised HLO instructions, "
        f"{result['kernels']} kernels"
    )
    print("  " + ", ".join(f"{p}: {n}" for p, n in result["parts"].items() if n))


# ---- the benchmark rows -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    title: str
    build: Callable  # build(lib) -> (fn, args)


def _from_case(builder, config):
    def build(lib):
        case = builder(lib, None, config)
        return case.fn, case.args

    return build


def _hessian(saveat_kind):
    def build(lib):
        loss, _ = bench_adjoint._lotka_volterra_loss(
            lib, lib.RecursiveCheckpointAdjoint(), saveat_kind
        )
        args = bench_adjoint._hessian_args(lib, saveat_kind, jnp.float64)
        return jax.hessian(loss), (args[0],) + tuple(args[1:])

    return build


def _event_row(batch):
    return lambda lib: bench_events.build(lib, batch)


def _sde_models():
    keys = jax.random.split(jax.random.key(2), 2)
    return (
        eqx.nn.MLP(4, 4, 32, 2, activation=jnp.tanh, key=keys[0]),
        eqx.nn.MLP(
            4, 16, 32, 2, activation=jnp.tanh, final_activation=jnp.tanh, key=keys[1]
        ),
    )


def _sde_row(kind):
    """bench_sde.py's adaptive solve and neural-SDE gradients."""

    def build(lib):
        if kind == "adaptive":
            return bench_sde.adaptive(lib), (jax.random.key(0),)
        keys = jax.random.split(jax.random.key(1), 32)
        if kind == "neural_ts":
            times = jnp.broadcast_to(
                jnp.linspace(0.0, bench_sde.TIMES - 1.0, bench_sde.TIMES),
                (32, bench_sde.TIMES),
            )
            return bench_sde.neural_sde_traced(lib), (_sde_models(), keys, times)
        return bench_sde.neural_sde(lib), (_sde_models(), keys)

    return build


def rows(batch_size: int) -> list[Row]:
    core = Config(dtype=jnp.float64, batch_size=batch_size)
    cde = bench_cde.CDEConfig(dtype=jnp.float32, batch_size=32)
    adjoint = bench_adjoint.AdjointConfig(dtype=jnp.float32, batch_size=32)
    out = [
        Row(f"core_{p.key}", f"core {p.title}", _from_case(p.build, core))
        for p in CORE_PROBLEMS
    ]
    out += [
        Row(f"cde_{p.key}", f"cde {p.title}", _from_case(p.build, cde))
        for p in bench_cde.PROBLEMS
    ]
    out += [
        Row("events_one", "events: one flight", _event_row(0)),
        Row("events_vmap", f"events: vmap x{batch_size}", _event_row(batch_size)),
    ]
    out += [
        Row(f"adjoint_{p.key}", f"adjoint {p.title}", _from_case(p.build, adjoint))
        for p in bench_adjoint.TRAINING_PROBLEMS
    ]
    out += [
        Row("hessian_t1", "hessian LV SaveAt(t1)", _hessian("t1")),
        Row("hessian_ts", "hessian LV SaveAt(ts)", _hessian("ts")),
    ]
    out += [
        Row("sde_adaptive", "sde: adaptive SPaRK x64", _sde_row("adaptive")),
        Row("sde_neural_grad", "sde: neural SDE grad x32", _sde_row("neural")),
        Row("sde_neural_ts", "sde: neural SDE ts grad x32", _sde_row("neural_ts")),
    ]
    return out


def _print_table(records: list[dict]) -> None:
    parts = [SHORT[p] for p in PARTS]
    header = (
        f"{'row':34s} {'library':8s} {'eqns':>6s} "
        + " ".join(f"{p:>5s}" for p in parts)
        + f" {'trace':>6s} {'lower':>6s} {'xla':>6s} {'shlo':>6s} {'hlo':>6s}"
        + f" {'kern':>5s}"
    )
    print(header)
    print("-" * len(header))
    for r in records:
        if "error" in r:
            print(f"{r['title']:34s} {r['library']:8s} error: {r['error']}")
            continue
        counts = (
            " ".join(f"{r['parts'][p]:5d}" for p in PARTS)
            if r["library"] == "diffeqx"
            else " ".join(f"{'':>5s}" for _ in PARTS)
        )
        print(
            f"{r['title']:34s} {r['library']:8s} {r['equations']:6d} {counts} "
            f"{r['trace_s']:6.2f} {r['lower_s']:6.2f} {r['xla_s']:6.2f} "
            f"{r['stablehlo_ops']:6d} {r['hlo_instructions']:6d} {r['kernels']:5d}"
        )
    print(
        "eqns: jaxpr equations (nested bodies included), then per part (diffeqx only: "
        f"{', '.join(f'{SHORT[p]}={p}' for p in PARTS)}); trace: make_jaxpr s; "
        "lower: trace + lower s; xla: XLA compile s; shlo: StableHLO ops; hlo: "
        "optimised HLO instructions; kern: kernels XLA generates code for (fused "
        "computations and unfused operations)."
    )


def _print_ratios(records: list[dict]) -> None:
    by = {(r["key"], r["library"]): r for r in records if "error" not in r}
    keys = [r["key"] for r in records if r["library"] == "diffeqx"]
    if not any((k, "diffrax") in by for k in keys):
        return
    print("\nRatios diffeqx / diffrax (compile = lower + xla; target compile <= 0.50x)")
    print(
        f"{'row':34s} {'eqns':>6s} {'hlo':>6s} {'kern':>6s} {'lower':>6s} {'xla':>6s} "
        f"{'compile':>8s}"
    )
    for key in keys:
        if (key, "diffeqx") not in by or (key, "diffrax") not in by:
            continue
        a, b = by[(key, "diffeqx")], by[(key, "diffrax")]
        compile_ratio = a["compile_s"] / b["compile_s"]
        print(
            f"{a['title']:34s} {a['equations'] / b['equations']:5.2f}x "
            f"{a['hlo_instructions'] / b['hlo_instructions']:5.2f}x "
            f"{a['kernels'] / b['kernels']:5.2f}x "
            f"{a['lower_s'] / b['lower_s']:5.2f}x {a['xla_s'] / b['xla_s']:5.2f}x "
            f"{compile_ratio:6.2f}x {'ok' if compile_ratio <= 0.5 else 'MISS'}"
        )


def _dump_and_compile(key: str, library: str, batch_size: int) -> None:
    """Compiles one row (in a process started with XLA's dumps on)."""
    lib = load_libraries(library != "diffrax")[library]
    row = {r.key: r for r in rows(batch_size)}[key]
    fn, args = row.build(lib)
    eqx.filter_jit(fn).lower(*args).compile()


def llvm_sizes(key: str, library: str, batch_size: int) -> dict:
    """The LLVM code XLA generates for a row's program: `total` bytes (optimised
    IR), `modules` (kernel modules) and `kernels`, (bytes, name, shape) largest
    first. Compiled in a fresh process, as the dump option is read at start-up."""
    import glob
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={folder}")
        command = [sys.executable, __file__, "--_dump", key, "--_library", library]
        command += ["--batch-size", str(batch_size)]
        run = subprocess.run(command, env=env, capture_output=True, text=True)
        if run.returncode != 0:
            errors = [
                line
                for line in run.stderr.splitlines()
                if re.match(r"\w+(Error|Exception)\b", line)
            ]
            last = (errors or run.stderr.strip().splitlines() or ["(no output)"])[-1]
            return dict(total=0, modules=0, kernels=[], error=last[:200])
        files = glob.glob(os.path.join(folder, "*.ir-with-opt.ll"))
        by_module: dict = {}
        for file in files:
            module = ".".join(os.path.basename(file).split(".")[:2])
            by_module.setdefault(module, []).append(file)
        if not by_module:
            return dict(total=0, modules=0, kernels=[])
        # The row's program is the last one compiled (the others are programs that
        # building its inputs compiled, e.g. random data); XLA numbers its modules
        # in the order it compiles them.
        main_module = max(by_module, key=lambda m: int(m.split(".")[0].split("_")[1]))
        hlo_files = glob.glob(
            os.path.join(folder, f"{main_module}.cpu_after_optimizations.txt")
        )
        hlo = open(hlo_files[0]).read() if hlo_files else ""
        kernels = []
        for file in by_module[main_module]:
            name = os.path.basename(file)[len(main_module) + 1 :]
            for suffix in ("_kernel_module.ir-with-opt.ll", ".ir-with-opt.ll"):
                name = name.removesuffix(suffix)
            name = name.removeprefix("__compute_module_")
            found = re.search(r"%" + re.escape(name) + r" = (\S+) ", hlo)
            shape = found.group(1) if found else ""
            kernels.append((os.path.getsize(file), name, shape))
        kernels.sort(reverse=True)
        total = sum(size for size, _, _ in kernels)
        return dict(total=total, modules=len(kernels), kernels=kernels)


def _print_llvm(chosen, libraries, count: int, batch_size: int) -> None:
    for row in chosen:
        for name in libraries:
            sizes = llvm_sizes(row.key, name, batch_size)
            if "error" in sizes:
                print(f"{row.title} ({name}): error: {sizes['error']}")
                continue
            print(
                f"{row.title} ({name}): {sizes['total'] / 1e6:.2f} MB of LLVM IR "
                f"in {sizes['modules']} kernel modules; largest:"
            )
            for size, kernel, shape in sizes["kernels"][:count]:
                print(f"  {size / 1e3:8.1f} kB  {kernel:44s} {shape}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="row keys, comma-separated")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-diffrax", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--llvm", type=int, metavar="N", default=0)
    parser.add_argument("--_dump", help=argparse.SUPPRESS)
    parser.add_argument("--_library", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options._dump:
        _dump_and_compile(options._dump, options._library, options.batch_size)
        return 0
    libraries = load_libraries(options.no_diffrax)
    all_rows = rows(options.batch_size)
    wanted = {k for k in options.only.split(",") if k}
    unknown = wanted - {r.key for r in all_rows}
    if unknown:
        raise SystemExit(
            f"unknown rows {sorted(unknown)}; choose from {[r.key for r in all_rows]}"
        )
    chosen = [r for r in all_rows if not wanted or r.key in wanted]
    info = environment(
        libraries,
        argparse.Namespace(
            dtype="float64",
            quick=False,
            batch_size=options.batch_size,
            compile_repeats=options.repeats,
        ),
    )
    print(f"jax {info['jax']} on {info['backend']} ({info['device']})")
    if options.llvm:
        _print_llvm(chosen, libraries, options.llvm, options.batch_size)
        return 0
    records = []
    for row in chosen:
        print(f"profiling {row.key} ...", flush=True)
        for name, lib in libraries.items():
            record = dict(key=row.key, title=row.title, library=name)
            try:
                fn, args = row.build(lib)
                record.update(profile(fn, args, repeats=options.repeats))
            except Exception as error:  # report it and carry on
                record["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            records.append(record)
    print()
    _print_table(records)
    _print_ratios(records)
    if options.json:
        import json

        with open(options.json, "w") as file:
            json.dump(dict(environment=info, results=records), file, indent=1)
        print(f"wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How XLA's CPU runtime will run a benchmark problem: its executors, their size, and
how many operations each has ready at once.

XLA runs a compiled CPU program as sequences of runtime calls ("thunks"): one
sequence for the program, one for each loop body and branch. A sequence runs in
order on the calling thread when it has at most 8 thunks, when every buffer it
touches has at most 512 bytes, or when each thunk depends on the one before;
otherwise it runs as a graph, and whenever more than 8 thunks are ready at once it
hands part of them to another thread and later waits for them. For small solves
that hand-off (tens of microseconds on a small machine) can cost more than the
arithmetic. This script reads the graphs XLA logs when it builds them (its
`thunk_executor` logging, switched on through `TF_CPP_VMODULE`), replays each in
XLA's first-in-first-out order and reports the most thunks ready at once.

    python benchmarks/cpu_executors.py lotka_volterra_dense_saves
    python benchmarks/cpu_executors.py neural_ode_grad --library diffrax

Problems are those of `_problems.py` (`build_<name>`). Executors with fewer than
`--min-thunks` thunks are left out. Relies on XLA's log format (checked with JAX
0.10.2); it says so if the logs are not found.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

SPLIT_THRESHOLD = 8  # XLA's: more ready thunks than this are split across threads

_CHILD = r"""
import sys
sys.path.insert(0, {benchmarks!r})
import jax, jax.numpy as jnp, equinox as eqx
jax.config.update("jax_enable_x64", True)
import importlib
import _problems as P
lib = None if {library!r} == "scan" else importlib.import_module({library!r})
case = getattr(P, "build_" + {problem!r})(lib, None, P.Config(jnp.float64, 1000))
jax.block_until_ready(eqx.filter_jit(case.fn)(*case.args))
"""

_HEADER = re.compile(
    r"Constructed ThunkExecutor with (\d+) thunks: #source_nodes=(\d+) .*"
    r"is_sequential=(\w+), small_buffers=(\w+)"
)
_THUNK = re.compile(
    r"\s*thunk #\d+: op_name=([^,]+), kind=([^,]+), dependencies=\[(.*)\]"
)


def parse(log: str) -> list[dict]:
    """The executors in XLA's log, each with its flags and (name, deps) thunks."""
    executors, current = [], None
    for line in log.splitlines():
        header = _HEADER.search(line)
        if header:
            current = dict(
                thunks=[],
                sources=int(header.group(2)),
                sequential=header.group(3) == "true",
                small_buffers=header.group(4) == "true",
            )
            executors.append(current)
            continue
        thunk = _THUNK.match(line)
        if thunk and current is not None:
            deps = [d.strip() for d in thunk.group(3).split(",") if d.strip()]
            current["thunks"].append((thunk.group(1), thunk.group(2), deps))
    return executors


def most_ready(thunks) -> tuple[int, str | None]:
    """Replays the graph in first-in-first-out order, as XLA does, one thunk at a
    time; returns the most thunks left ready after taking one, and that thunk."""
    indegree = {name: len(deps) for name, _, deps in thunks}
    users = collections.defaultdict(list)
    for name, _, deps in thunks:
        for dep in deps:
            users[dep].append(name)
    ready = collections.deque(name for name, _, deps in thunks if not deps)
    most, at = 0, None
    while ready:
        name = ready.popleft()
        if len(ready) > most:
            most, at = len(ready), name
        for user in users[name]:
            indegree[user] -= 1
            if indegree[user] == 0:
                ready.append(user)
    return most, at


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", help="a `_problems.build_<problem>` name")
    parser.add_argument("--library", default="diffeqx", help="diffeqx, diffrax, scan")
    parser.add_argument("--min-thunks", type=int, default=9)
    args = parser.parse_args(argv)
    benchmarks = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="0",
        TF_CPP_VMODULE="thunk_executor=6",
        JAX_PLATFORMS="cpu",
    )
    code = _CHILD.format(
        benchmarks=benchmarks, library=args.library, problem=args.problem
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    if run.returncode != 0:
        print(run.stderr[-3000:], file=sys.stderr)
        return run.returncode
    executors = parse(run.stdout + run.stderr)
    if not executors:
        print("XLA logged no executor graphs (is this JAX's CPU backend?)")
        return 1
    print(f"{args.problem} ({args.library}): {len(executors)} executors")
    print(f"{'thunks':>7} {'sources':>8} {'in order':>9} {'most ready':>11}  where")
    splits = 0
    for executor in executors:
        thunks = executor["thunks"]
        if len(thunks) < args.min_thunks:
            continue
        in_order = executor["sequential"]
        most, at = most_ready(thunks)
        flag = ""
        if not in_order and most > SPLIT_THRESHOLD:
            flag = "  <- split across threads"
            splits += 1
        print(
            f"{len(thunks):>7} {executor['sources']:>8} {str(in_order):>9} "
            f"{most:>11}  {at or '-'}{flag}"
        )
    print(
        f"{splits} executor(s) hand work to another thread (more than "
        f"{SPLIT_THRESHOLD} thunks ready at once in an executor that runs as a graph)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

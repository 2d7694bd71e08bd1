"""Where a program's size comes from: the solve's parts are traced inside named
scopes (`jax.named_scope("diffeqx.<part>")`), and `count_equations` attributes every
equation of a jaxpr, nested loops and branches included, to the innermost part it was
traced in. Names cost nothing at run time; they are kept by JAX's transformations, so
the backward pass of a `jax.grad` is attributed too.

The parts:

- `setup`: checks, dtype promotion and the initial state (first step size, solver and
  controller initialisation, output buffers);
- `step`: the solver's step, without the vector field;
- `vector_field`: the user's vector field (and control) evaluations;
- `controller`: accepting or rejecting the step and choosing the next one;
- `save`: writing outputs (`SaveAt`) and dense output;
- `events`: checking, locating and recording events;
- `progress`: the progress meter;
- `loop`: the loop's own bookkeeping (state selects, counters, termination test);
- `adjoint`: the adjoint's machinery around the loop (checkpointing, backsolve);
- `solution`: building the `Solution`;
- `outside`: everything not traced inside `diffeqsolve` (the user's loss, optimiser).
"""

import collections
import math
import re

import jax

try:
    from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover - an older JAX
    from jax.core import ClosedJaxpr, Jaxpr

PARTS = (
    "setup",
    "step",
    "vector_field",
    "controller",
    "save",
    "events",
    "progress",
    "loop",
    "adjoint",
    "solution",
    "outside",
)
_SCOPE = re.compile(r"diffeqx\.([a-z_]+)")


def scope(part: str):
    """A context manager tracing what runs inside it as part `part` of the solve."""
    assert part in PARTS, part
    return jax.named_scope(f"diffeqx.{part}")


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, Jaxpr):
                yield item


def count_equations(jaxpr) -> dict[str, int]:
    """The number of equations of `jaxpr` (a `Jaxpr` or `ClosedJaxpr`, e.g. from
    `jax.make_jaxpr`) per part of the solve, counting the equations of nested jaxprs
    (loop bodies, branches, inner jitted functions, custom derivative rules) each time
    they appear. An equation that holds others (a loop) counts once itself."""
    counts = collections.Counter({part: 0 for part in PARTS})

    def walk(jaxpr, inherited):
        for eqn in jaxpr.eqns:
            # Inner jaxprs carry name stacks relative to the equation holding them.
            found = _SCOPE.findall(str(eqn.source_info.name_stack))
            part = found[-1] if found and found[-1] in PARTS else inherited
            counts[part] += 1
            for sub in _sub_jaxprs(eqn.params):
                walk(sub, part)

    walk(jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr, "outside")
    return dict(counts)


def count_executions(jaxpr, primitive: str) -> int:
    """How many times equations of `primitive` run when `jaxpr` runs once: each
    occurrence times the lengths of the scans around it (loops of unknown length,
    and branches, count once)."""

    def count(jaxpr, repeat):
        total = 0
        for eqn in jaxpr.eqns:
            total += repeat * (eqn.primitive.name == primitive)
            inner_repeat = repeat * eqn.params.get("length", 1)
            for inner in _sub_jaxprs(eqn.params):
                total += count(inner, inner_repeat)
        return total

    return count(getattr(jaxpr, "jaxpr", jaxpr), 1)


def aval_bytes(aval) -> int:
    """The bytes of a value of abstract value `aval` (0 for one without a shape and
    dtype, e.g. a token)."""
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(shape) * dtype.itemsize


def intermediate_bytes(jaxpr) -> float:
    """The bytes of all values that `jaxpr` computes when it runs once (the outputs of
    its equations, those of nested jaxprs included, loop bodies times the lengths of
    their scans): an upper bound on what reverse mode can store of one run of it.
    Infinite where it holds a loop of unknown length (`while`)."""

    def total(jaxpr, repeat):
        out = 0.0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "while":
                return float("inf")
            out += repeat * sum(aval_bytes(v.aval) for v in eqn.outvars)
            inner_repeat = repeat * eqn.params.get("length", 1)
            for inner in _sub_jaxprs(eqn.params):
                out += total(inner, inner_repeat)
        return out

    return total(getattr(jaxpr, "jaxpr", jaxpr), 1)

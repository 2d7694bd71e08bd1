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
    from jax.extend.core import ClosedJaxpr, Jaxpr, Literal, jaxpr_as_fun
except ImportError:  # pragma: no cover - an older JAX
    from jax.core import ClosedJaxpr, Jaxpr, Literal, jaxpr_as_fun

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


def residual_bytes(closed) -> float:
    """The bytes reverse mode keeps for its backward pass from one run of the closed
    jaxpr `closed`, counting only the values that depend on its inputs: those a scan
    over it stacks, one per iteration. (Values that depend on its constants alone
    are kept once, outside the scan.)

    Read from the program of its linearisation, with respect to every inexact input
    and constant: the values that program passes to the linear part. Infinite where
    it cannot be linearised (e.g. a callback without a derivative rule)."""
    import jax.numpy as jnp

    jaxpr = closed.jaxpr
    const_avals = [jax.typeof(c) for c in closed.consts]
    in_avals = [v.aval for v in jaxpr.invars]

    def spec(aval):
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)

    def inexact(aval):
        return jnp.issubdtype(aval.dtype, jnp.inexact)

    def merge(avals, chosen, values):
        chosen = iter(chosen)
        return [
            next(chosen) if inexact(a) else v
            for a, v in zip(avals, values, strict=True)
        ]

    def linear_part(consts, args):
        def run(float_consts, float_args):
            c = merge(const_avals, float_consts, consts)
            x = merge(in_avals, float_args, args)
            return jaxpr_as_fun(ClosedJaxpr(jaxpr, c))(*x)

        pick = lambda avals, values: [
            v for a, v in zip(avals, values, strict=True) if inexact(a)
        ]
        _, linear = jax.linearize(run, pick(const_avals, consts), pick(in_avals, args))
        return jax.tree_util.tree_leaves(linear)

    try:
        program = jax.make_jaxpr(linear_part)(
            [spec(a) for a in const_avals], [spec(a) for a in in_avals]
        ).jaxpr
    except Exception:  # noqa: BLE001 - anything that cannot be linearised
        return float("inf")
    # The values computed from the inputs (not from the constants alone).
    varying = set(program.invars[len(const_avals) :])
    for eqn in program.eqns:
        if any(not isinstance(v, Literal) and v in varying for v in eqn.invars):
            varying.update(eqn.outvars)
    return float(
        sum(
            aval_bytes(v.aval)
            for v in set(program.outvars)
            if not isinstance(v, Literal) and v in varying
        )
    )

"""What JAX transformations the current computation is being traced under.

JAX has no public API for this, so it is read from JAX's trace context: the current
trace and the chain of its `parent_trace`s (outer transformations stay visible inside
`jax.jit`, `lax.scan`, `lax.cond` and `jax.checkpoint` while those are being traced).
Each trace is classified by its type:

- `LinearizeTrace` built for `jax.grad`/`jax.vjp` (`is_vjp`): `"reverse"`;
  built for `jax.linearize`: `"linearize"` (forward mode whose linear part may later be
  transposed, so either mode may follow);
- `JVPTrace` (`jax.jvp`, `jax.jacfwd`): `"forward"`, or `"reverse"` when it is staged
  for partial evaluation (how JAX versions before direct linearisation took reverse
  mode);
- `BatchTrace` (`jax.vmap`): `"batch"`;
- traces that stage or evaluate without transforming (`jax.jit`, control flow,
  `jax.checkpoint`, `shard_map`, plain evaluation): nothing.

The default adjoint chooses its loop from this (`strict=True`), so it must never guess:
a trace type it does not know, or a JAX that no longer has what it reads, raises
`TransformDetectionError` naming the JAX version and the adjoints that do not depend
on it. Performance heuristics use `strict=False`, which skips what it does not know.
"""

import contextlib
import functools
import importlib
import threading

import equinox as eqx
import jax
import numpy as _np

# JAX's internal modules, read when a solve is traced. (Module attributes, so that
# tests can stand in for a JAX whose internals have changed.)
_import_error = "jax._src.core"
try:
    from jax._src import core as _core
    from jax._src.interpreters import (
        ad as _ad,
        batching as _batching,
        partial_eval as _pe,
    )
except ImportError as error:  # pragma: no cover - depends on the JAX version
    _core = _ad = _batching = _pe = None
    _import_error = str(error)

_ADVICE = (
    "The default adjoint, `RecursiveCheckpointAdjoint`, chooses how to run the solve "
    "from the derivatives being taken. Pass an adjoint that does not need to know: "
    "`adjoint=diffeqx.DirectAdjoint()` (any mode and order; its cost grows with "
    "`max_steps`), `adjoint=diffeqx.ForwardMode()` (forward mode only) or "
    "`adjoint=diffeqx.BacksolveAdjoint()` (reverse mode only). Please also report "
    "this with your JAX version."
)


class TransformDetectionError(RuntimeError):
    """diffeqx could not read which JAX transformations a solve is traced under."""


def _fail(what: str):
    raise TransformDetectionError(
        f"diffeqx cannot tell which JAX transformations this solve is being traced "
        f"under (JAX {jax.__version__}): {what}. {_ADVICE}"
    )


@functools.cache
def _first_class(class_name, module_names) -> tuple:
    """`(cls,)` for the first of the modules that defines the class, else `()`
    (looked up once: it is read whenever a solve is called)."""
    for module_name in module_names:
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            return (cls,)
    return ()


def _trace_kinds():
    """`(current trace, classify)`: where `classify(trace)` is one of the level names,
    `None` (a trace that transforms nothing) or `"unknown"`. Raises `LookupError`
    naming what is missing from JAX."""
    core, ad, batching, pe = _core, _ad, _batching, _pe
    if core is None:
        raise LookupError(f"a JAX module it reads is missing: {_import_error}")
    try:
        trace = core.trace_ctx.trace
        jvp_trace, batch_trace = ad.JVPTrace, batching.BatchTrace
        staging = (core.EvalTrace, pe.DynamicJaxprTrace, pe.JaxprTrace)
    except AttributeError as error:
        raise LookupError(f"an attribute it reads is missing ({error})") from None
    # Optional: LinearizeTrace exists from JAX 0.4.36 (direct linearisation);
    # ShardMapTrace and RematTrace only in some versions.
    linearize_trace = getattr(ad, "LinearizeTrace", None)
    for class_name, module_names in (
        # `shard_map` moved from `jax.experimental` into `jax._src` in JAX 0.6.
        ("ShardMapTrace", ("jax._src.shard_map", "jax.experimental.shard_map")),
        ("RematTrace", ("jax._src.interpreters.remat",)),
    ):
        staging = staging + _first_class(class_name, module_names)

    def classify(t):
        if linearize_trace is not None and isinstance(t, linearize_trace):
            # Without `is_vjp` (older JAX) it cannot be told apart from
            # `jax.linearize`; reverse mode is by far the commoner.
            return "reverse" if getattr(t, "is_vjp", True) else "linearize"
        if isinstance(t, jvp_trace):
            parent = getattr(t, "parent_trace", None)
            return "reverse" if isinstance(parent, pe.JaxprTrace) else "forward"
        if isinstance(t, batch_trace):
            return "batch"
        if isinstance(t, staging):
            return None
        return "unknown"

    return trace, classify


def active_transforms(*, strict: bool = False) -> list[str]:
    """The transformations applied to the computation being traced, innermost first:
    `"reverse"` (`jax.grad`, `jax.vjp`), `"forward"` (`jax.jvp`, `jax.jacfwd`),
    `"linearize"` (`jax.linearize`) or `"batch"` (`jax.vmap`).

    With `strict=True`, raises `TransformDetectionError` where it cannot tell (a trace
    type it does not know, or JAX internals it reads that are missing). With
    `strict=False`, skips what it does not know (an empty list if nothing can be
    read): for decisions that only affect speed."""
    try:
        trace, classify = _trace_kinds()
    except LookupError as error:
        if strict:
            _fail(str(error))
        return []
    levels = []
    while trace is not None:
        kind = classify(trace)
        if kind == "unknown":
            if strict:
                _fail(f"it does not know the trace type `{type(trace).__qualname__}`")
        elif kind is not None:
            levels.append(kind)
            if strict and not hasattr(trace, "parent_trace"):
                _fail(f"`{type(trace).__qualname__}` has no `parent_trace`")
        trace = _parent(trace)
    return levels


_detached = threading.local()


def _parent(trace):
    """The trace `trace` was made in, or None at a boundary set by
    `outer_transforms_hidden`."""
    if trace is getattr(_detached, "boundary", None):
        return None
    return getattr(trace, "parent_trace", None)


@contextlib.contextmanager
def outer_transforms_hidden():
    """While a function is traced for one member of a `jax.vmap` batch at a time
    (see `kernel.call_per_member`): the transformations around the trace current on
    entry are not reported, as that function is computed without them (the
    `jax.vmap` runs it member by member, and no derivative was active when it was
    chosen). Transformations applied inside it are."""
    previous = getattr(_detached, "boundary", None)
    _detached.boundary = _core.trace_ctx.trace
    try:
        with mapped_inputs(None):
            yield
    finally:
        _detached.boundary = previous


def differentiation_levels(*, strict: bool = False) -> list[str]:
    """`active_transforms()` without the batching levels, innermost first."""
    return [level for level in active_transforms(strict=strict) if level != "batch"]


_one_at_a_time = threading.local()


@contextlib.contextmanager
def differentiated_one_step_at_a_time(active: bool = True):
    """While a loop body is traced for a loop whose backward pass differentiates one
    iteration at a time (`jax.vjp` of the body at each stored or recomputed state:
    the default adjoint's checkpointed and stored loops), so that the values one
    iteration keeps for its derivative live only while that iteration is
    differentiated, not for the whole loop. `active=False` for any other loop
    (which may be nested in such a body: a solve inside a vector field)."""
    previous = getattr(_one_at_a_time, "active", False)
    _one_at_a_time.active = active
    try:
        yield
    finally:
        _one_at_a_time.active = previous


def steps_differentiated_one_at_a_time() -> bool:
    """Whether the loop body being traced is differentiated one iteration at a time
    (see `differentiated_one_step_at_a_time`)."""
    return getattr(_one_at_a_time, "active", False)


def is_batched() -> bool:
    """Whether the computation is being traced under `jax.vmap` (a speed heuristic:
    unknown traces are skipped)."""
    return "batch" in active_transforms()


def batch_size() -> int | None:
    """The number of computations the one being traced stands for: the product of
    the sizes of the `jax.vmap`s around it (1 without). None where it cannot tell (a
    trace type it does not know, or JAX internals it reads that are missing): for
    decisions that only affect speed and memory, which must then assume the worst."""
    try:
        trace, classify = _trace_kinds()
    except LookupError:
        return None
    size = 1
    while trace is not None:
        kind = classify(trace)
        if kind == "unknown":
            return None
        if kind == "batch":
            axis_size = getattr(getattr(trace, "axis_data", None), "size", None)
            if not isinstance(axis_size, int):
                return None
            size *= axis_size
        trace = _parent(trace)
    return size


def batch_is_empty() -> bool:
    """Whether the computation being traced stands for no computation at all: a
    `jax.vmap` around it maps an axis of size 0. (Its runtime checks cannot be
    compiled then: `equinox.error_if` under such a `jax.vmap` fails to compile.)"""
    return batch_size() == 0


def branched_error_if(x, pred, index, messages):
    """`equinox.branched_error_if(x, pred, index, messages)`, left out (`x` itself)
    where the computation being traced stands for none (`batch_is_empty`)."""
    return x if batch_is_empty() else eqx.branched_error_if(x, pred, index, messages)


_mapped = threading.local()


@contextlib.contextmanager
def mapped_inputs(tracers):
    """While a function called under `jax.vmap` is traced as a nested `jax.jit`
    (`_eager.call_compiled`), its inputs are not yet mapped: `tracers` are those the
    `jax.vmap` maps, which `batched_leaf` then reports as mapped (and nothing else).
    None: no such function is being traced."""
    previous = getattr(_mapped, "ids", None)
    _mapped.ids = None if tracers is None else {id(x): x for x in tracers}
    try:
        yield
    finally:
        _mapped.ids = previous


def batched_leaf(tree, *, through_derivatives: bool = False):
    """A leaf of `tree` that `jax.vmap` maps, when the computation being traced is
    directly under `jax.vmap` (its innermost transformation); None otherwise, or where
    it cannot tell (a speed heuristic).

    With `through_derivatives`, also when the `jax.vmap` is outside derivatives taken
    inside it (`jax.vmap(jax.grad(f))`: the trace of the derivative is innermost, and
    a leaf is mapped when the value it differentiates at is), in which case the leaf
    returned is one of `tree`'s, whose primal value is mapped."""
    ids = getattr(_mapped, "ids", None)
    if ids is not None:
        for leaf in jax.tree_util.tree_leaves(tree):
            if ids.get(id(leaf)) is leaf and leaf.size > 0:
                return leaf
        return None
    batching = _batching
    if _core is None:
        return None
    try:
        trace = _core.trace_ctx.trace
        tracer_type, trace_type = batching.BatchTracer, batching.BatchTrace
    except AttributeError:
        return None
    derivatives = []
    if through_derivatives:
        derivatives, trace = _derivative_traces_above(trace)
    if not isinstance(trace, trace_type):
        return None
    for leaf in jax.tree_util.tree_leaves(tree):
        value = _primal_under(leaf, derivatives)
        if (
            isinstance(value, tracer_type)
            and getattr(value, "_trace", None) is trace
            and getattr(value, "batch_dim", None) is not None
            and value.size > 0
        ):
            return leaf
    return None


def _numeric(x) -> bool:
    return jax.numpy.issubdtype(x.dtype, jax.numpy.number) or x.dtype == bool


def _true_mapped_as(value):
    """A boolean `True` that a `jax.vmap` maps exactly where it maps `value` (XLA
    folds it, and any select on it, to a constant)."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        value = jax.random.key_data(value)
    first = jax.numpy.ravel(value)[0]
    return (first == first) | True


def _mapped_by(mark, x):
    """`x`, mapped where the boolean `mark` is (the same values)."""
    return jax.lax.select(jax.numpy.broadcast_to(mark, x.shape), x, x)


def batched_as(tree, leaf):
    """`tree` with each numeric array leaf mapped by the `jax.vmap` that maps `leaf`
    (the same values); `tree` itself if `leaf` is None.

    For a loop's initial carry: under `jax.vmap`, JAX finds which of a loop's values
    are mapped by batching the loop body's program until that set stops growing
    (`lax.while_loop`, `lax.scan`), then, for a while loop, once more. A carry that
    starts unmapped and is mapped after one iteration (an accumulator of zeros, a
    buffer the body writes mapped values to) costs one more batching of the whole
    body at trace time; started mapped, the set never grows."""
    if leaf is None:
        return tree
    mark = _true_mapped_as(leaf)

    def _leaf(x):
        if not isinstance(x, jax.Array) or not _numeric(x):
            return x
        if batched_leaf(x, through_derivatives=True) is not None:
            return x  # already mapped
        return _mapped_by(mark, x)

    return jax.tree_util.tree_map(_leaf, tree)


def batched_like(buffers: list, values: list) -> list:
    """Each of `buffers` mapped by a `jax.vmap` exactly where the value paired with
    it (of `values`, the same length) is, the same arrays otherwise: for a buffer
    that a loop writes that value into, so that it is mapped from the start (see
    `batched_as`). Unlike `batched_as` it needs no `jax.vmap` in sight when traced:
    a program traced first and batched later (a custom derivative's forward pass)
    gets its buffers mapped where its values turn out to be, and an unbatched
    program folds the selects away."""
    marks = {}

    def mark(value):
        if id(value) not in marks:
            marks[id(value)] = _true_mapped_as(value)
        return marks[id(value)]

    return [
        _mapped_by(mark(v), b) if _numeric(b) and jax.numpy.size(v) > 0 else b
        for b, v in zip(buffers, values, strict=True)
    ]


def mapped_from_start(tree, *sources):
    """`batched_as(tree, leaf)` with `leaf` a leaf of `sources` that the innermost
    `jax.vmap` maps (through derivatives taken inside it), if any: a loop's initial
    carry mapped from the start where its inputs are."""
    return batched_as(tree, batched_leaf(sources, through_derivatives=True))


def _derivative_traces_above(trace):
    """`(derivative traces, first other trace)`: the derivative traces (`jax.grad`,
    `jax.jvp`, `jax.linearize`) from `trace` outwards, innermost first, up to the
    first trace of another kind. ([], trace) where that cannot be read."""
    try:
        _, classify = _trace_kinds()
    except LookupError:
        return [], trace
    derivatives = []
    while trace is not None and classify(trace) in ("reverse", "forward", "linearize"):
        derivatives.append(trace)
        # (Not past a boundary of `outer_transforms_hidden`.)
        trace = _parent(trace)
    return derivatives, trace


def _primal_under(leaf, derivatives):
    """The value `leaf` differentiates at: the primal of its tracer of each of
    `derivatives` (innermost first) in turn; `leaf` itself where it is not one."""
    for trace in derivatives:
        if getattr(leaf, "_trace", None) is not trace:
            continue
        primal = getattr(leaf, "primal", None)
        if primal is None:
            return None
        leaf = primal
    return leaf


def is_staged() -> bool:
    """Whether the computation is being staged into a program (traced under `jax.jit`,
    inside control flow, `jax.checkpoint`, ...) or run by a transformation other than
    an eager `jax.vmap`, `jax.grad`, `jax.jvp` or `jax.linearize` (e.g. `shard_map`),
    rather than run eagerly. True where it cannot tell: this only decides whether an
    eager call is compiled as one program, which must not change results."""
    core, ad, batching = _core, _ad, _batching
    if core is None:
        return True
    try:
        trace = core.trace_ctx.trace
        eager = (core.EvalTrace, ad.JVPTrace, batching.BatchTrace)
    except AttributeError:
        return True
    linearize_trace = getattr(ad, "LinearizeTrace", None)
    if linearize_trace is not None:
        eager = eager + (linearize_trace,)
    while trace is not None:
        if type(trace) not in eager:
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def hashable_statics(tree) -> bool:
    """Whether everything in `tree` that is not an array (the PyTree structure, with
    the static fields of Modules, and the non-array leaves) can be hashed, as
    `equinox.filter_jit` needs to cache a call by it."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    try:
        hash(treedef)
        hash(tuple(x for x in leaves if not isinstance(x, (jax.Array, _np.ndarray))))
    except TypeError:
        return False
    return True

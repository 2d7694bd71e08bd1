"""A small adaptive solve compiled by XLA into one CPU kernel.

XLA's CPU runtime runs a program as a sequence of compiled kernels ("thunks"), one
per fused group of operations, and a while loop's body as such a sequence on every
iteration. For a small ODE each kernel does a few dozen floating-point operations,
so a solve's run time is mostly the cost of dispatching some twenty-five kernels per
step (measured with a kernel profile of Lotka-Volterra with Tsit5, 225 steps).

XLA can instead compile a computation called through a `call` instruction that
carries the frontend attribute `xla_cpu_small_call="true"` into a single kernel: one
LLVM function, its loops and branches included. Its own passes do so for while
loops whose iteration reads and writes under 1 KiB and that contain no operation
its single-kernel emitter lacks; a solve's loop fails the first test (it carries
the save buffers) and usually the second (the error estimate's dot product). Here
the solve's setup, loop and solution (the arrays built from the loop's final state)
are traced once as a nested `jax.jit`, whose call XLA's inliner keeps when it
carries `inlineable="false"`, and both attributes are set on it with
`jax.experimental.xla_metadata.set_xla_metadata`.

That emitter does not implement every operation: scatters with several indices,
sorting, FFTs, custom calls (LAPACK, callbacks), convolutions and matrix-matrix
products fail to compile in it. So the traced equations are checked first, and the
call is left to XLA's inliner (the usual program) unless every primitive in them,
nested bodies included, is on a list of primitives whose lowering that emitter
handles (`_ELEMENTAL`; single-index scatters, which XLA rewrites as in-place
updates; products of a vector with a vector or a small matrix). Large loops keep the
usual program too, where a kernel per operation lets XLA spread the work over
threads and compiles in less time.

The emitter also gives the kernel only the buffers that the called computation's
instructions use, and aborts the process (an XLA check failure) on a parameter that
none uses: an input the loop ignores, or one that XLA found constant and copied
into the computation. So the call returns its inputs too, and takes them through an
optimisation barrier (see `call`).

Used on CPU, without `jax.vmap` or derivatives (their loops are larger, and XLA's
own passes handle theirs), for adaptive steps (see `diffeqsolve.py` for constant
steps), and only where this JAX has the per-value form of `set_xla_metadata`. Under
one `jax.vmap`, a solve on a Brownian tree runs its members one after another, each
as such a kernel (`call_per_member`).
"""

import inspect
import math
import re
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Primitive, jaxpr_as_fun
from jax.interpreters import ad, batching, mlir

from .._transforms import (
    active_transforms,
    differentiation_levels,
    is_batched,
    outer_transforms_hidden,
)

try:  # pragma: no cover - depends on the JAX version
    from jax.experimental.xla_metadata import set_xla_metadata as _set_xla_metadata
except ImportError:  # pragma: no cover
    _set_xla_metadata = None


def _supported() -> bool:
    """Whether this JAX has what `call` uses: `jax.jit(...).trace` and the form of
    `set_xla_metadata` that marks the operation computing a value."""
    if _set_xla_metadata is None or not hasattr(jax.jit(lambda: None), "trace"):
        return False
    try:
        parameters = inspect.signature(_set_xla_metadata).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in parameters.values()
    )


_SUPPORTED = _supported()


# Two identity primitives, so that the call stays what it was traced as when a
# transformation reaches it later (`jax.vmap` or `jax.jvp` of a function already
# traced under `jax.jit`, whose cached program JAX transforms without tracing it
# again): `_barrier` is XLA's optimisation barrier on values, through which
# derivatives pass as if it were not there (JAX's own barrier would turn absent
# derivatives into zeros, and differentiate the whole solve); `_mark` attaches the
# attributes to the call computing its input, and does nothing once batched or
# differentiated, where the call's operations were not checked.
_barrier_p = Primitive("diffeqx_barrier")
_barrier_p.multiple_results = True
_barrier_p.def_impl(lambda *xs: list(jax.lax.optimization_barrier(tuple(xs))))
_barrier_p.def_abstract_eval(lambda *avals: list(avals))
mlir.register_lowering(
    _barrier_p,
    mlir.lower_fun(
        lambda *xs: list(jax.lax.optimization_barrier(tuple(xs))),
        multiple_results=True,
    ),
)
batching.primitive_batchers[_barrier_p] = lambda args, dims: (
    _barrier_p.bind(*args),
    list(dims),
)
ad.primitive_jvps[_barrier_p] = lambda primals, tangents: (
    _barrier_p.bind(*primals),
    list(tangents),
)

# `_mark` takes the call's outputs too, as operands it ignores: when a
# transformation batches the call (any output batched, though the marker, a
# constant, is not), its batching rule runs and drops the attributes.
_mark_p = Primitive("diffeqx_one_kernel")
_mark_p.def_impl(lambda x, *outputs: x)
_mark_p.def_abstract_eval(lambda aval, *outputs: aval)
if _SUPPORTED:
    mlir.register_lowering(
        _mark_p,
        mlir.lower_fun(
            lambda x, *outputs: _set_xla_metadata(
                x, inlineable="false", xla_cpu_small_call="true"
            ),
            multiple_results=False,
        ),
        # The attributes go on the operation computing the value passed in, not
        # on a cached function of this lowering.
        cacheable=False,
    )
batching.primitive_batchers[_mark_p] = lambda args, dims: (args[0], dims[0])
ad.primitive_jvps[_mark_p] = lambda primals, tangents: (primals[0], tangents[0])


def _barrier(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, _barrier_p.bind(*leaves))


# Primitives whose lowering XLA's single-kernel CPU emitter compiles: elementwise
# arithmetic and comparisons, shape operations, reductions, gathers and control flow
# (checked on this JAX and XLA; see tests/test_one_kernel.py). Anything else keeps
# the loop on the usual path.
_ELEMENTAL = frozenset(
    """
    abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp cos cosh
    div eq erf erf_inv erfc exp exp2 expm1 floor ge gt integer_pow is_finite
    le lgamma digamma log log1p logistic lt max min mul ne neg nextafter not or pow
    rem round rsqrt select_n shift_left shift_right_arithmetic
    shift_right_logical sign sin sinh sqrt square sub tan tanh xor population_count
    clz convert_element_type bitcast_convert_type copy copy_p reduce_precision
    broadcast_in_dim reshape squeeze expand_dims transpose rev slice dynamic_slice
    dynamic_update_slice concatenate pad iota stack split
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor
    argmax argmin gather
    while cond scan jit pjit closed_call core_call remat checkpoint
    custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr custom_lin
    stop_gradient optimization_barrier diffeqx_barrier name
    threefry2x32 random_bits random_wrap random_unwrap random_seed random_fold_in
    select_if_vmap nonbatchable unvmap_any unvmap_all unvmap_max
    nondifferentiable_backward diffeqx_reverse_only
    """.split()
)

# Single-index in-place updates (`x.at[i].set(v)`, Equinox's loop buffers): XLA
# rewrites a scatter of one index into an in-place update before emitting it.
_SINGLE_INDEX_SCATTERS = frozenset({"scatter", "maybe_set"})

# Solves of more operations than this (the traced setup and loop, nested bodies
# included) keep the usual program: one LLVM function's optimisation time grows
# faster than linearly with its size, and the arithmetic of such a solve outweighs
# the kernels' dispatch (measured on 2 CPU cores, a 32-state field of 150
# operations, 1,512 equations: compile 1.1-1.2x the usual program's time, the same
# run time; a 2-state field, 538 equations, compiled in about 0.7x; an adaptive
# SPaRK solve on a Brownian tree, 1,238 equations, most of them the tree's queries,
# compiled in about 0.7x and ran in about 0.5x).
_MAX_EQUATIONS = 1300
# ... as do loops computing values larger than this (elements) in their bodies,
# where a kernel per operation lets XLA spread the work over threads.
_MAX_ELEMENTS = 4096

# The largest operand of a vector-matrix product in such a loop (elements). Not
# more: with a 40 by 40 matrix in the field and saves at given times, XLA's default
# code generator aborted the process on the kernel (the "explicit index" check
# failure; measured 2026-12-06, see tests/test_one_kernel.py).
_MAX_PRODUCT_ELEMENTS = 1024

_LOOPS = frozenset({"while", "scan"})

# Equations whose outputs are carried or updated in place, not computed elementwise
# (a save buffer passed through a branch or written one row at a time).
_CARRIERS = frozenset(
    {
        "while",
        "cond",
        "scan",
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
        "dynamic_update_slice",
        "scatter",
        "maybe_set",
        "copy",
        "copy_p",
        "select_if_vmap",
        "nonbatchable",
        "diffeqx_reverse_only",
        "optimization_barrier",
        "diffeqx_barrier",
        "name",
    }
)


_tracing = threading.local()

# Off: every loop takes the usual path (for comparisons; not public).
enabled = True
# Off: a batched solve is traced batched, not member by member (for comparisons).
per_member = True


def possible() -> bool:
    """Whether a solve traced now may run its loop as one kernel (before looking at
    the loop itself)."""
    return (
        enabled
        and not getattr(_tracing, "active", False)
        and _SUPPORTED
        and jax.default_backend() == "cpu"
        and not is_batched()
        and not differentiation_levels()
    )


def _sub_jaxprs(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _sub_jaxprs(item)
        return
    inner = getattr(value, "jaxpr", None)
    if inner is not None and hasattr(value, "consts"):  # a ClosedJaxpr
        yield inner
    elif hasattr(value, "eqns") and hasattr(value, "invars"):  # a Jaxpr
        yield value


def _size(aval) -> int:
    shape = getattr(aval, "shape", None)
    return 0 if shape is None else math.prod(shape)


def _single_index(eqn) -> bool:
    if eqn.primitive.name == "maybe_set":
        # (pred, buffer, value, index): one (scalar) index.
        return all(_size(v.aval) <= 1 for v in eqn.invars[3:])
    # scatter(operand, indices, updates): indices' last axis is the index vector.
    shape = eqn.invars[1].aval.shape
    return math.prod(shape[:-1]) == 1 if shape else True


def _small_vector_product(eqn) -> bool:
    """A product of a vector with a vector or a small matrix (no batch axes), which
    the single-kernel emitter compiles; not a matrix-matrix product, whose kernels
    may call a library or be fused in ways that emitter does not implement."""
    (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval for v in eqn.invars)
    return (
        not lhs_batch
        and min(len(lhs.shape), len(rhs.shape)) <= 1
        and max(len(lhs.shape), len(rhs.shape)) <= 2
        and max(_size(lhs), _size(rhs)) <= _MAX_PRODUCT_ELEMENTS
    )


# StableHLO operations a Lineax `linear_solve` may lower to and still be compiled
# in the kernel (see `_linear_solve_fits`): elementwise arithmetic, comparisons,
# shape operations, reductions and control flow.
_LOWERED_ELEMENTAL = frozenset(
    """
    abs add and broadcast_in_dim compare constant convert divide is_finite maximum
    minimum multiply negate not or reduce reshape select slice subtract xor sqrt
    rsqrt sign clamp concatenate iota transpose dynamic_slice dynamic_update_slice
    while case if return optimization_barrier exponential log power floor ceil
    remainder bitcast_convert get_tuple_element tuple pad
    """.split()
)


def _linear_solve_fits(eqn) -> bool:
    """Whether a Lineax `linear_solve` equation lowers to operations the
    single-kernel emitter compiles. It is one primitive whose lowering depends on
    the solver Lineax picks when it is traced: a division for a diagonal (e.g.
    1-by-1) operator, such as an event's Newton step; a LAPACK call for LU and
    other factorisations. So its own lowering is checked."""
    try:
        lowered = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params)).lower(
            *(v.aval for v in eqn.invars)
        )
        text = lowered.as_text()
    except Exception:  # noqa: BLE001 - anything unexpected keeps the usual program
        return False
    names = set(re.findall(r"\b(?:stablehlo|chlo)\.([a-z_]+)", text))
    return bool(names) and names <= _LOWERED_ELEMENTAL


def fits(jaxpr) -> bool:
    """Whether every equation of `jaxpr`, nested bodies included, is one the
    single-kernel emitter compiles, and the loops in it are small enough to
    benefit (no value of more than `_MAX_ELEMENTS` computed in a loop's body; the
    output buffers, filled once before the loop, may be larger)."""
    count = 0
    stack = [(jaxpr, False)]
    while stack:
        current, in_loop = stack.pop()
        for eqn in current.eqns:
            count += 1
            if count > _MAX_EQUATIONS:
                return False
            name = eqn.primitive.name
            if name in _SINGLE_INDEX_SCATTERS:
                if not _single_index(eqn):
                    return False
            elif name == "dot_general":
                if not _small_vector_product(eqn):
                    return False
            elif name == "linear_solve":
                if not _linear_solve_fits(eqn):
                    return False
            elif name not in _ELEMENTAL:
                return False
            if (
                in_loop
                and name not in _CARRIERS
                and any(_size(v.aval) > _MAX_ELEMENTS for v in eqn.outvars)
            ):
                return False
            body = in_loop or name in _LOOPS
            for value in eqn.params.values():
                stack.extend((sub, body) for sub in _sub_jaxprs(value))
    return True


def arrays_only(fn, inputs: tuple):
    """`(inner, dynamic, rebuild)`: `inner(dynamic)` computes the arrays of
    `fn(*inputs)` from the arrays `dynamic` of `inputs` (a function `jax.jit` can
    take), and `rebuild` puts the rest of `fn`'s output back around them."""
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    out_static = []

    def inner(dynamic):
        out = fn(*eqx.combine(dynamic, static))
        out_dynamic, s = eqx.partition(out, eqx.is_array)
        out_static.append(s)
        return out_dynamic

    def rebuild(out_dynamic):
        return eqx.combine(out_dynamic, out_static[-1])

    return inner, dynamic, rebuild


def call(fn, *inputs, otherwise=None):
    """`fn(*inputs)`, traced once as a nested `jax.jit`, whose call XLA compiles
    into one kernel when its equations allow (see the module's docstring), and
    otherwise inlines; or, given `otherwise` (a function of no arguments), returns
    `otherwise()` instead where they do not allow it."""
    return _call(fn, inputs, otherwise)[0]


def _call(fn, inputs, otherwise=None):
    """`(fn(*inputs), fitted)`: as `call`, and whether the call is one kernel."""
    inner, dynamic, rebuild = arrays_only(fn, inputs)

    # The single-kernel emitter gives the kernel the buffers that the called
    # computation's instructions use, and aborts (an XLA check failure, not an
    # error) on a parameter that none uses: an input the loop ignores, or one XLA
    # finds constant and copies into the computation. So the call returns its
    # inputs too (through a barrier, so that JAX does not pass them around it),
    # and, below, takes them through a barrier, so that XLA finds none constant.
    # It also returns a marker computed in it (an output JAX cannot pass around
    # the call, as it may some of the loop's), which carries the attributes.
    def inner_and_inputs(dynamic):
        marker = jnp.zeros((1,), jnp.int32)
        return inner(dynamic), marker, _barrier(dynamic)

    jitted = jax.jit(inner_and_inputs)
    _tracing.active = True  # no call of this kind nested in this one
    try:
        jaxpr = jitted.trace(dynamic).jaxpr.jaxpr
    finally:
        _tracing.active = False
    if not fits(jaxpr):
        if otherwise is not None:
            return otherwise(), False
        # Found in JAX's cache (not traced again); JAX drops the unused outputs,
        # and XLA inlines the call: the program of the loop without it.
        out_dynamic, _, _ = jitted(dynamic)
        return rebuild(out_dynamic), False
    out_dynamic, marker, returned = jitted(_barrier(dynamic))
    marker = _mark_p.bind(marker, *jax.tree.leaves(out_dynamic))
    # JAX keeps a barrier, with all its inputs, when one of its outputs is used:
    # every output of the solve's loop goes through one with the marker and the
    # returned inputs.
    out_dynamic, _, _ = _barrier((out_dynamic, marker, returned))
    return rebuild(out_dynamic), True


def possible_per_member() -> bool:
    """Whether a solve traced now, under one `jax.vmap` and nothing else, may run
    its members one after another, each as one kernel (see `call_per_member`)."""
    return (
        enabled
        and per_member
        and not getattr(_tracing, "active", False)
        and _SUPPORTED
        and jax.default_backend() == "cpu"
        and active_transforms() == ["batch"]
    )


def call_per_member(fn, *inputs, precheck=None):
    """Under `jax.vmap`: `fn(*inputs)` computed for the members of the batch one
    after another (a `lax.map`), each member's solve one kernel (`call`) traced
    once without the batch, when that solve fits one; None otherwise (the caller
    then traces the batched solve as usual). Each member's values are then those
    of the solve of that member alone, to the bit.

    Chosen for solves driven by a `VirtualBrownianTree` (see `diffeqsolve.py`),
    whose queries walk the tree to a depth that differs from member to member,
    and which the batched loop walks to the deepest member's depth at every step.

    `precheck`, a function of no arguments (the vector field at the start), is
    traced first: when it does not fit one kernel, neither does the solve, which is
    then not traced unbatched at all."""
    if precheck is not None:
        with outer_transforms_hidden():
            if not fits(jax.make_jaxpr(precheck)().jaxpr):
                return None
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    out_static = []

    def member(dynamic):
        with outer_transforms_hidden():
            out, fitted = _call(fn, eqx.combine(dynamic, static))
        out_dynamic, s = eqx.partition(out, eqx.is_array)
        out_static.append((s, fitted))
        return out_dynamic

    # Traced once, unbatched, as a jaxpr whose constants are the arrays `fn`
    # closes over (tracers of the solve being traced): those become explicit
    # inputs, as the batching rule below runs once this trace is over.
    closed, out_shape = jax.make_jaxpr(member, return_shape=True)(dynamic)
    static_out, fitted = out_static[-1]
    if not fitted:
        return None
    jaxpr = closed.jaxpr
    out_tree = jax.tree.structure(out_shape)

    def evaluate(consts, flat):
        program = jaxpr_as_fun(ClosedJaxpr(jaxpr, consts))
        return jax.tree.unflatten(out_tree, program(*flat))

    members = jax.custom_batching.custom_vmap(evaluate)

    @members.def_vmap
    def _(axis_size, in_batched, consts, flat):
        del axis_size
        batched = list(in_batched[0]) + list(in_batched[1])
        values = list(consts) + list(flat)
        count = len(consts)

        def one(mapped):
            it = iter(mapped)
            merged = [
                next(it) if b else x for x, b in zip(values, batched, strict=True)
            ]
            return evaluate(merged[:count], merged[count:])

        out = jax.lax.map(one, [x for x, b in zip(values, batched, strict=True) if b])
        return out, jax.tree.map(lambda _: True, out)

    flat = jax.tree.leaves(dynamic)
    return eqx.combine(members(list(closed.consts), flat), static_out)

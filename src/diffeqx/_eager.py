"""Eager calls compiled once: a function called outside `jax.jit` with concrete (or
eagerly transformed) arguments, compiled as one program and cached.

`call_compiled(fn, args, traced)` runs `fn(*args, *traced)` through `jax.jit`:

- the array leaves of `args` (JAX and NumPy arrays, and the tracers of an eager
  `jax.vmap` or `jax.grad`) are traced; every other leaf of `args` (Python numbers,
  functions, settings) is static, part of the cache key, as under
  `equinox.filter_jit`;
- everything in `traced` is traced, Python numbers included (as weakly typed
  values, as `jnp.asarray` makes them): a new value compiles nothing new;
- the transformations applied to the call (`active_transforms`) are part of the
  key too, as they choose how a solve runs.

The output's non-array leaves are returned as they were made while tracing.

This is what `equinox.filter_jit` does, but cheaper per call: the arguments are
flattened once and the key hashed once, and `jax.jit`'s own dispatch does the rest
(measured on CPU: a repeated eager call of a 1,000-step Euler solve, checks
included, from 0.46 ms through `equinox.filter_jit` to 0.19 ms).

With `staged=True` (a call inside a function being traced), `fn` is traced as a
`jax.jit` nested in that function's trace, which JAX keeps and reuses when the
enclosing function is traced again with the same key: that is how a solve inside a
recompiled training step avoids being traced again. Under `jax.vmap` (eager or
traced) the key also holds the size of the batch and which inputs the innermost
`jax.vmap` maps, which `jax.jit` does not see and a solve reads while it is traced
(`mapped_inputs` in `_transforms.py` tells the traced function which of its inputs
those are).

As under `equinox.filter_jit` (and so as an eager call of Diffrax's `diffeqsolve`),
the call waits for its result, and an error raised inside the program by
`equinox.error_if` (a failed solve with `throw=True`) comes out as an
`equinox.EquinoxRuntimeError` carrying the error's message, rather than as JAX's
runtime error wrapping a callback's traceback.
"""

import functools
import logging

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np

from ._transforms import (
    active_transforms,
    batch_size,
    batched_leaf,
    is_staged,
    mapped_inputs,
)

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic)


class _Traced:
    """Stands for a traced leaf in a static key."""

    __slots__ = ()

    def __repr__(self):
        return "<traced>"


_TRACED = _Traced()


class _Key:
    """The static part of a call: the function, the arguments' structure, their
    non-array leaves (with their types: `1`, `1.0` and `True` are different keys)
    and the transformations applied. Hashed once."""

    __slots__ = ("fn", "treedef", "statics", "transforms", "_hash")

    def __init__(self, fn, treedef, statics, transforms):
        self.fn, self.treedef = fn, treedef
        self.statics, self.transforms = statics, transforms
        self._hash = hash((fn, treedef, statics, transforms))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return (
            isinstance(other, _Key)
            and self._hash == other._hash
            and self.fn is other.fn
            and self.treedef == other.treedef
            and self.statics == other.statics
            and self.transforms == other.transforms
        )


@jtu.register_static
class _Output:
    """The output's structure and non-array leaves, carried through `jax.jit` as
    static data (a PyTree node without children)."""

    __slots__ = ("treedef", "statics")

    def __init__(self, treedef, statics):
        self.treedef, self.statics = treedef, statics


def _run(key: _Key, dynamic: list, traced: tuple):
    leaves = [
        x if s is _TRACED else s[1] for s, x in zip(key.statics, dynamic, strict=True)
    ]
    _, _, mapped = key.transforms
    inputs = [x for x in dynamic if x is not None] + list(traced)
    with mapped_inputs(
        [x for x, m in zip(inputs, mapped, strict=True) if m] if mapped else None
    ):
        out = key.fn(*jtu.tree_unflatten(key.treedef, leaves), *traced)
    out_leaves, out_treedef = jtu.tree_flatten(out)
    arrays = [isinstance(x, _ARRAY_TYPES) for x in out_leaves]
    return (
        [x if a else None for x, a in zip(out_leaves, arrays, strict=True)],
        _Output(
            out_treedef,
            tuple(None if a else x for x, a in zip(out_leaves, arrays, strict=True)),
        ),
    )


def _new_cache(name):
    # A function of its own for each cache, as JAX keys its traces by the function;
    # `name` is what profiles and compiled programs call it.
    def call(key, dynamic, traced):
        return _run(key, dynamic, traced)

    call.__name__ = call.__qualname__ = name
    return jax.jit(call, static_argnums=0)


# Eager calls, and calls nested in a trace (`staged=True`; only `diffeqsolve` makes
# them), kept apart.
_run_jitted = _new_cache("diffeqx_call")
_nested_jitted = _new_cache("diffeqsolve")


def forget_traces():
    """Drops the traces kept for nested calls (`call_compiled(..., staged=True)`): for
    code (tests) that changes a setting a solve reads while it is traced, which is
    not in the key."""
    global _nested_jitted
    _nested_jitted = _new_cache("diffeqsolve")


def _transforms_key(inputs) -> tuple:
    """What a traced function may read of the transformations applied to its call,
    and that `jax.jit` does not key its cache by: their kinds, the size of the
    batch, and which inputs the innermost `jax.vmap` maps, derivatives taken inside
    it aside (as `batched_leaf` tells them apart; None when there is no such
    `jax.vmap`)."""
    transforms = tuple(active_transforms())
    if "batch" not in transforms:
        return transforms, 1, None
    mapped = tuple(
        batched_leaf(x, through_derivatives=True) is not None for x in inputs
    )
    return transforms, batch_size(), (mapped if any(mapped) else None)


def call_compiled(fn, args: tuple, traced: tuple = (), *, staged: bool = False):
    """`fn(*args, *traced)`, compiled once per static key and cached (see the
    module's docstring); `None` when something static in `args` cannot be hashed
    (the caller then runs `fn` as it is).

    With `staged=True` the call is part of a program being traced: `fn` is traced
    as a `jax.jit` nested in it, whose trace JAX reuses when the enclosing program
    is traced again with the same key."""
    leaves, treedef = jtu.tree_flatten(args)
    statics = tuple(
        _TRACED if isinstance(x, _ARRAY_TYPES) else (type(x), x) for x in leaves
    )
    dynamic = [
        x if s is _TRACED else None for x, s in zip(leaves, statics, strict=True)
    ]
    try:
        key = _Key(
            fn,
            treedef,
            statics,
            _transforms_key([x for x in dynamic if x is not None] + list(traced)),
        )
    except TypeError:
        return None
    if staged:
        out_arrays, out = _nested_jitted(key, dynamic, traced)
        return jtu.tree_unflatten(
            out.treedef,
            [
                x if s is None else s
                for x, s in zip(out_arrays, out.statics, strict=True)
            ],
        )
    quiet = _QuietEquinoxErrors()
    callback_logger = logging.getLogger("jax._src.callback")
    callback_logger.addFilter(quiet)
    try:
        out_arrays, out = _run_jitted(key, dynamic, traced)
        jax.block_until_ready(
            [
                x
                for x in out_arrays
                if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
            ]
        )
    except jax.errors.JaxRuntimeError as error:
        message = _equinox_message(str(error))
        if message is None:
            raise
        raise eqx.EquinoxRuntimeError(message) from None
    finally:
        callback_logger.removeFilter(quiet)
    return jtu.tree_unflatten(
        out.treedef,
        [x if s is None else s for x, s in zip(out_arrays, out.statics, strict=True)],
    )


# How `equinox.error_if`'s error appears in the text of JAX's runtime error.
_EQUINOX_ERROR_TYPE = "_EquinoxRuntimeError"
_EQUINOX_MARKER = _EQUINOX_ERROR_TYPE + ": "


def _equinox_message(text: str):
    """The message of an `equinox.error_if` error inside JAX's runtime error `text`;
    None if it holds none."""
    start = text.find(_EQUINOX_MARKER)
    if start < 0:
        return None
    message = text[start + len(_EQUINOX_MARKER) :]
    return message.split("\n\n\n", 1)[0].strip()


class _QuietEquinoxErrors(logging.Filter):
    """Drops JAX's log record of a callback that raised an `equinox.error_if` error
    (the error itself is raised to the caller)."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return type(error).__name__ != _EQUINOX_ERROR_TYPE


# ---- queries of paths and interpolations -----------------------------------------


def compiled_query(method=None, *, before=None):
    """Decorates a query method of a path (`evaluate`, `derivative`): called eagerly
    (outside `jax.jit`), it runs compiled as one program, cached by `call_compiled`.
    Op by op, each call would run dozens of small programs (measured on CPU: a
    `VirtualBrownianTree.evaluate` 40 ms per call, a `LinearInterpolation.evaluate`
    5 ms). Times (Python numbers and arrays, see `_is_time`) are traced, so that a
    new time compiles nothing new; other values (`left`, `use_levy`) are static.
    Traced (under `jax.jit`, or where the trace cannot be told), the method runs as
    it is.

    `before`, if given, names a method that runs first, on the call's own
    arguments: for the checks that a concrete time allows (and that a traced one
    would turn into a NaN rather than an error)."""
    if method is None:
        return functools.partial(compiled_query, before=before)

    @functools.wraps(method)
    def query(self, *args, **kwargs):
        if not is_staged():
            if before is not None:
                getattr(self, before)(*args, **kwargs)
            names = tuple(sorted(kwargs))
            values = args + tuple(kwargs[name] for name in names)
            numbers = tuple(map(_is_time, values))
            others = tuple(
                None if n else v for v, n in zip(values, numbers, strict=True)
            )
            out = call_compiled(
                _run_query,
                (method, self, len(args), names, numbers, others),
                tuple(v for v, n in zip(values, numbers, strict=True) if n),
            )
            if out is not None:
                return out
        return method(self, *args, **kwargs)

    return query


def _is_time(x) -> bool:
    """Whether an argument of a query is traced as a time, in one place of the
    compiled call whether it is a Python number or an array (so that either reuses
    the other's program): a number, or an array of numbers; not a flag."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    return isinstance(x, _ARRAY_TYPES) and str(x.dtype) != "bool"


def _run_query(method, obj, num_args, names, numbers, others, *traced):
    traced = iter(traced)
    values = [next(traced) if n else v for v, n in zip(others, numbers, strict=True)]
    kwargs = dict(zip(names, values[num_args:], strict=True))
    return method(obj, *values[:num_args], **kwargs)

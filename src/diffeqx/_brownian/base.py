"""`AbstractBrownianPath`, and what the Brownian paths share: checking `shape` and
`key`, and standard normal samples addressed by integer counters.

Counter-based sampling: a normal sample is a pure function of `(key words, counter
words)`, computed by the Threefry-2x32 hash (the one behind `jax.random`'s default
keys), an exact map from its bits to a probability strictly inside `(0, 1)` (52 bits
of it for float64, 24 otherwise), then the normal quantile function (Wichura's
algorithm AS 241). Many samples at arbitrary counters come from one vectorised
hash, so a path can address "the sample belonging to this cell of this tree" or
"to this interval" directly, without sequential key splitting.
"""

import abc
import dataclasses
import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._path.base import AbstractPath
from .._path.local import accumulation_dtype
from .levy import AbstractBrownianIncrement


class AbstractBrownianPath(AbstractPath):
    """Base class of Brownian motions: a path whose increments over disjoint
    intervals are independent Gaussians with variance the interval's length.

    Subclasses have a `shape` (a PyTree of `jax.ShapeDtypeStruct`), a `levy_area`
    (one of [`diffeqx.BrownianIncrement`][], [`diffeqx.SpaceTimeLevyArea`][],
    [`diffeqx.SpaceTimeTimeLevyArea`][]) and implement `evaluate`.
    """

    levy_area: eqx.AbstractVar[type[AbstractBrownianIncrement]]

    @abc.abstractmethod
    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        """The increment `W(t1) - W(t0)` of the Brownian motion.

        **Arguments:**

        - `t0`, `t1`: times. If `t1` is `None`, the value `W(t0)` (as an increment
          from the start of the path, where the path has one) is returned instead.
        - `left`: ignored: Brownian motion is continuous.
        - `use_levy`: if `True`, return an instance of the path's `levy_area` type
          (`dt`, `W`, and `H`, `K` where it has them) instead of `W` alone.

        **Returns:** a PyTree with the structure of `shape` (or a `levy_area`
        instance of such PyTrees).
        """

    def _vmap_exact(self, use_levy: bool) -> bool:
        """Whether `jax.vmap(self.evaluate)` over many intervals gives, bit for bit,
        what `evaluate` gives for each one (elementwise arithmetic only). Then a
        fixed-step solve may evaluate a block of steps' samples at once (see
        `_solve/tabulate.py`). False unless a subclass knows better."""
        return False

    def _tabulator(self, left: bool, use_levy: bool, num_steps: int):
        """How a fixed-step solve of `num_steps` steps computes a block of its
        steps' samples at once (when `_vmap_exact(use_levy)`): a function of the
        steps' start and end times (1-d arrays) that returns their samples,
        stacked, exactly as `evaluate` returns each. Called once per solve, before
        the steps, so that a path can prepare there what every block shares."""
        return jax.vmap(lambda a, b: self.evaluate(a, b, left=left, use_levy=use_levy))


def normalise_shape(shape, owner: str) -> PyTree[jax.ShapeDtypeStruct]:
    """`shape` as a PyTree of `jax.ShapeDtypeStruct`s of floating dtypes, real or
    complex: a tuple of integers becomes one struct of the default floating dtype."""
    if isinstance(shape, tuple) and all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape
    ):
        if any(n < 0 for n in shape):
            raise ValueError(
                f"`{owner}(shape=...)`: dimensions must be non-negative, got {shape}."
            )
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        return jax.ShapeDtypeStruct(tuple(int(n) for n in shape), dtype)
    leaves = jtu.tree_leaves(shape)
    if not leaves or not all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
        raise ValueError(
            f"`{owner}(shape=...)` must be a tuple of integers (e.g. `(3,)`, or `()` "
            "for a scalar Brownian motion) or a PyTree of `jax.ShapeDtypeStruct`s "
            f"(one per leaf, with its own dtype), but got {shape!r}."
        )
    for leaf in leaves:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise ValueError(
                f"`{owner}(shape=...)`: every leaf must have a floating dtype, real or "
                f"complex (e.g. float32, float64, complex64), but got {leaf}."
            )
    return shape


def sampled_shape(shape) -> PyTree[jax.ShapeDtypeStruct]:
    """The real Brownian motion a path samples for `shape`: a complex leaf becomes
    its real and imaginary parts, a trailing axis of 2 in the matching real dtype;
    a half-precision leaf (float16, bfloat16) is sampled in float32, whose normal
    quantiles and bridge arithmetic it cannot hold, and rounded at the end."""

    def real(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            return jax.ShapeDtypeStruct(leaf.shape + (2,), jnp.finfo(leaf.dtype).dtype)
        dtype = accumulation_dtype(leaf.dtype)
        return leaf if dtype == leaf.dtype else jax.ShapeDtypeStruct(leaf.shape, dtype)

    return jtu.tree_map(real, shape)


def as_shape(sample, shape):
    """A sample drawn on `sampled_shape(shape)` (an increment, or a Lévy area) on
    `shape`; unchanged when every leaf is sampled as it is. Each complex leaf is
    `(X + iY) / sqrt(2)` for the independent real parts `X`, `Y`, so that, as in
    Diffrax, its real and imaginary parts are independent with half the variance
    each (`E|W|^2 = dt`), and its `dt` stays real; a half-precision leaf is rounded
    to its dtype."""

    def leaf(x, s):
        if jnp.issubdtype(s.dtype, jnp.complexfloating):
            return lax.complex(x[..., 0], x[..., 1]) * np.sqrt(0.5).item()
        return x.astype(s.dtype)

    def interval(x, s):
        return x if accumulation_dtype(s.dtype) == s.dtype else x.astype(s.dtype)

    def tree(x, fn=leaf):
        return jtu.tree_map(fn, x, shape)

    from .levy import AbstractBrownianIncrement

    if jtu.tree_leaves(sampled_shape(shape)) == jtu.tree_leaves(shape):
        return sample
    if not isinstance(sample, AbstractBrownianIncrement):
        return tree(sample)
    fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
    return dataclasses.replace(
        sample,
        **{
            name: tree(value, interval if name == "dt" else leaf)
            for name, value in fields.items()
        },
    )


def check_key(key, owner: str):
    """`key` if it is a JAX PRNG key: a typed key (`jax.random.key`) of shape `()` or
    a legacy `uint32` key (`jax.random.PRNGKey`) of shape `(2,)` or `(4,)`."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return key
    elif dtype == jnp.uint32 and shape in ((2,), (4,)):
        return key
    raise ValueError(
        f"`{owner}(key=...)` must be a single JAX PRNG key (`jax.random.key(seed)`, "
        "or a legacy `jax.random.PRNGKey(seed)`), but got "
        f"{_describe(key)}. For a batch of Brownian motions, build one per key "
        "under `jax.vmap`."
    )


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array of shape {tuple(x.shape)} and dtype {x.dtype}"
    return repr(x)


def key_words(key, *shape: int):
    """Independent Threefry keys derived from `key` (of any PRNG implementation):
    `uint32` words of shape `(*shape, 2)`, the values of `jax.random.bits(key,
    (*shape, 2), jnp.uint32)`.

    For a Threefry key (JAX's default) they are computed here with `threefry2x32`
    below, as JAX does with its default `jax_threefry_partitionable=True`: the
    hash of the flat index, its two output words xor-ed. JAX's own CPU lowering of
    the hash is a loop whose body XLA compiles into large kernels, in every solve
    step that queries a tree (measured: 15% of the LLVM code of an adaptive SPaRK
    solve under `jax.vmap`); this one is elementwise operations that XLA fuses
    into one small kernel. Other keys, and other settings, take
    `jax.random.bits`."""
    size = 2 * int(np.prod(shape, dtype=np.int64))
    data = _threefry_key_data(key)
    if data is None or size >= 2**32:
        return jax.random.bits(key, (*shape, 2), jnp.uint32)
    return _hashed_words(data, shape)


@ft.partial(jax.jit, static_argnums=1)  # as `_normals` below
def _hashed_words(data, shape):
    size = 2 * int(np.prod(shape, dtype=np.int64))
    index = jnp.arange(size, dtype=jnp.uint32)
    hi, lo = threefry2x32(data[..., 0], data[..., 1], jnp.uint32(0), index)
    words = (hi ^ lo).reshape(*shape, 2)
    # Divided by a 1 known only at run time, so that XLA computes the words once,
    # into memory, rather than fusing the hash into each computation that reads
    # them: fused into a loop-invariant selection of a tree's keys per cell (every
    # word read there many times), LLVM took minutes to compile the kernel (an
    # adaptive SPaRK solve of one path on a tree of depth 19).
    one = words.reshape(-1)[0] | jnp.uint32(1)
    return words // (one // one)


def _threefry_key_data(key):
    """The two `uint32` words of a Threefry key (typed, or a legacy `(2,)` array),
    or None for another PRNG, or where JAX would not sample bits as `key_words`
    computes them (`jax_threefry_partitionable` off)."""
    if not getattr(jax.config, "jax_threefry_partitionable", False):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    default_impl = str(getattr(jax.config, "jax_default_prng_impl", ""))
    if key.shape != (2,) or default_impl != "threefry2x32":
        return None
    return key


# Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw, "Parallel random numbers:
# as easy as 1, 2, 3", SC 2011): the rotation constants and key-schedule parity of that
# paper. Written out in elementwise operations so that XLA fuses the whole hash, and
# the samples it feeds, into one loop (JAX's own CPU lowering of the hash is a rolled
# loop, a sequence of separate kernels per call). It computes the same function as
# `jax.extend.random.threefry_2x32` (tested).
_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
_PARITY = 0x1BD11BDA


def _rotate_left(x, r: int):
    return jnp.left_shift(x, jnp.uint32(r)) | jnp.right_shift(x, jnp.uint32(32 - r))


def threefry2x32(key1, key2, x1, x2):
    """The Threefry-2x32 hash of the counters `(x1, x2)` under the key `(key1,
    key2)`: two `uint32` words per counter. All arguments broadcast."""
    schedule = (key1, key2, key1 ^ key2 ^ jnp.uint32(_PARITY))
    x1, x2 = x1 + key1, x2 + key2
    for block in range(5):
        for r in range(4):
            x1 = x1 + x2
            x2 = _rotate_left(x2, _ROTATIONS[(4 * block + r) % 8]) ^ x1
        injection = block + 1
        x1 = x1 + schedule[injection % 3]
        x2 = x2 + schedule[(injection + 1) % 3] + jnp.uint32(injection)
    return x1, x2


def times_pow2(x, n):
    """`x * 2**n` for an integer `n` (traced) with `|n| <= 33`: the same value as
    `jnp.ldexp(x, n)` where the result is a normal number, with 2**n built from
    its exponent bits (a few operations; `jnp.ldexp` takes about fifty, and a
    Brownian tree whose depth is known only at run time computes several in every
    query). `jnp.ldexp` for a dtype whose exponent cannot hold `2**-33`."""
    dtype = jnp.result_type(x)
    info = jnp.finfo(dtype)
    if info.minexp > -34 or info.bits not in (32, 64):
        return jnp.ldexp(x, n)
    ints = {32: jnp.int32, 64: jnp.int64}[info.bits]
    biased = jnp.asarray(n).astype(ints) + (info.maxexp - 1)
    power = lax.bitcast_convert_type(
        jnp.left_shift(biased, jnp.asarray(info.nmant, ints)), dtype
    )
    return x * power


def normals(words, counter1, counter2, dtype):
    """Standard normal samples in `dtype`, one per counter pair, hashed with the keys
    `words` (`uint32`, last axis the two key words). All of `words[..., 0]`,
    `counter1` and `counter2` broadcast against each other."""
    return _normals(words, counter1, counter2, jnp.dtype(dtype))


# A nested `jax.jit`: its few hundred operations are one call in the solve's
# program, which JAX traces, batches under `jax.vmap` and lowers once per shape
# (measured on the adaptive SPaRK row: tracing and lowering 0.76 s against 0.82 s;
# XLA inlines the call, so the program and its values are the same).
@ft.partial(jax.jit, static_argnums=3)
def _normals(words, counter1, counter2, dtype):
    hi, lo = threefry2x32(words[..., 0], words[..., 1], counter1, counter2)
    return bits_to_normal(hi, lo, dtype)


# Wichura's algorithm AS 241 (Applied Statistics 37(3), 1988, "The percentage points
# of the normal distribution"), PPND16: rational approximations of the normal quantile
# function, accurate to about 1e-16. Coefficients in increasing powers.
_CENTRAL = (
    (3.3871328727963666080, 1.3314166789178437745e2, 1.9715909503065514427e3,
     1.3731693765509461125e4, 4.5921953931549871457e4, 6.7265770927008700853e4,
     3.3430575583588128105e4, 2.5090809287301226727e3),
    (1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
     2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4,
     5.2264952788528545610e3),
)  # fmt: skip
_NEAR_TAIL = (
    (1.42343711074968357734, 4.63033784615654529590, 5.76949722146069140550,
     3.64784832476320460504, 1.27045825245236838258, 2.41780725177450611770e-1,
     2.27238449892691845833e-2, 7.74545014278341407640e-4),
    (1.0, 2.05319162663775882187, 1.67638483018380384940, 6.89767334985100004550e-1,
     1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
     1.05075007164441684324e-9),
)  # fmt: skip
_FAR_TAIL = (
    (6.65790464350110377720, 5.46378491116411436990, 1.78482653991729133580,
     2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
     2.71155556874348757815e-5, 2.01033439929228813265e-7),
    (1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1,
     1.48753612908506148525e-2, 7.86869131145613259100e-4, 1.84631831751005468180e-5,
     1.42151175831644588870e-7, 2.04426310338993978564e-15),
)  # fmt: skip


def _horner(coefficients, x):
    total = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        total = total * x + c
    return total


def _normal_quantile(q):
    """The standard normal quantile at probability `0.5 + q`, for `|q| < 0.5`.

    Every branch is computed and the right one selected; the result is one
    division, so XLA keeps it in one buffer rather than recomputing it in each of
    its readers."""
    r = 0.180625 - q * q
    central = (q * _horner(_CENTRAL[0], r), _horner(_CENTRAL[1], r))
    s = jnp.sqrt(-jnp.log(0.5 - jnp.abs(q)))  # exact argument where it is used
    far = s > 5.0
    s = s - jnp.where(far, 5.0, 1.6)
    tail = [
        _horner([jnp.where(far, f, n) for n, f in zip(near, far_, strict=True)], s)
        for near, far_ in zip(_NEAR_TAIL, _FAR_TAIL, strict=True)
    ]
    is_central = jnp.abs(q) <= 0.425
    numerator = jnp.where(is_central, central[0], jnp.sign(q) * tail[0])
    return numerator / jnp.where(is_central, central[1], tail[1])


def bits_to_normal(hi, lo, dtype):
    """A standard normal in `dtype` from 64 random bits (two `uint32` words): the
    bits give an odd multiple `q` of `2^-(n+1)` in `(-1/2, 1/2)` (n = 52 for float64,
    24 otherwise), exactly; the sample is the normal quantile at `1/2 + q`."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64:
        top = jnp.right_shift(hi, jnp.uint32(12)).astype(jnp.float64)  # 20 bits
        count = top * 2.0**32 + lo.astype(jnp.float64)  # 52 bits, exact
        return _normal_quantile((2.0 * count + 1.0 - 2.0**52) * 2.0**-53)
    top = jnp.right_shift(hi, jnp.uint32(8)).astype(jnp.int32)  # 24 bits
    odd = 2 * top + 1 - 2**24  # |odd| < 2^24: exact in float32
    q = odd.astype(jnp.float32) * jnp.float32(2.0**-25)
    return _normal_quantile(q).astype(dtype)


def time_dtype(*times: Any):
    """The floating dtype that times are computed in: that of the array-valued
    `times` (promoted, weak types deferring), or the default floating dtype when all
    are Python numbers."""
    arrays = [
        t
        for t in times
        if hasattr(t, "dtype") and jnp.issubdtype(t.dtype, jnp.floating)
    ]
    if not arrays:
        return jax.dtypes.canonicalize_dtype(jnp.float64)
    # `jnp.result_type` of the arrays themselves, so that a weakly typed one (a
    # Python number passed through `jax.jit`) takes the other's dtype, as the number
    # would, also under strict dtype promotion.
    return jnp.result_type(*arrays)


def is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def brownian_paths(tree) -> list:
    """Every Brownian path in a PyTree (e.g. among the terms of a solve, inside
    control terms, `MultiTerm`s and the solve's own wrappers)."""

    def is_path(x):
        return isinstance(x, AbstractBrownianPath)

    return [x for x in jtu.tree_leaves(tree, is_leaf=is_path) if is_path(x)]

"""`UnsafeBrownianPath`: a fresh Gaussian sample for every interval asked about."""

from typing import final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._eager import compiled_query
from .base import (
    AbstractBrownianPath,
    as_shape,
    bits_to_normal,
    check_key,
    key_words,
    normalise_shape,
    normals,
    sampled_shape,
    threefry2x32,
    time_dtype,
)
from .levy import (
    UNIT_SCALES,
    BrownianIncrement,
    check_levy_area,
    make_levy,
    num_moments,
    reverse,
)


def _words(t):
    """The bits of a floating time as two `uint32` words (the high one zero below
    64 bits)."""
    if t.dtype.itemsize == 8:
        words = lax.bitcast_convert_type(t, jnp.uint32)
        return words[..., 1], words[..., 0]
    bits = lax.bitcast_convert_type(t.astype(jnp.float32), jnp.uint32)
    return jnp.zeros_like(bits), bits


@final
class UnsafeBrownianPath(AbstractBrownianPath):
    """Brownian increments sampled directly from the interval's endpoints: the
    fastest Brownian motion, valid only where each interval is used once.

    `evaluate(t0, t1)` hashes the key with the bits of `t0` and `t1` into a fresh
    Gaussian sample with the law of a Brownian increment over `[t0, t1]` (and of its
    Lévy areas, if `levy_area` asks for them). Nothing ties samples of different
    intervals together.

    **Arguments:**

    - `shape`: the shape of `W`: a tuple of integers (the default floating dtype),
      or a PyTree of `jax.ShapeDtypeStruct`s with per-leaf real floating dtypes.
    - `key`: a JAX PRNG key (`jax.random.key(seed)`).
    - `levy_area`: [`diffeqx.BrownianIncrement`][] (the default),
      [`diffeqx.SpaceTimeLevyArea`][] or [`diffeqx.SpaceTimeTimeLevyArea`][].

    **What is guaranteed:** the same key and the same endpoints (to the bit) give
    the same sample; `evaluate(t1, t0)` is the time-reversal of `evaluate(t0, t1)`
    (`W` and `K` negated, `H` unchanged); each sample has exactly the law of the
    Brownian increment (and Lévy areas) over its interval; samples for different
    pairs of endpoints are independent. So queries over non-overlapping intervals,
    e.g. the steps of a fixed-step solve, have exactly Brownian motion's law.

    **What is not:** consistency between intervals. `W(a, c)` is not
    `W(a, b) + W(b, c)`, and overlapping intervals get independent samples. The
    samples depend on the last bit of the times, which the same solve can compute
    differently when compiled differently (with and without `jax.jit`, say). So do
    not use it with adaptive step sizes (rejected steps are re-sampled over
    overlapping intervals), with `SaveAt(dense=True)` or `SaveAt(ts=...)` between
    steps, with `BacksolveAdjoint` (which solves backwards over other intervals), or
    to differentiate a solve with `RecursiveCheckpointAdjoint` under `jax.jit` (its
    recomputed steps can get other samples, which makes the gradient wrong).
    `evaluate(t)` (a value rather than an increment) is an error: the path has no
    values. Use [`diffeqx.VirtualBrownianTree`][] for any of these.

    Gradients do not flow through the samples (`jax.lax.stop_gradient`).

    **Example:**

    ```python
    bm = diffeqx.UnsafeBrownianPath(shape=(3,), key=jax.random.key(0))
    terms = diffeqx.MultiTerm(diffeqx.ODETerm(drift),
                              diffeqx.ControlTerm(diffusion, bm))
    sol = diffeqx.diffeqsolve(terms, diffeqx.Euler(), 0.0, 1.0, 1e-3, y0)
    ```
    """

    shape: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    # What is sampled: `shape` with each complex leaf as its real and imaginary parts.
    _sampled: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True, repr=False)
    levy_area: type = eqx.field(static=True)
    key: jax.Array

    def __init__(self, shape, key, levy_area=BrownianIncrement):
        self.shape = normalise_shape(shape, "UnsafeBrownianPath")
        self._sampled = sampled_shape(self.shape)
        self.key = check_key(key, "UnsafeBrownianPath")
        self.levy_area = check_levy_area(levy_area, "UnsafeBrownianPath")

    def _vmap_exact(self, use_levy: bool) -> bool:
        # Hashes and elementwise arithmetic only.
        return True

    @property
    def t0(self):
        return -jnp.inf

    @property
    def t1(self):
        return jnp.inf

    @compiled_query
    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        """A sample of the increment `W(t1) - W(t0)` (or, with `use_levy=True`, of
        the `levy_area` over `[t0, t1]`). `t1 < t0` gives the time-reversed
        sample of `[t1, t0]`. `left` is ignored."""
        del left
        sample = self._evaluate(t0, t1, use_levy, None)
        return as_shape(sample, self.shape)

    def _tabulator(self, left: bool, use_levy: bool, num_steps: int):
        # The key's words once per solve, not once per block of steps.
        words = key_words(self.key, 1)[0]

        def samples(a, b):
            sample = self._evaluate(a, b, use_levy, words)
            return as_shape(sample, self.shape)

        return jax.vmap(samples)

    def _evaluate(self, t0, t1, use_levy: bool, words):
        if t1 is None:
            raise ValueError(
                "`UnsafeBrownianPath.evaluate(t0)` was called without `t1`: this "
                "path samples increments over intervals and has no values at "
                "single times. Call `evaluate(t0, t1)`, or use "
                "`VirtualBrownianTree`, whose values are consistent."
            )
        dtype = time_dtype(t0, t1)
        first, second = (
            lax.stop_gradient(jnp.asarray(t).astype(dtype)) for t in (t0, t1)
        )
        lo, hi = jnp.minimum(first, second), jnp.maximum(first, second)
        shape_leaves, structure = jtu.tree_flatten(self._sampled)
        m = num_moments(self.levy_area)
        # One hash per query: the bits of the later endpoint are folded into the
        # key (by xor) and the bits of the earlier one are the counter, so distinct
        # pairs of endpoints hash distinct (key, counter) inputs. Its two output
        # words are the query's own key (and, for one scalar sample, its 64 bits).
        key = key_words(self.key, 1)[0] if words is None else words
        hi1, hi0 = _words(hi)
        key = jnp.stack(threefry2x32(key[0] ^ hi1, key[1] ^ hi0, *_words(lo)))
        dts, per_leaf = [], []
        single = len(shape_leaves) == 1 and m == 1 and shape_leaves[0].shape == ()
        for j, leaf in enumerate(shape_leaves):
            if single:
                # One sample in all: the query's own hash gives its 64 bits.
                z = bits_to_normal(key[0], key[1], leaf.dtype)[None]
            else:
                size = int(np.prod(leaf.shape, dtype=np.int64))
                element = jnp.arange(size, dtype=jnp.uint32).reshape((1,) + leaf.shape)
                slot = (np.uint32(3 * j) + np.arange(m, dtype=np.uint32)).reshape(
                    (m,) + (1,) * len(leaf.shape)
                )
                z = normals(key, element, slot, leaf.dtype)
            width = (hi - lo).astype(leaf.dtype)
            dts.append(width)
            root = jnp.sqrt(width)
            per_leaf.append(
                [root * scale * z[c] for c, scale in enumerate(UNIT_SCALES[:m])]
            )
        moments = [
            jtu.tree_unflatten(structure, list(x)) for x in zip(*per_leaf, strict=True)
        ]
        backwards = second < first
        moments = [
            jtu.tree_map(lambda a, b: jnp.where(backwards, a, b), flipped, x)
            for flipped, x in zip(reverse(tuple(moments)), moments, strict=True)
        ]
        moments = [lax.stop_gradient(x) for x in moments]
        if not use_levy:
            return moments[0]
        dt = jtu.tree_unflatten(structure, dts)
        dt = jtu.tree_map(lambda x: jnp.where(backwards, -x, x), dt)
        return make_levy(self.levy_area, dt, moments)

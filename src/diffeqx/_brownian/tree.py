r"""`VirtualBrownianTree`: a Brownian motion on `[t0, t1]` that can be queried at any
time, in any order, reproducibly, at a cost independent of earlier queries.

**The path.** The interval `[t0, t1]` is bisected `D` times, `D` the least depth at
which the cells (of width `(t1 - t0) / 2^D`) are no wider than `tol`. Each cell of the
binary tree has an address (its heap number: `2^level + index`). The root's moments
(`W`, and `H`, `K` when the `levy_area` asks for them) are sampled from their
Gaussian law; each cell's moments are split into its halves' moments by their exact
conditional law given the cell's (Lévy's Brownian-bridge construction, extended to
the space-time and space-time-time Lévy areas, whose conditional laws under
bisection Foster's thesis and Foster, Lyons & Oberhauser study): in standardised
coordinates the halves' moments are an orthogonal transform of the parent's and of
fresh normals (`levy.py`). Inside a leaf cell, a query time at fraction `λ` of the
cell splits it once more, by the exact conditional law at `λ`, using normals that
belong to the leaf. The path is therefore a pure function of `(key, t)`:

- *reproducible*: the same query gives the same result, whatever was asked before
  (the same bits from the same compiled computation; XLA may round differently
  compiled programs differently, by fusing multiply-adds, so across programs the
  same to rounding);
- *consistent*: `W(s, u) = W(s, t) + W(t, u)` (to rounding), the value at a time
  does not depend on the interval that asked for it, and the Lévy areas of adjacent
  intervals combine into the Lévy areas of their union (the exact concatenation
  formulas of `levy.py`, to rounding);
- *exact in law at resolution `tol`*: for any query times with at most one strictly
  inside each leaf cell, the increments and Lévy areas between them have exactly the
  joint law of Brownian motion (up to the sampling of the normals). In particular a
  solve whose steps are all at least `tol` long sees exactly Brownian motion. Inside
  a cell, one random split per query time stands in for the whole Brownian bridge:
  each time has the exact law, but two times in one cell are not jointly Brownian.
  With `BrownianIncrement`, `W(t) = W(a) + λ(W(b) - W(a)) + sqrt(λ(1 - λ)(b - a)) ξ`
  on a cell `[a, b]`, with one normal `ξ` per cell, so increments inside a cell are
  too small; with Lévy areas, the `H` and `K` of an interval inside one cell do not
  have Brownian motion's law (their variances are many times `h/12` and `h/720`).

**Why it is fast.** The randomness a query needs is addressed by cell, and a time's
cells (one per level) follow from its position alone, not from sampled values. So
all of a query's normals come from one vectorised counter-based hash (Threefry, see
`base.py`), with no sequential key splitting; the bisection is a chain of `D` small
orthogonal transforms, unrolled into elementwise arithmetic that XLA fuses (with
Lévy areas, a `lax.scan` over the levels, which keeps compilation short). Branching
factor 2 needs the fewest normals for a given resolution: a `B`-ary tree needs
`m (B - 1)` normals per level for `m` moments, over `log_B 2` times as many levels
as a binary tree. The hash and the normal quantile are most of the cost of a query.

A query `evaluate(s, t)` walks the tree for both ends (`2 (D + 2)` cells). The
increment `W(t) - W(s)` is the difference of the two values. Lévy areas over
`[s, t]` are assembled from the part of `s`'s cell after `s` and the part of `t`'s
cell before `t` below the deepest cell holding both, so they are never a difference
of quantities over longer intervals, except inside a single leaf cell.

**Bounds known only at run time.** When `t0`, `t1` or `tol` are traced (a tree
built inside `jax.jit` from data, as in a neural SDE whose times are its data's),
the depth is too. A walk then loops over the levels at run time (`lax.fori_loop`),
hashing each level's cells in turn and gathering, on the way down, what the query
needs: the same splits and sums, so the same path, to rounding. Under `jax.vmap`
over trees of different depths the loop runs to the deepest, each tree keeping its
own. (Unrolling all `_MAX_DEPTH` levels with those below the depth masked, as an
earlier version did, hashed four times the cells at a depth of 7.)

**Fixed steps.** A fixed-step solve asks for `W` over every step in turn, and a walk
from the root per step would hash each upper cell again for every step below it.
Instead (`_tabulator`, see `_solve/tabulate.py`) the solve builds, once, a table of
every cell of one level (the leaves, when they fit in `_TABLE_ENTRIES` numbers and
are not many more than the steps), level by level with a walk's own arithmetic:
each cell's moments and `W` at its start. Each step's ends then only walk the
levels below the table (none at the leaves) and split their leaf cell. The sum that
gives `W(t)` is taken from the root down in both, so the table gives a walk's
values, to rounding.
"""

import math
from typing import final

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

from .._eager import compiled_query
from . import bridge
from .base import (
    AbstractBrownianPath,
    as_shape,
    check_key,
    is_concrete,
    key_words,
    normalise_shape,
    sampled_shape,
    time_dtype,
    times_pow2,
)
from .levy import (
    BrownianIncrement,
    check_levy_area,
    make_levy,
    num_moments,
    reverse,
)

# Cell indices are uint32: at most 2^31 leaves (heap numbers below 2^32).
_MAX_DEPTH = 31
# The most numbers per moment in a fixed-step solve's table of cells (see
# `VirtualBrownianTree._tabulator`), per path: a batch of paths has one each.
_TABLE_ENTRIES = 2**12


def _static_depth(span: float, tol: float) -> int:
    depth = 0
    while span * 2.0**-depth > tol:
        depth += 1
        if depth > _MAX_DEPTH:
            raise ValueError(
                f"`VirtualBrownianTree`: tol={tol} is finer than this tree supports "
                f"on an interval of length {span}: the cells would be narrower than "
                f"(t1 - t0) / 2^{_MAX_DEPTH} = {span * 2.0**-_MAX_DEPTH:.3g}. Use a "
                "larger tol."
            )
    return depth


def _dynamic_depth(span, tol):
    depth = jnp.ceil(jnp.log2(span / tol))
    depth = jnp.where(jnp.ldexp(span, -depth.astype(jnp.int32)) > tol, depth + 1, depth)
    depth = jnp.clip(depth, 0, _MAX_DEPTH + 1).astype(jnp.int32)
    coarser = jnp.maximum(depth - 1, 0)
    return jnp.where((depth > 0) & (jnp.ldexp(span, -coarser) <= tol), coarser, depth)


class _Grid(eqx.Module):
    """The tree's cells: `depth` bisections of `[start, start + span]`. The depth is
    an `int` when the bounds and `tol` are known at trace time (walks are then
    unrolled over its `levels`); otherwise it is traced, and walks loop over the
    levels at run time (`bridge.values_to_depth`, `bridge.moments_to_depth`)."""

    start: jax.Array
    span: jax.Array
    depth: int | jax.Array

    @property
    def levels(self) -> int:
        """The number of levels, for walks unrolled at trace time."""
        assert isinstance(self.depth, int), "a traced depth has no static levels"
        return self.depth

    def _shift(self, amount):
        if isinstance(self.depth, int):
            return np.uint32(min(max(amount, 0), _MAX_DEPTH))
        return jnp.clip(amount, 0, _MAX_DEPTH).astype(jnp.uint32)

    def locate(self, times):
        """The leaf cell (`uint32`) holding each time, and the fraction of that cell
        before the time. The end of the interval is the end of the last cell."""
        u = jnp.clip((times - self.start) / self.span, 0, 1)
        if isinstance(self.depth, int):
            x = u * 2.0**self.depth
            cells, last = 2.0**self.depth, np.uint32(2**self.depth - 1)
        else:
            x = times_pow2(u, self.depth)
            cells = times_pow2(jnp.ones_like(u), self.depth)
            last = jnp.left_shift(jnp.uint32(1), self._shift(self.depth)) - 1
        floor = jnp.floor(x)
        at_end = floor >= cells
        leaf = jnp.where(at_end, last, jnp.where(at_end, 0, floor).astype(jnp.uint32))
        lam = jnp.where(at_end, jnp.ones_like(x), x - floor)
        return leaf, lam

    def addresses(self, leaf):
        """Heap numbers (`2^level + index`) of the cells split on the way to each
        leaf, shape `(times, levels + 2)`: 0 for the root's own sample, each level's
        cell, then the leaf cell. (Elementwise in the slot index, so that XLA fuses
        it into the hash that reads it.)"""
        slot = np.arange(self.levels + 2, dtype=np.int32)
        level = np.minimum(np.maximum(slot - 1, 0), self.depth).astype(np.uint32)
        shift = (np.uint32(self.depth) - level).astype(np.uint32)
        # Explicit ranks throughout (`(times, 1)` against `(1, slots)`): a user may
        # run with `jax_numpy_rank_promotion="raise"`, as Diffrax's tests do.
        cell = jnp.left_shift(jnp.uint32(1), level)[None, :] + jnp.right_shift(
            leaf[:, None], jnp.asarray(shift)[None, :]
        )
        return jnp.where((slot == 0)[None, :], jnp.uint32(0), cell)

    def right_halves(self, leaf, first: int = 0):
        """Whether each leaf cell lies in the right half of the cell holding it, at
        every level from `first` down: shape `(levels - first, *leaf.shape)`, from one
        shift for all the levels (a few operations in the program rather than a few
        per level)."""
        level = np.arange(first, self.levels, dtype=np.int32)
        shift = np.clip(self.depth - 1 - level, 0, _MAX_DEPTH).astype(np.uint32)
        shift = shift.reshape(shift.shape + (1,) * jnp.ndim(leaf))
        return jnp.right_shift(leaf[None], shift) & 1 == 1

    def right_half(self, leaf, level):
        """`right_halves` at one `level` (traced, e.g. the index of a `lax.scan`
        over the levels): computed inside the scan from the leaf, so that the
        scan does not read a `(levels, *leaf.shape)` array, which under `jax.vmap`
        XLA would transpose (with the batch axis) before the loop."""
        shift = jnp.clip(self.depth - 1 - level, 0, _MAX_DEPTH).astype(jnp.uint32)
        return jnp.right_shift(leaf, shift) & 1 == 1

    def half_width(self, level: int, dtype):
        return (self.span * 2.0 ** -(level + 1)).astype(dtype)

    def half_widths(self, first: int, dtype):
        """`half_width` at every level from `first` down (each the span times a
        power of two, as there)."""
        powers = 2.0 ** -(np.arange(first, self.levels, dtype=np.float64) + 1)
        return (self.span * jnp.asarray(powers, self.span.dtype)).astype(dtype)

    def leaf_width(self, dtype):
        if isinstance(self.depth, int):
            return (self.span * 2.0**-self.depth).astype(dtype)
        return times_pow2(self.span, -self.depth).astype(dtype)


def _values(grid, leaf, lam, hasher, table):
    """`W` at the located times (from the root, or from a `bridge.Table`)."""
    start = noise = None
    if table is not None:
        start, noise = table.start(grid, leaf), table.noise(leaf)
    elif not isinstance(grid.depth, int):
        return bridge.values_to_depth(grid, leaf, lam, hasher)
    if noise is None:
        noise = bridge.noise_separate(grid, leaf, hasher, start)
    path = bridge.walk(grid, leaf, lam, noise, start)
    return bridge.values(grid, path, leaf, lam, start)


@final
class VirtualBrownianTree(AbstractBrownianPath):
    r"""Brownian motion on `[t0, t1]`, sampled to resolution `tol`, that can be
    evaluated at any times in any order, with reproducible and consistent answers.

    **Arguments:**

    - `t0`, `t1`: the interval, `t0 < t1`.
    - `tol`: the resolution: the tree bisects `[t0, t1]` until its cells are no wider
      than `tol`. Steps of at least `tol` see exact Brownian increments; steps
      within one cell see a smoothed path (see below). At most `2^31` cells: a
      smaller `tol` is a `ValueError`.
    - `shape`: the shape of `W`: a tuple of integers (the default floating dtype),
      or a PyTree of `jax.ShapeDtypeStruct`s, one per leaf, each with its own real
      floating dtype.
    - `key`: a JAX PRNG key (`jax.random.key(seed)`). For a batch of Brownian
      motions, build the tree under `jax.vmap` over keys.
    - `levy_area`: [`diffeqx.BrownianIncrement`][] (the default: `W` only),
      [`diffeqx.SpaceTimeLevyArea`][] (also `H`) or
      [`diffeqx.SpaceTimeTimeLevyArea`][] (also `H` and `K`), as needed by the
      solver. The choice changes the path: the same key gives a different `W`.

    **Guarantees.** The path is a pure function of `key` and the query time: the same
    query always returns the same result, whatever was queried before (the same
    bits from the same compiled program; differently compiled programs may round
    differently, as XLA fuses multiply-adds); increments add
    up (`W(a, c) = W(a, b) + W(b, c)` to rounding); `evaluate(t)` is the value at
    `t`, whichever interval asked for it; the Lévy areas of adjacent intervals combine
    exactly into those of their union; `evaluate(t1, t0)` is the time-reversal of
    `evaluate(t0, t1)` (`W` and `K` negated, `H` unchanged). For query times with at
    most one strictly inside each cell of width `<= tol` (the cells split `[t0, t1]`
    into `2^D` equal parts), the increments and Lévy areas between them have exactly
    the joint law of Brownian motion, so a solve whose steps are all at least `tol`
    long sees exactly Brownian motion. Each single time has the exact law too, but
    within a cell the path is a single random interpolation of the cell's ends: the
    increment and Lévy areas between two times strictly inside one cell do not have
    Brownian motion's law (with `BrownianIncrement` the increment's variance is too
    small). Take steps of at least `tol` (or a smaller `tol`), in particular with
    solvers that use `H` or `K`.

    Gradients do not flow through the path: it is a random control, treated as a
    constant (`jax.lax.stop_gradient` on its times and results), so `jax.grad` of a solve
    driven by it gets zero cotangents for the path and its times.

    Querying outside `[t0, t1]` is a `ValueError` when the times are known at trace
    time. When they are only known at run time, the result is NaN (Diffrax raises a
    runtime error there; the check that needs costs about as much as a query).

    **Example:**

    ```python
    bm = diffeqx.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,),
                                     key=jax.random.key(0))
    dw = bm.evaluate(0.25, 0.5)   # W(0.5) - W(0.25), shape (2,)
    terms = diffeqx.MultiTerm(diffeqx.ODETerm(drift),
                              diffeqx.ControlTerm(diffusion, bm))
    sol = diffeqx.diffeqsolve(terms, diffeqx.Euler(), 0.0, 1.0, 1e-3, y0)
    ```
    """

    t0: float | jax.Array
    t1: float | jax.Array
    tol: float | jax.Array
    shape: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True)
    # What is sampled: `shape` with each complex leaf as its real and imaginary parts.
    _sampled: PyTree[jax.ShapeDtypeStruct] = eqx.field(static=True, repr=False)
    levy_area: type = eqx.field(static=True)
    key: jax.Array
    _depth: int | None = eqx.field(static=True)
    # The depth when the bounds or `tol` are traced: computed once, here, rather
    # than in every query (about 170 operations of every step's query).
    _traced_depth: jax.Array | None

    def __init__(self, t0, t1, tol, shape, key, levy_area=BrownianIncrement):
        self.t0, self.t1, self.tol = t0, t1, tol
        self.shape = normalise_shape(shape, "VirtualBrownianTree")
        self._sampled = sampled_shape(self.shape)
        self.key = check_key(key, "VirtualBrownianTree")
        self.levy_area = check_levy_area(levy_area, "VirtualBrownianTree")
        if is_concrete(t0, t1, tol):
            t0_, t1_, tol_ = (float(np.asarray(x)) for x in (t0, t1, tol))
            if not (math.isfinite(t0_) and math.isfinite(t1_) and t0_ < t1_):
                raise ValueError(
                    "`VirtualBrownianTree(t0, t1, ...)` needs finite t0 < t1, but got "
                    f"t0={t0_} and t1={t1_}. (It can still be queried backwards in "
                    "time: `evaluate(s, t)` with s > t.)"
                )
            if not (math.isfinite(tol_) and tol_ > 0):
                raise ValueError(
                    f"`VirtualBrownianTree(tol=...)` must be finite and positive, but "
                    f"got tol={tol_}."
                )
            self._depth = _static_depth(t1_ - t0_, tol_)
            self._traced_depth = None
        else:
            self._depth = None
            _, span, tol = self._bounds()
            depth = _dynamic_depth(span, tol)
            self._traced_depth = eqx.error_if(
                depth,
                (depth > _MAX_DEPTH) | ~(tol > 0) | ~(span > 0),
                "VirtualBrownianTree needs t0 < t1 and 0 < tol, with tol no finer "
                f"than (t1 - t0) / 2^{_MAX_DEPTH}.",
            )

    # ---- evaluation ----------------------------------------------------------------

    def _vmap_exact(self, use_levy: bool) -> bool:
        # `W` alone is elementwise arithmetic; the Lévy areas' transforms are small
        # matrix products, which XLA may sum in another order when batched.
        return not (use_levy and num_moments(self.levy_area) > 1)

    @compiled_query(before="_check_range")
    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        """The increment `W(t1) - W(t0)`, or with `t1=None` the value `W(t0)` (the
        increment from the tree's `t0`). With `use_levy=True`, an instance of
        `levy_area` over `[t0, t1]` (`[self.t0, t0]` if `t1` is `None`): `dt` and
        `W`, plus `H` and `K` where the type has them. `t1 < t0` gives the
        time-reversed increment. `left` is ignored."""
        del left
        sample = self._evaluate(t0, t1, use_levy, None, None)
        return as_shape(sample, self.shape)

    def _table_level(self, num_steps: int) -> int | None:
        """The level of the cells a fixed-step solve of `num_steps` steps tabulates
        before its steps (`bridge.Table`), or None for no table: as deep as the
        tree, but at most `_TABLE_ENTRIES` numbers per moment and no more cells than
        twice the steps' ends (on a coarser level, each query still walks the levels
        below the table)."""
        if self._depth is None:
            return None
        size = sum(
            int(np.prod(x.shape, dtype=np.int64))
            for x in jtu.tree_leaves(self._sampled)
        )
        level = self._depth
        while level > 0 and (
            2**level * size > _TABLE_ENTRIES or 2**level > 4 * num_steps
        ):
            level -= 1
        return level if level > 0 else None

    def _tabulator(self, left: bool, use_levy: bool, num_steps: int):
        # `W` from a table of the cells down to the leaves (or some level above),
        # built once per solve: each query then only walks the levels below it
        # (none, at the leaves) instead of hashing a cell at every level. The
        # table is built with a walk's own arithmetic, so the samples are those
        # of `evaluate`, bit for bit (tested).
        level = self._table_level(num_steps)
        if level is None or (use_levy and num_moments(self.levy_area) > 1):
            return super()._tabulator(left, use_levy, num_steps)
        grid, _ = self._grid()
        words = self._words()
        tables = [bridge.table(grid, hasher, level) for hasher in self._hashers(words)]

        def samples(a, b):
            sample = self._evaluate(a, b, use_levy, tables, words)
            return as_shape(sample, self.shape)

        return jax.vmap(samples)

    def _words(self):
        """The key words of the tree's hashes: `(leaves of shape, 2m, 2)`."""
        count = len(jtu.tree_leaves(self._sampled))
        return key_words(self.key, count, 2 * num_moments(self.levy_area))

    def _hashers(self, words) -> list:
        """One `bridge._Hasher` per leaf of `shape`."""
        shape_leaves = jtu.tree_leaves(self._sampled)
        return [
            bridge._Hasher(words[j], x.dtype, x.shape)
            for j, x in enumerate(shape_leaves)
        ]

    def _evaluate(self, t0, t1, use_levy: bool, tables: list | None, words):
        grid, dtype = self._grid()
        pair = t1 is not None
        if pair:
            (first, second), outside = self._check_times([t0, t1], dtype)
            lo, hi = jnp.minimum(first, second), jnp.maximum(first, second)
            leaf, lam = grid.locate(jnp.stack([lo, hi]))
        else:
            (hi,), outside = self._check_times([t0], dtype)
            lo = grid.start
            leaf, lam = grid.locate(hi[None])
        shape_leaves, structure = jtu.tree_flatten(self._sampled)
        m = num_moments(self.levy_area)
        words = self._words() if words is None else words
        dts, per_leaf = [], []
        for j, (leaf_shape, hasher) in enumerate(
            zip(shape_leaves, self._hashers(words), strict=True)
        ):
            dts.append((hi - lo).astype(leaf_shape.dtype))
            if use_levy and m > 1 and not isinstance(grid.depth, int):
                per_leaf.append(bridge.moments_to_depth(grid, leaf, lam, hasher, pair))
                continue
            if use_levy and m > 1:
                noise = bridge.noise_separate(grid, leaf, hasher)
                path = bridge.walk(grid, leaf, lam, noise)
                if pair:
                    per_leaf.append(bridge.moments_between(grid, path, leaf, lam))
                else:
                    per_leaf.append(bridge.moments_from_start(grid, path, leaf, lam))
                continue
            if tables is None:
                at = _values(grid, leaf, lam, hasher, None)
            else:
                # From the table, each end by itself: batched over many queries,
                # a stacked pair would be laid out across them (transposes).
                at = [
                    _values(grid, *grid.locate(end[None]), hasher, tables[j])[0]
                    for end in ((lo, hi) if pair else (hi,))
                ]
            per_leaf.append([at[1] - at[0]] if pair else [at[0]])
        moments = [
            lax.stop_gradient(jtu.tree_unflatten(structure, list(x)))
            for x in zip(*per_leaf, strict=True)
        ]
        dt = jtu.tree_unflatten(structure, dts)
        if t1 is not None:
            backwards = second < first
            dt = jtu.tree_map(lambda x: jnp.where(backwards, -x, x), dt)
            moments = [
                jtu.tree_map(lambda a, b: jnp.where(backwards, a, b), flipped, x)
                for flipped, x in zip(reverse(tuple(moments)), moments, strict=True)
            ]
        if outside is not None:
            moments = [
                jtu.tree_map(lambda x: jnp.where(outside, jnp.nan, x), x)
                for x in moments
            ]
        # Divided by a 1 known only at run time (from the key): XLA does not copy a
        # division into each of the several computations that read its result (a
        # solver's step reads it in many), so neither is the walk that produced it.
        nonzero = (words[0, 0, 0] | jnp.uint32(1)).astype(jnp.float32)
        moments = [
            jtu.tree_map(
                lambda x: x / (nonzero.astype(x.dtype) / nonzero.astype(x.dtype)), x
            )
            for x in moments
        ]
        if not use_levy:
            return moments[0]
        return make_levy(self.levy_area, dt, moments)

    def _bounds(self):
        """`(start, span, tol)` in the times' dtype, without derivatives."""
        dtype = time_dtype(self.t0, self.t1)
        start, end, tol = (
            lax.stop_gradient(jnp.asarray(x).astype(dtype))
            for x in (self.t0, self.t1, self.tol)
        )
        return start, end - start, tol

    def _grid(self):
        start, span, _ = self._bounds()
        depth = self._traced_depth if self._depth is None else self._depth
        return _Grid(start, span, depth), start.dtype

    def _check_range(self, t0, t1=None, left=True, use_levy=False):
        """Raises for a concrete query time outside `[self.t0, self.t1]`."""
        for t in (t0, t1):
            if t is not None and is_concrete(t, self.t0, self.t1):
                t_, t0_, t1_ = (float(np.asarray(x)) for x in (t, self.t0, self.t1))
                if not t0_ <= t_ <= t1_:
                    raise ValueError(
                        f"VirtualBrownianTree.evaluate: time {t_} is outside the "
                        f"tree's interval [t0, t1] = [{t0_}, {t1_}]."
                    )

    def _check_times(self, times, dtype):
        self._check_range(*times)
        times = [lax.stop_gradient(jnp.asarray(t).astype(dtype)) for t in times]
        if is_concrete(*times, self.t0, self.t1):
            return times, None
        # Known only at run time: NaN marks the result (a select, nearly free),
        # where a runtime error (`eqx.error_if`) would cost as much as the query.
        start = jnp.asarray(self.t0).astype(dtype)
        end = jnp.asarray(self.t1).astype(dtype)
        stacked = jnp.stack(times)
        return times, jnp.any((stacked < start) | (stacked > end))

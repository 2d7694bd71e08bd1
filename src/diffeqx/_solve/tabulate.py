"""Brownian samples for the fixed-step scan, computed a block of steps at a time.

On the fixed-step path the steps' times follow from the controller alone, so the
Brownian increments (and Lévy areas) a block of steps will ask for can be computed
before the block runs: one vectorised evaluation of the path at all the block's
intervals, instead of one scalar evaluation inside each step. A path's evaluation
is a pure function of its key and the query's times, and the block's times are
computed by the loop's own time arithmetic (the controller's proposal and the snap
onto `t1`), so every step receives the sample it would have computed itself: the
same bits from `UnsafeBrownianPath`; from a `VirtualBrownianTree`'s `W`, the same
to rounding (a table of the tree's cells, built once per solve with the arithmetic
of a walk down the tree, answers the queries; XLA may fuse, and so round, the two
computations differently).

This applies when every query a step makes of a Brownian path is over the step's
own interval `[tprev, tnext]` (checked once, at trace time, by tracing one step with
probes in place of the paths), and when the path's evaluation gives the same bits
batched as one at a time (`AbstractBrownianPath._vmap_exact`: `UnsafeBrownianPath`,
and `VirtualBrownianTree` for `W` alone; a tree's Lévy areas come from small matrix
products, which XLA may sum in another order when batched). Otherwise the steps
evaluate their paths themselves. How a path computes a block's samples is its own
`_tabulator`.
"""

import dataclasses
import threading

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._brownian.base import AbstractBrownianPath, brownian_paths
from .loop import LoopSpec, take_step
from .state import LoopState

_probe_log = threading.local()


def _is_path(x) -> bool:
    return isinstance(x, AbstractBrownianPath)


class _StandIn(AbstractBrownianPath):
    """Takes a Brownian path's place inside the terms, with its interval and shape."""

    inner: eqx.AbstractVar[AbstractBrownianPath]

    @property
    def t0(self):
        return self.inner.t0

    @property
    def t1(self):
        return self.inner.t1

    @property
    def shape(self):
        return self.inner.shape


class _Probe(_StandIn):
    """Stands in for a Brownian path while one step is traced, noting each query."""

    inner: AbstractBrownianPath
    index: int = eqx.field(static=True)
    levy_area: type = eqx.field(static=True)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        out = self.inner.evaluate(t0, t1, left=left, use_levy=use_levy)
        shapes = jtu.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out)
        _probe_log.calls.append((self.index, t0, t1, left, use_levy, shapes))
        return out


class _Answers(_StandIn):
    """Stands in for a Brownian path during one step: answers the step's queries
    with the samples computed for it beforehand."""

    inner: AbstractBrownianPath
    answers: dict  # (left, use_levy) -> the sample over the step's interval
    levy_area: type = eqx.field(static=True)

    def evaluate(self, t0, t1=None, left: bool = True, use_levy: bool = False):
        return self.answers[(bool(left), bool(use_levy))]


def _replace_paths(terms, replacements: list):
    remaining = iter(replacements)
    return jtu.tree_map(
        lambda x: next(remaining) if _is_path(x) else x, terms, is_leaf=_is_path
    )


class Tabulation(eqx.Module):
    """Which queries each Brownian path in the terms receives in a step."""

    paths: list  # the Brownian paths, in `brownian_paths` order
    queries: list  # per path: the sorted (left, use_levy) pairs it is asked for
    # per path: {(left, use_levy): the shapes of one step's answer}
    shapes: tuple = eqx.field(static=True)

    def row_shapes(self) -> list:
        """The shapes of one step's samples, as `block_samples` gives them per step."""
        return [
            {query: shapes[query] for query in queries}
            for queries, shapes in zip(self.queries, self.shapes, strict=True)
        ]


def tabulation(spec: LoopSpec, state: LoopState) -> Tabulation | None:
    """The queries to compute ahead of the steps, or None when the steps must make
    them themselves (no Brownian path, or a query over another interval than the
    step's own)."""
    paths = brownian_paths(spec.terms)
    if not paths:
        return None
    probes = [_Probe(p, i, p.levy_area) for i, p in enumerate(paths)]
    probe_spec = dataclasses.replace(spec, terms=_replace_paths(spec.terms, probes))
    own_interval = []

    def one_step(state):
        _probe_log.calls = []
        try:
            out = take_step(probe_spec, state)
            own_interval.append(
                [
                    (i, left, use_levy, shapes)
                    if (t0 is state.tprev and t1 is state.tnext)
                    else None
                    for i, t0, t1, left, use_levy, shapes in _probe_log.calls
                ]
            )
        finally:
            del _probe_log.calls
        return out

    jax.eval_shape(one_step, state)
    (calls,) = own_interval
    if not calls or any(call is None for call in calls):
        return None
    queries = [
        sorted({(bool(left), bool(levy)) for j, left, levy, _ in calls if j == i})
        for i in range(len(paths))
    ]
    shapes = tuple(
        {(bool(left), bool(levy)): s for j, left, levy, s in calls if j == i}
        for i in range(len(paths))
    )
    for path, path_queries in zip(paths, queries, strict=True):
        if not all(path._vmap_exact(levy) for _, levy in path_queries):
            return None
    return Tabulation(paths, queries, shapes)


def prepare(plan: Tabulation, num_steps: int) -> list:
    """Each path's tabulator for each query it receives, for a solve of `num_steps`
    steps. Called once, before the steps: what a tabulator holds (e.g. a tree's
    table of cells) is shared by every block."""
    return [
        {query: path._tabulator(*query, num_steps) for query in queries}
        for path, queries in zip(plan.paths, plan.queries, strict=True)
    ]


def block_samples(tabulators: list, tprevs, tnexts) -> list:
    """The samples of a block of steps `[tprevs[k], tnexts[k]]`: per path, the
    stacked answers to each of its queries."""
    return [
        {query: tabulate(tprevs, tnexts) for query, tabulate in per_path.items()}
        for per_path in tabulators
    ]


def answering(spec: LoopSpec, plan: Tabulation, rows: list) -> LoopSpec:
    """`spec` with each Brownian path replaced by one that answers a step's queries
    with the step's `rows` (one of `block_samples`' entries per step)."""
    answers = [
        _Answers(path, row, path.levy_area)
        for path, row in zip(plan.paths, rows, strict=True)
    ]
    return dataclasses.replace(spec, terms=_replace_paths(spec.terms, answers))

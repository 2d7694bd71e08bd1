"""The adjoint protocol: how the solve loop is run and differentiated."""

import abc
import functools as ft
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


class AbstractAdjoint(eqx.Module):
    """Base class for adjoints. An adjoint decides how the solve loop is run, and so
    how it is differentiated.

    `loop(run_loop, init_state, max_steps)` must return the final loop state;
    `run_loop(init_state, outer_while_loop, inner_while_loop)` runs the solve with the
    given while-loop implementations (each with the signature
    `(cond_fun, body_fun, init_val, *, max_steps, buffers) -> final_val`); its
    optional keyword `mark` is a function applied to every input the loop reads (the
    initial state and the fixed inputs it closes over) before it runs.
    """

    @abc.abstractmethod
    def loop(self, *, run_loop: Callable, init_state, max_steps: int | None):
        """Runs the solve loop and returns the final state."""

    def fixed_step_block(self, num_steps: int) -> int | None:
        """Whether (and how) a solve whose `num_steps` constant steps are known at
        trace time may run as a fixed-length scan instead of a while loop: `None`
        for no (the default, e.g. for adjoints with their own derivative rule), `0`
        for a plain scan, or `k > 0` to group the steps into rematerialised blocks
        of `k` steps for reverse mode."""
        return None

    def fixed_step_storage(self) -> int:
        """The most memory, in bytes, that reverse mode may spend on a fixed-length
        scan (see `fixed_step_block`) storing what every step computes, instead of
        grouping the steps into rematerialised blocks: when an upper bound on that
        memory is within it, the steps run as a plain scan and nothing is recomputed.
        `0` (the default): always the blocks."""
        return 0


def while_loop_of_kind(kind: str, *, pack_scalars: bool = False, **kwargs) -> Callable:
    """A while loop with write-once buffers: `"lax"` (forward-mode differentiable),
    `"checkpointed"` (reverse-mode, with recursive checkpointing) or `"bounded"`
    (both modes, any order, cost growing with `max_steps`), or `"stored"`
    (reverse mode, storing every iteration's state; see `stored.py`).
    `pack_scalars` runs a checkpointed or stored loop with its state's scalars
    packed (see `_scalars_packed`): worth it under reverse mode, where every leaf is
    stored and loaded, and not otherwise, where the loop is a plain one and packing
    only adds operations."""
    if kind == "stored":
        from .stored import stored_while_loop

        loop = ft.partial(stored_while_loop, **kwargs)
    else:
        loop = ft.partial(eqxi.while_loop, kind=kind, **kwargs)
    loop = ft.partial(_one_step_at_a_time, loop, kind in ("checkpointed", "stored"))
    if pack_scalars and kind in ("checkpointed", "stored"):
        return ft.partial(_scalars_packed, loop)
    return loop


def _one_step_at_a_time(loop, active, cond_fun, body_fun, init_val, **kwargs):
    """Runs `loop` with its body traced under `differentiated_one_step_at_a_time`:
    `active` for a checkpointed or stored loop (its backward pass differentiates one
    iteration at a time), not for the others, wherever and however often the loop
    traces it (Equinox's checkpointed loop traces it again in its backward pass)."""
    from .._transforms import differentiated_one_step_at_a_time

    def body(val):
        with differentiated_one_step_at_a_time(active):
            return body_fun(val)

    return loop(cond_fun, body, init_val, **kwargs)


class HeldMembersLoop:
    """A loop that runs while any member of a `jax.vmap` batch is going, and so is
    right only for a body that holds the members that have finished (as the solve's
    step does under `LoopSpec.mask_members`). `for_body` gives it, or `fallback` (a
    loop that selects each member's values itself) for a body that does not hold
    them under a `jax.vmap`."""

    def __init__(self, loop: Callable, fallback: Callable):
        self.loop, self.fallback = loop, fallback

    def for_body(self, holds_finished: bool) -> Callable:
        from .._transforms import batch_size

        if holds_finished or batch_size() == 1:
            return self.loop
        return self.fallback


def _scalars_packed(loop, cond_fun, body_fun, init_val, *, max_steps, buffers):
    """Runs `loop` (a checkpointed or stored while loop) with the state's scalars
    packed into one vector per kind: one per floating dtype, and one integer vector
    holding the integer and boolean scalars.

    The checkpointed loop stores, loads and selects every leaf of its state
    separately, in the forward loop and again in the backward loop, and each of
    those is a compiled kernel and a runtime call; a solve's state has a dozen or
    more scalar leaves (times, counters, flags, the controller's memory). Packed,
    they cost one of each per vector. The values, and so the results, are the same.
    """
    plan = _PackingPlan.of(init_val, buffers)
    if plan is None:
        return loop(cond_fun, body_fun, init_val, max_steps=max_steps, buffers=buffers)

    def packed_cond(carry):
        return cond_fun(plan.unpack(carry))

    def packed_body(carry):
        return plan.pack(body_fun(plan.unpack(carry)), plan.buffer_types(carry))

    final = loop(
        packed_cond,
        packed_body,
        plan.pack(init_val, ()),
        max_steps=max_steps,
        buffers=lambda carry: carry[2],
    )
    return plan.unpack(final)


class _PackingPlan:
    """Where each leaf of a loop state goes in the packed carry
    `(vectors, other leaves, buffer leaves)`."""

    def __init__(self, treedef, places, groups):
        self.treedef = treedef
        # Per leaf: ("vector", group, position), ("other", index) or ("buffer", index).
        self.places = places
        # Per vector: (dtype, the leaves' own dtypes, whether each is weakly typed).
        self.groups = groups

    @classmethod
    def of(cls, init_val, buffers):
        leaves, treedef = jtu.tree_flatten(init_val)
        buffer_leaves = jtu.tree_leaves(buffers(init_val))
        if any(not isinstance(x, jax.Array) or x.ndim == 0 for x in buffer_leaves):
            # The buffers of an enclosing loop, wrapped by it (a loop inside the
            # step), or something unexpected: run the loop as it is.
            return None
        buffer_ids = {id(x) for x in buffer_leaves}
        is_buffer = [id(x) in buffer_ids for x in leaves]
        if sum(is_buffer) != len(buffer_ids):
            return None  # a buffer also appears elsewhere in the state: leave it
        int_dtype = jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.int64))
        members: dict = {}
        for i, (leaf, buffer) in enumerate(zip(leaves, is_buffer, strict=True)):
            key = None if buffer else _vector_of(leaf, int_dtype)
            if key is not None:
                members.setdefault(key, []).append(i)
        members = {key: idx for key, idx in members.items() if len(idx) > 1}
        if not members:
            return None
        places = [None] * len(leaves)
        groups = []
        for g, (key, idx) in enumerate(members.items()):
            groups.append(
                (
                    key,
                    tuple(leaves[i].dtype for i in idx),
                    tuple(_weakly_typed(leaves[i]) for i in idx),
                )
            )
            for position, i in enumerate(idx):
                places[i] = ("vector", g, position)
        n_other = n_buffer = 0
        for i, buffer in enumerate(is_buffer):
            if places[i] is None:
                if buffer:
                    places[i] = ("buffer", n_buffer)
                    n_buffer += 1
                else:
                    places[i] = ("other", n_other)
                    n_other += 1
        return cls(treedef, places, groups)

    def buffer_types(self, carry):
        """Inside the loop body the buffers arrive wrapped by the loop; their types
        mark them as single leaves when the new state is flattened."""
        return tuple({type(b) for b in carry[2] if not isinstance(b, jax.Array)})

    def pack(self, val, buffer_types):
        leaves = jtu.tree_leaves(
            val, is_leaf=lambda x: bool(buffer_types) and isinstance(x, buffer_types)
        )
        if len(leaves) != len(self.places):
            raise AssertionError("the loop body changed the structure of its state")
        vectors = [[] for _ in self.groups]
        others, bufs = [], []
        for leaf, place in zip(leaves, self.places, strict=True):
            if place[0] == "vector":
                vectors[place[1]].append(leaf)
            elif place[0] == "other":
                others.append(leaf)
            else:
                bufs.append(leaf)
        # Joined as `(1,)` pieces rather than stacked: under `jax.vmap` a stack of
        # mapped scalars comes out with the batch axis last, which the loop's
        # derivative rule then transposes (XLA copying the vector into another
        # layout); the pieces keep it first.
        packed = tuple(
            jnp.concatenate(
                [jnp.reshape(jnp.asarray(x).astype(dtype), (1,)) for x in xs]
            )
            for (dtype, _, _), xs in zip(self.groups, vectors, strict=True)
        )
        return packed, tuple(others), tuple(bufs)

    def unpack(self, carry):
        packed, others, bufs = carry
        leaves = []
        for place in self.places:
            if place[0] == "vector":
                _, g, position = place
                value = packed[g][position]
                _, dtypes, weak = self.groups[g]
                dtype = dtypes[position]
                if dtype != value.dtype:
                    value = value != 0 if dtype == jnp.bool_ else value.astype(dtype)
                if weak[position]:
                    # A counter started from a Python `0` stays weakly typed, as it
                    # would in an unpacked loop.
                    value = _convert_weak(value, dtype, weak_type=True)
                leaves.append(value)
            elif place[0] == "other":
                leaves.append(others[place[1]])
            else:
                leaves.append(bufs[place[1]])
        return jtu.tree_unflatten(self.treedef, leaves)


try:  # restores the weak type of an unpacked scalar
    from jax._src.lax.lax import _convert_element_type as _convert_weak
except (
    ImportError
):  # pragma: no cover - a JAX without it: weak scalars stay as they are
    _convert_weak = None


def _weakly_typed(leaf) -> bool:
    return bool(getattr(jax.typeof(leaf), "weak_type", False))


def weak_type_as(value, like):
    """`value` (a scalar of `like`'s dtype), weakly typed if `like` is: a counter
    updated by an array keeps the weak type it started with (a Python `0`), as one
    updated by Python numbers does."""
    if _weakly_typed(like) and not _weakly_typed(value) and _convert_weak is not None:
        return _convert_weak(value, jnp.result_type(like), weak_type=True)
    return value


def _vector_of(leaf, int_dtype):
    """The packed vector a scalar leaf joins (keyed by the vector's dtype), or None
    for a leaf kept as it is: arrays and other dtypes (and weakly typed scalars if
    their weak type cannot be restored)."""
    if not isinstance(leaf, jax.Array) or leaf.shape != ():
        return None
    if _weakly_typed(leaf) and _convert_weak is None:
        return None
    dtype = leaf.dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype
    if dtype == jnp.bool_ or (
        jnp.issubdtype(dtype, jnp.signedinteger)
        and dtype.itemsize <= int_dtype.itemsize
    ):
        return int_dtype
    return None


class AbstractCustomGradientAdjoint(AbstractAdjoint):
    """An adjoint that defines the derivative of the whole solve itself (rather than
    differentiating the loop). `diffeqsolve` hands it the checked problem through
    `custom_solve(solve, problem)`, where `solve` is `diffeqsolve` and `problem` the
    dict of its arguments."""

    @abc.abstractmethod
    def custom_solve(self, solve: Callable, problem: dict):
        """Returns the `Solution`, with this adjoint's derivative rule attached."""


def closure_convert_terms(terms, t0, y0, args):
    """Makes the values that vector-field closures capture (e.g. parameters traced by
    an outer `jax.grad`) explicit leaves of the terms, so that a custom derivative
    rule can differentiate with respect to them."""
    from .._control_term import is_control_term
    from .._term import MultiTerm, ODETerm, is_term

    t0 = jnp.asarray(t0)

    def convert(term):
        if isinstance(term, MultiTerm):
            return MultiTerm(*(convert(sub) for sub in term.terms))
        if isinstance(term, ODETerm) or is_control_term(term):
            converted = eqx.filter_closure_convert(term.vector_field, t0, y0, args)
            return eqx.tree_at(lambda x: x.vector_field, term, converted)
        return term

    return jtu.tree_map(convert, terms, is_leaf=is_term)

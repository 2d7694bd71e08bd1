"""The default adjoint: reverse mode through the loop with recursive checkpointing."""

import math
from typing import final

import equinox as eqx
import jax.tree_util as jtu

from .._profile import aval_bytes
from .._transforms import batch_size, differentiation_levels
from .base import AbstractAdjoint, HeldMembersLoop, while_loop_of_kind
from .reverse_only import mark_reverse_only

# Raised when a forward-mode derivative reaches the checkpointed loop: the solve was
# traced without forward mode in sight, so the loop chosen supports reverse mode only.
FORWARD_MODE_MESSAGE = (
    "A forward-mode derivative (`jax.jvp`, `jax.jacfwd`, or the linear function "
    "returned by `jax.linearize`) reached the checkpointed loop of "
    "`RecursiveCheckpointAdjoint` (the default adjoint), which supports reverse mode "
    "only. The loop is chosen when the solve is traced, and this solve was traced "
    "without forward mode: typically a `jax.jit`-compiled function that was called "
    "before being differentiated. Apply `jax.jit` outside the derivative "
    "(`jax.jit(lambda x, v: jax.jvp(f, (x,), (v,)))` with `f` not jitted), or pass "
    "`adjoint=diffeqx.ForwardMode()` (forward mode only) or "
    "`adjoint=diffeqx.DirectAdjoint()` (any mode) to `diffeqsolve`."
)


# The memory a fixed-step solve under reverse mode may use to keep what its steps'
# backward pass needs (their linearisation's values), or else every step's state,
# when `checkpoints` is left to the library. Half of 32 MiB: a program whose
# temporary memory is larger is given fresh pages by the C library's allocator at
# every call on Linux, and their page faults cost about 0.35 ms per MB (measured on
# CPU: two solves of a continuous normalising flow keeping 27 MiB each ran in 38 ms,
# against 21 ms in blocks of one step). bench_sde.py's neural SDE gradient keeps 8 MiB.
_STORAGE_BYTES = 2**24


# The memory the loop over the steps may use to store every step's state for the
# backward pass, when `checkpoints` is left to the library: as `_STORAGE_BYTES`, and
# for the same reason. (Measured on CPU: the neural-ODE gradient of one trajectory,
# 110 bytes a step, compiles to 0.73x the optimised HLO instructions, in 0.8x the
# time, and runs in 0.85x. The training step of 32 trajectories under `jax.vmap`,
# 9.75 MiB at `max_steps=4096`, compiled in 0.72x-0.83x the time it took with the
# store thinned (which then compiled a second copy of the step, to recompute the
# steps between two stored states) and ran in 1.01x-1.13x (zeroing the store). With
# 256 trajectories in one state, 8 kB a step, 32 MiB, it compiled faster but ran
# slower with two threads: zeroing the store on every run then costs more than
# the recomputation it saves.)
_EVERY_STEP_BYTES = _STORAGE_BYTES


def _thinned_slots(max_steps: int) -> int | None:
    """The states the default adjoint's loop keeps at a time when it cannot store
    every step's: with `slots` of them its backward pass also needs a segment of
    up to `s` states, `s` the least power of two with `slots * s >= max_steps`
    (see `stored._run_thinned`); `slots` is the even number about `sqrt(max_steps)`
    that makes `slots * s` cover `max_steps`, which about minimises `slots + s`
    (64 and 64 at `max_steps=4096`). None where that is not below `max_steps`."""
    segment = 1
    while segment * segment < max_steps:
        segment *= 2
    slots = -(-max_steps // segment)
    slots += slots % 2
    return slots if 2 <= slots < max_steps else None


@final
class RecursiveCheckpointAdjoint(AbstractAdjoint):
    """Differentiates the solve by backpropagating through the solver's operations
    ("discretise-then-optimise"): gradients are exact for the discrete solution.

    Memory is bounded by checkpointing: only some loop states are stored, and the
    steps in between are recomputed on the backward pass. Memory then grows with the
    number of checkpoints, not with the number of steps; fewer checkpoints cost more
    recomputation. With an explicit `checkpoints`, recursive checkpointing (the
    treeverse scheme, Equinox's checkpointed loop).

    **Arguments:**

    - `checkpoints`: the number of stored states. `None` chooses it from `max_steps`
      (which must then be finite for reverse mode): every step's state is stored
      when `max_steps` of them take at most 16 MiB (counting the `jax.vmap` batch;
      the saved outputs are not part of it), which makes a smaller program that
      compiles and runs faster (the loop is then diffeqx's own, which builds the
      program in less time than Equinox's checkpointed loop); otherwise the same
      loop keeps about `sqrt(max_steps)` states (64 at `max_steps=4096`; every step's
      while they last, then every other one, and so on) and a segment of as many
      again in the backward pass, where each step between stored states is
      recomputed once (not with forward mode over reverse mode, e.g.
      `jax.hessian`, which takes Equinox's checkpointed loop with about
      `sqrt(2 * max_steps)` checkpoints). On the
      fixed-step path (constant steps known at trace time, see `diffeqsolve`), the
      steps are instead grouped into `checkpoints` blocks of equal length, each
      storing one state and recomputing its steps on the backward pass. With `checkpoints=None` there,
      a solve whose steps' values all fit in 64 MiB stores them and recomputes
      nothing (the bound is an upper one: every value a step computes, from its
      traced program, times the steps and the `jax.vmap` batch size); a larger
      one runs in blocks (about the square root of the number of steps of them).

    Supports every mode and order, choosing the loop from the derivatives being
    taken (read from JAX's trace when the solve is traced):

    - reverse mode (`jax.grad`, `jax.vjp`), and forward mode over it (`jax.hessian`,
      `jax.jacfwd(jax.grad(...))`): recursive checkpointing as above;
    - forward mode only (`jax.jvp`, `jax.jacfwd`): a plain loop carrying tangents, as
      `ForwardMode`;
    - reverse mode over another derivative (`jax.grad(jax.grad(...))`), and
      `jax.linearize` (whose linear function may be evaluated or transposed): a loop
      bounded by `max_steps`, as `DirectAdjoint`, whose cost grows with `max_steps`.

    The choice is made when the solve is traced, so apply `jax.jit` outside the
    derivatives (`jax.jit(jax.hessian(loss))`), not between them: a jitted function
    already traced without derivatives keeps the checkpointed loop, which supports
    `jax.grad` and `jax.hessian` but not `jax.jvp` or reverse-over-reverse; forward
    mode then raises an error saying so. Where the transformations cannot be read
    from JAX (a transformation it does not know, or a JAX whose internals changed),
    it raises rather than guess; pass `DirectAdjoint()` or `ForwardMode()` then.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.checkpoints is not None and (
            not isinstance(self.checkpoints, int) or self.checkpoints < 1
        ):
            raise ValueError(
                "`RecursiveCheckpointAdjoint(checkpoints=...)` must be a positive int "
                f"or None, got {self.checkpoints!r}."
            )

    def loop(self, *, run_loop, init_state, max_steps):
        levels = differentiation_levels(strict=True)
        if max_steps is None and self.checkpoints is None:
            if "reverse" in levels:
                raise ValueError(
                    "Reverse-mode differentiation (`jax.grad`, `jax.vjp`) of a solve "
                    "with `max_steps=None` needs a bound on the number of stored "
                    "states: pass a finite `max_steps`, or "
                    "`RecursiveCheckpointAdjoint(checkpoints=...)`."
                )
            # No reverse mode: an unbounded loop, differentiable in forward mode.
            loop = while_loop_of_kind("lax")
            return run_loop(init_state, loop, loop)
        if levels and levels[0] == "forward" and "reverse" not in levels:
            # Forward mode only (`jax.jvp`, `jax.jacfwd`, any order): a plain loop,
            # carrying tangents alongside the solution.
            loop = while_loop_of_kind("lax")
            return run_loop(init_state, loop, loop)
        if "linearize" in levels and "reverse" not in levels:
            # `jax.linearize`: forward mode whose linear function may also be
            # transposed (`jax.linear_transpose`, lineax's operators), so a loop that
            # supports both modes where `max_steps` bounds it.
            loop = while_loop_of_kind("lax" if max_steps is None else "bounded")
            return run_loop(init_state, loop, loop)
        if "reverse" in levels[1:]:
            # Reverse mode over another derivative (`jax.grad(jax.grad(...))`,
            # `jax.grad(jax.jvp(...))`): the checkpointed loop's own backward pass is
            # not reverse-differentiable, so use a loop bounded by `max_steps` that is
            # differentiable to any order.
            if max_steps is None:
                raise ValueError(
                    "Second derivatives in reverse mode through "
                    "`RecursiveCheckpointAdjoint` need a finite `max_steps`; got "
                    "`max_steps=None`."
                )
            loop = while_loop_of_kind("bounded")
            return run_loop(init_state, loop, loop)

        # No derivative, reverse mode, or forward mode over reverse mode (e.g.
        # `jax.hessian`): recursive checkpointing. Forward mode alone cannot pass this
        # loop; the marks make it say so if it is applied later.
        def mark(tree):
            return mark_reverse_only(tree, FORWARD_MODE_MESSAGE)

        # Under reverse mode the loop stores and loads every leaf of its state, so
        # its scalars travel packed (one kernel per vector rather than per scalar).
        pack = "reverse" in levels
        checkpoints = self._outer_checkpoints(init_state, max_steps)
        outer = while_loop_of_kind(
            "checkpointed", checkpoints=checkpoints, pack_scalars=pack
        )
        if pack and self.checkpoints is None and checkpoints == max_steps:
            # Every step's state is stored: a loop of diffeqx's own, which traces
            # the step fewer times than Equinox's (see `stored.py`), where the
            # solve's step holds the members of a `jax.vmap` batch that have
            # finished.
            stored = while_loop_of_kind("stored", pack_scalars=pack)
            outer = HeldMembersLoop(stored, fallback=outer)
        elif pack and self.checkpoints is None and levels == ["reverse"]:
            # Too many states to store them all: the same loop keeping at most
            # `_thinned_slots(max_steps)` of them (every step's while they last,
            # then every other one, ...) and recomputing the steps in between in
            # the backward pass, at most once each.
            slots = _thinned_slots(max_steps)
            if slots is not None:
                stored = while_loop_of_kind("stored", pack_scalars=pack, slots=slots)
                outer = HeldMembersLoop(stored, fallback=outer)
        if len(levels) > 1:
            # Forward over reverse: the backward pass re-runs each step, inner loops
            # included, under forward mode, so those must support both modes.
            inner = while_loop_of_kind("bounded")
        else:
            inner = while_loop_of_kind("checkpointed", pack_scalars=pack)
        return run_loop(init_state, outer, inner, mark=mark)

    def _outer_checkpoints(self, init_state, max_steps):
        """The checkpoints of the loop over the steps. Left to the library, every
        step's state is stored when `max_steps` of them fit in `_EVERY_STEP_BYTES`
        (counting the `jax.vmap` batch; the save buffers are not stored per step).
        The backward pass then differentiates each step straight after recomputing
        it, with no decision between the two, which makes a smaller program that
        XLA fuses better. Otherwise Equinox's default: about `sqrt(2 * max_steps)`
        checkpoints, recomputing the steps in between."""
        if self.checkpoints is not None or max_steps is None:
            return self.checkpoints
        batch = batch_size()
        if batch is None:
            return None
        from .._solve.state import buffers

        skip = {id(x) for x in jtu.tree_leaves(buffers(init_state))}
        per_step = sum(
            aval_bytes(x) for x in jtu.tree_leaves(init_state) if id(x) not in skip
        )
        if per_step * batch * max_steps <= _EVERY_STEP_BYTES:
            return max_steps
        return None

    def fixed_step_block(self, num_steps):
        # Constant steps known at trace time run as a scan of rematerialised blocks:
        # `checkpoints` blocks (about sqrt(num_steps) of them by default), each storing
        # one state for the backward pass and recomputing its steps. Blocks only
        # matter to reverse mode: without it, a plain scan (no block boundaries,
        # each of which costs a few kernel launches).
        # (Strict, as the choice of the while loop: under a transformation it
        # cannot identify, the solve says so rather than guess.)
        if "reverse" not in differentiation_levels(strict=True):
            return 0
        if self.checkpoints is None:
            return _block_size(num_steps, math.isqrt(num_steps))
        return _block_size(num_steps, -(-num_steps // self.checkpoints))

    def fixed_step_storage(self):
        # With `checkpoints` chosen by the library, a short solve whose steps' values
        # for the backward pass fit in `_STORAGE_BYTES` keeps them rather than
        # recomputing its blocks (a smaller program, compiled and run faster); else
        # one whose every step's state fits keeps those, in blocks of one step. An
        # explicit `checkpoints` is the user's memory budget, and keeps the blocks.
        return _STORAGE_BYTES if self.checkpoints is None else 0


def _block_size(num_steps, target):
    """A block size near `target`: a divisor of `num_steps` within a factor of two
    if there is one (so that no padded steps are computed), else `target` itself."""
    target = max(1, target)
    for offset in range(target):
        for candidate in (target - offset, target + offset):
            if target // 2 <= candidate <= 2 * target and num_steps % candidate == 0:
                return candidate
    return target

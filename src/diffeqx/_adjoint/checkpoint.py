"""The default adjoint: reverse mode through the loop with recursive checkpointing."""

from typing import final

import equinox as eqx

from .base import AbstractAdjoint, while_loop_of_kind


@final
class RecursiveCheckpointAdjoint(AbstractAdjoint):
    """Differentiates the solve by backpropagating through the solver's operations
    ("discretise-then-optimise"): gradients are exact for the discrete solution.

    Memory is bounded by recursive checkpointing (the treeverse scheme): only
    `checkpoints` loop states are stored, and the steps in between are recomputed on
    the backward pass. Memory then grows with `checkpoints`, not with the number of
    steps; fewer checkpoints cost more recomputation.

    **Arguments:**

    - `checkpoints`: the number of stored states. `None` chooses it from `max_steps`
      (which must then be finite).

    Supports reverse mode (`jax.grad`, `jax.vjp`); for forward mode use `ForwardMode`
    or `DirectAdjoint`.
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
        if max_steps is None and self.checkpoints is None:
            raise ValueError(
                "`RecursiveCheckpointAdjoint` needs a finite `max_steps` or an explicit "
                "`checkpoints` count; got `max_steps=None` and `checkpoints=None`."
            )
        outer = while_loop_of_kind("checkpointed", checkpoints=self.checkpoints)
        inner = while_loop_of_kind("checkpointed")
        return run_loop(init_state, outer, inner)

"""`DirectAdjoint`: differentiates straight through a bounded loop, in any mode."""

from typing import final

from .base import AbstractAdjoint, while_loop_of_kind


@final
class DirectAdjoint(AbstractAdjoint):
    """Differentiates through the solver's operations with a loop that supports both
    forward and reverse mode, to any order. Its cost and memory grow with
    `max_steps` (the loop is unrolled into nested bounded loops), so prefer
    `RecursiveCheckpointAdjoint` for reverse mode and `ForwardMode` for forward mode,
    and use this one for mixed or higher-order derivatives."""

    def loop(self, *, run_loop, init_state, max_steps):
        if max_steps is None:
            raise ValueError(
                "`DirectAdjoint` needs a finite `max_steps`; got `max_steps=None`."
            )
        loop = while_loop_of_kind("bounded")
        return run_loop(init_state, loop, loop)

    def fixed_step_block(self, num_steps):
        # A scan is differentiable in both modes, to any order.
        return 0

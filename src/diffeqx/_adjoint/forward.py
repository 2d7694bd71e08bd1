"""`ForwardMode`: forward-mode differentiation through a plain loop."""

from typing import final

from .base import AbstractAdjoint, while_loop_of_kind


@final
class ForwardMode(AbstractAdjoint):
    """Forward-mode differentiation (`jax.jvp`, `jax.jacfwd`) through the solve: one
    pass carries the tangents alongside the solution, with no stored history.
    Efficient when there are fewer inputs than outputs. Does not support reverse
    mode."""

    def loop(self, *, run_loop, init_state, max_steps):
        loop = while_loop_of_kind("lax")
        return run_loop(init_state, loop, loop)

    def fixed_step_block(self, num_steps):
        return 0

"""Counting executed vector-field evaluations, to compare the work two libraries do."""

import jax


class Counted:
    """A vector field `(t, y, args) -> ...` that counts its executed evaluations: one
    host callback per call (a call batched by `jax.vmap` counts once). Read `count`
    after `jax.effects_barrier()`."""

    def __init__(self, field):
        self.field = field
        self.count = 0

    def _tick(self):
        self.count += 1

    def __call__(self, t, y, args):
        jax.debug.callback(self._tick)
        return self.field(t, y, args)

"""A minimal Adam optimiser for the examples (which depend on nothing beyond JAX,
equinox and diffeqx)."""

import jax
import jax.numpy as jnp


def adam(learning_rate, beta1=0.9, beta2=0.999, eps=1e-8):
    """A minimal Adam: `init(params) -> state`, `update(grads, state) -> steps, state`."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return (zeros, zeros, jnp.zeros((), jnp.int32))

    def update(grads, state):
        m, v, count = state
        count = count + 1
        m = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, m, grads)
        v = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, v, grads)
        # Explicit casts throughout, so the examples also run under
        # `jax_numpy_dtype_promotion="strict"`.
        t = count.astype(jnp.result_type(float))
        scale = learning_rate * jnp.sqrt(1 - beta2**t) / (1 - beta1**t)
        steps = jax.tree.map(
            lambda m, v: -scale.astype(m.dtype) * m / (jnp.sqrt(v) + eps), m, v
        )
        return steps, (m, v, count)

    return init, update

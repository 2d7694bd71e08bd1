import jax

# Tests compare against float64 references; float32 behaviour is tested with explicit
# float32 inputs.
jax.config.update("jax_enable_x64", True)
# No implicit dtype promotion anywhere: careful users (and Diffrax's own tests) turn this
# on, so every internal operation must cast explicitly.
jax.config.update("jax_numpy_dtype_promotion", "strict")

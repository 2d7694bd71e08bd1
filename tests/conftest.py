import jax

# Tests compare against float64 references; float32 behaviour is tested with explicit
# float32 inputs.
jax.config.update("jax_enable_x64", True)

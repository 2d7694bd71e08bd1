"""What JAX transformations the current computation is being traced under."""


def active_transforms() -> list[str]:
    """The transformations applied to the computation being traced, innermost first:
    `"reverse"` (`jax.grad`, `jax.vjp`), `"forward"` (`jax.jvp`, `jax.jacfwd`) or
    `"batch"` (`jax.vmap`). Read from JAX's trace context (outer transformations stay
    visible inside `jax.jit`); an empty list where it cannot be read."""
    try:
        from jax._src import core
        from jax._src.interpreters import ad, batching, partial_eval as pe

        trace = core.trace_ctx.trace
    except (ImportError, AttributeError):
        return []
    linearize = getattr(ad, "LinearizeTrace", ())
    levels = []
    while trace is not None:
        if linearize and isinstance(trace, linearize):
            levels.append("reverse")
        elif isinstance(trace, ad.JVPTrace):
            parent = getattr(trace, "parent_trace", None)
            # Reverse mode by jvp-then-partial-evaluation (older JAX versions).
            levels.append("reverse" if isinstance(parent, pe.JaxprTrace) else "forward")
        elif isinstance(trace, batching.BatchTrace):
            levels.append("batch")
        trace = getattr(trace, "parent_trace", None)
    return levels


def differentiation_levels() -> list[str]:
    """`active_transforms()` without the batching levels."""
    return [level for level in active_transforms() if level != "batch"]


def is_batched() -> bool:
    """Whether the computation is being traced under `jax.vmap`."""
    return "batch" in active_transforms()

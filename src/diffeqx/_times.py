"""Arrays of times given by users (`SaveAt(ts=...)`, `StepTo(ts=...)`, step and
jump times): converted once, with errors that name the argument."""

import jax.numpy as jnp
import numpy as np


class TimesError(ValueError, RuntimeError):
    """Times that cannot be used (save times outside `[t0, t1]` or out of order,
    step times out of order), found when `diffeqsolve` is called. A `ValueError`,
    and also a `RuntimeError`, which is what Diffrax raises for them (while the
    solve runs), so that code catching either keeps working."""


def as_times(ts, argument: str):
    """`ts` as a 1-D floating-point array. `argument` names it in errors, e.g.
    "`SaveAt(ts=...)`"."""
    if isinstance(ts, (list, tuple)):
        try:
            ts = np.asarray(ts, dtype=float)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{argument} must be a 1-D array of times, got a ragged or "
                f"non-numeric sequence {ts!r}."
            ) from e
    # A NumPy array stays one: under `jax.jit` it is then still known when the
    # solve is traced (as a JAX array it would be a tracer), which lets a
    # constant-step solve plan its saves (see `_solve/fixed.py`).
    ts = ts if isinstance(ts, np.ndarray) else jnp.asarray(ts)
    if ts.ndim != 1:
        raise ValueError(
            f"{argument} must be a 1-D array of times, but got shape {ts.shape}."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    return ts

"""Moving a time by units in the last place (ULPs).

Steps that end next to a special time (a jump, the end of the interval) are placed
a fixed number of representable numbers away from it, so that these rules give the
same steps in every precision. One convention throughout, shared with Diffrax: the
neighbour of zero is the smallest *normal* number of that sign (never a subnormal,
which some hardware flushes to zero)."""

import functools

import jax
import jax.lax as lax
import jax.numpy as jnp


def _follows_t(fn):
    """`fn(t, ...)`, differentiable in `t` with derivative 1: a time moved by a few
    ULPs moves with `t` (e.g. a step ending just before a jump time given as a
    traced value, whose location a gradient may ask about). JAX has no derivative
    for `nextafter` or bit casts."""

    @functools.wraps(fn)
    def wrapped(t, *static):
        @jax.custom_jvp
        def moved(t):
            return fn(t, *static)

        @moved.defjvp
        def moved_jvp(primals, tangents):
            (t,), (t_dot,) = primals, tangents
            return moved(t), t_dot

        return moved(jnp.asarray(t))

    return wrapped


@_follows_t
def next_up(t):
    """The representable number just above `t`."""
    t = jnp.asarray(t)
    tiny = jnp.finfo(t.dtype).tiny
    return jnp.where(t == 0, tiny, jnp.nextafter(t, jnp.asarray(jnp.inf, t.dtype)))


@_follows_t
def next_down(t):
    """The representable number just below `t`."""
    t = jnp.asarray(t)
    tiny = jnp.finfo(t.dtype).tiny
    return jnp.where(t == 0, -tiny, jnp.nextafter(t, jnp.asarray(-jnp.inf, t.dtype)))


@_follows_t
def ulps_below(t, count: int):
    """`next_down` applied `count` times, in constant time: on the integer image of
    a float (sign and magnitude), one step down is one unit off the magnitude (away
    from zero for negative numbers)."""
    t = jnp.asarray(t)
    int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[t.dtype.itemsize]
    magnitude_bits = lax.bitcast_convert_type(jnp.abs(t), int_dtype)
    tiny_bits = lax.bitcast_convert_type(
        jnp.asarray(jnp.finfo(t.dtype).tiny), int_dtype
    )
    count_bits = jnp.asarray(count, int_dtype)
    positive = t > 0
    # Positive: the magnitude shrinks, but not past zero (that would need the
    # zero rule below; it only matters within `count` ULPs of zero).
    down = jnp.maximum(magnitude_bits - count_bits, 0)
    # Zero or negative: the magnitude grows; from zero the first step lands on
    # -tiny and the remaining ones move on from there.
    from_zero = tiny_bits + count_bits - 1
    up = jnp.where(t == 0, from_zero, magnitude_bits + count_bits)
    bits = jnp.where(positive, down, up)
    value = lax.bitcast_convert_type(bits, t.dtype)
    return jnp.where(positive, value, -value)

"""Counting XLA compilations (JAX's monitoring events), for tests that check a call
reuses a compiled program."""

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_state = {"active": False, "count": 0}


def _listen(event, duration, **kwargs):
    if _state["active"] and event == _COMPILE_EVENT:
        _state["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def compilations(fn, *args):
    """`(number of XLA compilations during fn(*args), its result)`."""
    _state.update(active=True, count=0)
    try:
        out = jax.block_until_ready(fn(*args))
    finally:
        _state["active"] = False
    return _state["count"], out

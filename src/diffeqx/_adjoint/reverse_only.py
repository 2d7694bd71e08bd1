"""A marker on the inputs of a reverse-mode-only loop: reverse-mode derivatives pass
through it unchanged, and a forward-mode derivative that reaches it stops with a
message saying what to do instead (rather than JAX's error about `custom_vjp`).

It is a pair of identity primitives. `reverse_only` marks a value; its JVP rule marks
the tangent with `forward_tangent`, which is linear: transposing it (reverse mode:
`jax.grad`, `jax.vjp`, `jax.hessian`) is the identity, while evaluating, compiling or
batching it (forward mode: `jax.jvp`, `jax.jacfwd`, the linear function of
`jax.linearize`) raises. Those only happen when the forward-mode derivative is
actually computed, and the marked values come before the loop, so the message appears
before JAX's own error about the loop's `custom_vjp`.
"""

import equinox as eqx
import jax.tree_util as jtu

try:
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir
except ImportError:  # pragma: no cover - a JAX without these extension points
    Primitive = None


class ForwardModeError(TypeError):
    """A forward-mode derivative reached a loop that supports reverse mode only."""


def _raise(*_, message, **__):
    raise ForwardModeError(message)


if Primitive is not None:
    reverse_only_p = Primitive("diffeqx_reverse_only")
    forward_tangent_p = Primitive("diffeqx_forward_tangent")

    reverse_only_p.def_impl(lambda x, *, message: x)
    reverse_only_p.def_abstract_eval(lambda aval, *, message: aval)
    mlir.register_lowering(
        reverse_only_p,
        mlir.lower_fun(lambda x, *, message: x, multiple_results=False),
    )
    batching.primitive_batchers[reverse_only_p] = lambda args, dims, *, message: (
        reverse_only_p.bind(*args, message=message),
        dims[0],
    )

    def _reverse_only_jvp(primals, tangents, *, message):
        (x,), (t,) = primals, tangents
        if type(t) is ad.Zero:
            return x, t
        return x, forward_tangent_p.bind(t, message=message)

    ad.primitive_jvps[reverse_only_p] = _reverse_only_jvp

    forward_tangent_p.def_impl(_raise)
    forward_tangent_p.def_abstract_eval(lambda aval, *, message: aval)
    mlir.register_lowering(forward_tangent_p, _raise)
    batching.primitive_batchers[forward_tangent_p] = _raise

    def _forward_tangent_jvp(primals, tangents, *, message):
        (x,), (t,) = primals, tangents
        out = forward_tangent_p.bind(x, message=message)
        if type(t) is ad.Zero:
            return out, t
        return out, forward_tangent_p.bind(t, message=message)

    ad.primitive_jvps[forward_tangent_p] = _forward_tangent_jvp
    ad.primitive_transposes[forward_tangent_p] = lambda ct, x, *, message: [ct]


def mark_reverse_only(tree, message: str):
    """`tree`, unchanged in value, with every floating-point array marked so that a
    forward-mode derivative through it raises `ForwardModeError(message)`."""
    if Primitive is None:  # pragma: no cover
        return tree
    return jtu.tree_map(
        lambda x: (
            reverse_only_p.bind(x, message=message) if eqx.is_inexact_array(x) else x
        ),
        tree,
    )

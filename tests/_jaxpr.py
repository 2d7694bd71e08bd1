"""Walking a jaxpr, nested loop bodies and branches included."""

import jax


def equations(fn, *args):
    """Every equation of the jaxpr of `fn(*args)`, descending into the jaxprs that
    equations hold (loop bodies, branches, inner jitted functions)."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for item in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(item, "jaxpr", None)
                    if inner is not None:
                        yield from walk(getattr(inner, "jaxpr", inner))

    return list(walk(jax.make_jaxpr(fn)(*args).jaxpr))

"""A solver's `term_structure`: does a PyTree of terms fit it, and if not, where not.

A structure is a PyTree whose leaves are term classes (`ODETerm`, `AbstractTerm`) or
subscripted term classes:

- `MultiTerm[tuple[A, B]]`: a `MultiTerm` whose parts fit `A` and `B`;
- `AbstractTerm[VF, Control]` (or `ControlTerm[VF, Control]`): a term whose vector
  field and control are of these types (checked with values, by tracing the term).

Containers (tuples, lists, dicts) must match node for node.
"""

import types
import typing
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from .._term import VFT, AbstractTerm, ControlT, MultiTerm


def _is_class_spec(structure) -> bool:
    return isinstance(structure, type) or isinstance(typing.get_origin(structure), type)


def _one_level(tree):
    """The children of `tree`'s root node, with their key paths, and the node type."""
    children, treedef = jtu.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is not tree
    )
    return children, treedef


def _node_repr(tree) -> str:
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of {len(tree)}"
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(tree, key=str)}"
    if isinstance(tree, AbstractTerm):
        return type(tree).__name__
    return f"{tree!r} (of type {type(tree).__name__})"


def structure_repr(x) -> str:
    """A short description of a structure or of a PyTree of terms."""
    if x is Any:
        return "Any"
    origin = typing.get_origin(x)
    if origin is not None and not isinstance(x, types.UnionType):
        name = getattr(origin, "__name__", repr(origin))
        inner = ", ".join(structure_repr(a) for a in typing.get_args(x))
        return f"{name}[{inner}]"
    if isinstance(x, MultiTerm):
        return "MultiTerm(" + ", ".join(structure_repr(t) for t in x.terms) + ")"
    if isinstance(x, AbstractTerm):
        return type(x).__name__
    if isinstance(x, (tuple, list)):
        inner = ", ".join(structure_repr(v) for v in x)
        return f"({inner},)" if isinstance(x, tuple) and len(x) == 1 else f"({inner})"
    if isinstance(x, dict):
        return (
            "{" + ", ".join(f"{k!r}: {structure_repr(v)}" for k, v in x.items()) + "}"
        )
    # jaxtyping annotations name `jax.Array` by its implementation's module path.
    return getattr(x, "__name__", repr(x)).replace("jaxlib._jax.Array", "Array")


def _multiterm_parts(structure) -> tuple:
    """The part structures of `MultiTerm[tuple[A, B, ...]]`."""
    (parts,) = typing.get_args(structure) or (None,)
    if typing.get_origin(parts) is not tuple:
        raise TypeError(
            "A subscripted MultiTerm in a term_structure must be written "
            f"`MultiTerm[tuple[...]]`, got {structure_repr(structure)}."
        )
    return typing.get_args(parts)


def term_structure_mismatch(terms, structure, path: str = "terms") -> str | None:
    """Where `terms` first departs from `structure`, as a sentence fragment naming the
    position, what was expected and what was found; `None` if it fits."""
    if _is_class_spec(structure):
        cls = typing.get_origin(structure) or structure
        if not isinstance(terms, cls):
            return (
                f"at `{path}` expected {structure_repr(structure)}, got "
                f"{_node_repr(terms)}"
            )
        if cls is MultiTerm and typing.get_origin(structure) is MultiTerm:
            parts = _multiterm_parts(structure)
            if len(parts) == 2 and parts[1] is Ellipsis:
                parts = (parts[0],) * len(terms.terms)
            if len(parts) != len(terms.terms):
                return (
                    f"at `{path}` expected a MultiTerm of {len(parts)} terms, got "
                    f"one of {len(terms.terms)}"
                )
            for i, (part, spec) in enumerate(zip(terms.terms, parts, strict=True)):
                found = term_structure_mismatch(part, spec, f"{path}.terms[{i}]")
                if found is not None:
                    return found
        return None
    spec_children, spec_def = _one_level(structure)
    if jtu.treedef_is_leaf(spec_def):
        # Not a class and not a container (e.g. `Any`): anything fits.
        return None
    term_children, term_def = _one_level(terms)
    if isinstance(terms, AbstractTerm) or term_def != spec_def:
        return f"at `{path}` expected {_node_repr(structure)}, got {_node_repr(terms)}"
    for (key, spec), (_, term) in zip(spec_children, term_children, strict=True):
        found = term_structure_mismatch(term, spec, path + jtu.keystr(key))
        if found is not None:
            return found
    return None


def _type_arguments(structure) -> tuple[Any, Any] | None:
    """`(VF, Control)` of a subscripted term class, or None when it has none."""
    origin = typing.get_origin(structure)
    if not isinstance(origin, type) or not issubclass(origin, AbstractTerm):
        return None
    if issubclass(origin, MultiTerm):
        return None
    binding = dict(
        zip(
            getattr(origin, "__parameters__", ()),
            typing.get_args(structure),
            strict=False,
        )
    )
    vf, control = binding.get(VFT, Any), binding.get(ControlT, Any)
    if vf is Any and control is Any:
        return None
    return vf, control


def _fits(value, expected) -> bool:
    """`isinstance` generalised to `Any`, unions and jaxtyping array types. Called on
    traced values, so that arrays are `jax.Array`s whatever their origin."""
    if expected is Any:
        return True
    if (
        isinstance(expected, types.UnionType)
        or typing.get_origin(expected) is typing.Union
    ):
        return any(_fits(value, option) for option in typing.get_args(expected))
    origin = typing.get_origin(expected)
    try:
        return isinstance(value, expected)
    except TypeError:
        # A subscripted generic such as `tuple[int, ...]`: check its class only.
        return origin is None or isinstance(value, origin)


def term_type_mismatch(terms, structure, t, y, args, path: str = "terms") -> str | None:
    """For every subscripted term class `T[VF, Control]` in `structure`, whether the
    matching term's vector field at `(t, y, args)` is a `VF` and its control over
    `[t, t]` is a `Control`. `terms` must already fit `structure`."""
    if _is_class_spec(structure):
        if typing.get_origin(structure) is MultiTerm:
            parts = _multiterm_parts(structure)
            if len(parts) == 2 and parts[1] is Ellipsis:
                parts = (parts[0],) * len(terms.terms)
            for i, (part, spec) in enumerate(zip(terms.terms, parts, strict=True)):
                found = term_type_mismatch(part, spec, t, y, args, f"{path}.terms[{i}]")
                if found is not None:
                    return found
            return None
        expected = _type_arguments(structure)
        if expected is None:
            return None
        vf_type, control_type = expected

        def _check():
            vf = terms.vf(t, y, args)
            control = terms.contr(t, t)
            return _fits(vf, vf_type), _fits(control, control_type)

        vf_ok, control_ok = eqx.filter_eval_shape(_check)
        if not vf_ok:
            return (
                f"the vector field of `{path}` ({type(terms).__name__}) does not "
                f"return a {structure_repr(vf_type)}"
            )
        if not control_ok:
            return (
                f"the control of `{path}` ({type(terms).__name__}) is not a "
                f"{structure_repr(control_type)}"
            )
        return None
    spec_children, spec_def = _one_level(structure)
    if jtu.treedef_is_leaf(spec_def):
        return None
    term_children, term_def = _one_level(terms)
    # A state with the same structure as a PyTree of terms (e.g. a dict of terms and
    # a dict of states with the same keys) gives each term its own part, as a
    # solver applying each term to its part of the state does.
    y_children, y_def = _one_level(y)
    parts = [child for _, child in y_children] if y_def == term_def else None
    for i, ((key, spec), (_, term)) in enumerate(
        zip(spec_children, term_children, strict=True)
    ):
        y_part = y if parts is None else parts[i]
        found = term_type_mismatch(term, spec, t, y_part, args, path + jtu.keystr(key))
        if found is not None:
            return found
    return None

"""The JAX adapter: what the core calls to recognise JAX values and prepare a check of them.

Invariant: preparing a check reads the user's arguments and changes none of them; it refuses, with an
InvalidArgumentError naming the argument, anything it cannot check faithfully (tracers: a check called inside a
JAX transformation; ``grad=`` and ``params=``, which a pure JAX function cannot take; structures that contain
themselves) before fn first runs; detection (:meth:`JaxAdapter.owns`, :meth:`JaxAdapter.pytree_node`) never
writes anything. Names and install hints are the registry's (:mod:`gradbridge._registry`), not this adapter's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradbridge._adapter import CheckSpec, ExpectedParams, ParamBinding
from gradbridge._comparing import mapping
from gradbridge._errors import InvalidArgumentError
from gradbridge._tree import self_reference

from ..common.complex import real_view_array, real_view_shape
from ..common.layout import Candidate, Unchecked, hidden_arrays, layout_leaves, unchecked_notes
from .cache import cache_size, clear_cache
from .compat import Tracer, is_jit_function, staging
from .prepared import JaxPrepared
from .problem import Argument, JaxProblem, dtype_name, is_array, is_complex, is_floating, is_key
from .state import State, holds_tracer, tracer_error
from .x64 import enable_float64


def _hidden_reason(value: Any) -> str:
    """Why the floating arrays inside a value JAX's pytree registry treats as a leaf are not checked."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (f"a {type(value).__module__.split('.')[0]} {type(value).__name__}, passed through unchanged; the JAX "
                "backend checks JAX and NumPy arrays: pass jnp.asarray(...) to check it")
    what = "a dataclass" if dataclasses.is_dataclass(value) else "a type"
    return (f"inside {type(value).__name__}, {what} that JAX's pytree registry does not know, so it is passed "
            "through unchanged: register it (jax.tree_util.register_dataclass, flax.struct.dataclass, "
            "jax.tree_util.register_pytree_with_keys) to check its fields")


def _registered_node(value: Any) -> Optional[Tuple[List[str], List[Any], Callable[[List[Any]], Any]]]:
    """One level of a node of JAX's pytree registry (for backend detection): path suffixes, children, rebuild;
    None for a leaf."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(value, is_leaf=lambda v: v is not value)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return None
    return ([jax.tree_util.keystr(path) for path, _ in pairs], [child for _, child in pairs],
            lambda children: jax.tree_util.tree_unflatten(treedef, children))


class JaxAdapter:
    """Adapter for JAX."""

    name = "jax"
    module_name = "jax"

    #: JAX's registered pytree nodes, for backend detection (arguments are flattened by JAX's own registry)
    pytree_node = staticmethod(_registered_node)

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        clear_cache()

    def cache_size(self) -> int:
        return cache_size()

    def owns(self, value: Any) -> bool:
        """JAX arrays (PRNG keys included), ``custom_vjp``/``custom_jvp`` functions and ``jax.jit`` functions."""
        if isinstance(value, (jax.Array, jax.custom_vjp, jax.custom_jvp)):
            return True
        return is_jit_function(value)

    def version(self) -> str:
        return jax.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether ``jax.grad`` computes in float64 inside the check's 64-bit scope, and whether the
        user's ``jax_enable_x64`` setting comes back unchanged (``gradbridge backends``)."""
        before = bool(jax.config.jax_enable_x64)
        with enable_float64():
            gradient = jax.grad(lambda x: jnp.sum(x * x))(jnp.asarray([1.0, 2.0], dtype=jnp.float64))
            ok = gradient.dtype == jnp.float64 and bool(jnp.allclose(gradient, jnp.asarray([2.0, 4.0])))
        restored = bool(jax.config.jax_enable_x64) == before
        note = (f"gradbridge enables jax_enable_x64 for the duration of a check and restores it (yours is "
                f"{'on' if before else 'off'}{'' if restored else ', NOT restored by the probe'})")
        return ok and restored, note if ok else f"jax.grad in the 64-bit scope gave {gradient.dtype}; {note}"

    def prepare(self, spec: CheckSpec) -> JaxPrepared:
        if spec.grad is not None:
            raise InvalidArgumentError(
                "grad: JAX differentiates fn itself; write a custom gradient as a jax.custom_vjp or jax.custom_jvp "
                "rule and pass the function, or use backend='numpy' to check a hand-written NumPy gradient")
        if spec.params is not None:
            raise InvalidArgumentError(
                "params: JAX functions are pure, so parameters they close over cannot be swapped for perturbed "
                "copies; pass the parameter pytree as an argument instead (check(loss, params, x)): every floating "
                "leaf is checked and named by its path, e.g. params['dense1']['w']")
        arguments: List[Argument] = []
        values: List[Any] = []
        candidates: List[Candidate] = []
        unchecked: List[Unchecked] = []
        positions: List[int] = []
        for index, (name, arg) in enumerate(zip(spec.arg_names, spec.args)):
            cycle = self_reference(arg, name)
            if cycle is not None:  # JAX's flattening would recurse without end
                raise InvalidArgumentError(
                    f"args: {cycle[0]} is {cycle[1]} itself (a structure that contains itself), which JAX's pytree "
                    "flattening cannot walk; pass the arrays in a structure without cycles")
            pairs, treedef = jax.tree_util.tree_flatten_with_path(arg)
            arguments.append(Argument(treedef, len(values), len(pairs)))
            for path, value in pairs:
                if isinstance(value, Tracer):
                    raise tracer_error("args", name + jax.tree_util.keystr(path))
                if is_array(value):
                    complex_view = is_complex(value)  # checked through its real view (..common.complex)
                    shape = real_view_shape(np.shape(value)) if complex_view else tuple(np.shape(value))
                    candidates.append(Candidate(name + jax.tree_util.keystr(path), value, shape, dtype_name(value),
                                                is_floating(value) or complex_view, "input", index))
                    positions.append(len(values))
                else:  # arrays JAX's registry does not reach are passed through: say so
                    unchecked.extend(hidden_arrays(value, name + jax.tree_util.keystr(path), _hidden_reason(value)))
                values.append(value)
        for key, value in spec.kwargs.items():
            if holds_tracer(value):
                raise tracer_error("kwargs", f"{key!r} (or something inside it)")
        leaked = State([("fn", spec.fn)], snapshot=False).watched
        if leaked:
            raise tracer_error("fn", f"a value fn reads ({leaked[0][0]})")
        if staging():
            raise tracer_error("fn", None)
        leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
        problem = JaxProblem(spec, arguments, values, candidates, positions, leaves, chosen)
        x0 = np.concatenate([(real_view_array(candidates[i].value) if is_complex(candidates[i].value)
                              else np.asarray(candidates[i].value, dtype=np.float64)).reshape(-1) for i in chosen])
        prepared = JaxPrepared(problem, lambda *parts: problem.call(parts), x0, compiled=problem.compiled)
        prepared.notes.extend(unchecked_notes(candidates, chosen, unchecked))
        if callable(getattr(spec.fn, "lower", None)) and callable(getattr(spec.fn, "__wrapped__", None)):
            prepared.notes.append("fn is a jax.jit function: the check runs it compiled, inside its own jit(vmap(...)) "
                                  "of fn; contracts='all' also compares it with the Python function it wraps")
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not isinstance(value, jax.Array) or is_key(value):
            return None
        return np.array(value, copy=True)

    def from_numpy(self, array: np.ndarray) -> jax.Array:
        """A JAX array of ``array``'s dtype: made in the 64-bit scope, so float64 stays float64 (the user's
        ``jax_enable_x64`` setting is untouched afterwards)."""
        with enable_float64():
            return jnp.asarray(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        return None  # JAX functions are pure: parameters always come as the dict argument (the pytree)

    def cast_like(self, array: Any, like: Any) -> Any:
        """``array`` in ``like``'s dtype (a layer tap's zero added to a float32 value stays float32)."""
        dtype = getattr(like, "dtype", None)
        return array.astype(dtype) if dtype is not None and hasattr(array, "astype") else array

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """The parameter pytree as ``fn``'s first argument: nested dicts of float64 arrays as the user nested
        them (a :class:`~gradbridge._comparing.mapping.FlatParams` remembers how, or ``params`` is nested
        itself: a flax ``variables`` tree reaches ``module.apply`` as a tree), else the flat dict
        ``{name: float64 array}``. Each leaf is named by its dotted name (``params.fc1.kernel``)."""
        if params is None:
            return ParamBinding(fn=fn)
        if not isinstance(params, mapping.FlatParams) and any(isinstance(v, Mapping) for v in params.values()):
            params = mapping.flat_params(params)
        if isinstance(params, mapping.FlatParams) and params.nested:
            native = params.tree(self.from_numpy)
            by_path = {params.path(name): name for name in params}
            pairs, _ = jax.tree_util.tree_flatten_with_path(native)
            names = {"params" + jax.tree_util.keystr(path): by_path[tuple(str(k.key) for k in path)]
                     for path, _ in pairs}
            leaf, name = next(iter(names.items()))
            return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",), names=names,
                                note=f"jax: params passed to fn as a nested tree of dicts ({name} is {leaf})")
        native = {name: self.from_numpy(array) for name, array in params.items()}
        pairs, _ = jax.tree_util.tree_flatten_with_path(native)  # dict keys come sorted
        names = {"params" + jax.tree_util.keystr(path): path[0].key for path, _ in pairs}
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",), names=names)

    def parameter_roles(self, fn: Callable[..., Any], params: Any = None) -> Optional[mapping.Roles]:
        """The roles of the parameters a JAX function takes, from the leaf names of ``params`` (a template: the
        flax ``variables`` tree, nested dicts of arrays or shapes; or the flat dotted mapping given): flax's
        ``kernel`` (2 axes: dense, more: convolution, laid out canonically), ``bias``, ``scale``,
        ``embedding``, ``batch_stats`` ``mean``/``var``; haiku's ``w``, ``b``, ``offset``, ``embeddings``;
        Keras' ``gamma``, ``beta``, ``moving_mean``, ``moving_variance``. A ``bias`` next to a ``scale`` is
        a norm layer's offset. The layer is the path without its collection (``params``, ``batch_stats``)
        and leaf. None without ``params``, or when no leaf name is known."""
        if not isinstance(params, Mapping) or not params:
            return None
        flat = params if isinstance(params, mapping.FlatParams) else mapping.flat_params(params)
        leaves = {}
        for name, value in flat.items():
            path = flat.path(name)
            if len(path) == 1:
                path = tuple(mapping.normalized(name).split("."))
            layer = path[1:-1] if len(path) > 2 and path[0] in _COLLECTIONS else path[:-1]
            leaves[name] = (".".join(layer), path[-1], mapping.shape_of(value))
        siblings: dict = {}
        for layer, leaf, _ in leaves.values():
            siblings.setdefault(layer, set()).add(leaf)
        roles = {}
        for name, (layer, leaf, shape) in leaves.items():
            role = _LEAF_ROLES.get(leaf)
            if leaf in ("kernel", "w"):
                role = mapping.DENSE_KERNEL if len(shape) == 2 else mapping.CONV_KERNEL if len(shape) > 2 else None
            elif role == mapping.BIAS and siblings[layer] & {"scale", "gamma"}:
                role = mapping.NORM_OFFSET
            roles[name] = mapping.ParamRole(role, None, layer, shape, True, "")
        return roles if any(r.role is not None for r in roles.values()) else None


#: Collections of a flax ``variables`` tree, dropped from a parameter's layer path.
_COLLECTIONS = ("params", "batch_stats")
#: Leaf names that say a parameter's role (kernels by their number of axes, see ``parameter_roles``).
_LEAF_ROLES = {"bias": mapping.BIAS, "b": mapping.BIAS, "scale": mapping.NORM_SCALE, "gamma": mapping.NORM_SCALE,
               "offset": mapping.NORM_OFFSET, "beta": mapping.NORM_OFFSET, "mean": mapping.NORM_MEAN,
               "moving_mean": mapping.NORM_MEAN, "var": mapping.NORM_VARIANCE,
               "moving_variance": mapping.NORM_VARIANCE, "embedding": mapping.EMBEDDING,
               "embeddings": mapping.EMBEDDING}


ADAPTER = JaxAdapter()

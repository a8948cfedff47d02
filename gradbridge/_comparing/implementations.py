"""The implementations of a comparison: resolving each to its adapter, converting the inputs once to NumPy and
then to each framework's arrays, and validating and binding the compared parameters.

Invariant: every implementation receives the same values (converted from one NumPy copy) and the same
parameters, validated against what it owns before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from .. import _registry
from .._adapter import ExpectedParams, ParamBinding
from .._api import argument_names
from .._errors import GradbridgeError, InvalidArgumentError
from .._tree import flatten
from .result import Implementation

# --- implementations ---

@dataclass
class ImplementationEntry:
    """One validated implementation: its label, function, NumPy gradient and adapter."""

    label: str
    fn: Callable[..., Any]
    grad: Optional[Callable[..., Any]]
    adapter: Any

    @property
    def where(self) -> str:
        return f"implementations[{self.label!r}]"


def _backend_key(label: str) -> Optional[str]:
    """The backend a label names (``"torch"``, ``"tf"``...), or None."""
    key = label.lower()
    return _registry.resolve_name(key)


def resolve(implementations: Any) -> List[ImplementationEntry]:
    """Validate the mapping and find each implementation's adapter."""
    if not isinstance(implementations, Mapping):
        raise InvalidArgumentError(f"implementations: expected a mapping of label -> implementation, e.g. "
                                   f"{{'torch': f_torch, 'jax': f_jax}}, got {type(implementations).__name__}")
    if len(implementations) < 2:
        raise InvalidArgumentError(f"implementations: expected at least two implementations to compare, got "
                                   f"{len(implementations)}; to check one alone use gb.check")
    return [_entry(label, value) for label, value in implementations.items()]


def _entry(label: Any, value: Any) -> ImplementationEntry:
    if not isinstance(label, str) or not label:
        raise InvalidArgumentError(f"implementations: labels must be non-empty strings, got {label!r}")
    where = f"implementations[{label!r}]"
    named = _backend_key(label)
    if isinstance(value, Implementation):
        fn, grad, backend = value.fn, value.grad, value.backend
        if backend is not None and named is not None and _backend_key(str(backend)) != named:
            raise InvalidArgumentError(f"{where}: the label names backend {named!r} but the Implementation says "
                                       f"backend={backend!r}; use another label or drop one of them")
        backend = backend if backend is not None else named
    elif isinstance(value, tuple):
        if len(value) != 2:
            raise InvalidArgumentError(f"{where}: a tuple must be (fn, grad), the NumPy form; got a tuple of "
                                       f"{len(value)} items")
        fn, grad = value
        if named is not None and named != "numpy":
            raise InvalidArgumentError(f"{where}: a (fn, grad) pair is the NumPy form, but {named} computes gradients "
                                       "itself; pass the function alone (write custom gradients as the framework's "
                                       "custom-gradient rules)")
        backend = "numpy"
    else:
        fn, grad, backend = value, None, named
    if not callable(fn):
        raise InvalidArgumentError(f"{where}: expected a callable (function, module, model), a (fn, grad) tuple for "
                                   f"NumPy, or gb.Implementation(fn, backend=...), got {type(fn).__name__}")
    if grad is not None and not callable(grad):
        raise InvalidArgumentError(f"{where}: grad must be a callable returning gradients, got {type(grad).__name__}")
    adapter = _adapter_for(where, fn, backend, label)
    if adapter.name == "numpy" and grad is None:
        raise InvalidArgumentError(f"{where}: NumPy has no automatic differentiation; pass (fn, grad) with grad as "
                                   "in gb.check, or gb.Implementation(fn, grad=..., backend='numpy')")
    if adapter.name != "numpy" and grad is not None:
        raise InvalidArgumentError(f"{where}: grad= is for NumPy implementations only; {adapter.name} computes "
                                   "gradients itself")
    return ImplementationEntry(label, fn, grad, adapter)


def _adapter_for(where: str, fn: Any, backend: Optional[str], label: str) -> Any:
    """The adapter for ``backend``, or the one owning ``fn`` (a module, a model, a compiled function)."""
    if backend is not None:
        try:
            return _registry.get_adapter(backend)
        except GradbridgeError as exc:
            raise type(exc)(f"{where}: {exc}") from None
    owners = [a for a in _registry.loaded_adapters() if a.name != "numpy" and a.owns(fn)]
    if len(owners) == 1:
        return owners[0]
    raise InvalidArgumentError(
        f"{where}: {label!r} is not a backend name ({', '.join(sorted(_registry.names()))}), and which "
        f"framework runs this {type(fn).__name__} cannot be told from it; use gb.Implementation(fn, backend='...')")


# --- conversion to NumPy and back ---

def _floating(array: np.ndarray) -> bool:
    return array.dtype.kind == "f" or array.dtype.name.startswith(("bfloat", "float"))


def _array_of(value: Any, source: Set[str]) -> Optional[np.ndarray]:
    """``value`` as NumPy (floating ones as float64 copies) when it is an array of some framework."""
    for adapter in _registry.loaded_adapters():
        if adapter.owns(value):
            array = adapter.to_numpy(value)
            if array is None:
                return None
            source.add(adapter.name)
            return np.array(array, dtype=np.float64) if _floating(array) else np.array(array, copy=True)
    return None


def _is_array_leaf(value: Any) -> bool:
    return isinstance(value, (np.ndarray, np.generic)) or any(
        a.owns(value) for a in _registry.loaded_adapters() if a.name != "numpy")


def _to_numpy_tree(tree: Any, root: str, source: Set[str]) -> Tuple[List[Any], Callable[[Sequence[Any]], Any]]:
    """The leaves of ``tree`` as NumPy arrays (non-arrays kept as they are) and the function rebuilding it."""
    leaves, rebuild = flatten(tree, root, _is_array_leaf)
    values = []
    for leaf in leaves:
        array = _array_of(leaf.value, source)
        values.append(leaf.value if array is None else array)
    return values, rebuild


def _native(entry: ImplementationEntry, values: Sequence[Any], rebuild: Callable[[Sequence[Any]], Any]) -> Any:
    """The tree rebuilt with each NumPy leaf as a new array of ``entry``'s framework."""
    return rebuild([entry.adapter.from_numpy(v) if isinstance(v, np.ndarray) else v for v in values])


class SharedInputs:
    """The positional and keyword arguments, converted to NumPy once, rebuilt per framework on demand."""

    def __init__(self, args: Sequence[Any], kwargs: Mapping[str, Any], source: Set[str]) -> None:
        self.args, self._rebuild_args = _to_numpy_tree(tuple(args), "args", source)
        self._paths = [leaf.path for leaf in flatten(tuple(args), "args", _is_array_leaf)[0]]
        self.kwargs, self._rebuild_kwargs = _to_numpy_tree(dict(kwargs), "kwargs", source)

    def native(self, entry: "ImplementationEntry", arrange: Optional[Callable[[int, np.ndarray], np.ndarray]] = None
               ) -> Tuple[tuple, Dict[str, Any]]:
        """The arguments as ``entry``'s arrays; ``arrange(position, array)`` lays out each top-level positional
        array as the implementation takes it (a channels-last implementation's images)."""
        args = list(self.args)
        if arrange is not None:
            for k, path in enumerate(self._paths):
                position = _top_position(path)
                if position is not None and isinstance(args[k], np.ndarray):
                    args[k] = arrange(position, args[k])
        return _native(entry, args, self._rebuild_args), _native(entry, self.kwargs, self._rebuild_kwargs)


def _top_position(path: str) -> Optional[int]:
    """``i`` for the path of a top-level positional argument (``args[i]``), else None."""
    inner = path[len("args["):-1] if path.startswith("args[") and path.endswith("]") else ""
    return int(inner) if inner.isdigit() else None


def params_to_numpy(params: Any, source: Set[str]) -> Optional[Dict[str, np.ndarray]]:
    """``params`` as one flat ``{dotted name: float64 array}`` (nested mappings joined with dots)."""
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise InvalidArgumentError(f"params: expected a mapping of parameter name -> array (e.g. a torch state_dict "
                                   f"or {{'fc1.weight': w1, ...}}), got {type(params).__name__}")
    flat: Dict[str, np.ndarray] = {}

    def walk(mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            if not isinstance(key, str) or not key:
                raise InvalidArgumentError(f"params: names must be non-empty strings, got {key!r}")
            name = prefix + key
            if isinstance(value, Mapping):
                walk(value, name + ".")
                continue
            array = _array_of(value, source)
            if array is None:
                raise InvalidArgumentError(f"params[{name!r}]: expected an array (NumPy or any framework's), got "
                                           f"{type(value).__name__}")
            if name in flat:
                raise InvalidArgumentError(f"params: {name!r} is given twice")
            flat[name] = array

    walk(params, "")
    return flat


# --- parameters ---

def validate_params(entry: ImplementationEntry, params: Optional[Dict[str, np.ndarray]]) -> None:
    """Names and shapes of ``params`` against what a module or model owns; one error listing every problem."""
    if params is None:
        return
    try:
        expected = entry.adapter.expected_params(entry.fn)
    except GradbridgeError as exc:
        raise type(exc)(f"{entry.where}: {exc}") from None
    if expected is None:
        return
    problems = _param_problems(expected, params)
    if problems:
        listing = ", ".join(f"{n} {tuple(s)}" for n, s in expected.required.items())
        optional = ", ".join(f"{n} {tuple(s)}" for n, s in expected.optional.items())
        raise InvalidArgumentError(
            f"{entry.where}: params do not match the parameters of the {expected.owner} ({expected.convention}): "
            + "; ".join(problems) + f". Expected: {listing or '(none)'}"
            + (f"; may also be given: {optional}" if optional else "")
            + f". Given: {', '.join(f'{n} {a.shape}' for n, a in params.items()) or '(none)'}")


def _param_problems(expected: ExpectedParams, params: Dict[str, np.ndarray]) -> List[str]:
    problems = []
    missing = [n for n in expected.required if n not in params]
    if missing:
        problems.append("missing " + ", ".join(f"{n!r} (shape {tuple(expected.required[n])})" for n in missing))
    known = {**expected.optional, **expected.required}
    for name, array in params.items():
        if name in expected.unsupported:
            problems.append(f"{name!r} cannot be loaded: {expected.unsupported[name]}")
        elif name not in known:
            close = [n for n in known if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
            hint = f" (did you mean {', '.join(repr(n) for n in close[:3])}?)" if close else ""
            problems.append(f"unexpected {name!r}{hint}")
        elif tuple(array.shape) != tuple(known[name]):
            problems.append(f"{name!r} has shape {tuple(array.shape)} in params but {tuple(known[name])} in the model")
    return problems


def bind(entry: ImplementationEntry, params: Optional[Dict[str, np.ndarray]]) -> ParamBinding:
    try:
        return entry.adapter.bind_params(entry.fn, params, entry.grad)
    except GradbridgeError as exc:
        raise type(exc)(f"{entry.where}: {exc}") from None


def common_argument_names(bindings: Sequence[ParamBinding], count: int) -> Tuple[str, ...]:
    """Names of the user's positional arguments: from the signatures where all that name them agree
    (a module's ``forward``, a function's parameters after the parameter dict), else ``arg0``, ``arg1``..."""
    defaults = tuple(f"arg{i}" for i in range(count))
    votes = set()
    for binding in bindings:
        lead = len(binding.leading_args)
        names = argument_names(binding.signature or binding.fn, lead + count)[lead:]
        if names != defaults and not any(n == d for n, d in zip(names, defaults)):
            votes.add(names)
    return votes.pop() if len(votes) == 1 else defaults

"""Weight and layout mapping for :func:`gradbridge.compare`: one ``params=`` (a torch ``state_dict``, a Keras
model's weights, a flax parameter tree) given to every implementation in its own names and layouts.

The same weights are named and laid out differently in each framework: a dense layer's kernel is (out, in) in
one and (in, out) in another, a convolution's kernel is (out, in, *spatial) or (*spatial, in, out), a norm
layer's scale is ``weight``, ``gamma`` or ``scale``, its running statistics are buffers, non-trainable
variables or a separate collection. Each adapter describes the parameters an implementation owns by
*role*, one of a small vocabulary, with the axis permutation that takes its layout to the role's canonical
layout (:class:`ParamRole`, the :class:`ParameterRoles` capability). This module pairs the parameters of the
implementation whose names ``params`` uses (the source) with another implementation's (:func:`pair_params`)
and converts each value source layout -> canonical -> target layout (:func:`convert`); :func:`map_params`
does it for every implementation of a comparison and :class:`MappedParams` carries one implementation's
result: its parameters in its own names and layouts, and the way back for names and gradients.

Pairing, for each parameter of the target, first match wins:

1. an explicit override ``{target name: name in params}`` (the user's ``param_map``);
2. the same name, separators normalised (``fc1.kernel`` ~ ``fc1/kernel``);
3. the same role in the same layer, separators normalised (``fc1.weight`` ~ ``fc1/kernel`` ~
   ``params/fc1/kernel``: the adapter strips a collection such as flax's ``params``);
4. role by role, kernels first: the same role in the layer already paired with this one (a bias goes with its
   layer's kernel), else the order of the parameters left with that role (the first dense kernel with the
   first dense kernel...), when both sides have as many of them left and every pair has the same canonical
   shape.

Whatever is left unpaired on either side (but optional values: buffers, running statistics the other side
lacks) is an :class:`InvalidArgumentError` naming the parameter and the override that would pair it.

Also here: :class:`FlatParams`, the flat ``{dotted name: array}`` mapping that remembers the user's nesting
(so a parameter tree reaches a JAX function as a tree), and :class:`Layout` (``channels_last``), the input and
output layout adapter (NCHW <-> NHWC) of one implementation, applied to NumPy arrays.

Invariant: values are only renamed and their axes permuted, never otherwise changed (an exact round trip); this
module never imports or names a framework: what a framework calls its layers is its adapter's knowledge.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import (Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np

from .._adapter import ParamBinding
from .._errors import GradbridgeError, InvalidArgumentError

# --- the vocabulary ---

DENSE_KERNEL = "dense.kernel"
CONV_KERNEL = "conv.kernel"
BIAS = "bias"
NORM_SCALE = "norm.scale"
NORM_OFFSET = "norm.offset"
NORM_MEAN = "norm.mean"
NORM_VARIANCE = "norm.variance"
EMBEDDING = "embedding"

#: Each role's canonical layout (what :attr:`ParamRole.to_canonical` permutes to).
CANONICAL_LAYOUTS: Dict[str, str] = {
    DENSE_KERNEL: "(in, out)",
    CONV_KERNEL: "(*spatial, in, out)",
    BIAS: "(out,)",
    NORM_SCALE: "(features,)",
    NORM_OFFSET: "(features,)",
    NORM_MEAN: "(features,)",
    NORM_VARIANCE: "(features,)",
    EMBEDDING: "(vocabulary, dim)",
}
ROLES = tuple(CANONICAL_LAYOUTS)

#: The name of ``gb.compare``'s option that names parameters explicitly, for messages.
OVERRIDE_OPTION = "param_map"

#: (out, in) -> (in, out).
OUT_IN = (1, 0)


def out_in_spatial(ndim: int) -> Tuple[int, ...]:
    """The permutation from a kernel laid out (out, in, *spatial) to the canonical (*spatial, in, out)."""
    if ndim < 3:
        raise ValueError(f"a convolution kernel has at least 3 axes, got {ndim}")
    return tuple(range(2, ndim)) + (1, 0)


class ParamRole(NamedTuple):
    """What one parameter of an implementation is, for :func:`pair_params`.

    Attributes:
        role: one of :data:`ROLES`, or None (unknown: paired by name or override only, never permuted).
        to_canonical: the axis permutation taking this parameter's layout to the role's canonical layout
            (``np.transpose(value, to_canonical)``); None when it already is canonical.
        layer: the path of the layer that owns it (``fc1``, ``encoder.0``; a framework's collection prefix
            such as flax's ``params`` dropped), for pairing by layer.
        shape: its shape in this implementation's layout.
        required: False for values an implementation may be given but need not be (buffers, running
            statistics, non-trainable variables): those left unpaired are not an error.
        kind: the layer's type, for messages (``Linear``, ``Dense``, ``LayerNorm``).
    """

    role: Optional[str]
    to_canonical: Optional[Tuple[int, ...]] = None
    layer: str = ""
    shape: Tuple[int, ...] = ()
    required: bool = True
    kind: str = ""

    @property
    def canonical_shape(self) -> Tuple[int, ...]:
        shape = tuple(self.shape)
        return shape if self.to_canonical is None else tuple(shape[i] for i in self.to_canonical)

    def describe(self) -> str:
        what = self.role or "parameter of unknown role"
        where = f" of {self.kind + ' ' if self.kind else ''}layer {self.layer!r}" if self.layer else ""
        return f"{what}{where}, shape {tuple(self.shape)}"


Roles = Dict[str, ParamRole]


@runtime_checkable
class ParameterRoles(Protocol):
    """Optional adapter capability (:class:`gradbridge._adapter.CompareAdapter`): the role of each parameter an
    implementation takes, so that :func:`gradbridge.compare` can give one ``params=`` to implementations that
    name and lay out the same weights differently."""

    def parameter_roles(self, fn: Callable[..., Any], params: Any = None) -> Optional[Roles]:
        """``{name: ParamRole}`` for every parameter ``fn`` takes, by the names :meth:`expected_params` and
        :meth:`bind_params` use (a module's or model's own; for a plain function, those of ``params``, a
        template of the parameters it takes: a nested mapping of arrays or of anything with a ``.shape``,
        whose leaf names say the role). None when the adapter cannot tell (a plain function without
        ``params``, or parameters named in no convention it knows)."""


def inverse(permutation: Sequence[int]) -> Tuple[int, ...]:
    result = [0] * len(permutation)
    for i, p in enumerate(permutation):
        result[p] = i
    return tuple(result)


def to_canonical(value: np.ndarray, role: ParamRole) -> np.ndarray:
    value = np.asarray(value)
    return value if role.to_canonical is None else np.transpose(value, role.to_canonical)


def from_canonical(value: np.ndarray, role: ParamRole) -> np.ndarray:
    value = np.asarray(value)
    return value if role.to_canonical is None else np.transpose(value, inverse(role.to_canonical))


def convert(value: np.ndarray, source: ParamRole, target: ParamRole) -> np.ndarray:
    """``value`` (laid out as ``source`` says) laid out as ``target`` says: a contiguous copy. A parameter of
    unknown role on either side passes unchanged (only known layouts are permuted).

    Gradients convert the same way (an axis permutation is orthogonal), so the way back is
    ``convert(gradient, target, source)``."""
    permutation = _conversion(source, target)
    value = np.asarray(value)
    return np.ascontiguousarray(value if permutation is None else np.transpose(value, permutation))


def _conversion(source: ParamRole, target: ParamRole) -> Optional[Tuple[int, ...]]:
    """The axis permutation :func:`convert` applies (source layout -> canonical -> target layout), None for none."""
    if source.role is None or target.role is None:
        return None
    ndim = len(source.shape)
    identity = tuple(range(ndim))
    s = source.to_canonical or identity
    t_inverse = inverse(target.to_canonical) if target.to_canonical is not None else identity
    if len(s) != ndim or len(t_inverse) != ndim:
        return None
    combined = tuple(s[i] for i in t_inverse)
    return None if combined == identity else combined


def _converted_shape(source: ParamRole, target: ParamRole) -> Tuple[int, ...]:
    permutation = _conversion(source, target)
    shape = tuple(source.shape)
    return shape if permutation is None else tuple(shape[i] for i in permutation)


# --- names ---

def normalized(name: str) -> str:
    """``name`` with ``/`` and ``.`` separators alike (``params/fc1/kernel`` -> ``params.fc1.kernel``)."""
    return ".".join(part for part in re.split(r"[./]+", name) if part)


def _layer_key(layer: str) -> str:
    return normalized(layer).lower()


class FlatParams(dict):
    """``{dotted name: value}`` that remembers the nesting the user gave: ``paths[name]`` is the tuple of keys
    from the root (``params.fc1.kernel`` -> ``("params", "fc1", "kernel")``), for adapters whose functions
    take the parameters as a tree. Names missing from ``paths`` are one key each."""

    def __init__(self, values: Any = (), paths: Optional[Mapping[str, Tuple[str, ...]]] = None) -> None:
        super().__init__(values)
        self.paths: Dict[str, Tuple[str, ...]] = dict(paths or {})

    def path(self, name: str) -> Tuple[str, ...]:
        return self.paths.get(name, (name,))

    @property
    def nested(self) -> bool:
        return any(len(self.path(name)) > 1 for name in self)

    def tree(self, leaf: Callable[[Any], Any] = lambda v: v) -> Dict[str, Any]:
        """The values as nested dicts along :attr:`paths`, each value passed through ``leaf``."""
        return nest(((self.path(name), leaf(value)) for name, value in self.items()))


def nest(items: Iterable[Tuple[Tuple[str, ...], Any]]) -> Dict[str, Any]:
    """Nested dicts from ``(path, value)`` pairs (in order)."""
    root: Dict[str, Any] = {}
    for path, value in items:
        node = root
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise InvalidArgumentError(f"params: {'.'.join(path)!r} nests under {key!r}, which is a value")
            node = child
        if path[-1] in node:
            raise InvalidArgumentError(f"params: {'.'.join(path)!r} is given twice")
        node[path[-1]] = value
    return root


def tree_paths(tree: Any) -> Dict[str, Tuple[str, ...]]:
    """``{dotted name: keys}`` of the leaves of nested mappings (what ``gb.compare`` flattens ``params`` to)."""
    paths: Dict[str, Tuple[str, ...]] = {}

    def walk(node: Mapping, keys: Tuple[str, ...]) -> None:
        for key, value in node.items():
            path = keys + (str(key),)
            if isinstance(value, Mapping):
                walk(value, path)
            else:
                paths[".".join(path)] = path

    if isinstance(tree, Mapping):
        walk(tree, ())
    return paths


def keep_structure(flat: Optional[Mapping[str, np.ndarray]], tree: Any) -> Optional[FlatParams]:
    """``flat`` (``params`` flattened with dots) as :class:`FlatParams` with the nesting of ``tree`` (the
    ``params`` the user gave)."""
    if flat is None:
        return None
    paths = tree_paths(tree)
    return FlatParams(flat, {name: paths[name] for name in flat if name in paths})


def flat_params(tree: Mapping[str, Any]) -> FlatParams:
    """Nested mappings as :class:`FlatParams` (leaves unchanged)."""
    paths = tree_paths(tree)
    values = {}
    for name, path in paths.items():
        node: Any = tree
        for key in path:
            node = node[key]
        values[name] = node
    return FlatParams(values, paths)


def shape_of(value: Any) -> Tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    return tuple(int(d) for d in shape)


# --- pairing ---

def _hint(label: str, target: str, source: str = "<name in params>") -> str:
    return f"{OVERRIDE_OPTION}={{{label!r}: {{{target!r}: {source!r}}}}}"


def pair_params(source: Roles, target: Roles, overrides: Optional[Mapping[str, str]] = None, *,
                target_label: str = "the implementation", source_label: str = "params") -> Dict[str, str]:
    """``{target name: source name}`` for every parameter of ``target`` that has a counterpart in ``source``.

    Raises:
        InvalidArgumentError: an override names a parameter that does not exist; a required parameter on
            either side is left without a counterpart; paired parameters whose canonical shapes differ. One
            error lists every problem, each with the override that would settle it.
    """
    pairs: Dict[str, str] = {}
    how: Dict[str, str] = {}
    used: set = set()
    problems: List[str] = []

    for t, s in (overrides or {}).items():
        if t not in target:
            problems.append(f"{OVERRIDE_OPTION} names {t!r}, which {target_label} does not have (it has "
                            f"{_listing(target)})")
        elif s not in source:
            problems.append(f"{OVERRIDE_OPTION} maps {t!r} to {s!r}, which is not in {source_label} (it has "
                            f"{_listing(source)})")
        else:
            pairs[t], how[t] = s, "given"
            used.add(s)

    def compatible(s: str, t: str) -> bool:
        return source[s].canonical_shape == target[t].canonical_shape

    # 2. the same name
    by_name: Dict[str, List[str]] = {}
    for s in source:
        by_name.setdefault(normalized(s), []).append(s)
    for t in target:
        if t in pairs:
            continue
        found = [s for s in by_name.get(normalized(t), []) if s not in used]
        if len(found) == 1 and compatible(found[0], t) and source[found[0]].role == target[t].role:
            pairs[t], how[t] = found[0], "name"
            used.add(found[0])

    # 3. the same role in the same layer
    by_layer: Dict[Tuple[str, str], List[str]] = {}
    for s, r in source.items():
        if r.role is not None:
            by_layer.setdefault((_layer_key(r.layer), r.role), []).append(s)
    for t, r in target.items():
        if t in pairs or r.role is None:
            continue
        found = [s for s in by_layer.get((_layer_key(r.layer), r.role), []) if s not in used]
        if len(found) == 1 and compatible(found[0], t):
            pairs[t], how[t] = found[0], "layer"
            used.add(found[0])

    # 4. role by role (kernels first): the layer already paired with this one, else the order of those left
    for role in ROLES:
        layers = {_layer_key(target[t].layer): _layer_key(source[s].layer) for t, s in reversed(list(pairs.items()))
                  if target[t].role is not None and source[s].role is not None}
        for t, r in target.items():
            if t in pairs or r.role != role or _layer_key(r.layer) not in layers:
                continue
            found = [s for s in by_layer.get((layers[_layer_key(r.layer)], role), []) if s not in used]
            if len(found) == 1 and compatible(found[0], t):
                pairs[t], how[t] = found[0], "layer"
                used.add(found[0])
        left_s = [s for s, r in source.items() if r.role == role and s not in used]
        left_t = [t for t, r in target.items() if r.role == role and t not in pairs]
        if not left_s or not left_t:
            continue
        if len(left_s) != len(left_t) or not all(compatible(s, t) for s, t in zip(left_s, left_t)):
            required_s = [s for s in left_s if source[s].required]
            required_t = [t for t in left_t if target[t].required]
            if len(required_s) != len(required_t) or not required_s or \
                    not all(compatible(s, t) for s, t in zip(required_s, required_t)):
                continue
            left_s, left_t = required_s, required_t
        for s, t in zip(left_s, left_t):
            pairs[t], how[t] = s, "order"
            used.add(s)

    for t, s in pairs.items():  # overrides may pair anything: their shapes must still fit
        if how[t] == "given" and _converted_shape(source[s], target[t]) != tuple(target[t].shape):
            problems.append(f"{OVERRIDE_OPTION} maps {t!r} ({target[t].describe()}) to {s!r} "
                            f"({source[s].describe()}): the shapes do not fit once laid out as {t!r} is")
    for t, r in target.items():
        if t not in pairs and r.required:
            problems.append(f"{t!r} of {target_label} ({r.describe()}) has no counterpart in {source_label}"
                            f"{_why(r, source, used)}; name it: {_hint(target_label, t)}")
    paired = set(pairs.values())
    for s, r in source.items():
        if s not in paired and r.required:
            problems.append(f"{s!r} in {source_label} ({r.describe()}) has no counterpart in {target_label}"
                            f"{_why(r, target, set(pairs))}; if {target_label} has it under another name, name "
                            f"it: {_hint(target_label, '<its name>', s)}")
    if problems:
        raise InvalidArgumentError(f"params: cannot map {source_label} onto {target_label}: " + "; ".join(problems))
    return pairs


def _why(role: ParamRole, other: Roles, taken: set) -> str:
    """Why ``role`` found no partner among ``other``'s parameters."""
    if role.role is None:
        return " (its role is unknown, so it pairs by name only)"
    same = [n for n, r in other.items() if r.role == role.role]
    if not same:
        return f" (no {role.role} there)"
    free = [n for n in same if n not in taken]
    shapes = ", ".join(f"{n} {other[n].canonical_shape}" for n in (free or same)[:4])
    return (f" (canonical shape {role.canonical_shape} {CANONICAL_LAYOUTS[role.role]}; "
            f"{'unpaired' if free else 'all paired'} {role.role} there: {shapes})")


def _listing(roles: Roles, limit: int = 8) -> str:
    names = list(roles)
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- one implementation's parameters ---

@dataclass
class MappedParams:
    """One implementation's parameters, mapped from ``params``.

    Attributes:
        label: the implementation's label.
        params: ``{its name: array in its layout}``, what its adapter's ``expected_params`` /
            ``bind_params`` take (a :class:`FlatParams`, with the nesting of its template or of the user's
            ``params``).
        source_of: its name -> the name in ``params``, for every parameter it receives.
        source_roles, target_roles: the roles on each side (empty when nothing is converted).
        note: what the report should say about the mapping ("" when the names are its own).
    """

    label: str
    params: FlatParams
    source_of: Dict[str, str]
    source_roles: Roles = field(default_factory=dict)
    target_roles: Roles = field(default_factory=dict)
    note: str = ""

    @property
    def identity(self) -> bool:
        return all(t == s for t, s in self.source_of.items()) and not any(
            _conversion(self.source_roles[s], self.target_roles[t]) for t, s in self.source_of.items()
            if s in self.source_roles and t in self.target_roles)

    def at_source(self) -> Dict[str, np.ndarray]:
        """The values as this implementation takes them (its layout), by their names in ``params``: what the
        core sets each parameter leaf of ``x0`` to once :meth:`rename` has named the leaves so."""
        return {self.source_of.get(t, t): v for t, v in self.params.items()}

    def rename(self, binding: ParamBinding) -> ParamBinding:
        """``binding`` with its leaves named by the names in ``params`` (so values and gradients are compared
        with the other implementations' under one name)."""
        if all(t == s for t, s in self.source_of.items()):
            return binding
        names = {leaf: self.source_of.get(common, common) for leaf, common in binding.names.items()}
        for t, s in self.source_of.items():  # leaves named by the parameter's own name (a torch module's)
            names.setdefault(t, s)
        return replace(binding, names=names)

    def to_source(self, name: str, value: np.ndarray) -> np.ndarray:
        """A value or gradient of the parameter ``params`` calls ``name``, from this implementation's layout to
        the layout of ``params``."""
        target = self._target_of().get(name)
        if target is None or target not in self.target_roles or name not in self.source_roles:
            return value
        return convert(value, self.target_roles[target], self.source_roles[name])

    def gradients_to_source(self, gradients: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """``{name in params: gradient}`` (as the core collects them after :meth:`rename`) from this
        implementation's layouts to the layouts of ``params``; other entries (inputs) unchanged."""
        return {name: self.to_source(name, value) for name, value in gradients.items()}

    def _target_of(self) -> Dict[str, str]:
        return {s: t for t, s in self.source_of.items()}


def _identity(label: str, params: Mapping[str, np.ndarray],
              paths: Optional[Mapping[str, Tuple[str, ...]]] = None) -> MappedParams:
    """``params`` as given, nested as the user gave them or as the implementation's template is."""
    flat = params if isinstance(params, FlatParams) else FlatParams(params)
    if paths and any(name in paths for name in flat):
        flat = FlatParams(flat, {**flat.paths, **{n: tuple(p) for n, p in paths.items() if n in flat}})
    return MappedParams(label, flat, {name: name for name in flat})


def map_one(label: str, params: Mapping[str, np.ndarray], source: Roles, target: Roles,
            overrides: Optional[Mapping[str, str]] = None, paths: Optional[Mapping[str, Tuple[str, ...]]] = None,
            source_label: str = "params") -> MappedParams:
    """``params`` (named and laid out as ``source`` says) in ``target``'s names and layouts.

    ``params`` names outside ``source`` are passed on unchanged when ``target`` has them, else dropped."""
    for name, array in params.items():
        if name in source and tuple(np.shape(array)) != tuple(source[name].shape):
            raise InvalidArgumentError(f"params[{name!r}] has shape {tuple(np.shape(array))}, but {source_label} "
                                       f"says {tuple(source[name].shape)}")
    known = {n: r for n, r in source.items() if n in params}
    pairs = pair_params(known, target, overrides, target_label=label, source_label=source_label)
    values: Dict[str, np.ndarray] = {}
    for t, s in pairs.items():
        values[t] = convert(params[s], known[s], target[t])
        if tuple(values[t].shape) != tuple(target[t].shape):
            raise InvalidArgumentError(
                f"params: {s!r} ({known[s].describe()}) laid out as {label}'s {t!r} has shape "
                f"{tuple(values[t].shape)}, but {t!r} has {tuple(target[t].shape)}; name the pair explicitly: "
                f"{_hint(label, t)}")
    mapped = MappedParams(label, FlatParams(values, {t: tuple(paths[t]) for t in values if paths and t in paths}),
                          dict(pairs), dict(known), dict(target))
    mapped.note = _note(mapped, source_label)
    return mapped


def _note(mapped: MappedParams, source_label: str) -> str:
    changed = [(t, s, _conversion(mapped.source_roles[s], mapped.target_roles[t]))
               for t, s in mapped.source_of.items()]
    changed = [(t, s, p) for t, s, p in changed if t != s or p is not None]
    if not changed:
        return ""
    renamed = sum(1 for t, s, _ in changed if t != s)
    moved = sum(1 for _, _, p in changed if p is not None)
    shown = [f"{s} -> {t}" + ("" if p is None else " (transposed)" if p == OUT_IN else f" (axes {p})")
             for t, s, p in sorted(changed, key=lambda c: c[2] is None)[:6]]
    more = f", and {len(changed) - 6} more" if len(changed) > 6 else ""
    return (f"{mapped.label}: {source_label} mapped to its own names and layouts ({renamed} renamed, {moved} with "
            f"axes permuted; values and gradients are compared under the names in params): " + ", ".join(shown) + more)


# --- every implementation of a comparison ---

@dataclass
class _Side:
    label: str
    owner: bool  # a module or model: it has parameters of its own
    roles: Optional[Roles]
    required: Dict[str, Tuple[int, ...]]
    optional: Dict[str, Tuple[int, ...]]
    paths: Dict[str, Tuple[str, ...]]
    adapter_name: str

    def takes(self) -> Dict[str, Tuple[int, ...]]:
        if self.roles is not None:
            return {n: tuple(r.shape) for n, r in self.roles.items()}
        return {**self.optional, **self.required}

    def matches(self, params: Mapping[str, np.ndarray]) -> Optional[Dict[str, str]]:
        """``{name in params: own name}`` when ``params`` uses this implementation's names (up to separators)
        and shapes, with every required one given; else None."""
        takes = self.takes()
        own = {normalized(n): n for n in takes}
        found = {}
        for name, array in params.items():
            mine = own.get(normalized(name))
            if mine is None or tuple(np.shape(array)) != takes[mine]:
                return None
            found[name] = mine
        required = set(self.required) | {n for n, r in (self.roles or {}).items() if r.required}
        return found if required <= set(found.values()) else None


def _side(entry: Any, params: Mapping[str, np.ndarray], template: Any) -> _Side:
    adapter, fn = entry.adapter, entry.fn
    try:
        expected = adapter.expected_params(fn)
    except GradbridgeError:
        expected = None  # validate_params reports it with the implementation's name
    roles = None
    if isinstance(adapter, ParameterRoles):
        given = template if template is not None else (params if expected is None else None)
        try:
            roles = adapter.parameter_roles(fn, given)
        except GradbridgeError as exc:
            raise type(exc)(f"implementations[{entry.label!r}]: {exc}") from None
    if expected is not None:
        required, optional = dict(expected.required), dict(expected.optional)
    elif template is not None:
        required = {n: shape_of(v) for n, v in flat_params(template).items()} if isinstance(template, Mapping) else {}
        optional = {}
    else:
        required, optional = {}, {}
    paths = tree_paths(template) if isinstance(template, Mapping) else {}
    return _Side(entry.label, expected is not None, roles, required, optional, paths, getattr(adapter, "name", "?"))


def map_params(implementations: Sequence[Any], params: Optional[Mapping[str, np.ndarray]],
               overrides: Optional[Mapping[str, Mapping[str, str]]] = None,
               templates: Optional[Mapping[str, Any]] = None, source: Optional[str] = None
               ) -> Optional[Dict[str, MappedParams]]:
    """Each implementation's parameters (by label), mapped from ``params`` (float64 NumPy, flat dotted names:
    what ``gb.compare`` made of the user's ``params``).

    Args:
        implementations: objects with ``label``, ``fn`` and ``adapter`` (``gb.compare``'s entries).
        params: the flat parameters (a :class:`FlatParams` keeps the user's nesting for implementations
            that take them as given); None: nothing to map.
        overrides: ``{label: {its parameter name: name in params}}``, pairs named explicitly.
        templates: ``{label: nested mapping of arrays or shapes}``, the parameters a plain function takes
            (a flax ``variables`` tree), where they are not the ones given.
        source: the label of the implementation whose names and layouts ``params`` uses; by default the
            first module or model whose parameters they are, else the first implementation that takes
            them as given and whose adapter knows their roles.

    An implementation receives ``params`` unchanged when they are its own (names and shapes), when it is a
    plain function without a template, or when its adapter cannot tell roles; else they are paired and
    converted (see the module's docstring).

    Raises:
        InvalidArgumentError: an override or template for an unknown label; a parameter that cannot be paired
            (naming it, and the override that pairs it); params whose layout is known from no implementation
            while another needs them converted.
    """
    if params is None:
        return None
    overrides, templates = dict(overrides or {}), dict(templates or {})
    labels = [entry.label for entry in implementations]
    for option, given in ((OVERRIDE_OPTION, overrides), ("templates", templates)):
        for label in given:
            if label not in labels:
                raise InvalidArgumentError(f"{option}: {label!r} is none of the implementations ({', '.join(labels)})")
    sides = {entry.label: _side(entry, params, templates.get(entry.label)) for entry in implementations}
    matched = {label: side.matches(params) for label, side in sides.items()}
    source_side = _source(sides, matched, source)
    source_roles: Roles = {}
    if source_side is not None:
        own = matched[source_side.label] or {}
        source_roles = {given: source_side.roles[mine] for given, mine in own.items()
                        if source_side.roles is not None and mine in source_side.roles}
    source_label = f"params ({source_side.label}'s names)" if source_side is not None else "params"
    # params nearly some module's or template's own (a name missing, one too many, a wrong shape): every
    # implementation takes them as given, and validating them against what each owns says what is wrong
    given_names = {normalized(n) for n in params}
    near = source_side is None and any(given_names & {normalized(n) for n in side.takes()} for side in sides.values()
                                       if side.owner or side.label in templates)
    result: Dict[str, MappedParams] = {}
    for entry in implementations:
        label, side = entry.label, sides[entry.label]
        own = matched[label]
        exact = own is not None and all(given == mine for given, mine in own.items())
        if label not in overrides and (exact or near or (side.roles is None and label not in templates)):
            result[label] = _identity(label, params, side.paths)
            continue
        if side.roles is None:
            raise InvalidArgumentError(
                f"implementations[{label!r}]: gradbridge knows no parameter roles of this {side.adapter_name} "
                f"implementation, so params cannot be mapped onto it; give it params in its own names")
        if own is not None and label not in overrides:
            roles = {given: side.roles[mine] for given, mine in own.items()}  # its own, up to separators
            result[label] = map_one(label, params, roles, side.roles, None, side.paths, source_label)
            continue
        roles_given = source_roles
        if source_side is None:
            if label not in overrides:
                raise InvalidArgumentError(
                    f"implementations[{label!r}] takes {_listing(side.roles)}, but params names "
                    f"{_listing({n: ParamRole(None) for n in params})}, which are no implementation's own, so their "
                    f"layouts are unknown; give params in the names of one of the modules or models compared (a "
                    f"torch state_dict, a Keras model's variable paths), or name every pair (the values then pass "
                    f"unchanged, so each must be laid out as {label} takes it): {_hint(label, '<its name>')}")
            roles_given = {n: ParamRole(None, None, "", tuple(np.shape(a)), True) for n, a in params.items()}
        result[label] = map_one(label, params, roles_given, side.roles, overrides.get(label), side.paths,
                                source_label)
    return result


def _source(sides: Mapping[str, _Side], matched: Mapping[str, Optional[Dict[str, str]]],
            source: Optional[str]) -> Optional[_Side]:
    if source is not None:
        if source not in sides:
            raise InvalidArgumentError(f"source: {source!r} is none of the implementations ({', '.join(sides)})")
        if matched[source] is None or sides[source].roles is None:
            raise InvalidArgumentError(f"source: params are not {source!r}'s parameters (names and shapes), or "
                                       "gradbridge knows no roles for them")
        return sides[source]
    def known(label: str, side: _Side) -> List[bool]:
        return [side.roles[mine].role is not None for mine in (matched[label] or {}).values()]

    # a module or model whose parameters these are; else a function whose template tells every role
    owners = [s for label, s in sides.items() if matched[label] is not None and s.roles is not None and s.owner
              and any(known(label, s))]
    others = [s for label, s in sides.items() if matched[label] is not None and s.roles is not None
              and not s.owner and known(label, s) and all(known(label, s))]
    return (owners or others or [None])[0]


# --- input and output layouts ---

#: Channels-first to channels-last for a batch of images (N, C, H, W) -> (N, H, W, C), any number of spatial axes.
def channels_last_axes(ndim: int) -> Tuple[int, ...]:
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return (0,) + tuple(range(2, ndim)) + (1,)


@dataclass(frozen=True)
class Layout:
    """How one implementation lays out some of its inputs and outputs, relative to the others (NumPy side).

    ``inputs``/``outputs`` name argument positions (int) or names (str), and output names, each with the
    permutation from the common layout to the implementation's (or a callable ``ndim -> permutation``).
    :func:`channels_last` builds the usual one. The core permutes an input before converting it to the
    implementation's arrays, an output (and its gradient) after, and a cotangent before.
    """

    inputs: Mapping[Any, Any] = field(default_factory=dict)
    outputs: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def _axes(spec: Any, ndim: int) -> Tuple[int, ...]:
        axes = tuple(spec(ndim) if callable(spec) else spec)
        if sorted(axes) != list(range(ndim)):
            raise InvalidArgumentError(f"layout: {axes} is no permutation of the {ndim} axes of the array")
        return axes

    def input_to_implementation(self, key: Any, array: np.ndarray) -> np.ndarray:
        spec = self.inputs.get(key)
        return array if spec is None else np.ascontiguousarray(np.transpose(array, self._axes(spec, np.ndim(array))))

    def input_from_implementation(self, key: Any, array: np.ndarray) -> np.ndarray:
        """An input's gradient (laid out as the implementation takes it) in the common layout."""
        spec = self.inputs.get(key)
        return array if spec is None else np.ascontiguousarray(
            np.transpose(array, inverse(self._axes(spec, np.ndim(array)))))

    def output_from_implementation(self, name: str, array: np.ndarray) -> np.ndarray:
        spec = self.outputs.get(name)
        return array if spec is None else np.ascontiguousarray(
            np.transpose(array, inverse(self._axes(spec, np.ndim(array)))))

    def output_to_implementation(self, name: str, array: np.ndarray) -> np.ndarray:
        """A cotangent (in the common layout) as the implementation's output is laid out."""
        spec = self.outputs.get(name)
        return array if spec is None else np.ascontiguousarray(np.transpose(array, self._axes(spec, np.ndim(array))))


def channels_last(inputs: Sequence[Any] = (0,), outputs: Sequence[str] = ()) -> Layout:
    """The layout of an implementation that takes (and returns) channels-last arrays (N, *spatial, C) where the
    others use channels-first (N, C, *spatial): ``inputs`` are argument positions or names, ``outputs`` output
    names (``out``, ``out[0]``)."""
    return Layout({key: channels_last_axes for key in inputs}, {name: channels_last_axes for name in outputs})

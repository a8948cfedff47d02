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

from dataclasses import dataclass, field, replace
from typing import (Any, Dict, List, Mapping, Optional, Sequence, Tuple)

import numpy as np

from ..._adapter import ParamBinding
from ..._errors import GradbridgeError, InvalidArgumentError
from .names import FlatParams, flat_params, normalized, shape_of, tree_paths
from .pairing import _hint, _listing, pair_params
from .roles import OUT_IN, OVERRIDE_OPTION, ParamRole, ParameterRoles, Roles, _conversion, convert

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

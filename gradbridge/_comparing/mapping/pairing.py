"""Pairing one implementation's parameters with another's: override, name, role in the same layer, then order.

Invariant: every parameter is paired once or reported with the override that would pair it; parameters of
unknown role are paired by name or override only, never permuted.
"""

from __future__ import annotations

from typing import (Dict, List, Mapping, Optional, Tuple)


from ..._errors import InvalidArgumentError
from .names import layer_key, normalized
from .roles import CANONICAL_LAYOUTS, OVERRIDE_OPTION, ParamRole, ROLES, Roles, _converted_shape

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
            by_layer.setdefault((layer_key(r.layer), r.role), []).append(s)
    for t, r in target.items():
        if t in pairs or r.role is None:
            continue
        found = [s for s in by_layer.get((layer_key(r.layer), r.role), []) if s not in used]
        if len(found) == 1 and compatible(found[0], t):
            pairs[t], how[t] = found[0], "layer"
            used.add(found[0])

    # 4. role by role (kernels first): the layer already paired with this one, else the order of those left
    for role in ROLES:
        layers = {layer_key(target[t].layer): layer_key(source[s].layer) for t, s in reversed(list(pairs.items()))
                  if target[t].role is not None and source[s].role is not None}
        for t, r in target.items():
            if t in pairs or r.role != role or layer_key(r.layer) not in layers:
                continue
            found = [s for s in by_layer.get((layers[layer_key(r.layer)], role), []) if s not in used]
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

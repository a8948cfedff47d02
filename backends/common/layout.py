"""Which leaves are checked, and where each lives in the flat vector (shared by every adapter).

An adapter lists every array-like value it found in the arguments and parameters as a
:class:`Candidate`; :func:`layout_leaves` applies ``wrt=`` and lays the checked ones out one after the
other.  Keeping this in the core means ``wrt=`` means the same thing in every framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from gradbridge._adapter import LeafSpec
from gradbridge._errors import InvalidArgumentError
from gradbridge._tree import NodeOf, array_kind, flatten_pytree, library_of

from .complex import real_view_shape

#: Why a floating array without elements is not checked (every adapter says the same).
EMPTY_REASON = "it has no elements, so there is nothing to perturb (it is passed to fn unchanged)"

#: Why a complex array is not checked (every adapter says the same).
COMPLEX_REASON = ("complex parameters are not checked (complex arguments are, through their real views): pass it to "
                  "fn as an argument to check it")


@dataclass(frozen=True)
class Candidate:
    """An array-like value found in the arguments or parameters.

    Attributes:
        name: readable path (``x``, ``xs[1]``, ``fc1.weight``).
        value: the user's object (never modified).
        shape: its shape.
        dtype: its dtype as a string.
        floating: whether it is a real floating-point array (only those can be checked).
        kind: ``"input"`` or ``"param"``.
        arg_index: position of the top-level argument it came from (``None`` for parameters).
    """

    name: str
    value: Any
    shape: Tuple[int, ...]
    dtype: str
    floating: bool
    kind: str
    arg_index: Optional[int] = None
    unchecked_reason: str = ""  # why a floating or complex value is not checked (e.g. "requires_grad=False")


@dataclass(frozen=True)
class Unchecked:
    """A floating (or complex) array among the arguments that is not a candidate at all, and why: another
    framework's array (a NumPy array in a TensorFlow check), a field of a dataclass that cannot be rebuilt, a
    dataclass JAX does not flatten. Listed in the report's notes; never silently passed over."""

    name: str
    dtype: str
    reason: str
    kind: str = "input"  # or "param": a model's frozen weight


def _matches(entry: Any, candidate: Candidate) -> bool:
    if isinstance(entry, bool):
        return False
    if isinstance(entry, int):
        return candidate.arg_index == entry
    if isinstance(entry, str):
        name = candidate.name
        return name == entry or any(name.startswith(entry + sep) for sep in ("[", ".", "/"))
    return entry is candidate.value


def layout_leaves(candidates: Sequence[Candidate], wrt: Optional[Sequence[Any]],
                  unchecked: Sequence[Unchecked] = ()) -> Tuple[List[LeafSpec], List[int]]:
    """Choose the checked leaves and give each an offset in the flat vector.

    Returns the leaf specs and, for each, the index of its candidate. Every floating candidate is
    checked unless ``wrt`` narrows the choice; ``wrt`` entries may be argument positions (int), names or
    name prefixes (str), or the array objects themselves. ``unchecked`` (arrays the adapter found but
    cannot check) only improves the messages.

    Raises:
        InvalidArgumentError: a ``wrt`` entry matches nothing floating, or nothing is left to check.
    """
    floating = [i for i, c in enumerate(candidates) if c.floating and not _empty(c)]
    if wrt is None:
        chosen = floating
    else:
        chosen = []
        for entry in wrt:
            hits = [i for i in floating if _matches(entry, candidates[i])]
            if not hits:
                described = entry if isinstance(entry, (int, str)) else f"an object of type {type(entry).__name__}"
                named = [candidates[i] for i in range(len(candidates)) if _matches(entry, candidates[i])]
                why = [f"{c.name}, which " + (f"is held fixed ({c.unchecked_reason})" if c.unchecked_reason
                                              else f"has shape {c.shape}: no elements" if _empty(c)
                                              else "is not floating-point") for c in named]
                if isinstance(entry, str):
                    why += [f"{u.name}, which is not checked ({u.reason})" for u in unchecked
                            if u.name == entry or any(u.name.startswith(entry + sep) for sep in ("[", ".", "/"))]
                raise InvalidArgumentError(
                    f"wrt: entry {described!r} selects nothing to check "
                    f"({'it names ' + ', '.join(why) if why else 'it matches no argument or parameter'}). "
                    f"Checkable leaves are: {_names(candidates, floating)}.")
            chosen.extend(i for i in hits if i not in chosen)
        chosen.sort()
    if not chosen:
        plain = [f"{c.name} ({c.dtype})" for c in candidates if not c.unchecked_reason and not _empty(c)]
        found = [", ".join(plain)] if plain else []
        found += [note[len("not checked: "):] for note in unchecked_notes(candidates, (), unchecked)]
        # the parameters are at fault when they are all there is (a module whose parameters are all frozen)
        kinds = {c.kind for c in candidates} | {u.kind for u in unchecked}
        params = kinds == {"param"}
        raise InvalidArgumentError(
            f"{'params' if params else 'args'}: no floating-point input to check. gradbridge checks floating "
            "arrays (float16/32/64, bfloat16) and complex arguments with at least one element among the arguments "
            "and params; found "
            f"{'; '.join(found) or 'no arrays at all'}. Python numbers pass through unchanged: pass them as arrays "
            "to check them.")
    leaves: List[LeafSpec] = []
    offset = 0
    for i in chosen:
        c = candidates[i]
        leaf = LeafSpec(c.name, tuple(int(d) for d in c.shape), c.dtype, offset, c.kind)
        leaves.append(leaf)
        offset += leaf.size
    return leaves, chosen


def unchecked_notes(candidates: Sequence[Candidate], chosen: Sequence[int],
                    unchecked: Sequence[Unchecked] = ()) -> List[str]:
    """The report's notes for every floating or complex array that is not checked, one per reason:
    ``not checked: z (complex128): complex arrays are not checked ...``. Integer and boolean arrays are
    not floating and are not listed."""
    by_reason: dict = {}
    picked = set(chosen)
    for i, c in enumerate(candidates):
        if i in picked:
            continue
        empty = c.floating and _empty(c)
        reason = c.unchecked_reason or (EMPTY_REASON if empty else "not selected by wrt=" if c.floating else "")
        if reason:
            by_reason.setdefault(reason, []).append(f"{c.name} ({c.dtype}, shape {c.shape})" if empty
                                                    else f"{c.name} ({c.dtype})")
    for u in unchecked:
        by_reason.setdefault(u.reason, []).append(f"{u.name} ({u.dtype})")
    notes = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        notes.append(f"not checked: {shown}: {reason}")
    return notes


def _empty(candidate: Candidate) -> bool:
    """A leaf without elements (a dimension of size 0): nothing to perturb, nothing to check."""
    return any(int(d) == 0 for d in candidate.shape)


def _names(candidates: Sequence[Candidate], indices: Sequence[int]) -> str:
    return ", ".join(candidates[i].name for i in indices) or "(none)"


def promotion_notes(leaves: Sequence[LeafSpec]) -> List[str]:
    """One note per original dtype below float64: which leaves are checked on float64 copies."""
    by_dtype: dict = {}
    for leaf in leaves:
        if leaf.dtype not in ("float64", "complex128"):
            by_dtype.setdefault(leaf.dtype, []).append(leaf.name)
    return [f"{dtype} leaves checked on {'complex128' if 'complex' in dtype else 'float64'} copies (the originals are "
            f"untouched): {', '.join(names)}" for dtype, names in by_dtype.items()]


def argument_candidates(args: Sequence[Any], arg_names: Sequence[str], is_array: Callable[[Any], bool],
                        describe: Callable[[Any], Tuple[Tuple[int, ...], str, bool]],
                        node_of: Optional[NodeOf] = None, unchecked: Optional[List[Unchecked]] = None,
                        native: str = "", not_checkable: Optional[Callable[[Any], str]] = None,
                        complex_inputs: bool = False) -> Tuple[List[Candidate], Callable[[Sequence[Any]], tuple]]:
    """The array leaves of the positional arguments as candidates, and a function rebuilding the arguments.

    The arguments are walked by :func:`gradbridge._tree.flatten_pytree` (dicts, lists, tuples, named tuples
    and dataclasses by field, optree-registered nodes, and the framework's own registered nodes through
    ``node_of``). ``describe(array)`` gives (shape, dtype name, floating); a complex array is a candidate
    that is not floating, with the reason. The rebuild function takes one value per candidate (further
    values, such as parameters appended after the inputs, are ignored) and returns the argument tuple with
    those values in place of the leaves.

    Floating and complex arrays that cannot be candidates are appended to ``unchecked`` (when given): another
    framework's arrays (``native`` says what this adapter checks and how to convert, e.g. "the torch backend
    checks torch tensors: pass torch.as_tensor(...)") and fields of dataclasses that cannot be rebuilt.

    ``not_checkable(value)`` (optional) says why an array of this framework cannot be checked though its dtype
    is floating (a sparse tensor), or returns ""; such a leaf is a candidate that is not floating, with that
    reason, and an array-like that is no leaf gets that reason instead of the generic one.
    """
    candidates: List[Candidate] = []
    rebuilds = []
    for index, (name, arg) in enumerate(zip(arg_names, args)):
        flat = flatten_pytree(arg, name, is_array, node_of)
        base = len(candidates)
        for leaf in flat.leaves:
            shape, dtype, floating = describe(leaf.value)
            reason = COMPLEX_REASON if not floating and dtype.startswith("complex") else ""
            if reason and complex_inputs:
                shape, floating, reason = real_view_shape(shape), True, ""
            special = not_checkable(leaf.value) if not_checkable is not None else ""
            if special:
                floating, reason = False, special
            candidates.append(Candidate(leaf.path, leaf.value, tuple(int(d) for d in shape), dtype, floating,
                                        "input", index, unchecked_reason=reason))
        if unchecked is not None:
            for other in flat.others:
                dtype, kind = array_kind(other.value)
                special = not_checkable(other.value) if not_checkable is not None else ""
                reason = special or (f"a {library_of(other.value)}, passed through unchanged"
                                     + (f"; {native}" if native else ""))
                unchecked.append(Unchecked(other.path, dtype, reason))
            unchecked.extend(Unchecked(u.path, u.dtype, u.reason) for u in flat.unwalked)
        rebuilds.append((flat.rebuild, base, len(flat.leaves)))
    return candidates, lambda values: tuple(r(values[base:base + n]) for r, base, n in rebuilds)


def hidden_arrays(value: Any, path: str, reason: str) -> List[Unchecked]:
    """The floating and complex arrays inside ``value`` (an object a framework's pytree does not walk, such as a
    dataclass JAX does not know), as :class:`Unchecked` entries with ``reason``."""
    flat = flatten_pytree(value, path, lambda v: array_kind(v) is not None)
    found = [Unchecked(leaf.path, array_kind(leaf.value)[0], reason) for leaf in flat.leaves]
    return found + [Unchecked(u.path, u.dtype, reason) for u in flat.unwalked]

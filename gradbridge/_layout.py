"""Which leaves are checked, and where each lives in the flat vector (shared by every adapter).

An adapter lists every array-like value it found in the arguments and parameters as a
:class:`Candidate`; :func:`layout_leaves` applies ``wrt=`` and lays the checked ones out one after the
other.  Keeping this in the core means ``wrt=`` means the same thing in every framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

from ._adapter import LeafSpec
from ._errors import InvalidArgumentError
from ._tree import flatten


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
    unchecked_reason: str = ""  # why a floating value is held fixed (e.g. "requires_grad=False")


def _matches(entry: Any, candidate: Candidate) -> bool:
    if isinstance(entry, bool):
        return False
    if isinstance(entry, int):
        return candidate.arg_index == entry
    if isinstance(entry, str):
        name = candidate.name
        return name == entry or any(name.startswith(entry + sep) for sep in ("[", ".", "/"))
    return entry is candidate.value


def layout_leaves(candidates: Sequence[Candidate], wrt: Optional[Sequence[Any]]) -> Tuple[List[LeafSpec], List[int]]:
    """Choose the checked leaves and give each an offset in the flat vector.

    Returns the leaf specs and, for each, the index of its candidate. Every floating candidate is
    checked unless ``wrt`` narrows the choice; ``wrt`` entries may be argument positions (int), names or
    name prefixes (str), or the array objects themselves.

    Raises:
        InvalidArgumentError: a ``wrt`` entry matches nothing floating, or nothing is left to check.
    """
    floating = [i for i, c in enumerate(candidates) if c.floating]
    if wrt is None:
        chosen = floating
    else:
        chosen = []
        for entry in wrt:
            hits = [i for i in floating if _matches(entry, candidates[i])]
            if not hits:
                described = entry if isinstance(entry, (int, str)) else f"an object of type {type(entry).__name__}"
                named = [candidates[i] for i in range(len(candidates)) if _matches(entry, candidates[i])]
                why = ("it names " + ", ".join(f"{c.name}, which " + (f"is held fixed ({c.unchecked_reason})"
                                                                     if c.unchecked_reason else "is not floating-point")
                                               for c in named)
                       if named else "it matches no argument or parameter")
                raise InvalidArgumentError(
                    f"wrt: entry {described!r} selects nothing to check ({why}). "
                    f"Checkable leaves are: {_names(candidates, floating)}.")
            chosen.extend(i for i in hits if i not in chosen)
        chosen.sort()
    if not chosen:
        found = ", ".join(f"{c.name} ({c.dtype})" for c in candidates) or "no arrays at all"
        raise InvalidArgumentError(
            "args: no floating-point input to check. gradbridge checks real floating arrays "
            f"(float16/32/64, bfloat16) among the arguments and params; found {found}. "
            "Python numbers pass through unchanged: pass them as arrays to check them.")
    leaves: List[LeafSpec] = []
    offset = 0
    for i in chosen:
        c = candidates[i]
        leaf = LeafSpec(c.name, tuple(int(d) for d in c.shape), c.dtype, offset, c.kind)
        leaves.append(leaf)
        offset += leaf.size
    return leaves, chosen


def _names(candidates: Sequence[Candidate], indices: Sequence[int]) -> str:
    return ", ".join(candidates[i].name for i in indices) or "(none)"


def promotion_notes(leaves: Sequence[LeafSpec]) -> List[str]:
    """One note per original dtype below float64: which leaves are checked on float64 copies."""
    by_dtype: dict = {}
    for leaf in leaves:
        if leaf.dtype != "float64":
            by_dtype.setdefault(leaf.dtype, []).append(leaf.name)
    return [f"{dtype} leaves checked on float64 copies (the originals are untouched): {', '.join(names)}"
            for dtype, names in by_dtype.items()]


def argument_candidates(args: Sequence[Any], arg_names: Sequence[str], is_array: Callable[[Any], bool],
                        describe: Callable[[Any], Tuple[Tuple[int, ...], str, bool]]
                        ) -> Tuple[List[Candidate], Callable[[Sequence[Any]], tuple]]:
    """The array leaves of the positional arguments as candidates, and a function rebuilding the arguments.

    ``describe(array)`` gives (shape, dtype name, floating). The rebuild function takes one value per
    candidate (further values, such as parameters appended after the inputs, are ignored) and returns
    the argument tuple with those values in place of the leaves.
    """
    candidates: List[Candidate] = []
    rebuilds = []
    for index, (name, arg) in enumerate(zip(arg_names, args)):
        leaves, rebuild = flatten(arg, name, is_array)
        base = len(candidates)
        for leaf in leaves:
            shape, dtype, floating = describe(leaf.value)
            candidates.append(Candidate(leaf.path, leaf.value, tuple(int(d) for d in shape), dtype, floating,
                                        "input", index))
        rebuilds.append((rebuild, base, len(leaves)))
    return candidates, lambda values: tuple(r(values[base:base + n]) for r, base, n in rebuilds)

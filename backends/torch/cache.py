"""What the torch backend keeps across checks: verified batching decisions, and vmap's refusals of classic
``autograd.Function``s.

Invariant: an entry only ever saves work, it never decides a number. A kept decision says that fn (the same
function, leaf shapes and dtypes, options, and fingerprint of what it reads) ran under ``torch.func.vmap`` and
agreed with the point-by-point loop in an earlier check; it is weakly held by the function (dropped with it, or
with any object its fingerprint names by identity), and anything going wrong when it is used sends the check
through the full decision again (see :mod:`.batching`). A kept refusal holds the first line of the error vmap
refused a Function class with, for as long as the class lives and keeps the same ``setup_context``.
``clear_cache()`` drops the decisions; ``cache_size()`` counts them.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable
from .forward_rules import _function_class
from .problem import _first_line


class _Fingerprint(Fingerprinter):
    """What fn reads besides its arguments, as far as it decides whether fn runs under ``torch.func.vmap``
    as it runs point by point: Python values by value, functions by their code and what they read, tensors,
    arrays and modules by identity (their values do not change how fn batches)."""

    libraries = BASE_LIBRARIES | {"torch", "functorch"}

    def ndarray(self, value: np.ndarray) -> Any:
        return ("ndarray", self.identity(value))

    def adapter_object(self, value: Any, depth: int) -> Any:
        if isinstance(value, (torch.Tensor, torch.nn.Module)):
            return (type(value).__name__, self.identity(value))
        return UNHANDLED


def _argument_token(fingerprint: Fingerprinter, value: Any, depth: int = 0) -> Any:
    """What fn receives as arguments, for the key of a batching decision: tensors by shape, dtype and
    ``requires_grad`` (their values do not change how fn batches), containers item by item, anything else
    (a flag, a config object) as the fingerprint keys what fn reads."""
    if depth > 32:
        raise Uncacheable("arguments nested too deep")
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_argument_token(fingerprint, v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((fingerprint.environment(k), _argument_token(fingerprint, v, depth + 1))
                              for k, v in value.items()))
    return fingerprint.environment(value)


class _Batches:
    """A cached decision: fn (for this key) ran under vmap and agreed with the loop in an earlier check."""

    def __init__(self, refs: List[Any]) -> None:
        self.refs = refs

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


#: Functions whose batched evaluation an earlier check verified, per structure and fingerprint (see
#: ``_evaluate_first_batch``); weakly held by the function, like the JAX and TensorFlow compiled code.
_BATCHES: WeakFunctionCache[_Batches] = WeakFunctionCache(per_function=16)


def clear_cache() -> None:
    """Forget every batching decision and every vmap refusal kept across checks."""
    _BATCHES.clear()
    _CLASSIC_REFUSALS.clear()


def cache_size() -> int:
    """How many batching decisions are kept across checks."""
    return len(_BATCHES)


# A classic autograd.Function (forward(ctx, ...), no setup_context) given as fn itself (``MyFunction.apply``)
# is refused by every torch.func transform before its forward runs, whatever the inputs: the refusal's
# first line is kept per class (with the setup_context it was refused with) so that later checks of the
# same Function skip the failing vmap attempt and note the same reason.
_CLASSIC_REFUSALS: "weakref.WeakKeyDictionary[type, Tuple[Any, str]]" = weakref.WeakKeyDictionary()


def _classic_function_refusal(fn: Any) -> Optional[str]:
    """The first line of the error vmap refused ``fn``'s Function class with before, if it did."""
    owner = _function_class(fn)
    known = _CLASSIC_REFUSALS.get(owner) if owner is not None else None
    if known is None or known[0] is not getattr(owner, "setup_context", None):
        return None
    return known[1]


def _remember_classic_function_refusal(fn: Any, exc: BaseException) -> None:
    owner = _function_class(fn)
    if owner is not None and isinstance(exc, RuntimeError) and "setup_context" in str(exc):
        _CLASSIC_REFUSALS[owner] = (getattr(owner, "setup_context", None), _first_line(exc))

"""Compiled code kept across checks: the fingerprint of what fn reads, and the weak cache of compiled entries.

Invariant: a kept entry is reused only for the same function object (held weakly: the cache never keeps it alive)
under an equal key of everything that shapes the trace, with every object the key names by identity still alive;
the entries hold no user array; anything that cannot be keyed or fingerprinted safely is not cached at all.

Tracing and compiling ``jax.jit(jax.vmap(fn))`` and the VJP/JVP maps costs far more than a small check itself, so
what a check compiles is kept for the next check of the same function. The key (built by
:meth:`.problem.JaxProblem.compiled`) covers the argument trees, each leaf's role (checked: shape and dtype; other
arrays: shape and dtype only, as they are passed to the compiled code as arguments, never baked in; other values:
by value, and only immutable ones), kwargs (immutable values only), promote, the leaves' dtypes inside fn and the
x64 mode. What fn reads from outside its arguments (closure cells, globals it names, defaults, the state of a
callable object or bound method, recursively through the Python functions it reaches) is part of the key too,
taken when the check looks its entry up, before it runs fn: Python scalars (ints included) and NumPy arrays by
contents, JAX arrays and other objects by identity (:class:`JaxFingerprint`). A global rebound to another value
or an array changed in place makes a fresh trace; an int or a list of ints fn bumps while traced (a trace counter)
does not, as the entries of the state a check started from are also kept under the state it leaves behind
(:meth:`WeakFunctionCache.keep_after_run`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, digest

if TYPE_CHECKING:  # pragma: no cover
    from .compiled import Compiled


class JaxFingerprint(Fingerprinter):
    """What fn reads besides its arguments: ``token`` for comparison, plus weak references proving that the
    objects compared by identity are still the same ones (:meth:`alive`). Plain values by value, as every
    adapter keys them (:meth:`Fingerprinter.plain`)."""

    #: Packages whose functions and objects are fingerprinted by identity only, not followed inside.
    libraries = BASE_LIBRARIES | {"jax", "jaxlib", "flax", "optax", "equinox", "haiku", "chex"}

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.token = self.environment(fn)

    def ndarray(self, value: np.ndarray) -> Any:
        """A NumPy array by shape, dtype and a digest of its contents, and by identity too."""
        return ("ndarray", value.shape, str(value.dtype), digest(value), self.identity(value))

    def adapter_object(self, value: Any, depth: int) -> Any:
        """JAX arrays (immutable) by identity; custom_vjp/custom_jvp functions by identity plus the user's
        function and rules inside."""
        if isinstance(value, jax.Array):
            return ("jax", self.identity(value))
        if isinstance(value, (jax.custom_vjp, jax.custom_jvp)):
            return ("custom", self.identity(value),
                    tuple(self.environment(getattr(value, name, None), depth + 1)
                          for name in ("fun", "fwd", "bwd", "jvp")))
        return UNHANDLED


CACHE: "WeakFunctionCache[Compiled]" = WeakFunctionCache(per_function=16)


def clear_cache() -> None:
    """Drop every compiled function kept across checks."""
    CACHE.clear()


def cache_size() -> int:
    """How many compiled entries are kept (over all functions)."""
    return len(CACHE)

"""Traced vectorized graphs kept across checks of the same function: the key, the entries, the cache.

Invariant: an entry is found only by the very function object (held weakly: the cache never keeps it alive)
and a key of everything a trace depends on, so a kept graph is never used for a check it was not traced for,
as far as the key can see; whatever cannot be keyed safely is not cached at all. A kept graph holds no Python
object of the check, and every check still compares its first batched chunk with the eager loop (see
:mod:`.batching`): a graph gone stale in a way the key missed is dropped, not trusted.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, TYPE_CHECKING

import numpy as np
import tensorflow as tf

from gradbridge._tree import is_walked_node

from ..common.cache import WeakFunctionCache
from ..common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable, VALUE_TYPES, digest
from .keras import floatx, is_keras_layer, is_keras_variable
from .tensors import is_tensor

if TYPE_CHECKING:
    from .problem import TensorFlowProblem

# --- traced graphs kept across checks ---
#
# Tracing a vectorized graph costs 0.05-0.1 s, far more than a small check itself, so the graphs a check traces
# are kept for the next check of the same function. An entry is found by the function object (held weakly: the
# cache never keeps it alive) and a key of everything a trace depends on: the argument structure (checked and
# other floating tensors by shape and dtype only, as they are graph inputs, never captured; integer and boolean
# tensors and other values by value; variables by identity, as a graph reads them when it runs), kwargs, the
# leaves and their dtypes inside fn, promote, train, the model and the parameter variables by identity, the
# outputs, Keras' floatx, and what fn reads from outside its arguments (closure cells, globals it names,
# defaults, recursively through the Python functions it reaches: tensors, variables, models and other objects by
# identity, NumPy arrays and Python scalars, ints included, by value), taken when the check is prepared, before
# it first runs fn. An int or a list of ints fn bumps while it runs (a trace or call counter) does not defeat the
# cache: the entries of the state a check started from are also kept under the state it leaves behind
# (WeakFunctionCache.keep_after_run, see backends.common.cache). Anything that cannot be keyed safely is not
# cached. The graphs hold no Python object of the check. Every check still compares its first batched chunk with
# the eager loop, so a graph gone stale in a way the key missed (an attribute of a Keras layer changed) is
# dropped, not trusted. Only first-order checks are cached (an order-2 function closes over its cotangent).

CACHE: WeakFunctionCache["Traced"] = WeakFunctionCache(per_function=16)


def clear_cache() -> None:
    """Drop every traced graph kept across checks."""
    CACHE.clear()


def cache_size() -> int:
    """How many entries (each holding the traced graphs of one function and key) are kept; one kept under
    several keys (the values of a counter fn bumps) counts once."""
    return len(CACHE)


class Traced:
    """What the checks of one function and key share: the traced graphs by path, the paths that cannot be
    batched (and why, found while tracing), flags found while tracing, and weak references to the objects
    keyed by identity (an id names an object only while it lives)."""

    def __init__(self, refs: List[Any]) -> None:
        self.refs = refs
        self.graphs: Dict[str, Any] = {}
        self.refused: Dict[str, str] = {}
        self.flags: Dict[str, List[bool]] = {}

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.refs)


class Keyer(Fingerprinter):
    """Builds the hashable tokens of a cache key, collecting weak references to what it keys by identity."""

    #: Packages whose functions and objects are keyed by identity only, not followed inside.
    libraries = BASE_LIBRARIES | {"tensorflow", "keras", "tf_keras", "absl", "google"}

    def __init__(self) -> None:
        super().__init__()
        self._walking: set = set()  # ids of the argument containers on the current path of :meth:`tree`

    def constant(self, value: Any) -> Any:
        """A value a trace bakes in (an argument that is not a graph input): by value, or a variable by identity."""
        if isinstance(value, (tf.Variable,)) or is_keras_variable(value):
            return ("variable", self.identity(value))
        if isinstance(value, tf.Tensor):
            if not hasattr(value, "numpy"):
                raise Uncacheable("symbolic tensor")
            return ("tensor", tuple(value.shape), value.dtype.name, digest(np.asarray(value.numpy())))
        if isinstance(value, VALUE_TYPES):
            return (type(value), value)
        if isinstance(value, np.generic):
            return ("scalar", value.dtype.str, value.tobytes())
        if isinstance(value, np.ndarray):
            return ("ndarray", value.shape, value.dtype.str, digest(value))
        if isinstance(value, tf.DType):
            return ("dtype", value.name)
        raise Uncacheable(type(value).__name__)

    def tree(self, node: Any, leaf: Callable[[Any], Any], depth: int = 0) -> Any:
        """The token of an argument tree, walked as :func:`gradbridge._tree.flatten` walks it (tensors and
        variables are leaves, given to ``leaf`` in the same order as the candidates)."""
        if depth > 32:
            raise Uncacheable("argument nested too deep")
        if is_tensor(node):
            return leaf(node)
        if isinstance(node, (dict, list, tuple)):
            walking = self._walking
            if id(node) in walking:  # a structure that contains itself (the check passes the inner one through)
                raise Uncacheable("an argument that contains itself")
            walking.add(id(node))
            try:
                if isinstance(node, dict):
                    return (self.identity(type(node)), tuple((self.constant(k), self.tree(v, leaf, depth + 1))
                                                             for k, v in node.items()))
                return (self.identity(type(node)), tuple(self.tree(v, leaf, depth + 1) for v in node))
            finally:
                walking.discard(id(node))
        if is_walked_node(node):  # a dataclass or registered node: its leaves are candidates this walk skips
            raise Uncacheable(f"a {type(node).__name__} among the arguments")
        return self.constant(node)

    def adapter_object(self, value: Any, depth: int) -> Any:
        """Eager tensors (they never change) by identity; variables, Keras layers and tf.Modules by identity
        only, as a graph reads them when it runs (a layer's settings: see above)."""
        if isinstance(value, tf.Tensor):
            if not hasattr(value, "numpy"):
                raise Uncacheable("symbolic tensor")
            return ("tensor", self.identity(value))
        if isinstance(value, tf.Variable) or is_keras_variable(value) or is_keras_layer(value) \
                or isinstance(value, tf.Module):
            return ("object", self.identity(value))
        return UNHANDLED


def environment_of(fn: Any) -> Optional[Tuple[Any, List[Any]]]:
    """The token of what ``fn`` reads besides its arguments and the weak references that must stay alive for
    it to hold; None where it cannot be keyed safely."""
    keyer = Keyer()
    try:
        token = keyer.environment(fn)
        hash(token)
    except (Uncacheable, TypeError, RecursionError):
        return None
    return token, keyer.refs


def cache_key(problem: "TensorFlowProblem") -> Tuple[Tuple[Any, Any], List[Any]]:
    """The key of a first-order check's traced graphs, ``(structure, environment)`` with the environment taken
    when the check was prepared, and the weak references that must stay alive for an entry to hold (raises
    Uncacheable)."""
    if problem.environment is None:
        raise Uncacheable("what fn reads")
    environment, environment_refs = problem.environment
    keyer = Keyer()
    chosen = set(problem.chosen)
    fed = set(problem.fed_positions)
    position = iter(range(len(problem.candidates)))

    def argument(value: Any) -> Any:
        i = next(position)
        c = problem.candidates[i]
        if i in chosen:
            return ("checked", c.shape, c.dtype)
        if i in fed:
            return ("fed", c.shape, c.dtype)
        return keyer.constant(value)

    spec = problem.spec
    structure = (tuple(keyer.tree(arg, argument) for arg in spec.args),
                 tuple(sorted((str(k), keyer.tree(v, keyer.constant)) for k, v in spec.kwargs.items())),
                 tuple(problem.chosen),
                 tuple((leaf.name, leaf.shape, leaf.dtype, leaf.offset, leaf.kind) for leaf in problem.leaves),
                 tuple(dtype.name for dtype in problem.feed),
                 tuple((c.name, keyer.identity(c.value)) for c in problem.candidates if c.kind == "param"),
                 keyer.identity(problem.model) if problem.model is not None else None,
                 problem.promote, problem.promote_model, bool(spec.train),
                 tuple((o.name, o.shape, o.dtype) for o in problem.outputs or ()),
                 floatx())
    key = (structure, environment)
    hash(key)
    return key, keyer.refs + environment_refs


def entry_for(problem: "TensorFlowProblem") -> Tuple[Optional[Traced], bool, Optional[Tuple[Any, Any]]]:
    """The cache entry of a first-order check (an empty one is made and kept when there is none yet), whether an
    earlier check had made it, and its key; (None, False, None) when the check cannot be cached."""
    try:
        key, refs = cache_key(problem)
    except (Uncacheable, TypeError, RecursionError):
        return None, False, None
    entry = CACHE.get(problem.spec.fn, key, keep=Traced.alive)
    if entry is not None:
        return entry, True, key
    entry = Traced(refs)
    return (entry, False, key) if CACHE.put(problem.spec.fn, key, entry) else (None, False, None)


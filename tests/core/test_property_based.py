"""Property-based checks of arbitrary argument structures (issue 14, item 5), with hypothesis.

Arguments are drawn as nested structures (a bare array, lists, tuples and dicts of arrays, one level of nesting
inside them) of arrays of any shape up to rank 3, 0-d, size 0 and size 1 included, in float64, float32 and
float16, with integer arrays mixed in (passed through, never checked). The function is a sum over the floating
leaves of ``exp(x/2) + x``, whose gradient ``exp(x/2)/2 + 1`` is at least 1 everywhere, so a relative bug
of 1e-3 on one element is an absolute error of at least 1e-3:

* correct code passes, or, when no floating leaf has an element, raises ``InvalidArgumentError`` naming
  ``args`` (the documented error for a check with nothing to check);
* the same code with a seeded 1e-3 bug on one element of one leaf fails, on exactly that leaf.

NumPy checks the hand-written gradient (``grad=``); PyTorch, JAX and TensorFlow check the op as each
framework's own custom-gradient rule (``tests/support/kits.py``). The runs are derandomized (the same examples in
every CI run) and sized to take a few seconds per backend.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradbridge as gb
from backend_matrix import require_backend
from kits import make_op

#: Examples per backend: NumPy is cheap; the frameworks trace or compile per structure.
EXAMPLES = {"numpy": 100, "torch": 40, "jax": 10, "tensorflow": 12, "autograd": 40}
BUG = 1e-3

FLOATS = [np.float64, np.float32, np.float16]


@st.composite
def _array(draw: Callable[..., Any]) -> np.ndarray:
    dtype = draw(st.sampled_from(FLOATS + [np.int64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
    if dtype is np.int64:
        return draw(hnp.arrays(dtype, shape, elements=st.integers(-3, 3)))
    elements = st.floats(-2.0, 2.0, width=np.dtype(dtype).itemsize * 8, allow_nan=False, allow_infinity=False)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _structures() -> st.SearchStrategy:
    leaf = _array()
    level = st.one_of(leaf, st.lists(leaf, min_size=1, max_size=3),
                      st.dictionaries(st.sampled_from(["a", "b", "c"]), leaf, min_size=1, max_size=3))
    return st.one_of(leaf,
                     st.lists(level, min_size=1, max_size=3),
                     st.tuples(level, leaf),
                     st.dictionaries(st.sampled_from(["w", "b", "state"]), level, min_size=1, max_size=3))


def _leaves(tree: Any, path: str = "tree") -> List[Tuple[str, Any]]:
    """The array leaves in the order and with the names gradbridge gives them (dicts in insertion order)."""
    if isinstance(tree, dict):
        return [leaf for key, value in tree.items() for leaf in _leaves(value, f"{path}[{key!r}]")]
    if isinstance(tree, (list, tuple)):
        return [leaf for i, value in enumerate(tree) for leaf in _leaves(value, f"{path}[{i}]")]
    return [(path, tree)]


def _is_float(array: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(array).dtype, np.floating)


def _forward(*arrays: np.ndarray) -> np.ndarray:
    """The sum over the leaves, in the widest of their dtypes (an empty float16 leaf may come first)."""
    dtype = np.result_type(*[a.dtype for a in arrays])
    return np.asarray(sum(float(np.sum(np.exp(a / 2) + a)) for a in arrays), dtype=dtype)


def _backward(bug_in: int) -> Callable[..., Tuple[np.ndarray, ...]]:
    """The VJP of :func:`_forward`; ``bug_in`` >= 0 puts a relative ``BUG`` on the first element of that leaf."""
    def backward(cotangent: np.ndarray, *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
        grads = [np.asarray(cotangent) * (np.exp(a / 2) / 2 + 1) for a in arrays]
        if bug_in >= 0:
            grads[bug_in] = np.array(grads[bug_in], copy=True)
            grads[bug_in].reshape(-1)[0] *= 1 + BUG
        return tuple(grads)
    return backward


def _convert(tree: Any, to_native: Callable[[np.ndarray], Any]) -> Any:
    if isinstance(tree, dict):
        return {key: _convert(value, to_native) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_convert(value, to_native) for value in tree)
    return to_native(tree)


def _native(backend: str) -> Callable[[np.ndarray], Any]:
    """The framework's array of the same dtype (JAX, without 64-bit mode: float64 as float32, int64 as int32)."""
    if backend == "torch":
        import torch
        return lambda a: torch.as_tensor(np.array(a))
    if backend == "jax":
        import jax.numpy as jnp
        narrow = {np.dtype(np.float64): np.float32, np.dtype(np.int64): np.int32}
        return lambda a: jnp.asarray(np.asarray(a, dtype=narrow.get(a.dtype, a.dtype)))
    if backend == "tensorflow":
        import tensorflow as tf
        return tf.constant
    return lambda a: a


def _check(backend: str, tree: Any, bug_in: int) -> gb.Report:
    """``gb.check`` of the sum over the floating leaves of ``tree`` with the op of ``tests/support/kits.py``.

    fn finds the floating leaves by name: JAX rebuilds dicts with their keys sorted."""
    floating = [name for name, leaf in _leaves(tree) if _is_float(leaf)]
    op, _, options = make_op(backend, _forward, _backward(bug_in))

    def fn(tree: Any) -> Any:
        leaves = dict(_leaves(tree))
        return op(*[leaves[name] for name in floating])

    if backend == "numpy":
        vjp = options["grad"]

        def grad(tree: Any) -> List[np.ndarray]:
            leaves = dict(_leaves(tree))
            gradients = vjp(np.float64(1.0), *[leaves[name] for name in floating])
            return [np.asarray(g) for g in gradients]  # one per floating leaf, as NumPy's check lays them out

        options = {"grad": grad}
    return gb.check(fn, _convert(tree, _native(backend)), **options)


def _property(backend: str) -> Callable[..., None]:
    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(tree=_structures(), pick=st.integers(0, 10 ** 6))
    def prop(tree: Any, pick: int) -> None:
        leaves = _leaves(tree)
        floating = [(name, leaf) for name, leaf in leaves if _is_float(leaf)]
        if not floating:  # nothing floating at all: the documented error
            with pytest.raises(gb.InvalidArgumentError, match=r"^args: no floating-point input"):
                _check(backend, tree, -1)
            return
        nonempty = [k for k, (_, leaf) in enumerate(floating) if np.size(leaf) > 0]
        if not nonempty:  # floating leaves, all without elements: nothing to check, the same error
            with pytest.raises(gb.InvalidArgumentError, match=r"^args: no floating-point input.*no elements"):
                _check(backend, tree, -1)
            return
        report = _check(backend, tree, -1)
        assert report.passed, str(report)
        assert {row.input for row in report.rows} == {floating[k][0] for k in nonempty}, str(report)
        bug_in = nonempty[pick % len(nonempty)]
        buggy = _check(backend, tree, bug_in)
        assert not buggy.passed, str(buggy)
        failing = {row.input for row in buggy.rows if row.status == "fail"}
        assert failing == {floating[bug_in][0]}, str(buggy)

    return prop


@pytest.mark.filterwarnings("ignore:The recursion limit will not be reset")  # a framework raised it meanwhile
@pytest.mark.parametrize("backend", [pytest.param(b, marks=getattr(pytest.mark, b)) for b in EXAMPLES])
def test_any_structure_correct_code_passes_and_a_seeded_bug_fails(backend: str) -> None:
    require_backend(backend)
    _property(backend)()


def test_the_structures_drawn_include_the_edge_shapes() -> None:
    """The strategy reaches 0-d arrays, size-0 and size-1 arrays, every float dtype and nested containers."""
    seen: Dict[str, bool] = {"0-d": False, "size 0": False, "size 1": False, "nested": False}
    dtypes = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(tree=_structures())
    def collect(tree: Any) -> None:
        for name, leaf in _leaves(tree):
            seen["0-d"] |= np.ndim(leaf) == 0
            seen["size 0"] |= np.size(leaf) == 0
            seen["size 1"] |= np.size(leaf) == 1 and np.ndim(leaf) > 0
            seen["nested"] |= name.count("[") >= 2
            dtypes.add(np.asarray(leaf).dtype.name)

    collect()
    assert all(seen.values()), seen
    assert {"float64", "float32", "float16", "int64"} <= dtypes, dtypes

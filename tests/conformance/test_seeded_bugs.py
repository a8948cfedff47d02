"""One table of custom ops with seeded bugs in their backward, checked on every backend.

Each op is written once in NumPy (forward and VJP) and turned into the backend's own custom-gradient
mechanism by ``kits.make_op``. Correct backwards must pass; every seeded bug must be caught and the
failing input (and, where the bug is on one element, that element) must be named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import pytest

import gradbridge as gb
from kits import make_op

RNG = np.random.default_rng(1234)


@dataclass
class Case:
    name: str
    forward: Callable
    backward: Callable
    buggy: Callable
    inputs: Tuple[np.ndarray, ...]
    arg_names: Tuple[str, ...]
    failing: str
    worst_index: Optional[Tuple[int, ...]] = None


def _few_elements_bug(g, x):
    grad = g * (1 - np.tanh(x) ** 2)
    grad[7] *= 1.01
    return (grad,)


CASES = [
    Case("sign flip", lambda x: x ** 3, lambda g, x: (3 * x ** 2 * g,), lambda g, x: (-3 * x ** 2 * g,),
         (RNG.normal(size=(3, 4)),), ("x",), "x"),
    Case("missing factor 2", lambda x: x ** 2, lambda g, x: (2 * x * g,), lambda g, x: (x * g,),
         (RNG.normal(size=5),), ("x",), "x"),
    Case("transposed matmul gradient", lambda a, b: a @ b, lambda g, a, b: (g @ b.T, a.T @ g),
         lambda g, a, b: (g @ b, a.T @ g), (RNG.normal(size=(3, 3)), RNG.normal(size=(3, 3))), ("a", "b"), "a"),
    Case("dropped product-rule term", lambda x: x * np.sin(x), lambda g, x: ((np.sin(x) + x * np.cos(x)) * g,),
         lambda g, x: (x * np.cos(x) * g,), (RNG.normal(size=6),), ("x",), "x"),
    Case("bias gradient summed over the wrong axis", lambda x, b: x + b, lambda g, x, b: (g, g.sum(axis=0)),
         lambda g, x, b: (g, g.sum(axis=1)), (RNG.normal(size=(4, 4)), RNG.normal(size=4)), ("x", "b"), "b"),
    Case("wrong gradient for one of three inputs", lambda x, y, z: x * y + z,
         lambda g, x, y, z: (g * y, g * x, g), lambda g, x, y, z: (g * y, g * y, g),
         (RNG.normal(size=4), RNG.normal(size=4), RNG.normal(size=4)), ("x", "y", "z"), "y"),
    Case("bug on one element of fifty", np.tanh, lambda g, x: (g * (1 - np.tanh(x) ** 2),), _few_elements_bug,
         (RNG.normal(size=50),), ("x",), "x", (7,)),
    Case("relative error 1e-4", np.exp, lambda g, x: (g * np.exp(x),), lambda g, x: (g * np.exp(x) * (1 + 1e-4),),
         (RNG.normal(size=5),), ("x",), "x"),
]


def _check(backend, case, backward, mode):
    fn, native, options = make_op(backend, case.forward, backward)
    args = [native(a) for a in case.inputs]
    return gb.check(fn, *args, backend=backend, mode=mode, **options)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_correct_backward_passes(backend, case, mode):
    report = _check(backend, case, case.backward, mode)
    assert report.passed, str(report)
    assert len({row.input for row in report.rows}) == len(case.arg_names), str(report)


@pytest.mark.parametrize("mode", ["full", "fast"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seeded_bug_is_caught_and_located(backend, case, mode):
    report = _check(backend, case, case.buggy, mode)
    assert not report.passed, str(report)
    failing = {row.input for row in report.failures}
    assert len(failing) == 1, str(report)
    failing_name = failing.pop()
    expected = case.arg_names.index(case.failing)
    # names come from the signature where there is one (numpy) or arg0, arg1... (a *inputs Function)
    assert failing_name in (case.failing, f"arg{expected}", f"inputs[{expected}]"), str(report)
    worst = report.failures[0].worst
    assert worst is not None and worst.abs_error > worst.allowed
    if case.worst_index is not None:
        assert worst.input_index == case.worst_index, str(report)
    with pytest.raises(gb.GradientCheckError) as raised:
        fn, native, options = make_op(backend, case.forward, case.buggy)
        gb.assert_check(fn, *[native(a) for a in case.inputs], backend=backend, mode=mode, **options)
    assert isinstance(raised.value, AssertionError)
    assert raised.value.report.passed is False

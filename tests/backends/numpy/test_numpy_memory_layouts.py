"""The memory-layout contracts on NumPy: fn and a hand-written ``grad=`` must give the same values for Fortran-ordered,
strided and broadcast (stride-0, read-only) arrays as for C-ordered copies with the same values. A compiled kernel
behind a NumPy function (C, Cython, numba, ctypes) that reads its buffer as C order is wrong only on such arrays,
which NumPy code passes all the time (``x.T``, ``x[:, ::2]``, ``np.broadcast_to``)."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb

X = np.array([[0.3, -0.7, 1.1, 0.2], [0.5, 2.0, -1.4, 0.9], [1.2, -0.3, 0.8, -2.1]])


def _c_order_read(array: np.ndarray) -> np.ndarray:
    """The classic stride bug: the array's buffer read as if it were C-contiguous (what a ctypes kernel does)."""
    itemsize = array.itemsize
    strides, step = [], itemsize
    for size in reversed(array.shape):
        strides.insert(0, step)
        step *= size
    return np.lib.stride_tricks.as_strided(array, array.shape, strides)


def _square(forward_bug: bool):
    return lambda x: (_c_order_read(x) if forward_bug else x) ** 2


def _square_grad(backward_bug: bool):
    return lambda g, x: 2 * g * (_c_order_read(x) if backward_bug else x)


def _layouts(report):
    return {c.name: c for c in report.contracts if c.name in ("non-contiguous inputs", "expanded inputs")}


def test_a_stride_aware_function_and_gradient_hold_both_layout_contracts() -> None:
    report = gb.check(_square(False), X, grad=_square_grad(False))
    assert report.passed, str(report)
    layouts = _layouts(report)
    assert set(layouts) == {"non-contiguous inputs", "expanded inputs"}, str(report)
    assert all(c.passed and c.checked for c in layouts.values()), str(report)


@pytest.mark.parametrize("forward_bug, backward_bug, side", [(False, True, "the backward"), (True, True, "fn")])
def test_a_kernel_reading_c_order_fails_while_every_row_passes(forward_bug, backward_bug, side) -> None:
    report = gb.check(_square(forward_bug), X, grad=_square_grad(backward_bug))
    assert all(row.passed for row in report.rows), str(report)
    assert not report.passed, str(report)
    violated = [c for c in _layouts(report).values() if not c.passed]
    assert violated and all(c.message.startswith(f"{side} gives other values") for c in violated), str(report)
    assert "non-contiguous inputs" in {c.name for c in violated}


def test_a_function_writing_its_input_in_place_is_reported_not_failed_on_a_read_only_broadcast() -> None:
    def scaled(x):
        x *= 1.0  # harmless on its own copy; a broadcast array is read-only
        return x ** 2

    report = gb.check(scaled, X, grad=_square_grad(False))
    expanded = _layouts(report)["expanded inputs"]
    assert report.passed and not expanded.checked, str(report)

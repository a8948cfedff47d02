"""Complex inputs and outputs on every backend: checked through their real views (both Wirtinger derivatives),
with gradbridge's convention (dL/dRe + i dL/dIm) mapped from each framework's own.

Every rule is written once in gradbridge's convention (``tests/support/kit_complex.py``) and built with each
framework's custom-gradient mechanism (JAX's and autograd's conjugated at both ends, their convention): the
correct rules must pass, the seeded bugs (a missing conjugate, JAX's convention where PyTorch's is meant, a 1e-4
relative error, a bug on one element) must fail, and a conjugation is named as such.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from kit_complex import autodiff, make_rule, namespace, to_native

Z = np.array([1.0 + 2.0j, -0.5 + 0.3j, 0.8 - 1.1j])
W = np.array([0.7 - 1.0j, 2.0 + 0.1j, -0.4 + 0.6j])


def _mul(xp, z, w):
    return z * w


def _cube(xp, z, w):
    return z * z * w


def _conj_mul(xp, z, w):  # not holomorphic in w
    return z * xp.conj(w)


def _energy(xp, z, w):  # a real loss of complex inputs
    return xp.total(xp.abs2(z) * xp.real(w))


def _energy_backward(xp, g, z, w):
    return 2 * z * xp.cplx(xp.real(w) * g), xp.cplx(xp.abs2(z) * g)


RULES = {
    "holomorphic-product": (_mul, lambda xp, g, z, w: (g * xp.conj(w), g * xp.conj(z))),
    "holomorphic-cube": (_cube, lambda xp, g, z, w: (g * xp.conj(2 * z * w), g * xp.conj(z * z))),
    "conjugate-product": (_conj_mul, lambda xp, g, z, w: (g * w, xp.conj(g) * z)),
    "real-loss": (_energy, _energy_backward),
}

#: name -> (forward, wrong backward, whether the bug is a conjugation the report must name)
BUGS = {
    "missing-conj-both": (_mul, lambda xp, g, z, w: (g * w, g * z), True),
    "missing-conj-one-input": (_cube, lambda xp, g, z, w: (g * xp.conj(2 * z * w), g * z * z), True),
    "conjugate-product-conj-dropped": (_conj_mul, lambda xp, g, z, w: (g * w, g * z), True),
    "jax-convention-in-real-loss": (_energy, lambda xp, g, z, w: (2 * xp.conj(z) * xp.cplx(xp.real(w) * g),
                                                                   xp.cplx(xp.abs2(z) * g)), True),
    "relative-1e-4": (_mul, lambda xp, g, z, w: (g * xp.conj(w) * (1 + 1e-4), g * xp.conj(z)), False),
    "imaginary-part-dropped": (_mul, lambda xp, g, z, w: (g * xp.conj(w), xp.cplx(xp.real(g * xp.conj(z)))), False),
}


def _check(backend: str, forward, backward, **extra):
    fn, options = make_rule(backend, forward, backward)
    return gb.check(fn, to_native(backend, Z), to_native(backend, W), **options, **extra)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_correct_complex_rules_pass(backend: str, rule: str) -> None:
    forward, backward = RULES[rule]
    report = _check(backend, forward, backward)
    assert report.passed, str(report)
    names = [row.input for row in report.rows]
    assert len(set(names)) == 2, str(report)  # both complex inputs are checked (named as fn's signature names them)
    assert any(f"complex values {names[0]}, {names[1]}" in note and "dL/dRe + i dL/dIm" in note
               for note in report.notes), report.notes


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_seeded_complex_bugs_fail(backend: str, bug: str) -> None:
    forward, backward, conjugation = BUGS[bug]
    report = _check(backend, forward, backward)
    assert not report.passed, str(report)
    text = str(report)
    assert ".real" in text or ".imag" in text, text  # elements of complex values are named by their parts
    if conjugation:
        assert "conj" in " ".join(row.message for row in report.failures), text


def test_a_bug_on_one_element_of_a_complex_input_fails(backend: str) -> None:
    def backward(xp, g, z, w):
        gz = g * xp.conj(w)
        mask = to_native(backend, np.array([0.0, 1.0, 0.0], dtype=complex))  # the second element's gradient is conjugated
        return gz + mask * (xp.conj(gz) - gz), g * xp.conj(z)

    report = _check(backend, _mul, backward)
    assert not report.passed, str(report)
    failing = [row for row in report.failures if row.input in ("z", "arg0")]
    assert len(report.failures) == 1 and failing and failing[0].worst.input_index[0] == 1, str(report)
    assert f"{failing[0].input}[1]." in str(report), str(report)


def test_autodiff_of_complex_functions_passes(backend: str) -> None:
    if backend == "numpy":
        pytest.skip("NumPy has no autodiff: its complex rules come from grad= (tested above)")
    fn, options = autodiff(backend, lambda xp, z, w: xp.exp(z) * xp.conj(w) + z * z)
    report = gb.check(fn, to_native(backend, Z), to_native(backend, W), **options)
    assert report.passed, str(report)
    loss, options = autodiff(backend, lambda xp, z: xp.total(xp.abs2(z)))
    report = gb.check(loss, to_native(backend, Z), **options)
    assert report.passed and report.rows[0].input_complex, str(report)


def test_a_complex_output_of_a_real_input_is_checked(backend: str) -> None:
    x = np.array([0.3, -0.7, 1.1])
    z = to_native(backend, np.array([0.5 + 0.5j, 1.0 - 0.2j, -0.3 + 0.9j]))
    if backend == "numpy":
        report = gb.check(lambda x: x * Z, x, grad=lambda g, x: np.real(g * np.conj(Z)))
        wrong = gb.check(lambda x: x * Z, x, grad=lambda g, x: np.real(g * Z))
    else:
        fn, options = autodiff(backend, lambda xp, x: xp.exp(xp.cplx(x) * z))
        report = gb.check(fn, to_native(backend, x), **options)
        wrong = None
    assert report.passed and report.rows[0].output_complex, str(report)
    if wrong is not None:
        assert not wrong.passed, str(wrong)


def test_the_conventions_of_the_frameworks_are_mapped(backend: str) -> None:
    """|z|^2 at 1+2j: torch and TensorFlow give 2+4j, JAX and autograd 2-4j; the check compares dL/dRe, dL/dIm =
    (2, 4) on every backend, so each framework's own autodiff passes."""
    if backend == "numpy":
        report = gb.check(lambda z: np.sum(np.abs(z) ** 2), np.array([1 + 2j]), grad=lambda z: 2 * z)
        jax_style = gb.check(lambda z: np.sum(np.abs(z) ** 2), np.array([1 + 2j]), grad=lambda z: 2 * np.conj(z))
        assert report.passed and not jax_style.passed, str(jax_style)
        return
    loss, options = autodiff(backend, lambda xp, z: xp.total(xp.abs2(z)))
    report = gb.check(loss, to_native(backend, np.array([1 + 2j])), **options)
    assert report.passed, str(report)
    worst = report.rows[0].worst
    assert worst is not None and abs(abs(worst.numeric) - (2.0 if worst.input_index[-1] == 0 else 4.0)) < 1e-6


def test_complex64_in_its_own_precision(backend: str) -> None:
    if backend == "autograd":
        pytest.skip("autograd computes in NumPy's dtypes; covered by the numpy backend")
    z64 = Z.astype(np.complex64)
    if backend == "numpy":
        report = gb.check(lambda z: np.sum(np.abs(z) ** 2), z64, grad=lambda z: 2 * z, promote=False)
    else:
        loss, options = autodiff(backend, lambda xp, z: xp.total(xp.abs2(z)))
        report = gb.check(loss, to_native(backend, z64), promote=False, **options)
    assert report.passed, str(report)
    promoted = gb.check(loss, to_native(backend, z64)) if backend != "numpy" else None
    assert promoted is None or promoted.passed, str(promoted)


def test_a_complex_argument_left_out_by_wrt_is_listed(backend: str) -> None:
    forward, backward = RULES["real-loss"]
    fn, options = make_rule(backend, forward, backward)
    if backend == "numpy":
        options = {"grad": lambda g, z, w: backward(namespace("numpy"), g, z, w)[1]}
    report = gb.check(fn, to_native(backend, Z), to_native(backend, W), wrt=1, **options)
    assert report.passed and len(report.rows) == 1, str(report)
    assert any(re.match(r"not checked: (z|arg0) \(complex128", note) for note in report.notes), report.notes


def test_the_users_complex_arrays_are_untouched(backend: str) -> None:
    z, w = to_native(backend, Z), to_native(backend, W)
    before = (np.array(z).copy(), np.array(w).copy())
    _check(backend, *BUGS["missing-conj-both"][:2])
    assert np.array_equal(np.array(z), before[0]) and np.array_equal(np.array(w), before[1])
    assert str(np.array(z).dtype) == "complex128"


@pytest.fixture(autouse=True)
def _x64_unchanged(backend: str):
    if backend != "jax":
        yield
        return
    require_backend("jax")
    import jax
    before = bool(jax.config.jax_enable_x64)
    yield
    assert bool(jax.config.jax_enable_x64) == before


def test_a_hand_written_grad_of_complex_values(backend: str) -> None:
    """``grad=`` on the frameworks that take one: gradbridge's convention, cotangent of a complex output included."""
    if backend in ("jax", "autograd"):
        pytest.skip(f"{backend} takes no grad= on its own arrays")
    xp = namespace(backend)
    z, w = to_native(backend, Z), to_native(backend, W)
    right = gb.check(lambda z, w: z * w, z, w, grad=lambda g, z, w: (g * xp.conj(w), g * xp.conj(z)))
    assert right.passed, str(right)
    wrong = gb.check(lambda z, w: z * w, z, w, grad=lambda g, z, w: (g * w, g * z))
    assert not wrong.passed and "conjugated" in " ".join(r.message for r in wrong.failures), str(wrong)
    loss = gb.check(lambda z: xp.total(xp.abs2(z)), z, grad=lambda z: 2 * z)
    assert loss.passed, str(loss)
    jax_style = gb.check(lambda z: xp.total(xp.abs2(z)), z, grad=lambda z: 2 * xp.conj(z))
    assert not jax_style.passed, str(jax_style)


def test_real_and_complex_arguments_mixed(backend: str) -> None:
    """A real argument of odd size before a complex one: the complex leaf starts at an odd offset of the flat
    vector (and of each point in a batch)."""
    x = np.array([0.3, -0.7, 1.1])

    def forward(xp, x, z):
        return xp.cplx(x) * z * z

    def backward(xp, g, x, z):
        return xp.real(g * xp.conj(z * z)), g * xp.conj(2 * xp.cplx(x) * z)

    fn, options = make_rule(backend, forward, backward)
    report = gb.check(fn, to_native(backend, x), to_native(backend, Z), **options)
    assert report.passed, str(report)
    wrong, options = make_rule(backend, forward, lambda xp, g, x, z: (xp.real(g * z * z), g * xp.conj(2 * xp.cplx(x) * z)))
    failed = gb.check(wrong, to_native(backend, x), to_native(backend, Z), **options)
    assert not failed.passed and len(failed.failures) == 1, str(failed)

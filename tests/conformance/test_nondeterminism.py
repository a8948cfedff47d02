"""Non-determinism is named, not called a wrong gradient, and never passes silently.

A backward pass whose result changes from call to call (atomics, a race, uninitialised memory) is run
twice at the same cotangent and its spread reported: below the tolerance the verdict stands with a note,
above it the row reads "non-deterministic", not "wrong gradient", and a real bug next to the noise still
fails as a bug. A forward that returns NaN at one perturbed point once, and finite values when the same
point is evaluated again, is a transient fault, never a domain edge. Each op is written once in NumPy and
turned into every framework's custom-gradient mechanism by the kits (tests/support/kits.py).
"""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from kits import make_op

A = np.array([[0.7, -1.2, 0.4, 2.0], [1.5, 0.3, -0.8, 0.6], [-0.5, 0.9, 1.1, -0.3]])
X = np.array([0.3, -0.7, 1.1, 0.25])


def forward(x):
    return A @ np.tanh(x)


def noisy_backward(amplitude, bug=0.0):
    """The right VJP of ``forward`` plus call-to-call noise of ``amplitude`` (a counter seeds it, so no
    generator the check re-seeds can pin it: like atomics, it differs on every call); ``bug`` adds a
    relative error to element 2."""
    calls = [0]

    def backward(cotangent, x):
        calls[0] += 1
        noise = np.random.default_rng(1000 + calls[0]).uniform(-amplitude, amplitude, x.shape)
        grad = (1.0 - np.tanh(x) ** 2) * (A.T @ cotangent)
        grad[2] *= 1.0 + bug
        return (grad + noise,)

    return backward


def check(backend, backward, **options):
    fn, to_native, kit_options = make_op(backend, forward, backward)
    return gb.check(fn, to_native(X), **kit_options, **options)


def test_a_deterministic_backward_gets_no_note(backend):
    report = check(backend, noisy_backward(0.0))
    assert report.passed, str(report)
    assert not any("non-deterministic" in note for note in report.notes), str(report)


def test_backward_noise_below_the_tolerance_passes_with_a_note(backend):
    report = check(backend, noisy_backward(1e-11))
    assert report.passed, str(report)
    notes = [note for note in report.notes if "non-deterministic backward" in note]
    assert len(notes) == 1, str(report)
    assert "below the tolerance" in notes[0], notes[0]


def test_backward_noise_above_the_tolerance_is_named_not_called_wrong(backend):
    report = check(backend, noisy_backward(1e-3))
    assert not report.passed, str(report)
    assert {row.status for row in report.rows} == {"nondeterministic"}, str(report)
    assert "non-deterministic backward" in report.summary(), report.summary()
    row = report.rows[0]
    assert "spread" in row.message and "not a wrong gradient" in row.message, row.message
    assert "NONDET" in str(report)


def test_a_real_bug_next_to_backward_noise_still_fails_as_a_bug(backend):
    report = check(backend, noisy_backward(1e-11, bug=1e-4))
    assert not report.passed, str(report)
    row = report.rows[0]
    assert row.status == "fail" and row.worst.input_index == (2,), str(report)


def test_a_large_bug_is_not_hidden_by_large_noise(backend):
    """Noise of 1e-3 explains mismatches up to a few times 1e-3, not a sign flip of an O(1) entry."""
    report = check(backend, noisy_backward(1e-3, bug=-2.0))
    assert not report.passed, str(report)
    assert report.rows[0].status == "fail" and report.rows[0].worst.input_index == (2,), str(report)


def flaky_forward():
    """``forward`` that returns NaN once, at the first perturbed point it sees, then never again (the
    first nonzero input it sees is the checked point, as the framework holds it: JAX's kit rounds it to
    float32; zeros are the kits' shape probes)."""
    fired, first = [False], []

    def fn(x):
        if np.any(x != 0.0) and not first:
            first.append(np.array(x))
        if not fired[0] and first and not np.array_equal(x, first[0]) and np.any(x != 0.0):
            fired[0] = True
            return np.full(A.shape[0], np.nan)
        return forward(x)

    return fn


def exact_backward(cotangent, x):
    return ((1.0 - np.tanh(x) ** 2) * (A.T @ cotangent),)


def test_a_transient_nan_at_a_perturbed_point_is_a_fault_not_a_domain_edge(backend):
    fn, to_native, kit_options = make_op(backend, flaky_forward(), exact_backward)
    report = gb.check(fn, to_native(X), **kit_options)
    assert not report.passed, str(report)
    assert report.problem is not None and "transient" in report.problem, str(report)
    assert "finite when the same point was evaluated again" in report.problem, report.problem


def test_a_real_domain_edge_is_still_a_domain_edge():
    """sqrt at 0 is NaN on the left every time: one-sided differences, no fault."""
    x = np.array([0.0, 0.5, 2.0])
    report = gb.check(lambda x: np.sum(np.sqrt(x) * x), x, grad=lambda x: 1.5 * np.sqrt(x))
    assert report.passed and report.problem is None, str(report)
    assert report.rows[0].one_sided >= 1, str(report)

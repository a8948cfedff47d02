"""The report: readable text with the worst element labelled, and a JSON-serialisable dict."""

from __future__ import annotations

import json

import numpy as np

import gradbridge as gb


def _buggy_report():
    def f(x, w):
        return float(np.sum(np.sin(x) * w ** 2))

    def grad(x, w):
        gw = 2 * np.sin(x) * w
        gw[1, 2] *= -1  # one wrong element
        return np.cos(x) * w ** 2, gw

    x = np.linspace(0.2, 1.3, 12).reshape(3, 4)
    return gb.check(f, x, x + 1.0, grad=grad)


def test_text_report_names_the_worst_element_and_labels_both_sides():
    text = str(_buggy_report())
    assert "FAILED" in text
    assert "w[1, 2]" in text
    assert "analytic (autodiff/grad)" in text and "numeric (finite diff.)" in text
    assert "tolerance:" in text and "step:" in text
    assert "1 of 12 compared entries outside tolerance" in text


def test_worst_element_values_are_the_real_ones():
    report = _buggy_report()
    row = report.row("w")
    x = np.linspace(0.2, 1.3, 12).reshape(3, 4)
    true = 2 * np.sin(x[1, 2]) * (x[1, 2] + 1.0)
    assert row.worst.input_index == (1, 2)
    assert np.isclose(row.worst.numeric, true, rtol=1e-8)
    assert np.isclose(row.worst.analytic, -true, rtol=1e-12)
    assert row.grade == "wrong" and row.mismatches == 1 and row.compared == 12
    assert report.row("x").status == "pass"


def test_to_dict_is_json_serialisable_and_complete():
    data = json.loads(json.dumps(_buggy_report().to_dict()))
    assert data["passed"] is False
    assert data["backend"] == "numpy" and data["mode"] == "full"
    rows = {row["input"]: row for row in data["rows"]}
    assert rows["w"]["passed"] is False and rows["x"]["passed"] is True
    assert rows["w"]["worst"]["input_index"] == [1, 2]
    # 2 (determinism) + 2 per element, + the noise estimate (only because something disagreed), + 2 for
    # the one disagreeing column re-evaluated at h/2, where the bug is far beyond the estimated error,
    # + the step-size sweep of the failing row's worst element (for the report's step-size plot)
    from gradbridge._checking.diagnostics import SWEEP_EXPONENTS
    from gradbridge._checking.ladder_codes import NOISE_DIRECTIONS, NOISE_POINTS

    assert data["evaluations"] == 2 + 2 * 24 + NOISE_DIRECTIONS * 2 * NOISE_POINTS + 2 + 2 * len(SWEEP_EXPONENTS)
    assert "step ladder" in rows["w"]["method"] and "step ladder" not in rows["x"]["method"]


def test_grades_follow_the_documented_bounds():
    from gradbridge._checking.tolerance import grade

    errors = (0.0, 5e-8, 5e-5, 5e-3, 0.5)
    assert [grade(e) for e in errors] == ["correct", "correct", "acceptable", "suspicious", "wrong"]

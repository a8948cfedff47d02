"""The HTML report: element maps and step-size sweeps of failing rows, the page, and the page as a
person sees it in headless Chromium (the heatmap and the step-size plot really drawn)."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._checking.diagnostics import SWEEP_EXPONENTS
from gradbridge._reporting.export import write_html, write_json
from backend_matrix import require_backend

RNG = np.random.default_rng(7)
W = RNG.normal(size=(6, 8))


def _tanh_layer(x):
    return np.tanh(x @ W)


def _tanh_layer_vjp(bug):
    def vjp(g, x):
        gx = (g * (1 - np.tanh(x @ W) ** 2)) @ W.T
        return (bug(gx),)
    return vjp


def _one_element(gx):
    gx = gx.copy()
    gx[1, 2] *= 1.01  # a 1% error on one element
    return gx


def _check(bug, x=None):
    x = RNG.normal(size=(5, 6)) if x is None else x
    return gb.check(_tanh_layer, x, grad=_tanh_layer_vjp(bug))


def test_element_map_marks_exactly_the_wrong_element_in_the_inputs_shape():
    row = _check(_one_element).row("x")
    assert row.status == "fail"
    assert np.shape(row.error_map) == (5, 6) and np.shape(row.outside_map) == (5, 6)
    assert list(zip(*np.nonzero(row.outside_map))) == [(1, 2)]
    assert abs(row.error_map[1, 2]) > 1e3 * np.max(np.abs(np.delete(row.error_map.ravel(), 1 * 6 + 2)))


def test_element_map_shows_a_wrong_row_as_a_row():
    def wrong_row(gx):
        gx = gx.copy()
        gx[3] *= -1  # a sign flip on one sample of the batch
        return gx

    row = _check(wrong_row).row("x")
    outside = np.asarray(row.outside_map)
    assert outside[3].all() and not np.delete(outside, 3, axis=0).any()
    assert np.all(np.isfinite(row.error_map))


def test_step_sweep_is_a_v_around_the_estimate_and_level_at_the_bug():
    row = _check(_one_element).row("x")
    sweep = row.step_sweep
    assert sweep is not None and len(sweep.steps) == len(SWEEP_EXPONENTS)
    assert sweep.element.startswith("x[1, 2] -> out[1, ")
    to_estimate = np.array(sweep.errors_against(sweep.reference))
    bottom = int(np.argmin(to_estimate))
    assert 0 < bottom < len(to_estimate) - 1
    # truncation error on the large-step side, round-off on the small-step side: both far above the bottom
    assert to_estimate[0] > 1e3 * to_estimate[bottom] and to_estimate[-1] > 1e3 * to_estimate[bottom]
    assert min(sweep.steps) < sweep.used_step < max(sweep.steps)
    # against the wrong analytic value the error never drops below (about) the bug
    bug = abs(sweep.analytic - sweep.reference)
    assert np.all(np.array(sweep.errors_against(sweep.analytic)) > 0.5 * bug)


def test_passing_rows_carry_no_pictures_data():
    report = _check(lambda gx: gx)
    assert report.passed
    row = report.row("x")
    assert row.error_map is None and row.outside_map is None and row.step_sweep is None


def test_json_document_has_labels_verdicts_and_the_element_map(tmp_path):
    bad, good = _check(_one_element), _check(lambda gx: gx)
    path = write_json(tmp_path / "out" / "report.json", [bad, good], labels=["buggy", "correct"])
    document = json.loads(path.read_text())
    assert document["checks"] == 2 and document["failed"] == 1
    assert [(e["label"], e["passed"]) for e in document["entries"]] == [("buggy", False), ("correct", True)]
    row = document["entries"][0]["result"]["rows"][0]
    assert np.array(row["outside_map"]).shape == (5, 6) and row["outside_map"][1][2] is True
    assert row["step_sweep"]["element"].startswith("x[1, 2]")


def test_html_without_matplotlib_keeps_the_tables_and_says_how_to_get_pictures(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    path = write_html(tmp_path / "report.html", [_check(_one_element)], labels=["buggy"])
    page = path.read_text()
    assert "<img" not in page
    assert 'pip install "gradbridge[plot]"' in page.replace("&quot;", '"')
    assert "x[1, 2]" in page and "FAILED" in page and "<table" in page


def test_html_is_self_contained(tmp_path):
    page = write_html(tmp_path / "report.html", [_check(_one_element)]).read_text()
    assert page.count('class="heatmap"') == 1 and page.count('class="step-plot"') == 1
    assert "http://" not in page and "https://" not in page  # no external resources
    assert "src=\"data:image/png;base64," in page


def _torch_report():
    require_backend("torch")
    import torch

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            return g * w, g * x.t().reshape(x.shape)  # a transposed backward: wrong off the diagonal

    x = torch.tensor(RNG.normal(size=(4, 4)))
    return gb.check(Scale.apply, x, torch.tensor(RNG.normal(size=(4, 4))))


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed (tools/install-chromium.sh installs Debian's)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI needs the browser test: " + message)
        pytest.skip(message)
    return path


def _distinct_colours(png: bytes) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


def test_the_page_as_a_person_sees_it_in_headless_chromium(tmp_path):
    """Render the report in headless Chromium, take screenshots, and check the pictures are there."""
    chromium = _chromium()
    playwright = pytest.importorskip("playwright.sync_api")
    reports = [_check(_one_element), _torch_report(), _check(lambda gx: gx)]
    assert [r.passed for r in reports] == [False, False, True]
    path = write_html(tmp_path / "report.html", reports, labels=["numpy one element", "torch transpose", "ok"])
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(path.as_uri())
            whole = page.screenshot(full_page=True)
            (tmp_path / "page.png").write_bytes(whole)
            pictures = {kind: page.query_selector_all(f"img.{kind}") for kind in ("heatmap", "step-plot")}
            assert len(pictures["heatmap"]) == 2 and len(pictures["step-plot"]) == 2  # one per failing input
            for kind, images in pictures.items():
                for image in images:
                    width, height, complete = page.evaluate("e => [e.naturalWidth, e.naturalHeight, e.complete]",
                                                            image)
                    assert complete and width > 200 and height > 150, kind
                    box = image.bounding_box()
                    assert box["width"] > 200 and box["height"] > 150, kind
                    shot = image.screenshot()
                    assert _distinct_colours(shot) > 50, f"{kind} looks empty"
            verdicts = page.locator("h2 .fail").all_inner_texts()
            assert verdicts == ["FAILED", "FAILED"]
        finally:
            browser.close()
    assert _distinct_colours(whole) > 100


def test_a_comparison_renders_its_pairs_verdicts_and_each_implementations_check(tmp_path):
    """A NumPy port with a wrong backward compared with a correct reference: the page has the pairwise
    table, the verdict naming the wrong side, and that side's own failing check with its pictures."""
    def f(params, x):
        return np.sum(np.tanh(x @ params["w"]))

    def grad(params, x, wrong=False):
        s = 1 - np.tanh(x @ params["w"]) ** 2
        gw = x.T @ s
        if wrong:
            gw = gw.copy()
            gw[0, 1] *= 1.001
        return {"w": gw}, s @ params["w"].T

    params = {"w": RNG.normal(size=(3, 2))}
    comparison = gb.compare({"reference": gb.Implementation(f, grad=grad, backend="numpy"),
                             "port": gb.Implementation(f, grad=lambda p, x: grad(p, x, True), backend="numpy"),
                             "third": gb.Implementation(f, grad=grad, backend="numpy")},
                            RNG.normal(size=(4, 3)), params=params)
    assert not comparison.passed
    page = write_html(tmp_path / "compare.html", [comparison], labels=["port"]).read_text()
    assert "class='pairs'" in page and "DIFFER" in page
    assert any("port" in v for v in comparison.verdicts)
    for verdict in comparison.verdicts:
        assert html_escape(verdict) in page
    assert "port&#x27;s own check" in page or "port's own check" in page
    assert page.count('class="heatmap"') == 1 and page.count('class="step-plot"') == 1
    own = comparison.checks["port"].row("w")
    assert own.step_sweep.element.startswith("w[0, 1]")  # the common leaf name, like the row's


def html_escape(text: str) -> str:
    import html

    return html.escape(text)

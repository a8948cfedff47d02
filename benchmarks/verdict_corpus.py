"""Score gradbridge and the frameworks' own gradient checkers on the verdict corpus, in one run.

The corpus is ``tests/support/corpus.py``: functions given once as a NumPy forward and a NumPy VJP, each with
its correct backward and a buggy one, turned into each framework's own custom-gradient op by the test
kits (``torch.autograd.Function``, ``jax.custom_vjp``, ``tf.custom_gradient``; NumPy ``grad=``), plus a
few cases written natively in one framework. Every checker is given the SAME native op at the SAME
point (the case's inputs in the case's dtype: float64, or float32 for the float32-only kernels).

A correct case that a checker fails is a *false alarm*; a buggy case it passes is a *missed bug*. An
exception raised inside a checker (or a gradbridge check running past --check-timeout) is an *error*,
counted apart from pass and fail.

Pass rules (each checker's documented or in-house rule, default options):

  gradbridge   gb.check(fn, *args, **case.options) with every other option at its default;
               pass = report.passed. A buggy case counts as "located" when the failing rows (or, where every row
               passes, a violated contract) name exactly the input the bug breaks.
  torch        torch.autograd.gradcheck(fn, inputs, raise_exception=False) with its defaults
               (eps=1e-6, atol=1e-5, rtol=1e-3, slow mode: every Jacobian entry,
               allclose(analytic, numeric)); pass = True. Inputs are leaf tensors with
               requires_grad=True in the case's dtype (float32 for the float32-only kernels:
               gradcheck only warns).
  jax          jax.test_util.check_grads(f, args, order=1, modes=["rev"]) with its defaults
               (eps=1e-4, one random tangent/cotangent, per-dtype atol=rtol: float64 1e-5,
               float32 2e-3, both multiplied by the output size); pass = no AssertionError.
               "rev" only: a custom_vjp has no forward mode. Run with the global jax_enable_x64
               flag on (restored afterwards), as JAX's own tests do, so float64 cases stay float64.
  tensorflow   theoretical, numerical = tf.test.compute_gradient(f, args) (delta=1/1024, full
               Jacobians), judged like TensorFlow's own op tests (tensorflow/python/kernel_tests,
               cwise_ops_unary_test / cwise_ops_test: ``assertAllClose(jacob_t, jacob_n, rtol=tol,
               atol=tol)`` with ``_default_tolerance``: float64 1e-5, float32 1e-3, float16/bfloat16
               5e-3): pass = every entry has |t - n| <= tol + tol*|n|. ``--tf-rule max_error`` uses the
               other common rule instead: ``max_error(theoretical, numerical) < 1e-4`` (the max over
               all entries of |t - n|, as in many TF gradient tests).

NumPy has no own checker: its rows are gradbridge's only.

Output: a markdown table per checker and backend (correct cases passed, false alarms, bugs caught,
bugs missed, errors), a per-category breakdown, and the list of every wrong verdict. ``--json PATH``
writes every single outcome as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gradbridge as gb  # noqa: E402
import corpus  # noqa: E402

ANCHORS = {"torch": "torch.autograd.gradcheck", "jax": "jax.test_util.check_grads",
           "tensorflow": "tf.test.compute_gradient"}
TF_TOLERANCE = {"float64": 1e-5, "float32": 1e-3, "float16": 5e-3, "bfloat16": 5e-3}


@dataclass
class Outcome:
    checker: str        # "gradbridge" or the anchor's name
    backend: str
    case: str           # variant id
    category: str
    correct: bool       # the backward is correct (must pass)
    result: str         # "pass", "fail" or "error"
    located: Optional[bool] = None  # gradbridge, buggy cases: the failing rows name the broken input
    detail: str = ""
    seconds: float = 0.0

    @property
    def right(self) -> bool:
        return self.result == ("pass" if self.correct else "fail")


CheckTimeout, time_limit = corpus.CheckTimeout, corpus.time_limit


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


# --------------------------------------------------------------------------------------- gradbridge
def run_gradbridge(fn: Callable[..., Any], args: Sequence[Any], options: Dict[str, Any], failing: Optional[str],
                   position: int, timeout: float) -> Tuple[str, Optional[bool], str]:
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = gb.check(fn, *args, **options)
    except (Exception, CheckTimeout) as exc:
        return "error", None, _first_line(exc)
    if report.passed:
        return "pass", None, ""
    located = None if failing is None else corpus.located(report, failing, position)
    reasons = "; ".join([f"{row.input}: {row.message.splitlines()[0][:120] if row.message else row.status}"
                         for row in report.failures[:3]]
                        + [f"contract {c.name}: {c.message[:120]}" for c in report.contracts if not c.passed][:2])
    return "fail", located, (report.problem or reasons)


# --------------------------------------------------------------------------------------- anchors
def anchor_torch(fn: Callable[..., Any], arrays: Sequence[np.ndarray]) -> Tuple[str, str]:
    import torch

    inputs = tuple(torch.tensor(np.asarray(a), requires_grad=True) for a in arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ok = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
    return ("pass" if ok else "fail"), ""


@contextlib.contextmanager
def jax_global_x64() -> Iterator[None]:
    import jax

    before = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


def anchor_jax(fn: Callable[..., Any], arrays: Sequence[np.ndarray]) -> Tuple[str, str]:
    import jax.numpy as jnp
    from jax.test_util import check_grads

    with jax_global_x64():
        args = tuple(jnp.asarray(np.asarray(a)) for a in arrays)
        try:
            check_grads(fn, args, order=1, modes=["rev"])
        except AssertionError as exc:
            return "fail", str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return "pass", ""


def anchor_tensorflow(fn: Callable[..., Any], arrays: Sequence[np.ndarray], rule: str) -> Tuple[str, str]:
    import tensorflow as tf

    args = [tf.constant(np.asarray(a)) for a in arrays]
    theoretical, numerical = tf.test.compute_gradient(fn, args)
    worst, nans = 0.0, 0
    ok = True
    for t, n, a in zip(theoretical, numerical, arrays):
        t, n = np.asarray(t, dtype=np.float64), np.asarray(n, dtype=np.float64)
        diff = np.abs(t - n)
        nans += int(np.sum(~np.isfinite(diff)))
        if np.any(np.isfinite(diff)):
            worst = max(worst, float(np.max(diff[np.isfinite(diff)])))
        if rule == "max_error":
            ok &= bool(diff.size == 0 or np.nanmax(diff) < 1e-4) and not np.any(np.isnan(diff))
        else:
            tol = TF_TOLERANCE[np.asarray(a).dtype.name]
            ok &= bool(np.all(diff <= tol + tol * np.abs(n)))
    return ("pass" if ok else "fail"), f"max|t-n| = {worst:.3g}" + (f", {nans} non-finite entries" if nans else "")


def run_anchor(backend: str, fn: Callable[..., Any], arrays: Sequence[np.ndarray], tf_rule: str,
               timeout: float) -> Tuple[str, str]:
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if backend == "torch":
                return anchor_torch(fn, arrays)
            if backend == "jax":
                return anchor_jax(fn, arrays)
            return anchor_tensorflow(fn, arrays, tf_rule)
    except (Exception, CheckTimeout) as exc:
        return "error", _first_line(exc)


# --------------------------------------------------------------------------------------- driver
def installed(backend: str) -> bool:
    from gradbridge import _registry

    return backend == "numpy" or _registry.framework_installed(backend)


def run_backend(backend: str, args: argparse.Namespace, log: Callable[[str], None]) -> List[Outcome]:
    outcomes: List[Outcome] = []
    anchor = ANCHORS.get(backend) if not args.no_anchors else None

    def record(checker, case_id, category, correct, result, located=None, detail="", seconds=0.0):
        o = Outcome(checker, backend, case_id, category, correct, result, located, detail, seconds)
        outcomes.append(o)
        if not o.right or (checker == "gradbridge" and located is False):
            log(f"  {checker:28s} {case_id:48s} {'correct' if correct else 'buggy':7s} -> {result}"
                f"{'' if located is not False else ' (wrong input)'}  {detail[:140]}")

    for variant in corpus.variants():
        if args.only and not any(s in variant.id for s in args.only):
            continue
        c = variant.case
        fn, op, native_args, options = corpus.build(backend, variant)
        start = time.perf_counter()
        result, located, detail = run_gradbridge(fn, native_args, options, None if variant.correct else c.failing,
                                                 c.arg_names.index(c.failing) if c.failing else 0, args.check_timeout)
        record("gradbridge", variant.id, c.category, variant.correct, result, located, detail,
               time.perf_counter() - start)
        if anchor:
            start = time.perf_counter()
            result, detail = run_anchor(backend, op, c.inputs, args.tf_rule, args.check_timeout)
            record(anchor, variant.id, c.category, variant.correct, result, None, detail, time.perf_counter() - start)
    for native in corpus.NATIVE_CASES:
        if native.backend != backend or (args.only and not any(s in native.id for s in args.only)):
            continue
        fn, native_args, options = corpus.build_native(native)
        start = time.perf_counter()
        result, located, detail = run_gradbridge(fn, native_args, options, None if native.correct else native.failing,
                                                 native.position, args.check_timeout)
        record("gradbridge", native.id, "native", native.correct, result, located, detail, time.perf_counter() - start)
        if anchor:
            _, arrays = native.make()
            start = time.perf_counter()
            result, detail = run_anchor(backend, fn, arrays, args.tf_rule, args.check_timeout)
            record(anchor, native.id, "native", native.correct, result, None, detail, time.perf_counter() - start)
    return outcomes


def tally(outcomes: Sequence[Outcome]) -> Dict[str, Any]:
    correct = [o for o in outcomes if o.correct]
    buggy = [o for o in outcomes if not o.correct]
    return {
        "correct": len(correct),
        "correct_passed": sum(o.result == "pass" for o in correct),
        "false_alarms": sum(o.result == "fail" for o in correct),
        "buggy": len(buggy),
        "bugs_caught": sum(o.result == "fail" for o in buggy),
        "bugs_missed": sum(o.result == "pass" for o in buggy),
        "bugs_located": sum(o.result == "fail" and bool(o.located) for o in buggy),
        "errors": sum(o.result == "error" for o in outcomes),
        "seconds": sum(o.seconds for o in outcomes),
    }


def markdown(outcomes: Sequence[Outcome], backends: Sequence[str]) -> str:
    lines = ["| checker | backend | correct passed | false alarms | bugs caught | bugs missed | errors | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    checkers = ["gradbridge"] + [ANCHORS[b] for b in backends if b in ANCHORS]
    for checker in checkers:
        for backend in backends:
            mine = [o for o in outcomes if o.checker == checker and o.backend == backend]
            if not mine:
                continue
            t = tally(mine)
            located = (f" ({t['bugs_located']} on the right input)" if checker == "gradbridge" else "")
            lines.append(f"| {checker} | {backend} | {t['correct_passed']}/{t['correct']} | {t['false_alarms']} | "
                         f"{t['bugs_caught']}/{t['buggy']}{located} | {t['bugs_missed']} | {t['errors']} | "
                         f"{t['seconds']:.1f} |")
    lines += ["", "Per category (all backends together; `passed x/N` = correct cases passed, `caught y/M` = "
              "bugs caught, `err` = errors):", ""]
    categories = [c for c in corpus.CATEGORIES if any(o.category == c for o in outcomes)]
    header = "| category | " + " | ".join(checkers) + " |"
    lines += [header, "| --- |" + " --- |" * len(checkers)]
    for category in categories:
        cells = []
        for checker in checkers:
            t = tally([o for o in outcomes if o.checker == checker and o.category == category])
            if t["correct"] + t["buggy"] == 0:
                cells.append("-")
                continue
            err = f", err {t['errors']}" if t["errors"] else ""
            cells.append(f"passed {t['correct_passed']}/{t['correct']}, caught {t['bugs_caught']}/{t['buggy']}{err}")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(corpus.BACKENDS), choices=corpus.BACKENDS)
    parser.add_argument("--json", metavar="PATH", help="also write every outcome (and the tallies) as JSON")
    parser.add_argument("--tf-rule", choices=("allclose", "max_error"), default="allclose",
                        help="pass rule for tf.test.compute_gradient (see above; default: allclose per dtype)")
    parser.add_argument("--check-timeout", type=float, default=30.0, metavar="S",
                        help="seconds one check may take before it counts as an error (0: no limit; default 30)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only the cases whose id contains one of these")
    parser.add_argument("--no-anchors", action="store_true", help="run gradbridge only")
    parser.add_argument("--quiet", action="store_true", help="do not list wrong verdicts while running")
    args = parser.parse_args(argv)

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    outcomes: List[Outcome] = []
    backends = []
    for backend in args.backends:
        if not installed(backend):
            print(f"(skipping {backend}: not installed)", file=sys.stderr)
            continue
        backends.append(backend)
        log(f"== {backend}: wrong verdicts as they happen")
        outcomes += run_backend(backend, args, log)
    elapsed = time.perf_counter() - started

    counts = corpus.summary()
    print(f"Verdict corpus: {len(corpus.CASES)} functions with a correct backward, "
          f"{sum(b for _, b in counts.values())} with a buggy one (shared by every backend), plus "
          f"{len(corpus.NATIVE_CASES)} native cases; gradbridge {gb.__version__ if hasattr(gb, '__version__') else ''}"
          f" | run time {elapsed:.0f} s\n")
    print(markdown(outcomes, backends))
    wrong = [o for o in outcomes if not o.right or (o.checker == "gradbridge" and o.located is False)]
    if wrong:
        print("\nWrong verdicts and errors:\n")
        for o in wrong:
            what = ("false alarm" if o.correct else "missed bug") if o.result != "error" else "error"
            if o.right:
                what = "bug caught on the wrong input"
            print(f"- {o.checker} / {o.backend} / {o.case}: {what}" + (f" ({o.detail[:200]})" if o.detail else ""))
    if args.json:
        data = {"seconds": elapsed, "backends": backends,
                "tallies": {f"{c}/{b}": tally([o for o in outcomes if o.checker == c and o.backend == b])
                            for c in {o.checker for o in outcomes} for b in backends
                            if any(o.checker == c and o.backend == b for o in outcomes)},
                "outcomes": [o.__dict__ for o in outcomes]}
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

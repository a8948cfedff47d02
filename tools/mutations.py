#!/usr/bin/env python
"""Mutation testing of the verdict core: does the test suite notice a realistic slip in the numerics?

Each mutation below is one text substitution on one exact code line (matched after stripping
indentation, which is kept). The script copies the working tree (tracked and untracked, not ignored
files) to a temporary directory, checks that the unmutated copy passes the tests, then applies each
mutation alone, runs the tests against the copy (``PYTHONPATH`` points at the copy, so the editable
install of the main checkout is not used), and prints which mutations survived and which tests
killed the others. A mutation whose target line is not found exactly as often as expected is
reported as STALE (the code moved): update its ``old`` text, never drop it silently.

Usage::

    python tools/mutations.py                          # every mutation, tests/test_verdict_numerics.py
    python tools/mutations.py --only a,b,h1            # some of them
    python tools/mutations.py --tests tests/test_verdict_numerics.py tests/test_verdicts.py
    python tools/mutations.py --list                   # the mutations, not run
    python tools/mutations.py --check                  # only verify every target line is still there

Exit status: 0 when every mutation was killed, 1 when one survived, 2 when one is stale or the
unmutated copy fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ["tests/test_verdict_numerics.py"]


@dataclass(frozen=True)
class Mutation:
    key: str
    path: str
    old: Union[str, Tuple[str, ...]]  # the exact code line (without indentation), or alternatives: the code's
    new: Union[str, Tuple[str, ...]]  # known versions, each with its replacement (indentation is kept)
    what: str
    count: int = 1    # how many lines must match; all of them are replaced
    after: str = ""   # only lines after the first line containing this text (e.g. "def _block_scale")

    def variants(self) -> List[Tuple[str, str]]:
        olds = (self.old,) if isinstance(self.old, str) else self.old
        news = (self.new,) * len(olds) if isinstance(self.new, str) else self.new
        return list(zip(olds, news))


N, T, C, L = "gradbridge/_numeric.py", "gradbridge/_tolerance.py", "gradbridge/_check.py", "gradbridge/_localize.py"

MUTATIONS: List[Mutation] = [
    # -- the list of issue 13, item 9 -------------------------------------------------------------
    Mutation("a", N, 'est = (4.0 * c - prev["c"][:, columns]) / 3.0', "est = c.copy()",
             "Richardson dropped: plain central difference at the current step"),
    Mutation("b", T, "return SAFETY * np.asarray(fd_error) + self.relative_floor * numeric + self.absolute_floor * np.asarray(scale) + TINY",
             "return SAFETY * np.asarray(fd_error) + self.relative_floor * numeric + TINY",
             "eps^(2/3)*max|numeric| floor dropped from the element tolerance"),
    Mutation("c", N, "scale[rows, cols] = float(np.max(block)) if block.size else 0.0",
             "scale[rows, cols] = block",
             "absolute floor taken per element (|numeric| of the element) instead of per block",
             after="def _block_scale"),
    Mutation("d", T, "return float(SAFETY * fd_error + self.relative_floor * max(abs(numeric), magnitude)",
             "return float(SAFETY * fd_error + self.relative_floor * abs(numeric)",
             "fast mode's relative floor on |numeric| only instead of max(|numeric|, magnitude)"),
    Mutation("e", T, 'GRADES = ((1e-7, "correct"), (1e-4, "acceptable"), (1e-2, "suspicious"), (np.inf, "wrong"))',
             'GRADES = ((1e-7, "correct"), (1e-3, "acceptable"), (1e-2, "suspicious"), (np.inf, "wrong"))',
             "'acceptable' grade bound moved from 1e-4 to 1e-3"),
    Mutation("f", N, "FAIL_AT_ONCE = 16.0      # a mismatch this many tolerances away fails without further refinement",
             "FAIL_AT_ONCE = 1.0", "FAIL_AT_ONCE 16 -> 1"),
    Mutation("g", N, "one = 2.0 * value - prev[side][:, columns]", "one = value",
             "one-sided Richardson dropped at domain edges (plain one-sided difference)"),
    Mutation("h", N, "agree = np.isfinite(c) & np.isfinite(allowed) & (np.abs(analytic - c) <= allowed)",
             "agree = np.isfinite(c) & np.isfinite(allowed) & (np.abs(analytic - c) < allowed)",
             "'<=' -> '<' in the first-pass test (both lines)", count=2),
    Mutation("i", C, ('return row.status == "pass" and not row.kinks and not row.one_sided',
                      'return row.status == "pass" and not row.kinks and not row.jumps and not row.one_sided'),
             ('return row.status == "pass" and not row.one_sided',
              'return row.status == "pass" and not row.jumps and not row.one_sided'),
             "compressed rows with kinks not re-checked element by element"),
    Mutation("j", L, "i = search.find_output(j, numeric, error)",
             "i = min(search.find_output(j, numeric, error) + 1, search.m - 1)",
             "bisection names the neighbouring output"),
    # -- more of the same kind ----------------------------------------------------------------------
    Mutation("safety", T, "SAFETY = 4.0", "SAFETY = 1.0", "SAFETY 4 -> 1"),
    Mutation("noise", N, "self.sigma = self._noise_level()", "pass",
             "noise estimate of fn dropped (sigma stays 0)"),
    Mutation("noise3", N, "return 3.0 * np.sqrt(variance)  # one sample of a noise variance: allow for a low draw",
             "return np.sqrt(variance)", "noise estimate without its 3x allowance for a low draw"),
    Mutation("kink05", N, "KINK_PERSISTS = 0.7      # a smooth function's one-sided gap halves per level; a kink's stays",
             "KINK_PERSISTS = 0.5", "KINK_PERSISTS 0.7 -> 0.5 (a smooth gap halving reads as a kink)"),
    Mutation("kink10", N, "KINK_PERSISTS = 0.7      # a smooth function's one-sided gap halves per level; a kink's stays",
             "KINK_PERSISTS = 1.0", "KINK_PERSISTS 0.7 -> 1.0 (a kink's constant gap no longer persists)"),
    Mutation("relfloor-big", T, "return float(np.sqrt(self.working_eps))", "return float(self.working_eps ** 0.25)",
             "relative floor sqrt(eps) -> eps^(1/4)"),
    Mutation("relfloor-small", T, "return float(np.sqrt(self.working_eps))",
             "return float(self.working_eps ** (2.0 / 3.0))", "relative floor sqrt(eps) -> eps^(2/3)"),
    Mutation("absfloor-big", T, "return float(self.working_eps ** (2.0 / 3.0))",
             "return float(np.sqrt(self.working_eps))", "absolute floor eps^(2/3) -> sqrt(eps)"),
    Mutation("absfloor-global", N, "scale[rows, cols] = float(np.max(block)) if block.size else 0.0",
             "scale[rows, cols] = float(np.max(finite)) if block.size else 0.0",
             "absolute floor from the largest entry of the whole Jacobian, not of the block",
             after="def _block_scale"),
    Mutation("fast-absfloor", T, "+ self.absolute_floor * magnitude + TINY)", "+ TINY)",
             "fast mode's eps^(2/3)*magnitude floor dropped"),
    Mutation("grade-le", T, "if rel_error < bound:", "if rel_error <= bound:",
             "grade bounds inclusive ('<' -> '<=')"),
    Mutation("h-ladder", N, "pass_now = judge & available & as_good_as_it_gets & (mismatch <= lim)",
             "pass_now = judge & available & as_good_as_it_gets & (mismatch < lim)",
             "'<=' -> '<' in the ladder's pass test"),
    Mutation("fail-once-big", N, "FAIL_AT_ONCE = 16.0      # a mismatch this many tolerances away fails without further refinement",
             "FAIL_AT_ONCE = 1e6", "FAIL_AT_ONCE 16 -> 1e6 (gross errors refined before failing)"),
    Mutation("richardson-err", N, "err = np.where(np.isfinite(previous), np.abs(est - previous), d) + 1.5 * cr",
             "err = np.where(np.isfinite(previous), np.abs(est - previous), d)",
             "round-off dropped from the Richardson error estimate"),
    Mutation("roundoff", N, "central_error = (eps * (np.abs(f_plus) + np.abs(f_minus)) + noise) / span",
             "central_error = noise / span", "round-off eps*|f|/h dropped from the central difference's error"),
    Mutation("rebase", N, "base = self._rebase_at_domain_edges(base, c, prev)", "pass",
             "no restart of the ladder at a step relative to |x| near a domain edge"),
    Mutation("one-sided-off", N, "use = ~central_ok & np.isfinite(one) & np.isfinite(one_err) & ~(one_err >= err)",
             "use = np.zeros_like(central_ok)", "one-sided differences never used at domain edges"),
    Mutation("diag-kinks", C, ("if not _clean(row) and (row.kinks or row.one_sided) and \\",
                               "if not _clean(row) and (row.kinks or row.jumps or row.one_sided) and \\"),
             ("if not _clean(row) and row.one_sided and \\",
              "if not _clean(row) and (row.jumps or row.one_sided) and \\"),
             "diagonal (all-at-once) rows with kinks not re-checked densely"),
    Mutation("bisect-column", L, "return int(columns[0])", "return int(columns[0]) + 1 if columns[0] + 1 < self.leaf.offset + self.leaf.size else int(columns[0])",
             "bisection names the neighbouring input element"),
    Mutation("bisect-scale", L, "allowed = float(self.tolerance.allowed(value, float(np.abs(v) @ error), scale * np.linalg.norm(v)))",
             "allowed = float(self.tolerance.allowed(value, float(np.abs(v) @ error), 0.0))",
             "bisection over outputs without the block-scale floor"),
    Mutation("max-levels", N, "MAX_LEVELS = 8           # smallest step h/256", "MAX_LEVELS = 3",
             "step ladder cut to 3 levels"),
]


def tree_files(src: Path) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=src, check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p and (src / p).is_file()]


def copy_tree(src: Path, dst: Path) -> None:
    for rel in tree_files(src):
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, target)
    # the editable install maps gradbridge.backends to the main checkout's backends/: point it at the copy
    link = dst / "gradbridge" / "backends"
    if (dst / "backends").is_dir() and not link.exists():
        link.symlink_to(Path("..") / "backends")


def apply(text: str, mutation: Mutation) -> Tuple[Optional[str], str]:
    """The mutated text, or None and why: a mutation applies when exactly one of its variants' target
    line is found exactly ``count`` times (after its ``after`` anchor); every such line is replaced."""
    lines = text.splitlines(keepends=True)
    start = 0
    if mutation.after:
        anchors = [k for k, line in enumerate(lines) if mutation.after in line]
        if not anchors:
            return None, f"anchor {mutation.after!r} not found"
        start = anchors[0]
    found = []
    for old, new in mutation.variants():
        hits = [k for k, line in enumerate(lines) if k >= start and line.strip() == old.strip()]
        if hits:
            found.append((old, new, hits))
    if len(found) != 1 or len(found[0][2]) != mutation.count:
        counts = ", ".join(f"{len(h)}x {o!r}" for o, _, h in found) or "no variant"
        return None, f"expected one variant {mutation.count} time(s), found {counts}"
    old, new, hits = found[0]
    if mutation.after:
        hits = hits[: mutation.count]
    for k in hits:
        line = lines[k]
        indent = line[: len(line) - len(line.lstrip())]
        ending = "\n" if line.endswith("\n") else ""
        lines[k] = indent + new.strip() + ending
    return "".join(lines), ""


def run_tests(copy: Path, tests: List[str], timeout: float) -> Tuple[str, List[str], float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", "--tb=no", *tests]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", [], time.perf_counter() - started
    seconds = time.perf_counter() - started
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)))
    errors = re.findall(r"^ERROR (\S+)", done.stdout, flags=re.M)
    if done.returncode == 0:
        return "passed", [], seconds
    if done.returncode == 1 and failed:
        return "failed", failed, seconds
    return "error", failed + errors or [done.stdout[-400:] + done.stderr[-400:]], seconds


def imports_from(copy: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), str(copy / "tests")]))
    code = "import gradbridge, gradbridge.backends.numpy as b; print(gradbridge.__file__); print(b.__file__)"
    return subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True,
                          check=True).stdout


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=ROOT, help="tree to copy and mutate (default: this checkout)")
    parser.add_argument("--tests", nargs="+", default=DEFAULT_TESTS, help="test files, relative to the tree")
    parser.add_argument("--only", default="", help="comma-separated mutation keys")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--check", action="store_true", help="only check that every target line is found")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (a timeout kills)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.key in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {m.key for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutation keys: {', '.join(sorted(unknown))}")
    if args.list:
        for m in chosen:
            print(f"{m.key:16} {m.path:26} {m.what}")
        return 0

    stale = []
    for m in chosen:
        mutated, why = apply((args.src / m.path).read_text(), m)
        if mutated is None:
            stale.append(m.key)
            print(f"STALE {m.key}: {m.path}: {why}; targets: {[old for old, _ in m.variants()]!r}")
    if args.check:
        print("all target lines found" if not stale else f"{len(stale)} stale mutation(s)")
        return 2 if stale else 0

    with tempfile.TemporaryDirectory(prefix="gradbridge-mutants-") as tmp:
        copy = Path(tmp) / "tree"
        copy_tree(args.src, copy)
        print(f"tree {args.src} copied to {copy}; imports:\n{imports_from(copy)}", end="")
        outcome, failed, seconds = run_tests(copy, args.tests, args.timeout)
        print(f"unmutated: {outcome} ({seconds:.1f} s)")
        if outcome != "passed":
            print("the unmutated tree must pass first:", *failed, sep="\n  ")
            return 2
        results = []
        for m in chosen:
            if m.key in stale:
                results.append((m, "STALE", [], 0.0))
                continue
            target = copy / m.path
            original = target.read_text()
            mutated, _ = apply(original, m)
            assert mutated is not None and mutated != original
            target.write_text(mutated)
            try:
                outcome, failed, seconds = run_tests(copy, args.tests, args.timeout)
            finally:
                target.write_text(original)
            verdict = {"passed": "SURVIVED", "failed": "killed", "timeout": "killed (timeout)"}.get(outcome, "killed (error)")
            results.append((m, verdict, failed, seconds))
            print(f"{m.key:16} {verdict:16} {seconds:6.1f} s  {m.what}")
            for name in failed:
                print(f"{'':34}{name}")
    print("\nsummary:")
    for m, verdict, failed, _ in results:
        print(f"  {m.key:16} {verdict:16} {len(failed)} failing test(s)  {m.what}")
    survived = [m.key for m, verdict, _, _ in results if verdict == "SURVIVED"]
    print(f"{len(results) - len(survived) - len(stale)} killed, {len(survived)} survived"
          + (f" ({', '.join(survived)})" if survived else "") + (f", {len(stale)} stale" if stale else ""))
    return 2 if stale else (1 if survived else 0)


if __name__ == "__main__":
    sys.exit(main())

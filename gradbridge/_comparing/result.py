"""What :func:`gradbridge.compare` returns: per pair of implementations, how far values and gradients are apart
(:class:`PairDifference`), and the whole comparison (:class:`Comparison`).

Invariant: a :class:`Comparison` passes exactly when every pair agrees within the pairwise rule and every
implementation's own check that ran passed; its text is rendered by :mod:`.render`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple


import numpy as np

from .._reporting.report import Report
from .render import render_comparison
from .render import failed_rows

@dataclass(frozen=True)
class Implementation:
    """One implementation for :func:`compare` under a label that is not a backend name.

    ``{"torch-fused": gb.Implementation(fused_fn, backend="torch")}``; ``grad`` is the NumPy gradient
    (``backend="numpy"``); ``backend=None`` detects a module, model or compiled function's framework.
    """

    fn: Callable[..., Any]
    grad: Optional[Callable[..., Any]] = None
    backend: Optional[str] = None


@dataclass
class PairDifference:
    """How far two implementations are apart on one output value or one leaf's gradient.

    ``max_rel_diff`` is the largest ``|a - b|`` relative to ``max(|a|, |b|)`` plus the near-zero terms of the
    pairwise rule (so it reads as the entries' relative difference; the tolerance's own scale is larger where an
    entry's measured magnitude exceeds its size, so a pair may pass above ``rtol`` there, never fail below it);
    ``worst_index`` is the element furthest outside
    its tolerance (or closest to it), where ``first_value``/``second_value`` are read; ``allowed`` is the
    tolerance there. ``mismatches`` counts the elements outside the tolerance, ``outside`` lists the first
    :data:`OUTSIDE_LISTED` of them. ``rtol`` is the pair's relative tolerance (the user's, or the one the
    precisions of the two implementations decided; ``Comparison.tolerance`` says which). ``point`` is 0 at the
    given inputs, 1, 2, ... at the points drawn around them (``gb.compare(points=...)``).
    """

    first: str
    second: str
    quantity: str
    leaf: str
    max_abs_diff: float
    max_rel_diff: float
    allowed: float
    passed: bool
    worst_index: Tuple[int, ...]
    first_value: float
    second_value: float
    shape: Tuple[int, ...] = ()
    mismatches: int = 0
    outside: List[Tuple[int, ...]] = field(default_factory=list)
    rtol: float = 0.0
    point: int = 0


@dataclass
class Comparison:
    """Outcome of :func:`gradbridge.compare`. ``passed`` is the verdict; ``verdicts`` say who is wrong.

    Attributes:
        function: a readable name of what was compared.
        implementations: the labels, in the order given.
        checks: each implementation's own finite-difference check (empty with ``own_check=False``).
        pairs: one entry per pair of implementations and output value or gradient leaf, at the given inputs.
        other_points: the same at the points drawn around the given inputs (``gb.compare(points=...)``; each
            entry's ``point`` says which: 1, 2, ...).
        point_inputs: the inputs at each of those points, ``{2: {input name: float64 array}, 3: ...}``, to
            reproduce a difference found there (point 1 is the given inputs).
        verdicts: plain sentences naming the side that is wrong and what to look at (empty on a pass).
        notes: how the comparison was made (cotangent, conversions, leaves not common to all).
        seconds: wall time.
        backends: label -> backend and its version.
        tolerance: the pairwise rule in force, each pair's rtol and atol and what decided them.
        mismatches: structural differences (outputs missing or shaped differently); each fails.
        patterns: the shape of a failing pair's difference where it has a simple one (one side transposed, a
            constant factor or offset, one row, column or element): it usually names the porting bug.
        complex_leaves: the complex inputs and outputs, compared through their real views (last index 0 real
            part, 1 imaginary part; elements read ``z[1].imag``), gradients in gradbridge's convention.
        layers: with ``layers=True``, per pair of implementations with layers, where their layers first diverge
            (:class:`gradbridge._comparing.layers.LayerDivergence`; its ``sentence()`` says it in words).
    """

    function: str
    implementations: List[str]
    checks: Dict[str, Report]
    pairs: List[PairDifference]
    verdicts: List[str]
    notes: List[str]
    seconds: float
    backends: Dict[str, str] = field(default_factory=dict)
    tolerance: str = ""
    mismatches: List[str] = field(default_factory=list)
    patterns: List[str] = field(default_factory=list)
    layers: List[Any] = field(default_factory=list)
    other_points: List[PairDifference] = field(default_factory=list)
    point_inputs: Dict[int, Dict[str, Any]] = field(default_factory=dict)
    complex_leaves: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every pair agrees, every own check passes and the outputs have the same structure."""
        return (not self.mismatches and all(p.passed for p in self.pairs) and all(p.passed for p in self.other_points)
                and all(r.passed for r in self.checks.values()))

    @property
    def failures(self) -> List[PairDifference]:
        return [p for p in self.pairs + self.other_points if not p.passed]

    def summary(self) -> str:
        """One line: the verdict and what disagrees."""
        values = {p.leaf for p in self.pairs if p.quantity == "value"}
        grads = {p.leaf for p in self.pairs if p.quantity == "gradient"}
        if self.passed:
            own = "; own checks pass" if self.checks else ""
            points = 1 + len({p.point for p in self.other_points})
            where = f" at {points} points" if points > 1 else ""
            return (f"passed: {len(self.implementations)} implementations agree on {len(values)} output(s) and the "
                    f"gradients of {len(grads)} leaf/leaves{where}{own}")
        parts = []
        if self.mismatches:
            parts.append(f"{len(self.mismatches)} structural mismatch(es)")
        failed = [p for p in self.pairs if not p.passed]
        if failed:
            parts.append(f"{len(failed)} of {len(self.pairs)} pairwise comparisons differ")
        elsewhere = sorted({p.point + 1 for p in self.other_points if not p.passed})
        if elsewhere:
            parts.append(f"differences at point(s) {', '.join(map(str, elsewhere))} around the given inputs")
        own = [f"{label} ({', '.join(failed_rows(report)) or 'no verdict'})"
               for label, report in self.checks.items() if not report.passed]
        if own:
            parts.append("own check fails: " + "; ".join(own))
        return "FAILED: " + ", ".join(parts)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of the whole comparison (own checks through :meth:`Report.to_dict`)."""
        data: Dict[str, Any] = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("checks", "pairs", "layers", "other_points", "point_inputs")}
        data["point_inputs"] = {str(k): {n: np.asarray(v).tolist() for n, v in inputs.items()}
                                for k, inputs in self.point_inputs.items()}
        data["layers"] = [dict(asdict(d), sentence=d.sentence()) for d in self.layers]
        data["checks"] = {label: report.to_dict() for label, report in self.checks.items()}
        data["pairs"] = [asdict(p) for p in self.pairs]
        data["other_points"] = [asdict(p) for p in self.other_points]
        data["passed"] = self.passed
        return data

    def __str__(self) -> str:
        return render_comparison(self)

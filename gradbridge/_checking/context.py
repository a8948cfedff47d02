"""What every part of one check shares: its options, report, counts and analytic spreads, and the precision it
runs in.

Invariant: :func:`working_eps` is the one answer to "how precise is this function" inside a check: the
adapter's working precision, the outputs' dtypes and, without promotion, the checked leaves' dtypes.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import numpy as np

from .._adapter import (PreparedFunction, UndefinedGradients, WorkingPrecision,
                       offered)
from .determinism import Spread
from .evaluate import Evaluator
from .memory import budget_bytes
from .._options import Options
from .._precision import DTYPE_EPS, FLOAT64_EPS, PointRounder
from .._reporting.progress import CheckProgress
from .._reporting.report import Report
from .structure import Structure
from .tolerance import Tolerance
from .verified_groups import ColumnAnalytic

#: Most non-differentiable points listed per row (the count is always complete).
KINKS_LISTED = 10
#: Probability with which ``fast`` mode's stated detectable error is caught.
FAST_CONFIDENCE = 0.999


class EvaluationCounts:
    """Evaluation counts summed over the first- and second-order evaluators."""

    def __init__(self) -> None:
        self.evaluators: List[Evaluator] = []

    def add(self, evaluator: Evaluator) -> Evaluator:
        self.evaluators.append(evaluator)
        return evaluator

    def fill(self, report: Report) -> None:
        report.evaluations = sum(e.evaluations for e in self.evaluators)
        report.vjps = sum(e.vjps for e in self.evaluators)
        report.jvps = sum(e.jvps for e in self.evaluators)


class CheckContext:
    """What every part of one check needs: options, tolerance, structures, the point's outputs."""

    def __init__(self, options: Options, tolerance: Tolerance, structures: Mapping[str, Structure],
                 mode: str, progress: CheckProgress) -> None:
        self.progress = progress
        self.notes: List[str] = []
        self.diagonal: Optional[np.ndarray] = None  # the verified diagonal of an elementwise analytic Jacobian
        self.strategy: Dict[str, str] = {}  # leaf name (and order) -> how it was compared
        self.columns: Optional[ColumnAnalytic] = None  # verified column groups found while choosing the mode
        self.automatic = False  # analytic='auto': fall back to forward mode where reverse mode is unsupported
        self.spreads: Dict[str, Spread] = {}  # analytic mode -> spread of two calls, where not deterministic
        self.options = options
        self.memory = budget_bytes(options.memory)  # bytes the comparison may allocate
        self.tolerance = tolerance
        self.structures = structures
        self.mode = mode


def working_eps(prepared: PreparedFunction, options: Optional[Options] = None) -> float:
    """Machine epsilon of the precision ``fn`` really computes in: the coarsest of what the adapter says
    (``working_eps``), the dtypes of the outputs (a function that casts to float32 inside is only as
    accurate as float32, whatever its inputs were) and, without promotion, the checked leaves' dtypes.
    Known after the first evaluation."""
    coarsest = float(offered(prepared, WorkingPrecision, "working_eps") or FLOAT64_EPS)
    try:
        outputs = prepared.output_specs
    except RuntimeError:  # not evaluated yet
        outputs = []
    for spec in outputs:
        coarsest = max(coarsest, DTYPE_EPS.get(spec.dtype, FLOAT64_EPS))
    if options is not None and not options.promote:
        coarsest = PointRounder(prepared.leaves, promote=False).eps(coarsest)
    return coarsest


def undefined_gradients(prepared: PreparedFunction) -> dict:
    """Leaf name -> reason, for leaves whose framework defines no gradient (filled by the adapter)."""
    return dict(offered(prepared, UndefinedGradients, "undefined_gradients") or {})

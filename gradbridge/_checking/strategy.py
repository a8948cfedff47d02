"""Which mode a check runs in and what it costs: full, fast, or full with compressed columns or a verified
diagonal.

Invariant: a check never allocates beyond its memory budget or evaluates beyond its evaluation budget
without saying so in the report; ``mode='auto'`` picks the most thorough mode within both.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from .._adapter import (PreparedFunction)
from .compress import diagonal_jacobian
from .._errors import ModeUnsupportedError
from .evaluate import Evaluator
from .memory import full_check_bytes, size_text
from .._options import Options
from .._reporting.report import Report
from .structure import Structure
from .verified_groups import ColumnAnalytic

def planned_cost(prepared: PreparedFunction, options: Options, mode: str) -> int:
    """Evaluations plus analytic calls a check is expected to take (the progress bar's total)."""
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    if mode == "fast":
        return 2 * options.probes * len(prepared.leaves) + options.probes
    return 2 * n + {"rev": m, "fwd": n, "both": m + n}[options.analytic]


def verified_diagonal(evaluator: Evaluator, options: Options, structures: Mapping[str, Structure],
                       precision: float) -> Optional[np.ndarray]:
    """The analytic Jacobian's diagonal when it is verified diagonal (elementwise ops, float64, reverse
    mode, no structures, a full or auto check); None otherwise. Costs three VJPs when eligible."""
    prepared = evaluator.prepared
    if options.mode == "fast" or options.analytic != "rev" or not options.promote or structures:
        return None
    m = sum(spec.size for spec in prepared.output_specs)
    try:
        return diagonal_jacobian(evaluator.vjp, prepared.leaves, m, precision, options.seed)
    except ModeUnsupportedError:
        return None


def choose_mode(prepared: PreparedFunction, options: Options, structures: Mapping[str, Structure],
                 report: Report, diagonal: bool = False, columns: Optional[ColumnAnalytic] = None,
                 memory: Optional[int] = None) -> str:
    """``full`` or ``fast``: ``auto`` compares the cost of a full check with ``options.budget`` and its
    memory with ``memory`` (bytes); a verified diagonal Jacobian makes a full check cost a handful of
    evaluations."""
    if options.mode != "auto":
        report.mode = options.mode
        return options.mode
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    directions = sum(leaf.size for leaf in prepared.leaves)  # structured inputs have fewer; an upper bound
    analytic_calls = {"rev": m, "fwd": n, "both": m + n}[options.analytic]
    cost = 2 * directions + analytic_calls
    if diagonal:
        cost = 2 * len(prepared.leaves)
    elif columns is not None:  # the verified groups' evaluations; their analytic calls are already spent
        cost = 2 * sum(columns.plans[leaf.name].count if leaf.name in columns.plans else leaf.size
                       for leaf in prepared.leaves)
    mode = "full" if cost <= options.budget else "fast"
    needed = full_bytes(prepared, diagonal, columns)
    if mode == "full" and memory is not None and needed > memory:
        mode = "fast"
        report.mode = mode
        report.notes.append(
            f"mode='auto' chose fast: a full check would need about {size_text(needed)} of memory for its "
            f"{m:,} x {directions:,} comparison, above memory={size_text(memory)}. Random projections check every "
            "leaf; a failing leaf is localised by bisection. Pass memory= (or check fewer inputs with wrt=) for a "
            "full check.")
        return mode
    if mode == "full" and columns is not None:
        report.notes.append(f"mode='auto' chose full: the dense check would cost {2 * directions + analytic_calls:,} "
                            f"evaluations and analytic calls, above budget={options.budget:,}, but verified column "
                            f"groups need {cost:,} evaluations")
    report.mode = mode
    if mode == "fast":
        report.notes.append(
            f"mode='auto' chose fast: a full check would take about {cost:,} evaluations and analytic calls "
            f"({2 * directions:,} perturbed points, {analytic_calls:,} {options.analytic} calls), above "
            f"budget={options.budget:,}. Random projections check every leaf; a failing leaf is re-checked "
            "element by element. Pass mode='full' (or a larger budget) to compare every element.")
    return mode


def full_bytes(prepared: PreparedFunction, diagonal: bool, columns: Optional[ColumnAnalytic]) -> int:
    """Estimated memory of a full first-order check along the path it would take."""
    m = sum(spec.size for spec in prepared.output_specs)
    n = len(prepared.x0)
    if diagonal:
        return full_check_bytes(m, len(prepared.leaves))
    if columns is not None:
        return full_check_bytes(m, sum(columns.plans[leaf.name].count if leaf.name in columns.plans else leaf.size
                                       for leaf in prepared.leaves))
    return full_check_bytes(m, sum(leaf.size for leaf in prepared.leaves), n, dense=True)

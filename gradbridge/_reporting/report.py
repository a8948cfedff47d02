"""The result of a check: one row per compared (input, output) block, readable and machine-readable.

``str(report)`` is for people (a table, the worst element of each row with the analytic and numeric
values side by side); ``report.to_dict()`` is for machines (JSON-serialisable).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class WorstElement:
    """The element of a block that is furthest outside its tolerance (or closest to it, on a pass).

    ``analytic`` comes from the framework's differentiation (or the user's ``grad``); ``numeric`` from
    central finite differences. ``ratio`` is ``|analytic - numeric| / allowed``: above 1 fails.
    """

    input_index: Tuple[int, ...]
    output_index: Tuple[int, ...]
    analytic: float
    numeric: float
    abs_error: float
    allowed: float
    step: Optional[float]
    fd_error: Optional[float] = None
    method: str = ""
    direction: str = ""

    @property
    def ratio(self) -> float:
        return self.abs_error / self.allowed if self.allowed > 0 else (0.0 if self.abs_error == 0 else float("inf"))

    @property
    def times_error(self) -> Optional[float]:
        """How many times the estimated numerical error of the finite difference the mismatch is."""
        if self.fd_error is None:
            return None
        return self.abs_error / self.fd_error if self.fd_error > 0 else float("inf")


@dataclass
class KinkPoint:
    """An element at a non-differentiable point: the one-sided differences disagree beyond their error
    and their gap does not shrink with the step (relu at 0, abs, max), or fn itself jumps there.

    ``left``/``right`` are the backward/forward one-sided derivatives; ``subgradient`` says whether the
    analytic value lies between them (a valid choice at a kink, like relu'(0) = 0). At a jump
    (``jump`` set: fn's one-sided limits differ by that much, a branch switch, a step function, a
    sampler's accept/reject boundary) both are measured from points on their own side only, and
    ``subgradient`` says whether the analytic value is one of them.
    """

    input_index: Tuple[int, ...]
    output_index: Tuple[int, ...]
    analytic: float
    left: float
    right: float
    subgradient: bool
    direction: str = ""
    jump: Optional[float] = None

    @property
    def discontinuous(self) -> bool:
        """A jump of fn itself (``jump`` is its size), not only of its derivative."""
        return self.jump is not None


@dataclass
class StepSweep:
    """Central differences of one element at steps spanning many decades (the step-size plot).

    ``numeric[k]`` is the central difference at ``steps[k]`` (NaN where fn was not finite);
    ``analytic`` the analytic value, ``reference`` the check's best numeric estimate and ``used_step``
    the step it came from; ``allowed`` the tolerance of the element.
    """

    element: str
    steps: List[float]
    numeric: List[float]
    analytic: float
    reference: float
    used_step: float
    allowed: float

    def errors_against(self, value: float) -> List[float]:
        """``|numeric(h) - value|`` per step: against ``analytic``, the V of truncation and round-off
        when the analytic value is right, a floor at the bug's size when it is wrong."""
        return [abs(n - value) for n in self.numeric]


@dataclass
class RowResult:
    """One compared block: the derivative of one output with respect to one checked input or parameter.

    ``status`` is ``"pass"``, ``"fail"``, ``"unsupported"`` (the mode is not available for this function;
    neither a pass nor a failure), ``"no-gradient"`` (the framework defines no gradient for this input:
    it passes only where the numeric derivative is zero too), ``"unresolved"`` (fn jumps at the point
    and the derivative on some side could not be measured: never a pass), ``"nondeterministic"`` (two
    analytic calls at the same cotangent differ, and every mismatch lies within that spread: the
    analytic side is noisy beyond the tolerance, not shown wrong; never a pass) or ``"error"``.

    ``jumps`` counts elements where fn itself is discontinuous at the point (judged against the
    one-sided derivatives, listed in ``nondifferentiable``); ``resolution`` is the relative error to
    which fn's derivatives could be measured where fn is not smooth below the default step (internal
    adaptivity, a solver's tolerance): errors below it cannot be seen in this function.

    A failing row of a full check also carries ``error_map`` (per input element, analytic - numeric of
    its worst output entry, in the input's shape), ``outside_map`` (which elements have an entry outside
    tolerance) and ``step_sweep`` (its worst element's central differences over many step sizes): the
    HTML report draws them as a heatmap and a step-size plot.

    ``input_complex``/``output_complex``: the input or output is complex and was checked through its real view
    (last index 0 real part, 1 imaginary part); indices are shown as ``z[1].imag``.
    """

    input: str
    output: str
    shape: Tuple[int, ...]
    kind: str = "input"
    order: int = 1
    method: str = "full"
    analytic_mode: str = "rev"
    status: str = "pass"
    max_abs_error: float = 0.0
    rel_error: float = 0.0
    grade: str = "correct"
    mismatches: int = 0
    compared: int = 0
    worst: Optional[WorstElement] = None
    message: str = ""
    nondifferentiable: List[KinkPoint] = field(default_factory=list)
    kinks: int = 0
    jumps: int = 0
    unresolved: int = 0
    resolution: Optional[float] = None
    one_sided: int = 0
    refined: int = 0
    error_map: Optional[Any] = None
    outside_map: Optional[Any] = None
    step_sweep: Optional[StepSweep] = None
    # a complex input or output, checked through its real view: its indices read [i].real / [i].imag
    input_complex: bool = False
    output_complex: bool = False

    @property
    def passed(self) -> bool:
        """True for a pass (jumps judged against the one-sided derivatives included), an unsupported
        mode, or a missing gradient where the numeric derivative is zero too; never for ``unresolved``
        or ``nondeterministic``."""
        if self.status == "no-gradient":
            return self.mismatches == 0
        return self.status in ("pass", "unsupported")


@dataclass
class Contract:
    """One contract check on the analytic side (no finite differences): ``name`` (``linear in the cotangent``,
    ``primal under differentiation``), whether it held, the analytic ``mode`` it concerns (``rev``/``fwd``) and a
    sentence saying what the rule did (see :mod:`gradbridge._checking.contracts`). A violated contract fails the
    check; one that could not run (``checked=False``: a rule that cannot be batched) is reported, not failed."""

    name: str
    passed: bool
    mode: str
    message: str
    checked: bool = True  # False: the contract could not run (the message says why); never a failure
    calls: int = 0  # the analytic calls (VJPs, or JVPs for mode "fwd") it made, counted in the report's totals


@dataclass
class Report:
    """Outcome of :func:`gradbridge.check`. ``passed`` is the verdict; ``rows`` the details.

    Attributes:
        function: the checked function's name.
        backend: ``numpy``, ``torch``, ``jax`` or ``tensorflow`` (with ``backend_version``).
        mode: ``full`` (every Jacobian entry) or ``fast`` (random projections).
        order: 1 for gradients, 2 also checks the gradient of the gradient.
        rows: one :class:`RowResult` per compared block.
        rule: ``"error-estimated"`` (the default verdict rule) or ``"atol/rtol"`` (given by the caller).
        problem: a reason the check could not judge gradients at all (e.g. a non-deterministic
            function); set only when it makes the check fail.
        tolerance: the comparison rule in force, as a formula.
        step: the finite-difference step rule.
        evaluations: number of evaluations of the function (points), ``vjps``/``jvps`` analytic calls.
        seconds: wall time of the check.
        strategy: how each checked leaf was compared (``"x: 16 verified column groups ..."``): the
            path the check chose, so the cost in ``evaluations`` and ``seconds`` can be read against it.
        notes: things the user should know (promotion from float32, modes put in eval, ...).
        contracts: the contract checks on the rules (:class:`Contract`: linear in the cotangent, the primal under
            differentiation equals fn(x)); a violated one fails the check.
    """

    function: str
    backend: str
    backend_version: str
    mode: str
    order: int
    rows: List[RowResult] = field(default_factory=list)
    problem: Optional[str] = None
    tolerance: str = ""
    rule: str = ""
    step: str = ""
    evaluations: int = 0
    vjps: int = 0
    jvps: int = 0
    seconds: float = 0.0
    strategy: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    contracts: List[Contract] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every row passed, at least one derivative was really compared, and every contract held."""
        compared = any(row.status in ("pass", "no-gradient") for row in self.rows)
        return (self.problem is None and compared and all(row.passed for row in self.rows)
                and all(contract.passed for contract in self.contracts))

    @property
    def failures(self) -> List[RowResult]:
        return [row for row in self.rows if not row.passed]

    @property
    def nondifferentiable(self) -> List[KinkPoint]:
        """Every element found at a non-differentiable point (shown; fails only with ``kinks=`` set so)."""
        return [k for row in self.rows for k in row.nondifferentiable]

    def contract_calls(self, mode: str = "rev") -> int:
        """How many of the report's VJPs (``mode="rev"``) or JVPs (``"fwd"``) the contract checks made."""
        return sum(c.calls for c in self.contracts if c.mode == mode)

    def row(self, input: str, output: Optional[str] = None, order: int = 1) -> RowResult:
        """The row for ``input`` (and ``output``, if several) at ``order``; KeyError if there is none."""
        for row in self.rows:
            if row.input == input and row.order == order and (output is None or row.output == output):
                return row
        raise KeyError(f"no row for input {input!r}" + (f", output {output!r}" if output else "") + f", order {order}")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict of the whole report."""
        data = asdict(self)
        data["passed"] = self.passed
        for row, row_data in zip(self.rows, data["rows"]):
            row_data["passed"] = row.passed
            for key in ("error_map", "outside_map"):
                if row_data[key] is not None:
                    row_data[key] = row_data[key].tolist()
        return data

    def summary(self) -> str:
        """One line: the verdict and what failed."""
        if self.problem:
            return f"FAILED: {self.problem}"
        failed = self.failures
        violated = [c.name for c in self.contracts if not c.passed]
        if violated:
            rows = f"; {len(failed)} of {len(self.rows)} block(s) wrong" if failed else ""
            return f"FAILED: contract violated: {', '.join(violated)}{rows}"
        if not failed and not self.passed:
            return "FAILED: nothing was compared (every requested mode is unsupported for this function)"
        if not failed:
            return f"passed: {len(self.rows)} block(s) checked"
        parts = []
        for statuses, what in ((("fail", "no-gradient"), "wrong"),
                               (("error",), "could not be checked ({reason})"),
                               (("nondeterministic",), "differ only within the spread of a non-deterministic {side}"),
                               (("unresolved",), "could not be resolved (fn jumps at the point and a one-sided "
                                                 "derivative could not be measured)")):
            rows = [f for f in failed if f.status in statuses]
            if rows:
                names = ", ".join(sorted({f.input + ("" if f.order == 1 else f" (order {f.order})") for f in rows}))
                side = "backward" if all(f.analytic_mode == "rev" for f in rows) else "analytic side"
                reason = rows[0].message.split(":")[0]
                parts.append(f"{len(rows)} of {len(self.rows)} block(s) {what.format(side=side, reason=reason)}: "
                             f"{names}")
        return "FAILED: " + "; ".join(parts)

    def __str__(self) -> str:
        from .render import render_text

        return render_text(self)

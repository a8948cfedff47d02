"""Calls into a prepared function with counting, shape checks and readable errors.

Every evaluation the check makes goes through :class:`Evaluator`, so the report's counts are right and
a NaN, an exception or a wrong shape is reported with the point where it happened.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ._adapter import LeafSpec, PreparedFunction
from ._errors import FunctionEvaluationError, GradbridgeError
from ._progress import CheckProgress


class Evaluator:
    """Wraps a :class:`PreparedFunction`; counts evaluations, VJPs and JVPs."""

    def __init__(self, prepared: PreparedFunction, chunk_size: int, what: str = "fn",
                 progress: Optional[CheckProgress] = None) -> None:
        self.prepared = prepared
        self.progress = progress
        self.chunk_size = chunk_size
        self.what = what
        self.evaluations = 0
        self.vjps = 0
        self.jvps = 0

    def _call(self, method, data: np.ndarray, label: str) -> np.ndarray:
        try:
            return np.asarray(method(data), dtype=np.float64)
        except GradbridgeError:
            raise
        except Exception as exc:  # the user's code raised: say where, keep the original as the cause
            raise FunctionEvaluationError(f"{self.what} raised {type(exc).__name__} during {label}: {exc}") from exc

    def evaluate(self, points: np.ndarray, describe: Optional[Sequence[str]] = None,
                 allow_nonfinite: bool = False) -> np.ndarray:
        """Outputs at each row of ``points``; ``describe[k]`` names point k in errors.

        Outputs must be finite unless ``allow_nonfinite`` (perturbed points near a domain edge, where the
        check falls back to one-sided differences)."""
        outputs = []
        for start in range(0, len(points), self.chunk_size):
            chunk = points[start:start + self.chunk_size]
            first = self.evaluations + 1
            try:
                result = self._call(self.prepared.evaluate, chunk, f"evaluation {first}")
            except FunctionEvaluationError:
                self._locate_failure(chunk, first, describe[start:start + len(chunk)] if describe else None)
                raise
            self.evaluations += len(chunk)
            self._advance(len(chunk))
            bad = ~np.isfinite(result)
            if bad.any() and not allow_nonfinite:
                row, col = (int(i) for i in np.argwhere(bad)[0])
                where = describe[start + row] if describe is not None else "the checked input"
                value = result[row, col]
                raise FunctionEvaluationError(
                    f"{self.what} returned {value} in output {self.output_name(col)} at {where} "
                    f"(evaluation {first + row}); gradients cannot be checked where the function is not finite")
            outputs.append(result)
        return np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0))

    def _locate_failure(self, chunk: np.ndarray, first: int, describe: Optional[Sequence[str]]) -> None:
        """A batch raised: evaluate its points one by one so the error names the point that fails.

        Returns without raising only when no single point fails (the batch itself was the problem)."""
        for k in range(len(chunk)):
            try:
                self.prepared.evaluate(chunk[k:k + 1])
            except GradbridgeError:
                raise
            except Exception as exc:
                where = f" at {describe[k]}" if describe else ""
                raise FunctionEvaluationError(
                    f"{self.what} raised {type(exc).__name__} during evaluation {first + k}{where}: {exc}") from exc

    def _advance(self, count: int) -> None:
        if self.progress is not None:
            self.progress.advance(count)

    def output_name(self, flat_index: int) -> str:
        for spec in self.prepared.output_specs:
            if spec.offset <= flat_index < spec.offset + spec.size:
                return f"{spec.name}{list(spec.unravel(flat_index - spec.offset))}"
        return f"#{flat_index}"

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(cotangents), self.chunk_size):
            chunk = cotangents[start:start + self.chunk_size]
            parts.append(self._call(self.prepared.vjp, chunk, "the reverse-mode (VJP) computation"))
            self.vjps += len(chunk)
            self._advance(len(chunk))
        return np.concatenate(parts, axis=0)

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(tangents), self.chunk_size):
            chunk = tangents[start:start + self.chunk_size]
            parts.append(self._call(self.prepared.jvp, chunk, "the forward-mode (JVP) computation"))
            self.jvps += len(chunk)
            self._advance(len(chunk))
        return np.concatenate(parts, axis=0)


def describe_perturbation(leaves: Sequence[LeafSpec], column: int, sign: str) -> str:
    """Human name of the point ``x0 ± h e_column``: e.g. ``w[1, 0] + h``."""
    for leaf in leaves:
        if leaf.offset <= column < leaf.offset + leaf.size:
            return f"{leaf.name}{list(leaf.unravel(column - leaf.offset))} {sign} h"
    return f"element {column} {sign} h"

"""Calls into a prepared function with counting, shape checks and readable errors.

Every evaluation the check makes goes through :class:`Evaluator`, so the report's counts are right and
a NaN, an exception or a wrong shape is reported with the point where it happened.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

from .._adapter import EditedEvaluation, LeafSpec, PreparedFunction, TransposedProducts, WorkingPrecision, offered
from .._errors import FunctionEvaluationError, GradbridgeError, ModeUnsupportedError
from .executor import LOCK as _EXECUTOR_LOCK, RemoteEvaluation, RemoteFailure, RemoteTraceback, agreement
from .._reporting.progress import CheckProgress


class Evaluator:
    """Wraps a :class:`PreparedFunction`; counts evaluations, VJPs and JVPs."""

    def __init__(self, prepared: PreparedFunction, chunk_size: int, what: str = "fn",
                 progress: Optional[CheckProgress] = None, remote: Optional[RemoteEvaluation] = None) -> None:
        self.prepared = prepared
        self.progress = progress
        self.chunk_size = chunk_size
        self.what = what
        self.evaluations = 0
        self.vjps = 0
        self.jvps = 0
        # points where fn was not finite once and finite when evaluated again: a fault, not a domain edge
        self.transients: List[str] = []
        # executor=: the chunks of evaluate go to other processes (see gradbridge._checking.executor)
        self.remote = remote

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
        if self.remote is not None and len(points):
            outputs = self._evaluate_remote(points, describe, allow_nonfinite)
            return self._recheck_nonfinite(outputs, lambda rows: points[rows], describe)
        outputs = []
        for start in range(0, len(points), self.chunk_size):
            chunk = points[start:start + self.chunk_size]
            first = self.evaluations + 1
            try:
                result = self._call(self.prepared.evaluate, chunk, _evaluations(first, len(chunk)))
            except FunctionEvaluationError as error:
                self._locate_failure(chunk, first, describe[start:start + len(chunk)] if describe else None, error)
                raise
            outputs.append(self._accept(result, start, first, describe, allow_nonfinite))
        result = np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0))
        return self._recheck_nonfinite(result, lambda rows: points[rows], describe)

    def evaluate_edits(self, positions: np.ndarray, values: np.ndarray, describe: Optional[Sequence[str]] = None,
                       allow_nonfinite: bool = False) -> np.ndarray:
        """Outputs at the points ``x0`` with element ``positions[k]`` set to ``values[k]``, one point per k.

        The same as :meth:`evaluate` of those points, which is what runs when the prepared function has no
        ``evaluate_edits`` or an executor evaluates; otherwise the adapter builds the points itself (a
        scalar loss at 4096 inputs needs 8192 such points: 268 MB the core need not write and convert)."""
        method = offered(self.prepared, EditedEvaluation, "evaluate_edits")
        if method is None or self.remote is not None:
            return self.evaluate(self._edited(positions, values), describe, allow_nonfinite)
        outputs = []
        for start in range(0, len(positions), self.chunk_size):
            at, to = positions[start:start + self.chunk_size], values[start:start + self.chunk_size]
            first = self.evaluations + 1
            try:
                result = self._call(lambda pair: method(*pair), (at, to), _evaluations(first, len(at)))
            except FunctionEvaluationError as error:
                self._locate_failure(self._edited(at, to), first,
                                     describe[start:start + len(at)] if describe else None, error)
                raise
            outputs.append(self._accept(result, start, first, describe, allow_nonfinite))
        result = np.concatenate(outputs, axis=0) if outputs else np.zeros((0, 0))
        return self._recheck_nonfinite(result, lambda rows: self._edited(positions[rows], values[rows]), describe)

    def _recheck_nonfinite(self, outputs: np.ndarray, points_of: Callable[[np.ndarray], np.ndarray],
                           describe: Optional[Sequence[str]]) -> np.ndarray:
        """Evaluate the points where fn was not finite once more, here: a domain edge is not finite every
        time, a transient fault (a race, uninitialised memory, a flaky kernel) is finite on the second try
        and is recorded in ``transients`` (the check then fails: fn is not deterministic)."""
        if outputs.size == 0:
            return outputs
        rows = np.flatnonzero(~np.isfinite(outputs).all(axis=1))
        if rows.size == 0:
            return outputs
        parts = []
        for start in range(0, len(rows), self.chunk_size):
            chunk = points_of(rows[start:start + self.chunk_size])
            if self.remote is not None:
                with _EXECUTOR_LOCK:
                    parts.append(self._call(self.prepared.evaluate, chunk, "a re-evaluation where it was not finite"))
            else:
                parts.append(self._call(self.prepared.evaluate, chunk, "a re-evaluation where it was not finite"))
        again = np.concatenate(parts, axis=0)
        self.evaluations += len(rows)
        for k, row in enumerate(rows):
            now_finite = np.isfinite(again[k]) & ~np.isfinite(outputs[row])
            if now_finite.any():
                column = int(np.flatnonzero(now_finite)[0])
                where = describe[row] if describe is not None else "a perturbed point"
                self.transients.append(f"{float(outputs[row, column])} in output {self.output_name(column)} at "
                                       f"{where}, {float(again[k, column]):.6g} when the same point was evaluated "
                                       "again")
        return outputs

    def _edited(self, positions: np.ndarray, values: np.ndarray) -> np.ndarray:
        """The points of :meth:`evaluate_edits` as rows: copies of ``x0``, one element set in each."""
        points = np.empty((len(positions), len(self.prepared.x0)))
        points[:] = self.prepared.x0
        points[np.arange(len(positions)), positions] = values
        return points

    def _accept(self, result: np.ndarray, start: int, first: int, describe: Optional[Sequence[str]],
                allow_nonfinite: bool) -> np.ndarray:
        """Count one chunk's evaluations and refuse non-finite outputs (unless allowed)."""
        self.evaluations += len(result)
        self._advance(len(result))
        bad = ~np.isfinite(result)
        if bad.any() and not allow_nonfinite:
            row, col = (int(i) for i in np.argwhere(bad)[0])
            where = describe[start + row] if describe is not None else "the checked input"
            value = result[row, col]
            raise FunctionEvaluationError(
                f"{self.what} returned {value} in output {self.output_name(col)} at {where} "
                f"(evaluation {first + row}); gradients cannot be checked where the function is not finite")
        return result

    def _evaluate_remote(self, points: np.ndarray, describe: Optional[Sequence[str]],
                         allow_nonfinite: bool) -> np.ndarray:
        """Like :meth:`evaluate`, with the chunks evaluated by the executor's workers, gathered in order.

        A chunk whose evaluation raised in a worker is evaluated here again, point by point, so the error
        names the point exactly as a local check would; the first chunk of the check is compared with a
        local evaluation of its first point."""
        remote = self.remote
        bounds = remote.bounds(len(points), self.chunk_size)
        futures = remote.submit(points, bounds)
        outputs = []
        try:
            for (start, stop), future in zip(bounds, futures):
                chunk = points[start:stop]
                first = self.evaluations + 1
                names = describe[start:stop] if describe else None
                try:
                    result = np.asarray(remote.result(future, first, len(chunk)), dtype=np.float64)
                except RemoteFailure as failure:
                    remote.cancel(futures)
                    self._failed_remotely(chunk, first, names, failure)
                if not remote.verified:
                    self._verify(chunk, result, first, names)
                outputs.append(self._accept(result, start, first, describe, allow_nonfinite))
        except BaseException:
            remote.cancel(futures)
            raise
        return np.concatenate(outputs, axis=0)

    def _failed_remotely(self, chunk: np.ndarray, first: int, describe: Optional[Sequence[str]],
                         failure: RemoteFailure) -> None:
        """fn raised in a worker: evaluate the chunk here as a local check would, which raises the same
        error (naming the point); if it does not fail here, fn behaves differently in the workers."""
        with _EXECUTOR_LOCK:
            try:
                self._call(self.prepared.evaluate, chunk, f"evaluation {first}")
            except FunctionEvaluationError:
                self._locate_failure(chunk, first, describe)
                raise
        raise FunctionEvaluationError(
            f"{self.what} raised {failure.type_name} during evaluations {first} to {first + len(chunk) - 1} in a "
            f"worker of {self.remote.name}, but not when the same points were evaluated in this process: "
            f"{failure.message}. fn must compute the same in every process (no state set up only here)"
        ) from RemoteTraceback(failure.remote_traceback)

    def _verify(self, chunk: np.ndarray, result: np.ndarray, first: int, describe: Optional[Sequence[str]]) -> None:
        """The workers must compute what this process computes: compare the first point of the first chunk
        with a local evaluation (which also tells the local prepared function its outputs)."""
        with _EXECUTOR_LOCK:
            try:
                local = self._call(self.prepared.evaluate, chunk[:1], f"evaluation {first}")
            except FunctionEvaluationError:
                self._locate_failure(chunk[:1], first, describe)
                raise
        eps = max(float(offered(self.prepared, WorkingPrecision, "working_eps") or 0.0), float(np.finfo(np.float64).eps))
        where = describe[0] if describe else "the checked input"
        if result.ndim != 2 or len(result) != len(chunk) or result.shape[1:] != local.shape[1:]:
            raise FunctionEvaluationError(
                f"executor: the workers of {self.remote.name} returned outputs of shape {result.shape[1:]} per point "
                f"at {where}, this process {local.shape[1:]}; fn must compute the same in every process")
        differs = agreement(result[0], local[0], eps)
        if differs is not None:
            index, there, here = differs
            raise FunctionEvaluationError(
                f"executor: {self.what} computes {there!r} in output {self.output_name(index)} at {where} in the "
                f"workers of {self.remote.name}, but {here!r} in this process; fn must compute the same in every "
                "process (it may depend on state set up only here: a global changed after import, a seed, a "
                "file or a device)")
        self.remote.verified = True

    def _locate_failure(self, chunk: np.ndarray, first: int, describe: Optional[Sequence[str]],
                        error: Optional[FunctionEvaluationError] = None) -> None:
        """A batch raised: name the point that failed, numbered as the evaluations are counted (evaluation 1 is
        the first call of fn).

        An adapter that runs a batch point by point marks the exception with the point that raised (see
        :func:`mark_failed_point`); that point is evaluated once more to tell a reproducible failure from an
        intermittent one. Otherwise the points are evaluated one by one, and the first that raises is named.
        Returns without raising only when the batch's error came from gradbridge itself and no single point
        fails (the caller re-raises it)."""
        cause = error.__cause__ if error is not None else None
        marked = getattr(cause, "gradbridge_point", None) if isinstance(cause, Exception) else None
        if isinstance(marked, int) and 0 <= marked < len(chunk):
            where = f" at {describe[marked]}" if describe else ""
            said = f"{self.what} raised {type(cause).__name__} during evaluation {first + marked}{where}: {cause}"
            try:
                self.prepared.evaluate(chunk[marked:marked + 1])
            except GradbridgeError:
                raise
            except Exception:
                raise FunctionEvaluationError(said) from cause
            raise FunctionEvaluationError(
                f"{said}. Evaluated again, the same point did not raise: {self.what} fails intermittently (it "
                "depends on how often it was called, or on state or randomness the check does not pin), so "
                "finite differences of it cannot be trusted") from cause
        for k in range(len(chunk)):
            try:
                self.prepared.evaluate(chunk[k:k + 1])
            except GradbridgeError:
                raise
            except Exception as exc:
                where = f" at {describe[k]}" if describe else ""
                raise FunctionEvaluationError(
                    f"{self.what} raised {type(exc).__name__} during evaluation {first + k}{where}: {exc}") from exc
        if isinstance(cause, Exception) and not isinstance(cause, GradbridgeError) and len(chunk) > 1:
            raise FunctionEvaluationError(
                f"{self.what} raised {type(cause).__name__} during {_evaluations(first, len(chunk))} (one batch): "
                f"{cause}. Evaluated again one point at a time, none of them raised: {self.what} fails "
                "intermittently (it depends on how often it was called, or on state or randomness the check does "
                "not pin), or only when these points are evaluated together") from cause

    def _advance(self, count: int) -> None:
        if self.progress is not None:
            self.progress.advance(count)

    def _finite(self, result: np.ndarray, what: str, first: int, name: Callable[[int], str]) -> np.ndarray:
        """The analytic side's results must be finite where fn is: a NaN or Inf there is a broken derivative
        rule (0*inf, 0/0), not a wrong gradient to compare with finite differences."""
        bad = ~np.isfinite(result)
        if not bad.any():
            return result
        row, col = (int(i) for i in np.argwhere(bad)[0])
        short = what.rsplit("(", 1)[-1].rstrip(")")
        raise FunctionEvaluationError(
            f"{self.what}: the {what} returned {result[row, col]} for {name(col)} ({short} {first + row}) at the "
            "checked point, where fn is finite; the analytic derivative must be finite to be checked (a nan in a "
            "derivative rule is often 0*inf or 0/0: a sqrt, log or division at 0, the norm of a zero vector)")

    def input_name(self, flat_index: int) -> str:
        """``x[1, 0]``: the checked element at position ``flat_index`` of the flat input vector."""
        for leaf in self.prepared.leaves:
            if leaf.offset <= flat_index < leaf.offset + leaf.size:
                return f"{leaf.name}{list(leaf.unravel(flat_index - leaf.offset))}"
        return f"element {flat_index}"

    def output_name(self, flat_index: int) -> str:
        for spec in self.prepared.output_specs:
            if spec.offset <= flat_index < spec.offset + spec.size:
                return f"{spec.name}{list(spec.unravel(flat_index - spec.offset))}"
        return f"#{flat_index}"

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(cotangents), self.chunk_size):
            chunk = cotangents[start:start + self.chunk_size]
            parts.append(self._finite(self._call(self.prepared.vjp, chunk, "the reverse-mode (VJP) computation"),
                                      "reverse-mode derivative (VJP)", self.vjps + 1, self.input_name))
            self.vjps += len(chunk)
            self._advance(len(chunk))
        return np.concatenate(parts, axis=0)

    def vjp_transposed(self, tangents: np.ndarray) -> np.ndarray:
        """``J t`` per row of ``tangents`` from the transposed VJP (counted as VJPs: the same rules run);
        raises ModeUnsupportedError when the adapter cannot transpose it."""
        method = offered(self.prepared, TransposedProducts, "vjp_transposed")
        if method is None:
            raise ModeUnsupportedError("this backend cannot transpose its VJP")
        parts = []
        for start in range(0, len(tangents), self.chunk_size):
            chunk = tangents[start:start + self.chunk_size]
            parts.append(self._finite(self._call(method, chunk, "the transposed reverse-mode (J t from the VJP) "
                                                                "computation"),
                                      "transposed reverse-mode derivative (J t from the VJP)", self.vjps + 1,
                                      self.output_name))
            self.vjps += len(chunk)
            self._advance(len(chunk))
        return np.concatenate(parts, axis=0)

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        parts = []
        for start in range(0, len(tangents), self.chunk_size):
            chunk = tangents[start:start + self.chunk_size]
            parts.append(self._finite(self._call(self.prepared.jvp, chunk, "the forward-mode (JVP) computation"),
                                      "forward-mode derivative (JVP)", self.jvps + 1, self.output_name))
            self.jvps += len(chunk)
            self._advance(len(chunk))
        return np.concatenate(parts, axis=0)


def _evaluations(first: int, count: int) -> str:
    """``evaluation 3``, or ``evaluations 3 to 62`` for a batch."""
    return f"evaluation {first}" if count <= 1 else f"evaluations {first} to {first + count - 1}"


def mark_failed_point(exc: BaseException, index: int) -> None:
    """For adapters that evaluate a batch point by point: mark the exception fn raised with the point (row of the
    batch) that raised it, so the error names that evaluation (see :meth:`Evaluator._locate_failure`)."""
    try:
        exc.gradbridge_point = index  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an exception type without attributes: the batch is searched instead
        pass


def describe_perturbation(leaves: Sequence[LeafSpec], column: int, sign: str) -> str:
    """Human name of the point ``x0 ± h e_column``: e.g. ``w[1, 0] + h``."""
    for leaf in leaves:
        if leaf.offset <= column < leaf.offset + leaf.size:
            return f"{leaf.name}{list(leaf.unravel(column - leaf.offset))} {sign} h"
    return f"element {column} {sign} h"

"""Spreading a check's function evaluations over a ``concurrent.futures.Executor`` (``executor=``).

Only evaluations of ``fn`` go out; analytic VJPs/JVPs and everything else stay in this process. A worker
cannot receive this process's prepared function (framework objects, closures, a session), so it gets a
*recipe*: the backend's name and the :class:`~gradbridge._adapter.CheckSpec` as pickled bytes. Each
worker process prepares the check from it once, caches it under the recipe's key, checks that it has
the same leaf layout as this process, and evaluates its chunks inside the prepared function's session.

Serialisation: standard :mod:`pickle` (``fn`` must be importable: a module-level function), or
cloudpickle for a Dask ``distributed`` client or its ``get_executor()``, which serialise by value
(lambdas work there). An in-process thread pool gets the spec itself and a copy prepared here.

Nothing here imports a framework or Dask; a Dask client is recognised by its ``get_executor`` method.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import math
import os
import pickle
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from .._agreement import agreement_bound
from .. import _process
from .._adapter import CheckSpec, PreparedFunction
from .._errors import InvalidArgumentError

#: Serialises evaluations inside one process: frameworks keep RNG seeds, default dtypes and module modes
#: per process, so two prepared functions of one process must not evaluate at the same time (a thread
#: pool, a Dask worker with several threads, this process's own check). The same lock as the adapters'
#: windows around the user's code (:mod:`gradbridge._process`).
LOCK = _process.LOCK
#: Prepared functions a worker process keeps, newest last (a pool serves check after check).
_CACHE: "OrderedDict[str, PreparedFunction]" = OrderedDict()
_CACHE_SIZE = 4
#: id(local prepared function) -> its remote evaluation, while a check with ``executor=`` runs.

Layout = Tuple[Any, ...]


def layout_of(prepared: PreparedFunction) -> Layout:
    """The checked leaves as plain data: (name, shape, dtype, offset, kind) each, and the vector length."""
    return (tuple((leaf.name, tuple(leaf.shape), str(leaf.dtype), int(leaf.offset), leaf.kind)
                  for leaf in prepared.leaves), int(len(prepared.x0)))


@dataclass(frozen=True)
class Recipe:
    """What a worker needs to prepare the check: the backend's name and the spec (pickled bytes, or the
    spec object itself for in-process executors), the expected layout, and a key to cache it under."""

    key: str
    backend: str
    payload: Any
    layout: Layout


# --- the worker side -----------------------------------------------------------------------------------


def _prepared(recipe: Recipe) -> PreparedFunction:
    prepared = _CACHE.get(recipe.key)
    if prepared is not None:
        _CACHE.move_to_end(recipe.key)
        return prepared
    from .. import _registry

    spec = pickle.loads(recipe.payload) if isinstance(recipe.payload, bytes) else recipe.payload
    prepared = _registry.get_adapter(recipe.backend).prepare(spec)
    layout = layout_of(prepared)
    if layout != recipe.layout:
        raise _LayoutMismatch(_layout_difference(recipe.layout, layout))
    _CACHE[recipe.key] = prepared
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return prepared


class _LayoutMismatch(Exception):
    pass


def _layout_difference(here: Layout, there: Layout) -> str:
    leaves_here, leaves_there = here[0], there[0]
    for a, b in zip(leaves_here, leaves_there):
        if a != b:
            return (f"leaf {a[0]} (shape {a[1]}, {a[2]}, offset {a[3]}) here but {b[0]} (shape {b[1]}, {b[2]}, "
                    f"offset {b[3]}) in the worker")
    return (f"{len(leaves_here)} checked leaves ({here[1]} elements) here but {len(leaves_there)} "
            f"({there[1]} elements) in the worker")


def run_chunk(recipe: Recipe, points: np.ndarray, nonce: str) -> Tuple[Any, ...]:
    """Evaluate ``points`` in a worker. Never raises for the user's code: returns ``("ok", outputs)``,
    ``("fn", type, message, traceback)`` when fn (or the adapter) raised, ``("setup", ...)`` when the
    check could not be prepared, ``("layout", message)`` when the worker's leaves differ.

    ``nonce`` makes every submission distinct, so no executor merges two identical chunks into one
    computation (the two evaluations at the unperturbed input must really be two)."""
    del nonce
    with LOCK:
        try:
            prepared = _prepared(recipe)
        except _LayoutMismatch as exc:
            return ("layout", str(exc))
        except Exception as exc:  # unpickling (fn not importable there), a missing framework, ...
            return ("setup", type(exc).__name__, str(exc), traceback.format_exc())
        try:
            with prepared.session():
                outputs = np.asarray(prepared.evaluate(np.asarray(points, dtype=np.float64)), dtype=np.float64)
        except Exception as exc:
            return ("fn", type(exc).__name__, str(exc), traceback.format_exc())
    return ("ok", outputs)


# --- the local side ------------------------------------------------------------------------------------


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (chained as the cause of the local error)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


class RemoteFailure(Exception):
    """A chunk failed in a worker with ``fn`` raising there (the evaluator decides what to report)."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


def _executor_name(obj: Any) -> str:
    return type(obj).__name__


def resolve(executor: Any) -> Tuple[Any, str, bool]:
    """The object to submit to, its name for the report, and whether it serialises by value (cloudpickle).

    A Dask ``distributed.Client`` (anything with ``get_executor``) is replaced by ``get_executor()``;
    that executor keeps the client as ``_client``."""
    getter = getattr(executor, "get_executor", None)
    if callable(getter):
        return getter(), f"{_executor_name(executor)} (through its get_executor())", True
    client = getattr(executor, "_client", None)
    by_value = callable(getattr(client, "get_executor", None))
    return executor, _executor_name(executor), by_value


def _parallelism(executor: Any) -> int:
    """How many evaluations the executor can run at once (a hint for splitting; never wrong to guess)."""
    workers = getattr(executor, "_max_workers", None)
    if isinstance(workers, int) and workers > 0:
        return workers
    client = getattr(executor, "_client", None)
    nthreads = getattr(client, "nthreads", None)
    if callable(nthreads):
        try:
            total = sum(int(n) for n in nthreads().values())
            if total > 0:
                return total
        except Exception:  # a client that cannot answer now: fall back to the local count
            pass
    return os.cpu_count() or 1


def _pickle_spec(spec: CheckSpec, by_value: bool, name: str) -> bytes:
    dumps = pickle.dumps
    if by_value:
        import cloudpickle  # Dask's distributed depends on it

        dumps = cloudpickle.dumps
    try:
        return dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        part = _unpicklable_part(spec, dumps)
        if part == "fn":
            raise InvalidArgumentError(
                f"executor: fn must be picklable (a module-level function) to run in other processes; pickling it "
                f"for {name} failed ({type(exc).__name__}: {exc}). Define fn at the top level of a module the "
                "workers can import, or use a Dask client, which pickles lambdas and closures by value") from exc
        raise InvalidArgumentError(
            f"executor: {part} must be picklable to run in other processes; pickling it for {name} failed "
            f"({type(exc).__name__}: {exc})") from exc


def _unpicklable_part(spec: CheckSpec, dumps: Any) -> str:
    for part in ("fn", "grad", "args", "kwargs", "params"):
        try:
            dumps(getattr(spec, part))
        except Exception:
            return part
    return "the check's specification"


class RemoteEvaluation:
    """Submits chunks of points to the executor and turns the workers' answers into outputs."""

    def __init__(self, executor: Any, name: str, recipe: Recipe) -> None:
        self.executor = executor
        self.name = name
        self.recipe = recipe
        self.parallelism = _parallelism(executor)
        self.chunks = 0
        self.largest = 0
        self.verified = False

    def bounds(self, count: int, chunk_size: int) -> List[Tuple[int, int]]:
        """(start, stop) of each chunk: at most ``chunk_size`` points, and enough chunks to keep every
        worker busy."""
        size = max(1, min(chunk_size, math.ceil(count / self.parallelism)))
        return [(start, min(start + size, count)) for start in range(0, count, size)]

    def submit(self, points: np.ndarray, bounds: List[Tuple[int, int]]) -> List[Any]:
        futures = []
        try:
            for start, stop in bounds:
                chunk = np.ascontiguousarray(points[start:stop], dtype=np.float64)
                futures.append(self.executor.submit(run_chunk, self.recipe, chunk, uuid.uuid4().hex))
        except Exception as exc:
            self.cancel(futures)
            raise InvalidArgumentError(f"executor: {self.name} refused the evaluations "
                                       f"({type(exc).__name__}: {exc})") from exc
        self.chunks += len(bounds)
        self.largest = max([self.largest] + [stop - start for start, stop in bounds])
        return futures

    def result(self, future: Any, first: int, count: int) -> np.ndarray:
        """The outputs of one chunk; raises :class:`RemoteFailure` when fn raised in the worker."""
        from .._errors import FunctionEvaluationError

        try:
            outcome = future.result()
        except Exception as exc:
            raise FunctionEvaluationError(
                f"executor: {self.name} could not run evaluations {first} to {first + count - 1} "
                f"({type(exc).__name__}: {exc})") from exc
        kind = outcome[0]
        if kind == "ok":
            return outcome[1]
        if kind == "fn":
            raise RemoteFailure(outcome[1], outcome[2], outcome[3])
        if kind == "layout":
            raise InvalidArgumentError(
                f"executor: the workers of {self.name} prepared a different set of checked leaves than this "
                f"process ({outcome[1]}); they must run the same versions of gradbridge and the framework, and "
                "fn's arguments must unpickle to the same arrays there")
        raise InvalidArgumentError(
            f"executor: the workers of {self.name} could not prepare the check ({outcome[1]}: {outcome[2]}). "
            "fn, grad and the arguments must be importable in the worker processes (defined at module level "
            "in a module they can import), and the framework must be installed there") from RemoteTraceback(outcome[3])

    @staticmethod
    def cancel(futures: List[Any]) -> None:
        """Cancel what has not started and wait for what has (no worker of this process may still be
        evaluating when the check goes on here)."""
        for future in futures:
            with contextlib.suppress(Exception):
                future.cancel()
        waitable = [f for f in futures if isinstance(f, cf.Future)]
        if waitable:
            cf.wait(waitable)

    def note(self, order: int) -> str:
        text = (f"evaluations spread over {self.name} in {self.chunks} chunk(s) of up to {self.largest} points; "
                "analytic VJPs/JVPs ran in this process")
        if order == 2:
            text += ", and so did the second-order evaluations of the gradient function"
        if self.verified:
            text += "; one extra local evaluation confirmed the workers compute what this process computes"
        return text


def plan(executor: Any, backend: str, spec: CheckSpec, prepared: PreparedFunction) -> RemoteEvaluation:
    """The remote evaluation of one check: the recipe pickled once here (clear errors when it cannot be)."""
    target, name, by_value = resolve(executor)
    layout = layout_of(prepared)
    if isinstance(target, cf.ThreadPoolExecutor):
        # same process: no pickling; a copy of the check prepared now, before the check's session starts
        key = f"local-{uuid.uuid4().hex}"
        recipe = Recipe(key, backend, spec, layout)
        with LOCK:
            _prepared(recipe)
    else:
        payload = _pickle_spec(spec, by_value, name)
        key = f"{backend}-{hashlib.sha256(payload).hexdigest()}"
        recipe = Recipe(key, backend, payload, layout)
    return RemoteEvaluation(target, name, recipe)


@contextlib.contextmanager
def activated(remote: Optional[RemoteEvaluation]) -> Iterator[None]:
    """The lifetime of ``remote`` (handed to the check's evaluator): a recipe made for this check only is
    dropped from the workers' cache when the block ends."""
    if remote is None:
        yield
        return
    try:
        yield
    finally:
        if remote.recipe.key.startswith("local-"):
            with LOCK:
                _CACHE.pop(remote.recipe.key, None)


def agreement(remote: np.ndarray, local: np.ndarray, eps: float) -> Optional[Tuple[int, float, float]]:
    """None when ``remote`` and ``local`` (one row each) agree under the internal agreement rule (:mod:`gradbridge._agreement`); else the
    first output position that differs, with both values."""
    if remote.shape != local.shape:
        return (-1, float("nan"), float("nan"))
    scale = max(float(np.max(np.abs(local[np.isfinite(local)]), initial=0.0)), np.finfo(np.float64).tiny)
    with np.errstate(invalid="ignore"):
        close = np.abs(remote - local) <= agreement_bound(eps, np.maximum(np.abs(local), scale))
    same = close | (np.isnan(remote) & np.isnan(local)) | (remote == local)
    if same.all():
        return None
    index = int(np.argwhere(~same.reshape(-1))[0][0])
    return index, float(remote.reshape(-1)[index]), float(local.reshape(-1)[index])


__all__ = ["LOCK", "Recipe", "RemoteEvaluation", "RemoteFailure", "RemoteTraceback", "activated", "agreement",
           "layout_of", "plan", "resolve", "run_chunk"]

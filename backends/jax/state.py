"""State fn keeps and rebinds while it runs (a model splitting its own PRNG key): watched, put back, sent eager.

Invariant: every run of fn under a trace is guarded: where it leaves tracers in the places fn can rebind, those
are put back at once, before anything reads them, and fn is marked eager for the rest of the check and for later
checks of the same compiled entry; when a check's session ends, also by raising, every place holds what it held
when the session began (arrays, keys, state objects; int counters and logs fn keeps stay as fn left them).

A model that keeps its key (``self.key, sub = jax.random.split(self.key)``), a closure rebinding a nonlocal key, a
global it advances: traced under jit or vmap, fn stores tracers into the user's objects, the next trace or call
then reads a dead tracer (UnexpectedTracerError), and the user's model is left broken. So the places fn can rebind
(found from fn and from the non-array values passed to it, by the fingerprint's reach, see
:class:`backends.common.state.StateWalker`) are snapshotted before each traced run and looked through for tracers
after; where fn left some, fn is marked stateful: from then on it is evaluated point by point, eagerly, and
differentiated with eager jax.vjp/jax.linearize at the checked point (:mod:`.eager`; what jit would bake in, one
key for every evaluation, is not what fn does). A function whose output depends on the key it advances then
differs between two evaluations at the same point, which the core reports as "not deterministic"; one whose output
does not depend on it gets its normal verdict.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from gradbridge._errors import FunctionEvaluationError, InvalidArgumentError

from ..common.fingerprint import UNHANDLED
from ..common.state import StateSnapshot, StateWalker
from .cache import JaxFingerprint
from .compat import Tracer

if TYPE_CHECKING:  # pragma: no cover
    from .problem import JaxProblem


class State(StateWalker):
    """The places fn can rebind, and the tracers found in them."""

    libraries = JaxFingerprint.libraries

    def is_array(self, value: Any) -> bool:
        return isinstance(value, (jax.Array, np.ndarray))

    def is_watched(self, value: Any) -> bool:
        return isinstance(value, Tracer)

    def adapter_children(self, value: Any) -> Any:
        if isinstance(value, (jax.custom_vjp, jax.custom_jvp)):
            return [getattr(value, name) for name in ("fun", "fwd", "bwd", "jvp") if hasattr(value, name)]
        return UNHANDLED


def holds_tracer(value: Any) -> bool:
    """Whether ``value`` is, or holds somewhere inside (a tuple, a new state object, a closure), a tracer."""
    if isinstance(value, Tracer):
        return True
    if isinstance(value, (jax.Array, np.ndarray)):
        return False
    return bool(State([("", value)], snapshot=False).watched)


class StatefulFunction(FunctionEvaluationError):
    """Raised out of a traced run of fn that left tracers in the user's state (already put back): the prepared
    function's method that ran it starts again, eagerly (see :func:`.eager.eager_on_leak`)."""


class _Active(threading.local):
    """The problems whose sessions are open in this thread, innermost last (a check inside fn nests one)."""

    def __init__(self) -> None:
        self.problems: List["JaxProblem"] = []


ACTIVE = _Active()


def call_fn(fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Mapping[str, Any], traced: bool) -> Any:
    """``fn(*args, **kwargs)``; a traced run is guarded by the innermost open session's problem."""
    if traced and ACTIVE.problems:
        return ACTIVE.problems[-1].guarded(fn, args, kwargs)
    return fn(*args, **kwargs)


def tracer_error(where: str, what: Optional[str]) -> InvalidArgumentError:
    """gradbridge.check was given a tracer: it was called under a JAX transformation (marked, so that a check
    running fn under a trace, where fn calls gradbridge.check itself, can tell it and evaluate fn eagerly)."""
    found = f"{what} is a JAX tracer, not a concrete array" if what else "JAX is tracing code (jax.jit)"
    error = InvalidArgumentError(
        f"{where}: {found}: gradbridge.check was called inside a JAX transformation (jax.jit, jax.grad, jax.vmap, "
        "jax.lax control flow, or a function that gradbridge itself is checking, which it traces). gradbridge runs "
        "fn and JAX's derivatives itself and needs concrete values: call gb.check outside any transformed code, "
        "on concrete arrays")
    error.gradbridge_tracer_argument = True  # type: ignore[attr-defined]
    return error


class StateGuard:
    """The guard of a problem's traced runs of fn (mixed into :class:`.problem.JaxProblem`).

    Uses ``roots`` (where fn can keep state: fn itself and the non-array values it is passed), ``eager_reason``
    (why fn runs eagerly, or None) and ``_compiled`` (the compiled entry, which remembers the reason for later
    checks).
    """

    roots: List[Tuple[str, Any]]
    eager_reason: Optional[str]
    _compiled: Optional[Tuple[Any, Tuple[Any, ...]]]

    def guarded(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """A traced run of ``fn``: where it leaves tracers in the places it can rebind, those are put back at once
        and fn is marked stateful; the first time, :class:`StatefulFunction` stops the traced path (the
        prepared function's method starts again, eagerly). Once stateful, a run under eager autodiff
        (jax.vjp/jax.linearize at the point) is only put back: its derivative holds."""
        before = StateSnapshot(State(self.roots))
        eager = self.eager_reason is not None
        try:
            result = fn(*args, **kwargs)
        except InvalidArgumentError as error:
            self._put_back(before)
            if eager or not getattr(error, "gradbridge_tracer_argument", False):
                raise  # under eager autodiff: fn checks values that depend on the point, which cannot be done
            self.mark_eager("fn calls gradbridge.check itself, which needs concrete values: fn is evaluated point "
                            "by point and differentiated eagerly")
            raise StatefulFunction(self.eager_reason or "") from None
        except Exception:
            if self._put_back(before) and not eager:
                raise StatefulFunction(self.eager_reason or "") from None
            raise
        if self._put_back(before) and not eager:
            raise StatefulFunction(self.eager_reason or "")
        return result

    def _put_back(self, before: StateSnapshot) -> bool:
        """Whether a traced run left tracers in fn's state; if so they are put back and fn marked stateful."""
        leaked = State(self.roots, snapshot=False).watched
        if not leaked:
            return False
        before.restore(holds_tracer)
        paths = sorted({path for path, _ in leaked})
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        self.mark_eager(f"fn rebinds JAX arrays in its own state while it runs ({shown}): under jax.jit/jax.vmap "
                        "that stores tracers there, so fn is evaluated point by point and differentiated eagerly, "
                        "and its state is put back as it was after the check")
        return True

    def mark_eager(self, reason: str) -> None:
        if self.eager_reason is None:
            self.eager_reason = reason
            if self._compiled is not None:
                self._compiled[0].eager_reason = reason  # the next check of fn in this state starts eagerly

    def eager(self) -> bool:
        """Whether fn must run eagerly: it left tracers in its state in this check or in an earlier one of the
        same compiled entry."""
        if self.eager_reason is None and self._compiled is not None and self._compiled[0].eager_reason is not None:
            self.eager_reason = self._compiled[0].eager_reason
        return self.eager_reason is not None


def snapshot(roots: Sequence[Tuple[str, Any]]) -> StateSnapshot:
    """What the places fn can rebind hold now (put back with ``restore(holds_tracer)``)."""
    return StateSnapshot(State(list(roots)))

"""Validation of the options of :func:`gradbridge.check`: one clear error per bad value."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from . import _defaults
from ._errors import InvalidArgumentError
from ._checking.memory import parse_memory

MODES = ("auto", "full", "fast")
ANALYTIC = ("auto", "rev", "fwd", "both")
KINKS = ("allow", "subgradient", "fail")
#: Default for ``budget`` (kept here for the modules that import it; the value is :mod:`gradbridge._defaults`'s).
DEFAULT_BUDGET = _defaults.BUDGET


@dataclass(frozen=True)
class Options:
    """The validated options of one check (see :func:`gradbridge.check` for their meaning)."""

    mode: str
    order: int
    eps: Optional[float]
    atol: Optional[float]
    rtol: Optional[float]
    seed: int
    probes: int
    analytic: str
    train: bool
    chunk_size: int
    budget: int = DEFAULT_BUDGET
    kinks: str = _defaults.KINKS
    promote: bool = _defaults.PROMOTE
    progress: Optional[bool] = None
    memory: Optional[int] = None  # bytes a check may allocate; None: half of what is available
    # the analytic mode of each derived level (2..order) when ``analytic`` was given per level (a tuple); empty:
    # every level takes ``analytic``
    levels: Tuple[str, ...] = ()
    # the contract checks on the rules (see gradbridge._checking.contracts): True the cheap ones, "all" also those
    # that cost a trace or compile the check has not paid for, False none
    contracts: Union[bool, str] = True

    def level_modes(self) -> Tuple[str, ...]:
        """The analytic mode of each level, 1..order: the mode the level's derivative is checked in. Level k + 1
        differentiates the function level k built: ``x -> J(x)^T v`` where level k is ``rev`` or ``both``
        (reverse mode), ``x -> J(x) t`` where it is ``fwd`` (forward mode)."""
        return (self.analytic,) + (self.levels or (self.analytic,) * (self.order - 1))


def _number(name: str, value: Any, *, positive: bool) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name}: expected a {'positive' if positive else 'non-negative'} number or None, got {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value != value or value == float("inf"):
        raise InvalidArgumentError(f"{name}: expected a {'positive' if positive else 'non-negative'} finite number, got {value!r}")
    return value


#: The smallest relative step ``eps`` accepted: float64's machine epsilon. A step below it leaves ``x + h`` equal
#: to ``x`` for elements of magnitude about 1, so the finite differences would measure nothing and read every
#: gradient as wrong. (The check's own precision may need more: see :func:`validate_step`.)
MIN_EPS = 2.0 ** -52


def _step(value: Any) -> Optional[float]:
    """``eps``: None, or a finite relative step of at least :data:`MIN_EPS`."""
    eps = _number("eps", value, positive=True)
    if eps is not None and eps < MIN_EPS:
        raise InvalidArgumentError(
            f"eps: {eps!r} is below float64's machine epsilon ({MIN_EPS:.3g}): a relative step that small leaves "
            "x + h equal to x, so the finite differences would measure nothing. Pass eps >= 2.2e-16, or None for "
            "the default cbrt(eps), about 6e-6")
    return eps


def validate_step(eps: Optional[float], working_eps: Optional[float], precision: str) -> None:
    """``eps`` against the machine epsilon of the precision the checked leaves are perturbed in (float32, say,
    with ``promote=False``): a smaller relative step rounds the perturbed points back to ``x``."""
    if eps is not None and working_eps is not None and eps < working_eps:
        raise InvalidArgumentError(
            f"eps: {eps!r} is below the machine epsilon of {precision} ({working_eps:.3g}), the precision the check "
            f"perturbs its inputs in: a relative step that small rounds x + h back to x. Pass eps >= "
            f"{working_eps:.3g}, or None for the default")


def _integer(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if type(value) is int and value >= low and (high is None or value <= high):
        return value  # the common case, without the (slow) abstract-base-class check below
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"from {low} to {high}"
        raise InvalidArgumentError(f"{name}: expected an integer {bounds}, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"{name}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def validate_options(*, mode: Any, order: Any, eps: Any, atol: Any, rtol: Any, seed: Any, probes: Any,
                     analytic: Any, train: Any, chunk_size: Any, budget: Any = DEFAULT_BUDGET,
                     kinks: Any = "allow", promote: Any = True, progress: Any = None,
                     memory: Any = None, contracts: Any = True) -> Options:
    """Check every option's type and range; raise :class:`InvalidArgumentError` naming the first bad one."""
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or not 1 <= order <= MAX_ORDER:
        raise InvalidArgumentError(f"order: expected an integer from 1 (gradients) to {MAX_ORDER} (2: gradients of "
                                   f"gradients, ...), got {order!r}")
    levels: Tuple[str, ...] = ()
    if isinstance(analytic, (tuple, list)):
        levels = _level_modes(analytic, int(order))
        analytic = levels[0]
        levels = levels[1:]
    if not isinstance(contracts, bool) and contracts != "all":
        raise InvalidArgumentError(f"contracts: expected True (check the rules' contracts, the default), 'all' (also "
                                   f"those that cost a trace or compile) or False, got {contracts!r}")
    if not isinstance(train, bool):
        raise InvalidArgumentError(f"train: expected True or False, got {train!r}")
    if not isinstance(promote, bool):
        raise InvalidArgumentError(f"promote: expected True (check in float64 copies) or False (check in the "
                                   f"arrays' own dtypes), got {promote!r}")
    if progress is not None and not isinstance(progress, bool):
        raise InvalidArgumentError(f"progress: expected None (a bar on interactive terminals only), True or False, "
                                   f"got {progress!r}")
    return Options(
        mode=_choice("mode", mode, MODES),
        order=int(order),
        eps=_step(eps),
        atol=_number("atol", atol, positive=False),
        rtol=_number("rtol", rtol, positive=False),
        seed=_integer("seed", seed, 0, 2**32 - 3),  # every framework's seed fits 32 bits
        probes=_integer("probes", probes, 1),
        analytic=_choice("analytic", analytic, ANALYTIC),
        train=train,
        chunk_size=_integer("chunk_size", chunk_size, 1),
        budget=_integer("budget", budget, 1),
        kinks=_choice("kinks", kinks, KINKS),
        promote=promote,
        progress=progress,
        memory=parse_memory(memory),
        levels=levels,
        contracts=contracts,
    )


#: The highest derivative order a check takes (each level costs a full check of the level below's derivative).
MAX_ORDER = 4
LEVEL_MODES = ("rev", "fwd")


def _level_modes(analytic: Any, order: int) -> Tuple[str, ...]:
    """``analytic`` given per level, innermost first: ``("rev", "fwd")`` is forward-over-reverse."""
    modes = tuple(analytic)
    if len(modes) != order or any(m not in LEVEL_MODES for m in modes):
        raise InvalidArgumentError(
            f"analytic: a sequence gives the mode of each derivative level, innermost first, one per order "
            f"('rev' or 'fwd'; order={order} needs {order}): ('rev', 'fwd') is forward-over-reverse, ('fwd', 'rev') "
            f"reverse-over-forward, ('fwd', 'fwd') forward-over-forward; got {analytic!r}")
    return modes


def validate_executor(executor: Any) -> Any:
    """``executor``: None, a ``concurrent.futures.Executor`` (anything with ``submit``), or a Dask client
    (anything with ``get_executor``)."""
    if executor is None:
        return None
    if callable(getattr(executor, "submit", None)) or callable(getattr(executor, "get_executor", None)):
        return executor
    raise InvalidArgumentError(
        f"executor: expected None or a concurrent.futures.Executor (ProcessPoolExecutor, ThreadPoolExecutor, a Dask "
        f"distributed Client or its get_executor()) with a submit method, got {type(executor).__name__}")


def normalize_wrt(wrt: Any) -> Optional[Tuple[Any, ...]]:
    """``wrt`` as a tuple of entries (positions, names, or array objects), or None for "everything"."""
    if wrt is None:
        return None
    if isinstance(wrt, (list, tuple)):
        if not wrt:
            raise InvalidArgumentError("wrt: expected None, an argument position, a name, or a non-empty list of them; got an empty list")
        return tuple(wrt)
    return (wrt,)


def validate_kwargs(kwargs: Any) -> Mapping[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidArgumentError(f"kwargs: expected a dict of keyword arguments for fn, got {type(kwargs).__name__}")
    return dict(kwargs)

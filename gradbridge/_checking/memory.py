"""The memory budget of a check: how much a comparison may allocate, decided before it allocates.

A full check compares every entry of an ``(m, D)`` block of directional derivatives (``m`` outputs,
``D`` perturbation directions: one per input element, or one per column group when compressed). Its
large temporaries all have that shape or the dense analytic Jacobian's ``(m, n)``: the Jacobian from
unit cotangents, its projection onto the directions, the outputs at ``x0 ± h d`` per ladder level,
and the per-entry evidence of the verdict (numeric value, error, tolerance, one-sided values, ...).
Measured on dense and compressed checks, passing and failing (``tracemalloc`` peak over ``8 m D``):
25-30 copies; :data:`BYTES_PER_ENTRY` rounds that up. A check whose estimate is above the budget is
never started that way: ``mode="auto"`` takes random projections (localised by bisection, memory
linear in the sizes), a compressed check that would need the dense Jacobian to name its failing
elements reports the failing groups as they are, and ``mode="full"`` asked for explicitly raises an
:class:`~gradbridge._errors.InvalidArgumentError` that says what to do.

The default budget is half of what this process can still get: the smaller of the machine's available
memory (``MemAvailable``) and the room left under an address-space limit (``RLIMIT_AS``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional

from .._errors import InvalidArgumentError

#: float64 bytes per compared entry of a full check's ``(m, D)`` block, temporaries included.
BYTES_PER_ENTRY = 8 * 32
#: float64 bytes per entry of the dense analytic Jacobian ``(m, n)``, where it is built.
BYTES_PER_JACOBIAN_ENTRY = 8 * 3
#: Used when the operating system cannot say how much memory is available.
FALLBACK_BYTES = 4 * 2 ** 30

_UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 10 ** 3, "kib": 2 ** 10, "m": 2 ** 20, "mb": 10 ** 6, "mib": 2 ** 20,
          "g": 2 ** 30, "gb": 10 ** 9, "gib": 2 ** 30, "t": 2 ** 40, "tb": 10 ** 12, "tib": 2 ** 40}


def parse_memory(value: Any) -> Optional[int]:
    """``memory=``: None (the default budget), a number of bytes, or a string such as ``"4GiB"``."""
    if value is None:
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidArgumentError(f"memory: expected None, a number of bytes or a size such as '4GiB' or "
                                       f"'512MB', got {value!r}")
        value = float(match.group(1)) * _UNITS[unit]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 2 ** 20 \
            or value == float("inf"):
        raise InvalidArgumentError(f"memory: expected None or a budget of at least 1 MiB (bytes, or a size such as "
                                   f"'4GiB'), got {value!r}")
    return int(value)


def available_bytes() -> int:
    """What this process can still allocate: available memory, and the room under ``RLIMIT_AS``."""
    room = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    room.append(int(line.split()[1]) * 1024)
    except OSError:
        try:
            room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            room.append(max(0, soft - _address_space_used()))
    except (ImportError, OSError, ValueError):
        pass
    return min(room) if room else FALLBACK_BYTES


def _address_space_used() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def budget_bytes(memory: Optional[int]) -> int:
    """The check's budget: ``memory`` when given, else half of :func:`available_bytes`."""
    return memory if memory is not None else available_bytes() // 2


def full_check_bytes(outputs: int, directions: int, inputs: int = 0, dense: bool = False) -> int:
    """Estimated peak of a full comparison of ``outputs x directions`` entries (and of the dense
    ``outputs x inputs`` analytic Jacobian when ``dense``)."""
    jacobian = BYTES_PER_JACOBIAN_ENTRY * outputs * inputs if dense else 0
    return BYTES_PER_ENTRY * outputs * directions + jacobian


def size_text(count: float) -> str:
    """``1.5 GiB``, ``320 MiB``."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count / 2 ** 10:.3g} KiB"

"""Every default of gradbridge's options, in one place.

:func:`gradbridge.check`, :func:`gradbridge.compare` (its implementations' own checks), the validated
:class:`gradbridge._options.Options` and the pytest plugin take their defaults from here, so a default changes
in one line and the signatures, docs and validation follow.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

#: ``mode``: full unless its cost is above ``budget`` (then fast).
MODE = "auto"
#: ``order``: first derivatives.
ORDER = 1
#: ``analytic``: reverse mode, plus forward mode where fn has forward rules of its own.
ANALYTIC = "auto"
#: ``probes``: random projections per leaf in fast mode.
PROBES = 3
#: ``chunk_size``: points per call of the prepared function.
CHUNK_SIZE = 256
#: ``budget``: most evaluations plus analytic calls a full check may take under ``mode="auto"``.
BUDGET = 20_000
#: ``kinks``: a non-differentiable point is reported, not failed.
KINKS = "allow"
#: ``seed``: the seed of every random generator the check pins and of its probes.
SEED = 0
#: ``promote``: check float64 copies of every floating leaf.
PROMOTE = True
#: ``train``: modules run in eval mode.
TRAIN = False
#: ``gb.compare``'s pairwise tolerance has no constant default: it follows each implementation's measured
#: precision (see gradbridge/_comparing/differences.py).

#: The options of a check with their defaults (``eps``, ``atol``, ``rtol``, ``progress``, ``memory``: None means
#: "decided per check": the step and tolerances from measured error, progress on a terminal, half the free memory).
CHECK_DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    mode=MODE, order=ORDER, eps=None, atol=None, rtol=None, seed=SEED, probes=PROBES, analytic=ANALYTIC,
    train=TRAIN, chunk_size=CHUNK_SIZE, budget=BUDGET, kinks=KINKS, promote=PROMOTE, progress=None, memory=None))

"""The NumPy backend: plain NumPy code, checked against the user's hand-written ``grad=``.

``adapter.py`` (the adapter), ``problem.py`` (argument layout, calling ``fn``, the RNG window), ``prepared.py``
(evaluation and the VJPs from ``grad``), ``demo.py`` (the demo cases). It has nothing for the other files of a
backend folder: no batching (NumPy code is evaluated point by point), no cache (nothing is kept across checks),
no transposed VJP (a hand-written ``grad`` cannot be differentiated again), no compat (no private or
version-dependent API; the one optional import, ``ml_dtypes``' bfloat16, is a dtype lookup in ``problem.py``).

Invariant: importing this package imports NumPy only (never another framework).
"""

from __future__ import annotations

from .adapter import ADAPTER, NumpyAdapter  # noqa: F401
from .prepared import NumpyPrepared  # noqa: F401

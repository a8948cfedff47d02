"""The autograd backend: HIPS autograd (``autograd.numpy`` code, ``defvjp``/``defjvp`` rules) checked.

``adapter.py`` (the adapter, and the detection rule), ``problem.py`` (the NumPy backend's problem plus ``fn`` as
one traceable function), ``prepared.py`` (evaluation, VJPs, JVPs, ``order=2``, undefined gradients),
``transposed.py`` (``J t`` through the backward pass), ``compat.py`` (autograd's internals: the tracer, the rule
registries), ``reach.py`` (what fn's code reaches: autograd for detection, the user's primitives and their
``defjvp`` rules), ``demo.py`` (the demo cases). No ``batching.py``: autograd has no batching, so evaluation is
the NumPy backend's point-by-point loop and one VJP is one backward call. No ``cache.py``: nothing is traced
ahead or compiled, so nothing is kept across checks (``cache_size()`` is always 0).

Invariant: importing this package imports autograd (and NumPy) only; ``import gradbridge`` never imports it.
"""

from __future__ import annotations

from .adapter import ADAPTER, AutogradAdapter  # noqa: F401
from .prepared import AutogradPrepared  # noqa: F401


def clear_cache() -> None:
    """Nothing is kept across checks."""


def cache_size() -> int:
    return 0

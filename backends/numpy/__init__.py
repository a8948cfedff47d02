"""The NumPy backend (step 1 of the folder restructure: the adapter still lives in ``prepared.py``)."""

from __future__ import annotations

from .prepared import ADAPTER  # noqa: F401

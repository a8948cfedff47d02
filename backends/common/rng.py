"""Pin and restore the random number generators every backend shares: Python's and NumPy's global ones.

User code of any framework may draw from ``random`` or ``numpy.random`` (a NumPy dropout, say). Both are
re-seeded identically before every evaluation, and the states they had are put back exactly as they were
when the adapter's window around the user's code closes (see :mod:`gradbridge._process`): between
evaluations, and after the check, they are the user's.
"""

from __future__ import annotations

import contextlib
import random
from typing import Dict, Iterator

import numpy as np


#: Python's generator state right after ``random.seed(seed)``, per seed: restoring it is about twice as fast
#: as seeding again, and gives exactly the same state.
_SEEDED_PYTHON_STATES: Dict[int, tuple] = {}


class SharedRandomState:
    """Saves the global Python and NumPy RNG states on enter and restores them on exit."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._python_state = _SEEDED_PYTHON_STATES.get(seed)

    def reseed(self) -> None:
        """Put both global generators into the same state before an evaluation."""
        if self._python_state is None:
            random.seed(self.seed)
            self._python_state = _SEEDED_PYTHON_STATES.setdefault(self.seed, random.getstate())
        else:
            random.setstate(self._python_state)
        np.random.seed(self.seed % (2**32))

    @contextlib.contextmanager
    def preserved(self) -> Iterator["SharedRandomState"]:
        python_state = random.getstate()
        numpy_state = np.random.get_state(legacy=False)  # the same state, about twice as fast to save and load
        try:
            yield self
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

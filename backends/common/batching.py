"""One decision per computation: batched, or one point at a time, taken on the first chunk and kept.

Invariant: once decided, a path is kept for the rest of the check, and each decision is said once in the check's
notes (updated in place when the path changes or the batch grows). A batched path that raises or disagrees never
decides a verdict: the loop computes the numbers. Where batching can change what fn does (``torch.func.vmap``
and ``tf.vectorized_map`` of arbitrary Python, a batched VJP), the batched path replaces the point-by-point loop
only after it ran on the check's first chunk and agreed with the loop there under the internal agreement rule
(:meth:`PathChoice.verify`, :mod:`gradbridge._agreement`). JAX's ``vmap`` of a function its tracing guard found
pure is the same computation by construction, so the JAX backend decides without that comparison (a stateful
fn is sent to the eager path instead).

Every adapter uses :class:`PathChoice` for each computation it can batch (``evaluate``, ``vjp``,
``transposed``, ...); what differs per framework (how to batch, what to cache) stays in the adapter.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import numpy as np

from gradbridge._agreement import disagreement

BATCHED = "batched"
LOOP = "loop"


class PathChoice:
    """The path of one computation of one check: undecided, ``"batched"`` or ``"loop"``.

    Args:
        notes: the prepared function's notes, where the decision is said (one note, kept current).
        describe_batched: the note for the batched path given the largest batch run so far.
    """

    def __init__(self, notes: List[str], describe_batched: Callable[[int], str]) -> None:
        self.notes = notes
        self.describe_batched = describe_batched
        self.path: Optional[str] = None
        self.largest = 0
        self._note: Optional[str] = None

    @property
    def undecided(self) -> bool:
        return self.path is None

    @property
    def batched(self) -> bool:
        return self.path == BATCHED

    @property
    def looped(self) -> bool:
        return self.path == LOOP

    def use_batched(self, size: int = 0) -> None:
        """Batched from now on; ``size`` rows ran in the latest batch."""
        self.path = BATCHED
        self.largest = max(self.largest, size)
        self._say(self.describe_batched(self.largest))

    def use_loop(self, reason: str) -> None:
        """The loop from now on, for ``reason`` (a sentence saying why, shown in the notes)."""
        self.path = LOOP
        self._say(reason)

    def verify(self, batched: np.ndarray, looped: np.ndarray, eps: float) -> Optional[str]:
        """None when the batched rows agree with the looped ones (the same points); else why not."""
        return disagreement(batched, looped, eps)

    def _say(self, note: str) -> None:
        if self._note is not None and self._note in self.notes:
            self.notes[self.notes.index(self._note)] = note
        else:
            self.notes.append(note)
        self._note = note


def path_choices(notes: List[str], descriptions: Dict[str, Callable[[int], str]]) -> Dict[str, PathChoice]:
    """One :class:`PathChoice` per computation name, sharing ``notes``."""
    return {what: PathChoice(notes, describe) for what, describe in descriptions.items()}

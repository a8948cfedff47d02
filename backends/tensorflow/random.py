"""TensorFlow's random state during a check: pinned before every evaluation, the user's put back after.

Invariant: inside a window (see :mod:`gradbridge._process`) every evaluation of ``fn`` starts from the same
TensorFlow randomness (global seed, operation seeds, the global ``tf.random.Generator``; the kernel cache too,
for functions that draw from stateful random kernels); when the window closes, also by an exception, the
user's global seed, operation-seed sequence, global generator (object and state) and Keras' global seed
generator are exactly as they were. The one thing not restorable is a cleared kernel cache.

(This module is ``gradbridge.backends.tensorflow.random``; imports are absolute, so ``import random`` anywhere,
here included, is the standard library's.)
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf

from . import compat

#: The seeded global generator that stands in while the user has none, and its seeded state, one per seed,
#: shared by checks (creating one makes a variable, about 1 ms). Every check starts it from the seeded state,
#: whatever drew from it in between (fn may keep it: ``tf.random.get_global_generator()``).
STAND_IN_GENERATORS: Dict[int, Tuple[tf.random.Generator, np.ndarray]] = {}


def stand_in_generator(seed: int) -> Tuple[tf.random.Generator, np.ndarray]:
    found = STAND_IN_GENERATORS.get(seed)
    if found is None:
        generator = tf.random.Generator.from_seed(seed)
        found = STAND_IN_GENERATORS.setdefault(seed, (generator, generator.state.numpy().copy()))
    return found


class TensorFlowRandomState:
    """Pins TensorFlow's random sources before each evaluation and puts the user's back afterwards.

    Before each evaluation: the global seed and the generator of operation seeds derived from it are
    reset (what ``tf.random.set_seed`` does), the global ``tf.random.Generator`` is reset to its state at
    the start of the check (a seeded one, owned by the check, stands in when the user has none), and, only
    for functions that draw from stateful random kernels (``tf.random.normal`` and friends; the probe finds
    out), TensorFlow's kernel cache is cleared, which is what makes such kernels start over.

    Restored exactly afterwards: the global seed, the operation-seed generator and its state, the global
    generator (object and state) and Keras' global seed generator. Not restorable: a cleared kernel cache,
    so eager random ops with an explicit op seed restart their sequence after a check of such a function.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.clear_kernel_cache = True  # until the probe shows the function does not need it
        self._active: Optional[tf.random.Generator] = None
        self._active_state: Optional[np.ndarray] = None

    def reseed(self) -> None:
        if self.clear_kernel_cache:
            tf.random.set_seed(self.seed)
        else:  # the same seeds, without the (slow, irreversible) cache clearing of tf.random.set_seed
            compat.set_seeds_keeping_kernels(self.seed)
        if self._active is not None and self._active_state is not None:
            self._active.reset(self._active_state)

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        seeds = compat.SeedState()
        user_generator = compat.global_generator()
        keras_state = compat.keras_global_state()
        keras_generator = keras_state.get_global_attribute("global_seed_generator") if keras_state else None
        try:
            if user_generator is None:
                stand_in, seeded = stand_in_generator(self.seed)
                stand_in.reset(seeded)
                self._active, self._active_state = stand_in, seeded
            else:
                self._active = user_generator
                self._active_state = user_generator.state.numpy().copy()
            compat.set_global_generator(self._active)
            yield
        finally:
            seeds.restore()
            if self._active is not None and self._active_state is not None:
                self._active.reset(self._active_state)
            compat.set_global_generator(user_generator)
            if keras_state is not None:
                keras_state.set_global_attribute("global_seed_generator", keras_generator)
            self._active = None
            self._active_state = None

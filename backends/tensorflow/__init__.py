"""The TensorFlow backend (step 1 of the folder restructure: the adapter still lives in ``prepared.py``)."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the first import of TensorFlow: no INFO/WARNING spam

from .prepared import ADAPTER, MIN_BATCH_ROWS, TensorFlowPrepared, cache_size, clear_cache  # noqa: E402,F401

"""PyTorch backend (being split into a folder per backend; see prepared.py for now)."""

from .prepared import ADAPTER, TorchPrepared, cache_size, clear_cache  # noqa: F401

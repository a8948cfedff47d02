"""The JAX backend (being split into a folder: step 1, the module moved whole to ``prepared.py``)."""

from .prepared import ADAPTER, JaxAdapter, JaxPrepared, JaxProblem, cache_size, clear_cache

__all__ = ["ADAPTER", "JaxAdapter", "JaxPrepared", "JaxProblem", "cache_size", "clear_cache"]

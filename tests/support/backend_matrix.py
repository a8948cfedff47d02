"""Which backends the tests run on, taken from the registry, and how a missing one is handled.

Locally a missing framework is a visible skip. In CI (``CI=true``) every backend gradbridge has an
adapter for is required, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os

from gradbridge import testing
from gradbridge._registry import builtin_names

ALL_BACKENDS = tuple(builtin_names())


def _require_all() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_backend(name: str) -> None:
    """Skip (locally) or fail (in CI) when the framework or its adapter is missing."""
    testing.require_backend(name, require_all=_require_all())

"""Shared fixtures: the ``backend`` fixture runs a test once per backend.

Locally a missing framework is a visible skip. In CI (``CI=true``) every backend gradbridge has an
adapter for is required, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os

import pytest

from gradbridge import testing

ALL_BACKENDS = ("numpy", "torch", "jax", "tensorflow")


def _require_all() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_backend(name: str) -> None:
    """Skip (locally) or fail (in CI) when the framework or its adapter is missing."""
    testing.require_backend(name, require_all=_require_all())


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ALL_BACKENDS])
def backend(request) -> str:
    require_backend(request.param)
    return request.param

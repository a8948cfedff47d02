"""Shared fixtures: the ``backend`` fixture runs a test once per backend.

Locally a missing framework is a visible skip. In CI (``CI=true``) every backend gradbridge has an
adapter for is required, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os

import pytest

from gradbridge import _registry

ALL_BACKENDS = ("numpy", "torch", "jax", "tensorflow")


def _require_all() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_backend(name: str) -> None:
    """Skip (locally) or fail (in CI) when the framework or its adapter is missing."""
    missing = None
    if not _registry.framework_installed(name):
        missing = f"{name} is not installed ({_registry.install_hint(name)})"
    elif not _registry.adapter_exists(name):
        missing = f"gradbridge has no {name} adapter yet"
    if missing is None:
        return
    if _require_all() and _registry.adapter_exists(name):
        pytest.fail(f"CI requires every backend: {missing}")
    pytest.skip(missing)


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ALL_BACKENDS])
def backend(request) -> str:
    require_backend(request.param)
    return request.param

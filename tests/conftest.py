"""Shared fixtures: the ``backend`` fixture runs a test once per registered backend
(``tests/support/backend_matrix.py``)."""

from __future__ import annotations

import pytest

from backend_matrix import ALL_BACKENDS, require_backend


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in ALL_BACKENDS])
def backend(request) -> str:
    require_backend(request.param)
    return request.param

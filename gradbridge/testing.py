"""Helpers for test suites that check gradients on several backends.

>>> from gradbridge.testing import parametrize_backends
>>> @parametrize_backends()                  # numpy, torch, jax, tensorflow
... def test_my_op(backend, gradcheck): ...

A backend whose framework is not installed becomes a visible skip with the install hint
(``torch is not installed: pip install "gradbridge[torch]"``). With the ini option
``gradbridge_require_backends = true`` (or ``--gradbridge-require-backends``) the gradbridge pytest plugin
turns those skips into errors, so a CI job that is meant to test every backend cannot go green by
skipping. A backend gradbridge itself has no adapter for is always skipped: installing cannot fix it.

This module imports pytest; gradbridge itself never imports it (only test suites do). It imports no
framework: whether one is installed is decided without importing it.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, TypeVar

import pytest

from . import _registry

#: Every backend gradbridge knows, in the order tests are parametrized.
BACKENDS = tuple(_registry.builtin_names())

#: The marker every backend parameter carries: ``gradbridge_backend(name="torch")``. The plugin reads it to
#: fail instead of skip when all backends are required; ``-m "gradbridge_backend(name='torch')"`` selects
#: the torch cases (pytest >= 8.3).
MARKER = "gradbridge_backend"

_F = TypeVar("_F", bound=Callable[..., object])


def backend_name(name: str) -> str:
    """The canonical name of a backend (``"pytorch"`` -> ``"torch"``, ``"tf"`` -> ``"tensorflow"``).

    Raises:
        ValueError: the name is not a backend gradbridge knows (a typo should not become a silent skip).
    """
    if not isinstance(name, str):
        raise ValueError(f"backend names are strings, got {name!r}")
    key = _registry.resolve_name(name)
    if key is None:
        raise ValueError(f"unknown backend {name!r}; gradbridge knows {', '.join(BACKENDS)}")
    return key


def missing_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run here, or None when it can. Imports no framework."""
    key = backend_name(name)
    if not _registry.framework_installed(key):
        return f"{_registry.entry(key).framework_module} is not installed: {_registry.install_hint(key)}"
    if not _registry.adapter_exists(key):
        return f"gradbridge {_version()} has no {key} adapter"
    return None


def requirable(name: str) -> bool:
    """True when a missing backend ``name`` could be installed (its adapter exists): only then does
    requiring every backend turn its skip into a failure."""
    return _registry.adapter_exists(backend_name(name))


def backends_params(*names: str) -> List["pytest.param"]:
    """``pytest.param`` entries for ``names`` (default: every backend), with ids equal to the names.

    A backend that cannot run here carries a skip mark whose reason says how to install it. Use them
    anywhere pytest takes parameters: ``@pytest.mark.parametrize("backend", backends_params())`` or
    ``@pytest.fixture(params=backends_params("torch", "jax"))``.
    """
    keys = _unique([backend_name(n) for n in names] if names else list(BACKENDS))
    params = []
    for key in keys:
        marks = [getattr(pytest.mark, MARKER)(name=key)]
        reason = missing_reason(key)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(key, marks=marks, id=key))
    return params


def parametrize_backends(*names: str, argname: str = "backend") -> Callable[[_F], _F]:
    """Decorator: run the test once per backend in ``names`` (default: every built-in backend), passing the backend's
    name as the argument ``argname`` (``"backend"`` by default). Missing frameworks are visible skips.

    >>> @parametrize_backends("torch", "jax")
    ... def test_op(backend): ...
    """
    if names and callable(names[0]) and not isinstance(names[0], str):
        raise TypeError("parametrize_backends needs parentheses: @parametrize_backends() or "
                        "@parametrize_backends('torch', 'jax')")
    return pytest.mark.parametrize(argname, backends_params(*names))


def require_backend(name: str, require_all: bool = False) -> None:
    """Inside a test: skip it when backend ``name`` cannot run here, or fail it when ``require_all`` is
    true and installing the framework would fix it."""
    __tracebackhide__ = True
    reason = missing_reason(name)
    if reason is None:
        return
    if require_all and requirable(name):
        pytest.fail(f"every backend is required (gradbridge_require_backends): {reason}", pytrace=False)
    pytest.skip(reason)


def _unique(keys: Sequence[str]) -> List[str]:
    seen: List[str] = []
    for key in keys:
        if key not in seen:
            seen.append(key)
    return seen


def _version() -> str:
    from . import __version__

    return __version__

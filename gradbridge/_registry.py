"""Find the adapter for a check: by name, or by looking at the values passed in.

Detection follows einops: a framework is only considered when its module is already in
``sys.modules``, so deciding never imports a framework. Adapters are imported lazily by name.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, Dict, Iterable, List

from ._adapter import Adapter
from ._errors import BackendNotAvailableError, InvalidArgumentError

#: Backend name -> (module of the adapter, framework module it needs, pip extra).
KNOWN_BACKENDS: Dict[str, tuple] = {
    "numpy": ("gradbridge.backends.numpy", "numpy", None),
    "torch": ("gradbridge.backends.torch", "torch", "torch"),
    "jax": ("gradbridge.backends.jax", "jax", "jax"),
    "tensorflow": ("gradbridge.backends.tensorflow", "tensorflow", "tensorflow"),
}

_ALIASES = {"pytorch": "torch", "tf": "tensorflow", "np": "numpy"}
#: How messages name the library an array's top-level module belongs to.
_DISPLAY_NAMES = {"numpy": "NumPy", "torch": "torch", "jax": "JAX", "jaxlib": "JAX", "tensorflow": "TensorFlow",
                  "keras": "Keras"}


def library_display_name(module: str) -> str:
    """``NumPy`` for ``numpy``, ``JAX`` for ``jaxlib``: the library a top-level module name belongs to."""
    return _DISPLAY_NAMES.get(module, module)
_loaded: Dict[str, Adapter] = {}


def install_hint(name: str) -> str:
    extra = KNOWN_BACKENDS[name][2]
    return f'pip install "gradbridge[{extra}]"' if extra else "pip install numpy"


def framework_installed(name: str) -> bool:
    """True when the framework behind backend ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(KNOWN_BACKENDS[name][1]) is not None


def adapter_exists(name: str) -> bool:
    """True when this gradbridge ships an adapter for backend ``name``."""
    return importlib.util.find_spec(KNOWN_BACKENDS[name][0]) is not None


def available_backends() -> list:
    """Backends usable here: the framework is installed and gradbridge has an adapter for it."""
    return [n for n in KNOWN_BACKENDS if framework_installed(n) and adapter_exists(n)]


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name`` (``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"``).

    Raises:
        InvalidArgumentError: the name is unknown.
        BackendNotAvailableError: the framework is not installed.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"backend: expected one of {sorted(KNOWN_BACKENDS)} or None, got {name!r}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in KNOWN_BACKENDS:
        raise InvalidArgumentError(f"backend: unknown backend {name!r}; expected one of {sorted(KNOWN_BACKENDS)} or None")
    if key in _loaded:
        return _loaded[key]
    if not framework_installed(key):
        raise BackendNotAvailableError(
            f"backend {key!r} needs the {KNOWN_BACKENDS[key][1]} package, which is not installed: {install_hint(key)}")
    try:
        module = importlib.import_module(KNOWN_BACKENDS[key][0])
    except ModuleNotFoundError as exc:
        if exc.name != KNOWN_BACKENDS[key][0]:
            raise
        raise BackendNotAvailableError(f"backend {key!r}: this version of gradbridge has no adapter for it yet") from None
    adapter = module.ADAPTER
    _loaded[key] = adapter
    return adapter


def loaded_adapters() -> List[Adapter]:
    """Adapters whose framework is already imported by the user (numpy last: it is everyone's fallback)."""
    import sys

    names = [n for n in KNOWN_BACKENDS if n != "numpy" and sys.modules.get(KNOWN_BACKENDS[n][1]) is not None]
    return [get_adapter(n) for n in names] + [get_adapter("numpy")]


def detect_adapter(values: Iterable[Any]) -> Adapter:
    """The adapter that owns the given values (arguments, parameters, the function itself).

    A framework array or module decides; plain NumPy arrays and Python numbers fall back to NumPy.

    Raises:
        InvalidArgumentError: values of two different frameworks are mixed (pass ``backend=``).
    """
    values = list(values)
    owners = []
    for adapter in loaded_adapters():
        if adapter.name == "numpy":
            continue
        if any(adapter.owns(v) for v in values):
            owners.append(adapter)
    if len(owners) > 1:
        raise InvalidArgumentError(
            "backend: the arguments mix arrays of " + " and ".join(a.name for a in owners)
            + "; pass backend='...' to say which framework computes the gradients")
    return owners[0] if owners else get_adapter("numpy")

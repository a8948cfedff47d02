"""Which backends exist, what they need, and finding the adapter for a check (by name or by its values).

The registry owns everything the rest of gradbridge knows about a backend without importing it: its name and
aliases, the adapter module, the framework module whose presence in ``sys.modules`` means the user works with
it, the pip extra that installs it, and how messages name its library. Detection follows einops: a framework
is only considered when its module is already in ``sys.modules``, so deciding never imports a framework.
Adapters are imported lazily by name.

Backends outside gradbridge register through the ``gradbridge.backends`` entry-point group: an entry point
named after the backend whose object is a :class:`BackendEntry`. They are read only when a name is not one of
the built-in backends or when every backend is listed, so ``import gradbridge`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from ._adapter import Adapter
from ._errors import BackendNotAvailableError, InvalidArgumentError

ENTRY_POINT_GROUP = "gradbridge.backends"


@dataclass(frozen=True)
class BackendEntry:
    """One backend, as the registry knows it before importing anything.

    Attributes:
        name: the backend's name (``backend="torch"``).
        adapter_module: the module defining ``ADAPTER``.
        framework_module: the top-level module the framework is imported as; its presence in ``sys.modules``
            means the user works with the framework (detection), its absence from the environment that the
            backend is not installed.
        extra: the gradbridge extra that installs the framework (``pip install "gradbridge[extra]"``), or
            None when a plain ``pip install`` of ``framework_module``'s package does.
        display: how messages name the library (``NumPy``, ``JAX``).
        aliases: other names accepted for ``backend=``.
        library_modules: further top-level modules whose arrays belong to this library (``jaxlib``, ``keras``).
        detect: whether a value owned by this backend picks it without ``backend=``.
        by_code: the backend is recognised from ``fn``'s code, not from array types (autograd's arrays are
            NumPy's): a check with a hand-written ``grad=`` then stays on the NumPy backend, since the
            framework's differentiation would not be used anyway.
    """

    name: str
    adapter_module: str
    framework_module: str
    extra: Optional[str]
    display: str
    aliases: Tuple[str, ...] = ()
    library_modules: Tuple[str, ...] = ()
    detect: bool = True
    by_code: bool = False

    @property
    def install_hint(self) -> str:
        if self.extra:
            return f'pip install "gradbridge[{self.extra}]"'
        return f"pip install {self.framework_module}"


#: The backends shipped with gradbridge, NumPy first (everyone's fallback).
BUILTIN: Tuple[BackendEntry, ...] = (
    BackendEntry("numpy", "gradbridge.backends.numpy", "numpy", None, "NumPy", aliases=("np",)),
    BackendEntry("torch", "gradbridge.backends.torch", "torch", "torch", "torch", aliases=("pytorch",)),
    BackendEntry("jax", "gradbridge.backends.jax", "jax", "jax", "JAX", library_modules=("jaxlib",)),
    BackendEntry("tensorflow", "gradbridge.backends.tensorflow", "tensorflow", "tensorflow", "TensorFlow",
                 aliases=("tf",), library_modules=("keras",)),
    # detect: autograd's arrays are NumPy's, so its adapter owns only fn itself (an autograd primitive, or code
    # that uses autograd.numpy/autograd.scipy): see gradbridge.backends.autograd.adapter
    BackendEntry("autograd", "gradbridge.backends.autograd", "autograd", "autograd", "autograd",
                 aliases=("hips-autograd",), by_code=True),
)

_entries: Dict[str, BackendEntry] = {entry.name: entry for entry in BUILTIN}
_plugins_read = False
_loaded: Dict[str, Adapter] = {}


def _read_plugins() -> None:
    """Add the backends registered by other packages (once)."""
    global _plugins_read
    if _plugins_read:
        return
    _plugins_read = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry = point.load()
        except Exception:  # a broken plugin must not break gradbridge; it is simply not listed
            continue
        if isinstance(entry, BackendEntry) and entry.name not in _entries:
            _entries[entry.name] = entry


def entries() -> List[BackendEntry]:
    """Every registered backend: the built-in ones, then those of other packages."""
    _read_plugins()
    return list(_entries.values())


def names() -> List[str]:
    """The names of every registered backend."""
    return [entry.name for entry in entries()]


def builtin_names() -> List[str]:
    """The names of the backends gradbridge ships."""
    return [entry.name for entry in BUILTIN]


def resolve_name(name: str) -> Optional[str]:
    """The backend called ``name`` or one of its aliases (any case), or None."""
    key = name.lower()
    for attempt in (False, True):
        for entry in _entries.values():
            if key == entry.name or key in entry.aliases:
                return entry.name
        if attempt or _plugins_read:
            return None
        _read_plugins()
    return None


def entry(name: str) -> BackendEntry:
    """The registry entry of backend ``name`` (a registered name, not an alias)."""
    return _entries[name]


def library_display_name(module: str) -> str:
    """``NumPy`` for ``numpy``, ``JAX`` for ``jaxlib``: the library a top-level module name belongs to."""
    for known in _entries.values():
        if module == known.framework_module or module in known.library_modules:
            return known.display
    return module


def install_hint(name: str) -> str:
    return _entries[name].install_hint


def framework_installed(name: str) -> bool:
    """True when the framework behind backend ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(_entries[name].framework_module) is not None


def adapter_exists(name: str) -> bool:
    """True when an adapter for backend ``name`` is installed."""
    module = _entries[name].adapter_module
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the adapter's parent package is missing
        return False


def available_backends() -> List[str]:
    """Backends usable here: the framework is installed and an adapter for it exists."""
    return [n for n in names() if framework_installed(n) and adapter_exists(n)]


def get_adapter(name: str) -> Adapter:
    """The adapter called ``name`` (``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"``, ``"autograd"``, ...).

    Raises:
        InvalidArgumentError: the name is unknown.
        BackendNotAvailableError: the framework is not installed.
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"backend: expected one of {sorted(names())} or None, got {name!r}")
    key = resolve_name(name)
    if key is None:
        raise InvalidArgumentError(f"backend: unknown backend {name!r}; expected one of {sorted(names())} or None")
    if key in _loaded:
        return _loaded[key]
    known = _entries[key]
    if not framework_installed(key):
        raise BackendNotAvailableError(
            f"backend {key!r} needs the {known.framework_module} package, which is not installed: {known.install_hint}")
    try:
        module = importlib.import_module(known.adapter_module)
    except ModuleNotFoundError as exc:
        if exc.name != known.adapter_module:
            raise
        raise BackendNotAvailableError(f"backend {key!r}: this version of gradbridge has no adapter for it yet") from None
    adapter = module.ADAPTER
    _loaded[key] = adapter
    return adapter


def loaded_adapters(hand_written: bool = False) -> List[Adapter]:
    """Adapters whose framework the user already imported and that detection may pick (numpy last: it is
    everyone's fallback); ``hand_written``: a ``grad=`` is given, so backends recognised by code are left out."""
    chosen = [e.name for e in _entries.values()
              if e.name != "numpy" and e.detect and not (hand_written and e.by_code)
              and sys.modules.get(e.framework_module) is not None]
    return [get_adapter(n) for n in chosen] + [get_adapter("numpy")]


def imported_adapters() -> List[Adapter]:
    """Every adapter imported so far in this process (those a check has used)."""
    return list(_loaded.values())


def detect_adapter(values: Iterable[Any], hand_written: bool = False) -> Adapter:
    """The adapter that owns the given values (arguments, parameters, the function itself).

    A framework array or module decides; plain NumPy arrays and Python numbers fall back to NumPy.
    ``hand_written``: the check has a ``grad=`` (see :attr:`BackendEntry.by_code`).

    Raises:
        InvalidArgumentError: values of two different frameworks are mixed (pass ``backend=``).
    """
    values = list(values)
    owners = []
    for adapter in loaded_adapters(hand_written):
        if adapter.name == "numpy":
            continue
        if any(adapter.owns(v) for v in values):
            owners.append(adapter)
    if len(owners) > 1:
        raise InvalidArgumentError(
            "backend: the arguments mix arrays of " + " and ".join(a.name for a in owners)
            + "; pass backend='...' to say which framework computes the gradients")
    return owners[0] if owners else get_adapter("numpy")

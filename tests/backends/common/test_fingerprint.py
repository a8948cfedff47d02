"""The shared function fingerprint and weak per-function cache (``gradbridge._fingerprint``), on real objects."""

from __future__ import annotations

import functools
import gc
import json
import subprocess
import sys
import textwrap
import threading
import time
import types
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import pytest

from gradbridge.backends.common.cache import WeakFunctionCache
from gradbridge.backends.common.fingerprint import BASE_LIBRARIES, Fingerprinter, UNHANDLED, Uncacheable, digest, owners, same_but_ints, weak_callable


def _function(source: str, **namespace: Any) -> Callable[..., Any]:
    """``fn`` defined by ``source`` in a fresh module namespace holding ``namespace`` (its globals)."""
    scope: Dict[str, Any] = {"__name__": "user_module", **namespace}
    exec(source, scope)
    return scope["fn"]


def _token(value: Any, walker: type = Fingerprinter) -> Any:
    return walker().environment(value)


class _Holder:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def method(self, x: float) -> float:
        return self.scale * x


class _Partial(functools.partial):
    """A partial of a user's module (``functools.partial`` itself is a library object)."""


class _NoWeakRef:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 1.0

    def __call__(self, x: float) -> float:
        return x


# --- the walk ---


def test_an_array_read_by_fn_is_keyed_by_its_contents() -> None:
    fn = _function("def fn(x):\n    return W @ x\n", W=np.ones((2, 3)))
    before = _token(fn)
    assert _token(fn) == before
    fn.__globals__["W"] = np.ones((2, 3))  # another array, the same contents
    assert _token(fn) == before
    fn.__globals__["W"][0, 1] = 5.0  # changed in place
    assert _token(fn) != before
    fn.__globals__["W"] = np.ones((3, 2))  # the same contents, another shape
    assert _token(fn) != before


@pytest.mark.parametrize("name, value, other", [
    ("SCALE", 2.0, 3.0), ("FACTOR", 2, 3), ("FLAG", True, False), ("PHASE", 1j, 2j), ("MODE", "sum", "mean"),
    ("RAW", b"a", b"b"), ("OFFSET", np.float32(1.0), np.float32(1.5)), ("COUNT", 0, 7),
])
def test_python_and_numpy_scalars_are_keyed_by_value(name: str, value: Any, other: Any) -> None:
    fn = _function("def fn(x):\n    global COUNT\n    COUNT += 1\n"
                   "    return SCALE * FACTOR * x + np.float32(OFFSET) if FLAG else PHASE, MODE, RAW\n",
                   np=np, SCALE=2.0, FACTOR=2, FLAG=True, PHASE=1j, MODE="sum", RAW=b"a", COUNT=0,
                   OFFSET=np.float32(1.0))
    fn.__globals__[name] = value
    before = _token(fn)
    fn.__globals__[name] = other
    assert _token(fn) != before
    fn.__globals__[name] = value
    assert _token(fn) == before


def test_an_int_is_not_keyed_as_the_equal_bool_or_float() -> None:
    fn = _function("def fn(x):\n    return S * x\n", S=1)
    before = _token(fn)
    for other in (True, 1.0, np.int64(1)):
        fn.__globals__["S"] = other
        assert _token(fn) != before


def test_same_but_ints_leaves_out_ints_and_containers_of_ints_only() -> None:
    holder = _Holder(2.0)
    holder.calls = 0
    fn = _function("def fn(x):\n    return SCALE * H.scale * x + len(LOG) + COUNT + len(TABLE)\n",
                   SCALE=2.0, H=holder, LOG=[], COUNT=0, TABLE={"a": 1, "b": 2.0})
    before = _token(fn)
    assert same_but_ints(before, before)
    fn.__globals__["COUNT"] = 3  # a counter fn bumps
    fn.__globals__["LOG"].extend([1, 1])  # a log of ints fn appends to
    holder.calls = 5  # a counter in the state of an object fn reads
    fn.__globals__["TABLE"]["a"] = 4
    assert _token(fn) != before and same_but_ints(before, _token(fn))
    after = _token(fn)
    for name, value in (("SCALE", 3.0), ("SCALE", 2), ("COUNT", 3.0), ("COUNT", True), ("LOG", [1.0]),
                        ("LOG", [1, "a"]), ("H", _Holder(2.0)), ("TABLE", {"a": 2.0, "b": 1})):
        kept = fn.__globals__[name]
        fn.__globals__[name] = value
        assert not same_but_ints(after, _token(fn)), (name, value)
        fn.__globals__[name] = kept
    assert _token(fn) == after
    holder.scale = 2.5
    assert not same_but_ints(after, _token(fn))


def test_closures_defaults_partials_and_bound_methods_are_followed() -> None:
    def make(scale: float) -> Callable[..., Any]:
        def inner(x: float, shift: float = 1.0) -> float:
            return scale * x + shift
        return inner

    assert _token(make(2.0)) != _token(make(3.0))
    inner = make(2.0)
    before = _token(inner)
    inner.__defaults__ = (4.0,)
    assert _token(inner) != before

    partial = _Partial(make(2.0), shift=1.0)
    before = _token(partial)
    assert before[0] == "partial"
    partial.keywords["shift"] = 2.0
    assert _token(partial) != before
    library_partial = functools.partial(make(2.0), shift=1.0)  # followed too, though its module is functools
    before = _token(library_partial)
    assert before[0] == "partial"
    library_partial.keywords["shift"] = 2.0
    assert _token(library_partial) != before

    holder = _Holder(2.0)
    before = _token(holder.method)
    assert _token(holder.method) == before  # a fresh method object each access, the same function and object
    holder.scale = 3.0
    assert _token(holder.method) != before


def test_an_empty_closure_cell_is_keyed() -> None:
    def outer() -> Tuple[Any, Any]:
        def fn(x: float) -> float:
            return later * x
        token = _token(fn)
        later = 1.0
        return token, _token(fn)

    empty, filled = outer()
    assert empty[2][2] == (("empty",),) and filled[2][2] == ((float, 1.0),)


def test_objects_are_keyed_by_identity_and_weak_references_say_whether_they_live() -> None:
    fn = _function("def fn(x):\n    return H.method(x)\n", H=_Holder(2.0))
    walker = Fingerprinter()
    token = walker.environment(fn)
    assert walker.alive()
    fn.__globals__["H"] = _Holder(2.0)  # equal state, another object
    assert _token(fn) != token
    gc.collect()
    assert not walker.alive()


def test_recursion_and_shared_objects_are_walked_once() -> None:
    shared = np.arange(3.0)
    fn = _function("def fn(x):\n    return fn(x - 1) if x else A + B\n", A=shared, B=shared)
    token = _token(fn)
    referenced = dict(token[2][1])
    assert referenced["A"][0] == "ndarray" and referenced["B"] == ("seen", 1) and referenced["fn"] == ("seen", 0)
    assert _token(fn) == token


def test_library_objects_are_keyed_by_identity_only() -> None:
    """A function of a package in ``libraries`` is not followed: its globals are not the user's."""
    fn = _function("def fn(x):\n    return SCALE * x\n", SCALE=2.0)
    fn.__module__ = "somelib.ops"

    class Walker(Fingerprinter):
        libraries = BASE_LIBRARIES | {"somelib"}

    assert Walker().is_library(fn) and not Fingerprinter().is_library(fn)
    followed, kept = _token(fn), _token(fn, Walker)
    fn.__globals__["SCALE"] = 3.0
    assert _token(fn) != followed
    assert _token(fn, Walker) == kept
    assert Fingerprinter().is_library(np.linspace) and Fingerprinter().is_library(np.float64)


def test_modules_builtins_and_wrapped_functions() -> None:
    fn = _function("def fn(x):\n    return np.sin(len(x))\n", np=np)
    assert dict(_token(fn)[2][1]) == {"np": ("builtin", "numpy", id(np))}
    inner = _function("def fn(x):\n    return SCALE * x\n", SCALE=2.0)

    class Wrapper:
        def __init__(self, wrapped: Callable[..., Any]) -> None:
            self.__wrapped__ = wrapped

    wrapper = Wrapper(inner)
    before = _token(wrapper)
    assert before[0] == "wrapped"
    inner.__globals__["SCALE"] = 3.0
    assert _token(wrapper) != before


def test_the_adapter_hook_comes_before_the_generic_rules() -> None:
    class Tensorish:
        def __init__(self) -> None:
            self.values = [1.0, 2.0]

    class Walker(Fingerprinter):
        def adapter_object(self, value: Any, depth: int) -> Any:
            return ("tensorish", self.identity(value)) if isinstance(value, Tensorish) else UNHANDLED

    tensor = Tensorish()
    fn = _function("def fn(x):\n    return T\n", T=tensor)
    generic, hooked = _token(fn), _token(fn, Walker)
    assert hooked[2][1][0][1] == ("tensorish", ("id", id(tensor)))
    tensor.values.append(3.0)  # the generic walk follows __dict__; the hook keys the object by identity only
    assert _token(fn) != generic and _token(fn, Walker) == hooked


def test_a_policy_for_plain_values_can_be_replaced() -> None:
    class NoScalars(Fingerprinter):
        def plain(self, value: Any) -> Any:
            return None if isinstance(value, (type(None), int, float)) else UNHANDLED

    fn = _function("def fn(x):\n    return SCALE * x\n", SCALE=2.0)
    before = _token(fn, NoScalars)
    fn.__globals__["SCALE"] = 3.0
    assert _token(fn, NoScalars) == before


@pytest.mark.parametrize("value", [
    np.array([object()]),  # an object array has no contents to hash
    _NoWeakRef(),  # keyed by identity, but no weak reference can prove it alive
    [_Holder(1.0) for _ in range(Fingerprinter.limit + 10)],  # too much state
    functools.reduce(lambda inner, _: [inner], range(Fingerprinter.max_depth + 2), [1.0]),  # nested too deep
], ids=["object-array", "no-weakref", "too-many", "too-deep"])
def test_what_cannot_be_keyed_safely_is_uncacheable(value: Any) -> None:
    fn = _function("def fn(x):\n    return V\n", V=value)
    with pytest.raises(Uncacheable):
        _token(fn)


def test_digest_follows_contents_not_layout() -> None:
    a = np.arange(6.0).reshape(2, 3)
    assert digest(a) == digest(np.ascontiguousarray(a)) == digest(a.copy(order="F"))
    assert digest(a) != digest(a + 1) and len(digest(a)) == 16
    assert digest(np.float64(2.0) * np.ones(())) == digest(np.array(2.0))


# --- the weak per-function cache ---


def test_entries_are_kept_per_function_and_key() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache()

    def f(x: float) -> float:
        return x

    def g(x: float) -> float:
        return x

    assert cache.put(f, ("a",), "f-a") and cache.put(f, ("b",), "f-b") and cache.put(g, ("a",), "g-a")
    assert cache.get(f, ("a",)) == "f-a" and cache.get(g, ("a",)) == "g-a" and cache.get(g, ("b",)) is None
    assert len(cache) == 3
    cache.put(f, ("a",), "f-a2")
    assert cache.get(f, ("a",)) == "f-a2" and len(cache) == 3
    cache.clear()
    assert len(cache) == 0 and cache.get(f, ("a",)) is None


def test_the_cache_does_not_keep_the_function_alive() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache()
    fn = _function("def fn(x):\n    return x\n")
    cache.put(fn, 1, "entry")
    gone = weakref.ref(fn)
    del fn
    gc.collect()
    assert gone() is None and len(cache) == 0


def test_a_bound_method_is_tied_to_its_function_and_object() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache()
    holder, other = _Holder(1.0), _Holder(1.0)
    assert owners(holder.method) == (_Holder.method, holder)
    cache.put(holder.method, 1, "entry")
    assert cache.get(holder.method, 1) == "entry"  # another method object, the same function and object
    assert cache.get(other.method, 1) is None
    gone = weakref.ref(holder)
    del holder
    gc.collect()
    assert gone() is None and len(cache) == 0


def test_a_slot_keeps_the_latest_stored_keys() -> None:
    cache: WeakFunctionCache[int] = WeakFunctionCache(per_function=3)

    def f(x: float) -> float:
        return x

    for key in range(3):
        cache.put(f, key, key)
    cache.put(f, 0, 10)  # stored again: now the newest
    cache.put(f, 3, 3)
    assert [cache.get(f, key) for key in range(4)] == [10, None, 2, 3] and len(cache) == 3


def test_an_entry_the_caller_rejects_is_dropped() -> None:
    cache: WeakFunctionCache[Dict[str, bool]] = WeakFunctionCache()

    def f(x: float) -> float:
        return x

    cache.put(f, 1, {"valid": True})
    assert cache.get(f, 1, keep=lambda e: e["valid"]) == {"valid": True}
    cache.get(f, 1)["valid"] = False
    assert cache.get(f, 1) == {"valid": False}  # without keep: returned as is
    assert cache.get(f, 1, keep=lambda e: e["valid"]) is None and len(cache) == 0


def test_an_entry_under_several_keys_counts_once() -> None:
    cache: WeakFunctionCache[Dict[str, int]] = WeakFunctionCache()

    def f(x: float) -> float:
        return x

    entry = {"traces": 1}
    cache.put(f, ("shape", ((int, 0),)), entry)
    cache.put(f, ("shape", ((int, 1),)), entry)
    assert cache.get(f, ("shape", ((int, 0),))) is cache.get(f, ("shape", ((int, 1),))) is entry
    assert len(cache) == 1
    cache.put(f, ("shape", ((int, 1),)), {"traces": 2})
    assert len(cache) == 2


def test_entries_are_kept_after_a_run_that_changed_only_ints() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache(per_function=4)

    def f(x: float) -> float:
        return x

    def env(count: int, scale: float = 2.0) -> Any:
        return (("COUNT", (int, count)), ("SCALE", (float, scale)))

    cache.put(f, ("shape-a", env(0)), "a")
    cache.put(f, ("shape-b", env(0)), "b")
    cache.put(f, ("shape-c", env(0, 3.0)), "c")  # another start state: not moved along
    assert not cache.keep_after_run(f, env(0), env(0))  # nothing changed
    assert not cache.keep_after_run(f, env(0), env(0, 3.0))  # a float changed: the start keys only
    assert not cache.keep_after_run(f, env(5), env(6))  # no entry was kept under env(5)
    assert cache.keep_after_run(f, env(0), env(1))
    assert cache.get(f, ("shape-a", env(1))) == "a" and cache.get(f, ("shape-b", env(1))) == "b"
    assert cache.get(f, ("shape-c", env(1, 3.0))) is None and len(cache) == 3
    assert cache.keep_after_run(f, env(1), env(2))  # the oldest keys drop out: (shape-a, 0), (shape-b, 0), ...
    assert cache.get(f, ("shape-a", env(2))) == "a" and cache.get(f, ("shape-b", env(2))) == "b"
    assert cache.get(f, ("shape-a", env(0))) is None and cache.get(f, ("shape-c", env(0, 3.0))) is None
    assert len(cache) == 2


def test_a_function_without_weak_references_is_not_kept() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache()
    fn = _NoWeakRef()
    assert not cache.put(fn, 1, "entry") and len(cache) == 0 and cache.get(fn, 1) is None


def test_weak_callable_does_not_keep_fn_alive() -> None:
    holder = _Holder(2.0)
    fn = _function("def fn(x):\n    return x\n")
    back_to_method, back_to_fn = weak_callable(holder.method), weak_callable(fn)
    assert back_to_method()(3.0) == 6.0 and back_to_fn() is fn
    del holder, fn
    gc.collect()
    assert back_to_method() is None and back_to_fn() is None
    strong = _NoWeakRef()
    assert weak_callable(strong)() is strong


# --- no framework in the core ---


def test_the_core_imports_and_names_no_framework(tmp_path: Path) -> None:
    frameworks = ("torch", "jax", "jaxlib", "tensorflow", "keras", "flax", "tf_keras")
    code = ("import sys, json, gradbridge.backends.common.fingerprint; "
            f"print(json.dumps([m for m in {frameworks!r} if m in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                            check=True)
    assert json.loads(result.stdout) == []
    import gradbridge.backends.common.fingerprint as core

    source = Path(core.__file__).read_text().lower()
    assert not [name for name in frameworks if name in source]
    assert not BASE_LIBRARIES & set(frameworks)


def test_holds_ints_finds_an_int_anywhere_and_nothing_else() -> None:
    from gradbridge.backends.common.fingerprint import holds_ints

    counter = [0]
    scale = 2.0

    def reads_counter(x):
        return x * counter[0]

    def reads_float(x):
        return x * scale

    assert holds_ints(Fingerprinter().environment(reads_counter))
    assert not holds_ints(Fingerprinter().environment(reads_float))
    assert not holds_ints(Fingerprinter().environment(lambda x: x))  # None defaults, code ids: not ints read
    assert holds_ints(("a", (float, 1.0), ((int, 3),)))
    assert not holds_ints(("id", 12345)) and not holds_ints((bool, True)) and not holds_ints(None)


# --- what the walk follows: partials, callable objects, dict keys, user modules and classes ---


def test_a_functools_partial_is_followed_to_its_function_and_arguments() -> None:
    """``functools.partial`` objects are of the ``functools`` module, a library, yet what they call and pass is
    the user's: the wrapped function's globals, the arguments and the keywords are all part of the token."""
    fn = _function("def fn(x, table, shift=0.0):\n    return SCALE * x * table[0] + shift\n", SCALE=2.0)
    table = [1.0]
    partial = functools.partial(fn, table=table, shift=1.0)
    before = _token(partial)
    assert before[0] == "partial" and _token(partial) == before
    fn.__globals__["SCALE"] = 3.0  # a global the wrapped function reads
    assert _token(partial) != before
    fn.__globals__["SCALE"] = 2.0
    table[0] = 5.0  # an argument changed in place
    assert _token(partial) != before
    table[0] = 1.0
    partial.keywords["shift"] = 4.0
    assert _token(partial) != before
    partial.keywords["shift"] = 1.0
    assert _token(partial) == before
    positional = functools.partial(fn, 1.0)
    assert _token(positional) != _token(functools.partial(fn, 2.0))


def test_a_callable_object_is_keyed_by_its_class_call_and_what_it_reads() -> None:
    namespace: Dict[str, Any] = {"__name__": "user_module", "SCALE": 2.0, "OFFSET": 1.0}
    exec(textwrap.dedent("""
        class Loss:
            factor = 2.0

            def __call__(self, x):
                return self.factor * SCALE * x + self.helper(x)

            def helper(self, x):  # reached only through __call__ (self.helper)
                return OFFSET + x
        """), namespace)
    loss = namespace["Loss"]()
    before = _token(loss)
    assert _token(loss) == before
    for name, value in (("SCALE", 3.0), ("OFFSET", 2.0)):  # globals read by __call__ and by the method it calls
        kept = namespace[name]
        namespace[name] = value
        assert _token(loss) != before, name
        namespace[name] = kept
    namespace["Loss"].factor = 3.0  # a class attribute read through the object
    assert _token(loss) != before
    namespace["Loss"].factor = 2.0
    assert _token(loss) == before


def test_dicts_are_keyed_by_their_keys_too_and_containers_keep_positions() -> None:
    fn = _function("def fn(x):\n    return CFG.get('scale', 2.0) * x + len(PARTS)\n",
                   CFG={"scale": 3.0}, PARTS=[[], 2.0])
    before = _token(fn)
    fn.__globals__["CFG"] = {"shift": 3.0}  # the same values, another key
    assert _token(fn) != before
    fn.__globals__["CFG"] = {"scale": 3.0}
    fn.__globals__["PARTS"] = [2.0, []]  # an empty container moved: the positions of the others count
    assert _token(fn) != before
    fn.__globals__["PARTS"] = [[], 2.0]
    assert _token(fn) == before
    counter = {"calls": 0}
    fn = _function("def fn(x):\n    return COUNTS\n", COUNTS=counter)
    start = _token(fn)
    counter["calls"] += 1  # an int under the same key: still bookkeeping
    assert same_but_ints(start, _token(fn))
    counter["other"] = 1.5
    assert not same_but_ints(start, _token(fn))


def test_a_class_attribute_read_by_fn_is_keyed_by_value() -> None:
    namespace: Dict[str, Any] = {"__name__": "user_module", "BASE": 1.0}
    exec(textwrap.dedent("""
        class Config:
            scale = 3.0

            class Nested:
                shift = 1.0

            @staticmethod
            def factor():
                return BASE * 2.0

            @classmethod
            def doubled(cls):
                return 2.0 * cls.scale

            @property
            def offset(self):
                return BASE

        def fn(x):
            return Config.scale * x + Config.Nested.shift + Config.factor() + Config.doubled() + Config().offset
        """), namespace)
    fn, config = namespace["fn"], namespace["Config"]
    before = _token(fn)
    assert _token(fn) == before
    for owner, name, value in ((config, "scale", 1.0), (config.Nested, "shift", 2.0)):
        kept = getattr(owner, name)
        setattr(owner, name, value)
        assert _token(fn) != before, name
        setattr(owner, name, kept)
    namespace["BASE"] = 5.0  # read by a staticmethod and a property of the class
    assert _token(fn) != before
    namespace["BASE"] = 1.0
    assert _token(fn) == before
    config.unread = 7.0  # an attribute fn does not name: not part of the token
    assert _token(fn) == before


def test_a_user_module_attribute_read_by_fn_is_keyed_by_value() -> None:
    settings = types.ModuleType("gb_test_settings")
    settings.SCALE = 3.0
    settings.sub = types.ModuleType("gb_test_settings.sub")
    settings.sub.SHIFT = 1.0
    settings.UNREAD = 1.0
    fn = _function("def fn(x):\n    return settings.SCALE * x + settings.sub.SHIFT + np.sin(x)\n",
                   settings=settings, np=np)
    before = _token(fn)
    assert _token(fn) == before
    assert dict(before[2][1])["np"] == ("builtin", "numpy", id(np))  # a library module: by identity only
    settings.SCALE = 1.0
    assert _token(fn) != before
    settings.SCALE = 3.0
    settings.sub.SHIFT = 2.0
    assert _token(fn) != before
    settings.sub.SHIFT = 1.0
    settings.UNREAD = 2.0  # not named by fn's code
    assert _token(fn) == before
    import math  # a standard library module: by identity only, its attributes are not the user's
    stdlib = _function("def fn(x):\n    return math.pi * x\n", math=math)
    assert dict(_token(stdlib)[2][1])["math"] == ("builtin", "math", id(math))


def test_a_library_decorator_object_is_told_apart_by_its_class() -> None:
    """A library's decorator object copies the wrapped function's ``__module__`` onto itself; its state (here a
    signature, which has no weak reference) is the library's: keyed by identity plus the wrapped function."""
    import inspect

    class Walker(Fingerprinter):
        libraries = BASE_LIBRARIES | {"somelib"}

    class Decorator:
        def __init__(self, target: Callable[..., Any]) -> None:
            self.__wrapped__ = target
            self.__module__ = target.__module__
            self.__signature__ = inspect.signature(target)

    Decorator.__module__ = "somelib.decorators"
    inner = _function("def fn(x):\n    return SCALE * x\n", SCALE=2.0)
    inner.__module__ = "user_module"
    decorated = Decorator(inner)
    before = _token(decorated, Walker)
    assert before[0] == "wrapped" and before[1] == ("id", id(decorated))
    inner.__globals__["SCALE"] = 3.0
    assert _token(decorated, Walker) != before


class _RaisingGetattr:
    """An object whose ``__getattr__`` raises KeyError for a missing name (not AttributeError)."""

    def __init__(self) -> None:
        self._values = {"scale": 2.0}

    def __getattr__(self, name: str) -> Any:
        return self._values[name]


class _RaisingDict:
    @property
    def __dict__(self) -> Any:  # type: ignore[override]
        raise ValueError("no state here")


class _RaisingModule:
    @property
    def __module__(self) -> Any:  # type: ignore[override]
        raise RuntimeError("no module")


@pytest.mark.parametrize("value", [_RaisingGetattr(), _RaisingDict(), _RaisingModule()],
                         ids=["getattr-keyerror", "dict-valueerror", "module-runtimeerror"])
def test_an_error_raised_by_a_user_object_makes_the_check_uncacheable(value: Any) -> None:
    fn = _function("def fn(x):\n    return V.scale * x\n", V=value)
    with pytest.raises(Uncacheable):
        _token(fn)


def test_a_token_holds_no_user_subclass_of_a_plain_type() -> None:
    """A cache hashes and compares keys outside the walk: a str or int subclass whose ``__hash__`` or ``__eq__``
    raises must not end up in a token (it is keyed by its type and its value as the base type)."""

    class Name(str):
        def __hash__(self) -> int:
            raise KeyError("no hash")

        def __eq__(self, other: Any) -> bool:
            raise KeyError("no eq")

    class Count(int):
        def __hash__(self) -> int:
            raise KeyError("no hash")

    fn = _function("def fn(x):\n    return MODE, N\n", MODE=Name("sum"), N=Count(3))
    token = _token(fn)
    hash(token)
    assert token == _token(fn) and dict(token[2][1]) == {"MODE": (Name, "sum"), "N": (Count, 3)}
    fn.__globals__["MODE"] = Name("mean")
    assert _token(fn) != token


def test_an_error_raised_by_a_hook_makes_the_check_uncacheable() -> None:
    class Walker(Fingerprinter):
        def adapter_object(self, value: Any, depth: int) -> Any:
            raise LookupError("a hook that fails")

    fn = _function("def fn(x):\n    return W\n", W=[np.ones(2)])
    with pytest.raises(Uncacheable):
        _token(fn, Walker)


def test_a_large_container_is_uncacheable_without_walking_its_items() -> None:
    iterated = []

    class Table(list):
        def __iter__(self) -> Any:
            iterated.append(True)
            return super().__iter__()

    fn = _function("def fn(x):\n    return TABLE[3] * x\n", TABLE=Table([1e-6] * (Fingerprinter.limit + 1)))
    with pytest.raises(Uncacheable):
        _token(fn)
    assert not iterated
    fn.__globals__["TABLE"] = [float(i) for i in range(2_000_000)]
    start = time.perf_counter()
    with pytest.raises(Uncacheable):
        _token(fn)
    assert time.perf_counter() - start < 0.05
    fn.__globals__["TABLE"] = [1.0] * (Fingerprinter.limit - 10)
    assert _token(fn) is not None  # a smaller table is keyed


# --- the weak cache and the cyclic garbage collector ---

_DEADLOCK_SCRIPT = """
import gc, sys
from gradbridge.backends.common.cache import WeakFunctionCache

def make():
    def f(x):
        return f(x)  # refers to itself: a reference cycle, freed only by the cyclic collector
    return f

cache = WeakFunctionCache()
gc.disable()
f = make(); cache.put(f, "k", object()); del f
g = lambda x: x; cache.put(g, "k", object())
# a collection run while the cache's lock is held (any allocation may start one), freeing the cached f
assert cache.get(g, "k", keep=lambda entry: gc.collect() >= 0) is not None
assert len(cache) == 1, len(cache)
gc.enable()
for i in range(20000):  # natural collections inside put and get
    f = make()
    cache.put(f, ("k", i), [i])
    cache.get(f, ("k", i))
    del f
print("done")
"""


def test_a_collection_inside_the_cache_lock_does_not_deadlock(tmp_path: Path) -> None:
    """A cached function freed by the cyclic collector while the cache's lock is held (in the same thread)
    must not wait for that lock. Run in a subprocess: a regression hangs there, not here."""
    script = tmp_path / "deadlock.py"
    script.write_text(_DEADLOCK_SCRIPT)
    root = str(Path(__file__).resolve().parents[3])
    try:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                                env={**__import__("os").environ, "PYTHONPATH": root})
    except subprocess.TimeoutExpired:
        pytest.fail("WeakFunctionCache deadlocked when a cached function was collected under its lock")
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr


def test_a_function_collected_while_another_thread_holds_the_lock_does_not_wait() -> None:
    cache: WeakFunctionCache[str] = WeakFunctionCache()
    fn = eval("lambda x: x", {})  # in no reference cycle: freed as soon as the last reference goes
    cache.put(fn, 1, "entry")
    dropped = threading.Event()

    def drop() -> None:
        nonlocal fn
        del fn  # the weak reference's callback runs here, in this thread
        dropped.set()

    with cache._lock:  # another thread holds the lock meanwhile
        worker = threading.Thread(target=drop)
        worker.start()
        assert dropped.wait(10), "the weak reference's callback waited for the cache's lock"
    worker.join(10)
    assert len(cache) == 0

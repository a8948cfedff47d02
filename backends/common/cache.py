"""A cache of traces and decisions per user function, held weakly, and which state its keys describe.

:class:`WeakFunctionCache` keeps entries per function and key without keeping the function alive; the
callback that drops a collected function's entries never waits for the cache's lock (a collection can start
inside it, in the same thread).

Which state a key describes. An adapter keys an entry by ``(structure, environment)``: what its traces
depend on besides ``fn``'s environment (shapes, dtypes, options), and the token of that environment taken
before the check first runs ``fn``. A deterministic check that starts from that state traces the same
graphs, whatever ``fn`` changes while it runs, so the entry holds for every later check starting from it.

``fn`` may change what it reads while it runs: a trace counter (``global TRACES; TRACES += 1``), a log of
ints it appends to. Keyed by value, such a counter would differ at the start of every check and the cache
would never be hit. So after a check, :meth:`WeakFunctionCache.keep_after_run` keeps the entries of the
state the check started from also under the state ``fn`` left behind, which the next check starts from, but
only where the two differ in Python ints and in containers holding nothing but ints (:func:`same_but_ints`).
Such ints are taken to be ``fn``'s bookkeeping, which its traces do not depend on: a function whose result
depends on how often it ran has no single derivative to check (within one check its traces would already
disagree). Any other change (a float, a string, an array, an object that ``fn`` rebinds while it runs)
leaves the entries under the start state only: a trace may have read the value from before the change, so
the next check, starting from the changed state, traces afresh. An int the user rebinds between checks (a
factor ``SCALE = 3``) is not bookkeeping: it changes the start state, so the check traces afresh.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any, Callable, Dict, Generic, Hashable, Optional, Tuple, TypeVar



from .fingerprint import owners, same_but_ints

E = TypeVar("E")
_Slot = Tuple[Tuple["weakref.ref[Any]", ...], Dict[Hashable, E]]


class WeakFunctionCache(Generic[E]):
    """Entries per function and key, kept only while the function lives.

    A function's slot is found by the ids of its :func:`owners` and checked against weak references to them
    (an id is reused once its object is gone); those references drop the slot when an owner is collected. A
    slot keeps the :attr:`per_function` latest stored keys (older keys of a counter's values drop out first);
    one entry may be kept under several keys (:meth:`keep_after_run`). Thread-safe.

    The callback of those references (:meth:`_forget`) never waits for the lock: the cyclic garbage collector
    can run it in the thread that holds the lock (any allocation inside a locked region may start a
    collection), where waiting would hang that thread for good. It queues the slot, drops it at once where the
    lock is free, and otherwise leaves it to the next call, which drops the queued slots first.
    """

    def __init__(self, per_function: int = 16) -> None:
        self.per_function = per_function
        self._slots: Dict[Tuple[int, ...], _Slot[E]] = {}
        self._lock = threading.Lock()
        # (slot key, dead weak reference) queued by _forget; deque.append and popleft are atomic
        self._pending: "collections.deque[Tuple[Tuple[int, ...], weakref.ref[Any]]]" = collections.deque()

    def _forget(self, slot_key: Tuple[int, ...], ref: "weakref.ref[Any]") -> None:
        """The callback of an owner's weak reference: queue its slot, and drop it now only if the lock is free."""
        self._pending.append((slot_key, ref))
        if self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _purge(self) -> None:
        """Drop the queued slots of collected owners (under the lock; before any use of the slots)."""
        while True:
            try:
                slot_key, ref = self._pending.popleft()
            except IndexError:
                return
            slot = self._slots.get(slot_key)
            if slot is not None and any(r is ref for r in slot[0]):  # not a new slot of an object with that id
                del self._slots[slot_key]

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._purge()
            self._slots.clear()

    def __len__(self) -> int:
        """How many entries are kept, over all functions (one kept under several keys counts once)."""
        with self._lock:
            self._purge()
            return sum(len({id(entry) for entry in entries.values()}) for _, entries in self._slots.values())

    def get(self, fn: Any, key: Hashable, keep: Optional[Callable[[E], bool]] = None) -> Optional[E]:
        """``fn``'s entry for ``key``, or None; an entry ``keep`` rejects is dropped and None returned."""
        fn_owners = owners(fn)
        with self._lock:
            self._purge()
            slot = self._slots.get(tuple(id(o) for o in fn_owners))
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                return None
            entry = slot[1].get(key)
            if entry is not None and keep is not None and not keep(entry):
                del slot[1][key]
                return None
            return entry

    def put(self, fn: Any, key: Hashable, entry: E) -> bool:
        """Keep ``entry`` for ``fn`` and ``key`` (the newest of its slot); False when ``fn`` cannot be
        referenced weakly (nothing is kept)."""
        fn_owners = owners(fn)
        slot_key = tuple(id(o) for o in fn_owners)

        def forget(ref: "weakref.ref[Any]", slot_key: Tuple[int, ...] = slot_key) -> None:
            self._forget(slot_key, ref)

        with self._lock:
            self._purge()
            slot = self._slots.get(slot_key)
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                try:
                    slot = (tuple(weakref.ref(o, forget) for o in fn_owners), {})
                except TypeError:
                    return False
                self._slots[slot_key] = slot
            self._store(slot[1], key, entry)
        return True

    def _store(self, entries: Dict[Hashable, E], key: Hashable, entry: E) -> None:
        entries.pop(key, None)
        entries[key] = entry
        while len(entries) > self.per_function:
            del entries[next(iter(entries))]

    def keep_after_run(self, fn: Any, before: Any, after: Any) -> bool:
        """After a check of ``fn`` that started from the environment token ``before`` and left ``after`` behind,
        keep every entry of ``fn`` kept under ``(structure, before)`` also under ``(structure, after)``, where
        the two differ in ints only (:func:`same_but_ints`; see the module's docstring). The entries of other
        structures (shapes, options) are moved along too: the counter is the same for all of them. Returns
        whether any entry is kept so."""
        if after == before or not same_but_ints(before, after):
            return False
        try:
            hash(after)
        except TypeError:
            return False
        fn_owners = owners(fn)
        with self._lock:
            self._purge()
            slot = self._slots.get(tuple(id(o) for o in fn_owners))
            if slot is None or any(ref() is not o for ref, o in zip(slot[0], fn_owners)):
                return False
            entries = slot[1]
            found = [(key[0], entry) for key, entry in entries.items()
                     if type(key) is tuple and len(key) == 2 and key[1] == before]
            for structure, entry in found:
                self._store(entries, (structure, after), entry)
        return bool(found)

"""Threads and nesting: what another thread sees while a check runs, and the process state after concurrent
and nested checks. Real frameworks, no mocks; overlaps are ordered with events (never with sleeps), and the
timeouts below are reached only when something hangs.

Process-wide state a check touches: torch's default dtype, torch's, NumPy's and Python's global generators,
TensorFlow's global seed and generator, the modes of a module being checked, JAX's ``jax_enable_x64`` flag.
Two ways a check runs next to another thread are pinned down:

* *between* two evaluations of a check (its session open, fn not running), another thread sees exactly its
  own state: its default dtype, its seeded draws (seeded before an evaluation, drawn after it);
* overlapping checks in two threads, ordered so that the second starts while the first runs and ends after
  it (the order in which "save at start, restore at end" puts the first check's state back for good), and
  nested checks, leave every piece of that state as it was before.

The checks are paused between evaluations through ``executor=``: an in-process thread pool whose ``submit``
first runs a hook, called by the check between its evaluations.
"""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import gradbridge as gb
from gradbridge._adapter import CheckSpec

from backend_matrix import require_backend

#: Reached only when a test hangs: no assertion depends on time.
TIMEOUT = 60.0


# --- helpers -----------------------------------------------------------------------------------------------


def _in_threads(*targets: Callable[[], None]) -> None:
    """Run each target in a thread of its own, wait for all, and raise the first exception one raised."""
    errors: List[BaseException] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]


class _PausingPool(cf.ThreadPoolExecutor):
    """An in-process executor for ``executor=`` whose second ``submit`` runs ``pause`` first. The check calls
    ``submit`` inside its session, between evaluations: ``pause`` then runs while the check is under way (it
    has evaluated fn in this thread too: the first chunk is compared with a local evaluation) but none of the
    user's code runs."""

    def __init__(self, pause: Callable[[], None]) -> None:
        super().__init__(max_workers=1)
        self._pause: Optional[Callable[[], None]] = pause
        self._submits = 0
        self.paused = False

    def submit(self, *args: Any, **kwargs: Any) -> cf.Future:
        self._submits += 1
        if self._submits == 2 and self._pause is not None:
            self.paused = True
            self._pause()
        return super().submit(*args, **kwargs)


def _overlapping(check_a: Callable[[Any], gb.Report], check_b: Callable[[Any], gb.Report]
                 ) -> Tuple[gb.Report, gb.Report]:
    """Run ``check_a(executor)`` and ``check_b(executor)`` in two threads, ordered: A starts; B starts while A
    is under way; A ends while B is under way; then B ends."""
    a_under_way, b_under_way, a_done = threading.Event(), threading.Event(), threading.Event()
    reports: Dict[str, gb.Report] = {}

    def pause_a() -> None:
        a_under_way.set()
        assert b_under_way.wait(TIMEOUT)

    def pause_b() -> None:
        b_under_way.set()
        assert a_done.wait(TIMEOUT)

    pools: List[_PausingPool] = []

    def run_a() -> None:
        try:
            with _PausingPool(pause_a) as pool:
                pools.append(pool)
                reports["a"] = check_a(pool)
        finally:
            a_under_way.set()
            a_done.set()

    def run_b() -> None:
        try:
            assert a_under_way.wait(TIMEOUT)
            with _PausingPool(pause_b) as pool:
                pools.append(pool)
                reports["b"] = check_b(pool)
        finally:
            b_under_way.set()

    _in_threads(run_a, run_b)
    assert len(pools) == 2 and all(pool.paused for pool in pools), "the checks did not overlap as planned"
    return reports["a"], reports["b"]


def _shared_generators() -> Tuple[Any, Any]:
    """NumPy's and Python's global generator states."""
    return np.random.get_state(), random.getstate()


def _same_shared_generators(a: Tuple[Any, Any], b: Tuple[Any, Any]) -> bool:
    (np_a, py_a), (np_b, py_b) = a, b
    return (np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and tuple(np_a[2:]) == tuple(np_b[2:])
            and py_a == py_b)


def _spec(fn: Callable[..., Any], *args: Any, params: Any = None) -> CheckSpec:
    return CheckSpec(fn=fn, args=args, kwargs={}, params=params, wrt=None, grad=None, seed=0, train=False,
                     arg_names=tuple(f"arg{i}" for i in range(len(args))))


# --- torch -------------------------------------------------------------------------------------------------


def _torch() -> Any:
    require_backend("torch")
    import torch

    return torch


@pytest.fixture
def torch_float32():
    """The user's default dtype is float32 (torch's own default), put back whatever a test leaves behind."""
    torch = _torch()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    state = torch.get_rng_state()
    shared = _shared_generators()
    yield torch
    torch.set_default_dtype(before)
    torch.set_rng_state(state)
    np.random.set_state(shared[0])
    random.setstate(shared[1])


def _draws(x: Any) -> Any:
    """fn drawing from every global generator torch code may use."""
    import torch

    noise = torch.randn(x.shape, dtype=x.dtype) + float(np.random.rand()) + random.random()
    return (torch.sin(x) * x).sum() + 0.0 * noise.sum()


def _seeded_draws(torch: Any, seed: int) -> Tuple[Any, ...]:
    """What a thread draws right after seeding every global generator with ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return torch.randn(3), np.random.rand(3), random.random()


def _assert_same_draws(got: Tuple[Any, ...], expected: Tuple[Any, ...]) -> None:
    assert got[0].dtype == expected[0].dtype and bool((got[0] == expected[0]).all()), "torch draws changed"
    np.testing.assert_array_equal(got[1], expected[1], err_msg="NumPy draws changed")
    assert got[2] == expected[2], "Python draws changed"


@pytest.mark.torch
def test_torch_another_thread_between_evaluations_sees_its_dtype_and_keeps_its_seeded_draws(torch_float32) -> None:
    """A float32 worker next to a check, between two evaluations: its default dtype is its own, and what it
    seeded before an evaluation it draws after it."""
    torch = torch_float32
    expected = _seeded_draws(torch, 7)
    x = torch.linspace(0.1, 0.9, 4, dtype=torch.float64)
    from gradbridge.backends import torch as torch_backend

    prepared = torch_backend.ADAPTER.prepare(_spec(_draws, x))
    seen: Dict[str, Any] = {}
    seeded, evaluated = threading.Event(), threading.Event()

    def worker() -> None:
        seen["default"] = torch.get_default_dtype()
        seen["zeros"] = torch.zeros(2).dtype
        seen["tensor"] = torch.tensor([0.5]).dtype
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        seeded.set()
        assert evaluated.wait(TIMEOUT)
        seen["draws"] = (torch.randn(3), np.random.rand(3), random.random())

    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert seeded.wait(TIMEOUT)
        prepared.evaluate(np.stack([prepared.x0] * 3))  # re-seeds every generator, fn draws
        evaluated.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert seen["default"] == torch.float32
    assert seen["zeros"] == torch.float32 and seen["tensor"] == torch.float32
    _assert_same_draws(seen["draws"], expected)
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.torch
def test_torch_fn_still_runs_with_float64_defaults_and_seeded_generators(torch_float32) -> None:
    """What the check needs inside fn holds: float64 defaults, the same draws at every evaluation."""
    torch = torch_float32
    seen: List[Tuple[Any, Any]] = []

    def fn(x):
        made = torch.zeros(1) + torch.tensor(0.1)
        seen.append((made.dtype, torch.rand(2).dtype))
        return (torch.sin(x) * x).sum() + made.sum() + 0.0 * torch.rand(1).sum()

    report = gb.check(fn, torch.linspace(0.1, 0.9, 4))
    assert report.passed and report.problem is None, str(report)
    assert seen and set(seen) == {(torch.float64, torch.float64)}
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.torch
def test_torch_what_another_thread_sees_while_fn_runs(torch_float32) -> None:
    """The documented window: while the check runs fn, torch's process-wide default dtype is float64 (torch
    has no per-thread default); before and after, the other thread's own."""
    torch = torch_float32
    inside, observed = threading.Event(), threading.Event()
    seen: Dict[str, Any] = {}

    def fn(x):
        if not inside.is_set():
            inside.set()
            observed.wait(TIMEOUT)
        return (torch.sin(x) * x).sum()

    def observer() -> None:
        assert inside.wait(TIMEOUT)
        seen["during fn"] = torch.get_default_dtype()
        observed.set()

    thread = threading.Thread(target=observer, daemon=True)
    thread.start()
    report = gb.check(fn, torch.linspace(0.1, 0.9, 4))
    thread.join(TIMEOUT)
    assert report.passed, str(report)
    assert seen["during fn"] == torch.float64
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.torch
def test_two_overlapping_torch_checks_leave_dtype_generators_and_modes_as_before(torch_float32) -> None:
    torch = torch_float32
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Dropout(0.5))
    model.train()  # the user's mode; each check runs it in eval mode
    x = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def loss(x):
        return model(x).pow(2).sum() + 0.0 * torch.randn(1).sum() + 0.0 * float(np.random.rand())

    expected = _seeded_draws(torch, 5)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    a, b = _overlapping(lambda pool: gb.check(loss, x, params=model, executor=pool),
                        lambda pool: gb.check(loss, x, params=model, executor=pool))
    assert a.passed and b.passed, f"{a}\n{b}"
    assert torch.get_default_dtype() == torch.float32
    assert all(m.training for m in model.modules()), "a module was left in eval mode"
    assert next(model.parameters()).dtype == torch.float32
    _assert_same_draws((torch.randn(3), np.random.rand(3), random.random()), expected)


@pytest.mark.torch
def test_torch_check_nested_inside_a_checked_function(torch_float32) -> None:
    """fn calls gb.check itself: both verdicts right, fn's own draws unchanged by the inner check (it is
    deterministic), and every piece of state as before afterwards."""
    torch = torch_float32
    inner: List[gb.Report] = []

    def inner_fn(y):
        return (torch.cos(y) * y).sum() + 0.0 * torch.randn(1).sum()

    def outer(x):
        before = torch.randn(1)
        inner.append(gb.check(inner_fn, torch.linspace(0.2, 0.8, 3)))
        after = torch.randn(1)
        assert torch.get_default_dtype() == torch.float64  # the outer check's, put back by the inner one
        return (torch.sin(x) * x).sum() + 1e-3 * (before + after).sum()

    expected = _seeded_draws(torch, 3)
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    report = gb.check(outer, torch.linspace(0.1, 0.9, 4))
    assert report.passed and report.problem is None, str(report)
    assert inner and all(r.passed for r in inner)
    assert torch.get_default_dtype() == torch.float32
    _assert_same_draws((torch.randn(3), np.random.rand(3), random.random()), expected)


# --- JAX ---------------------------------------------------------------------------------------------------


def _jax() -> Tuple[Any, Any]:
    require_backend("jax")
    import jax
    import jax.numpy as jnp

    return jax, jnp


@pytest.fixture
def x64_off():
    """The user's global jax_enable_x64 is False (JAX's default), put back afterwards."""
    jax, _ = _jax()
    before = jax.enable_x64.get_global()
    jax.config.update("jax_enable_x64", False)
    yield jax
    jax.config.update("jax_enable_x64", before)


def _jax_loss(x):
    import jax.numpy as jnp

    return jnp.sum(jnp.sin(x) * x)


@pytest.mark.jax
def test_jax_another_thread_sees_the_users_x64_flag_while_a_check_runs(x64_off) -> None:
    jax, jnp = _jax()
    inside, observed = threading.Event(), threading.Event()
    seen: Dict[str, Any] = {}

    def fn(x):
        seen.setdefault("fn dtype", x.dtype)
        if not inside.is_set():
            inside.set()
            observed.wait(TIMEOUT)
        return jnp.sum(jnp.sin(x) * x)

    def observer() -> None:
        assert inside.wait(TIMEOUT)
        seen["flag"] = bool(jax.config.jax_enable_x64)
        seen["global"] = bool(jax.enable_x64.get_global())
        seen["zeros"] = jnp.zeros(1).dtype
        observed.set()

    thread = threading.Thread(target=observer, daemon=True)
    thread.start()
    report = gb.check(fn, jnp.linspace(0.1, 0.9, 3))
    thread.join(TIMEOUT)
    assert report.passed, str(report)
    assert seen["fn dtype"] == jnp.float64  # the check itself runs in 64-bit mode, in its own thread
    assert seen["flag"] is False and seen["global"] is False, "another thread saw jax_enable_x64 switched on"
    assert seen["zeros"] == jnp.float32
    assert jax.config.jax_enable_x64 is False


@pytest.mark.jax
def test_two_overlapping_jax_checks_leave_x64_and_the_generators_as_before(x64_off) -> None:
    jax, jnp = _jax()
    np.random.seed(11)
    random.seed(11)
    shared = _shared_generators()
    local = jax.enable_x64.get_local()
    a, b = _overlapping(lambda pool: gb.check(_jax_loss, jnp.linspace(0.1, 0.9, 3), executor=pool),
                        lambda pool: gb.check(_jax_loss, jnp.linspace(0.2, 0.7, 4), executor=pool))
    assert a.passed and b.passed, f"{a}\n{b}"
    assert jax.config.jax_enable_x64 is False and jax.enable_x64.get_global() is False
    assert jax.enable_x64.get_local() is local
    assert jnp.zeros(1).dtype == jnp.float32
    assert _same_shared_generators(_shared_generators(), shared)


@pytest.mark.jax
def test_jax_check_in_a_thread_next_to_a_check_tracing_fn(x64_off) -> None:
    """A check started in another thread while a check is tracing fn is no check inside a trace: it runs."""
    jax, jnp = _jax()
    inside = threading.Event()
    reports: Dict[str, gb.Report] = {}

    def fn(x):
        if not inside.is_set():
            inside.set()
        return jnp.sum(jnp.sin(x) * x)

    def first() -> None:
        reports["first"] = gb.check(fn, jnp.linspace(0.1, 0.9, 3))

    def second() -> None:
        assert inside.wait(TIMEOUT)
        reports["second"] = gb.check(_jax_loss, jnp.linspace(0.2, 0.7, 4))

    _in_threads(first, second)
    assert reports["first"].passed and reports["second"].passed
    assert jax.config.jax_enable_x64 is False


@pytest.mark.jax
@pytest.mark.parametrize("promote", [True, False])
def test_jax_check_nested_inside_a_checked_function(x64_off, promote: bool) -> None:
    """fn calls gb.check on values that do not depend on its input: both checks run (no tracer error); on
    values that do, a gradbridge error naming the argument, not a JAX tracer error."""
    jax, jnp = _jax()
    inner: List[bool] = []

    def outer_constant(x):
        inner.append(gb.check(_jax_loss, jnp.linspace(0.5, 1.0, 3)).passed)
        return jnp.sum(jnp.sin(x) * x)

    report = gb.check(outer_constant, jnp.linspace(0.1, 0.9, 3, dtype=jnp.float32), promote=promote)
    assert report.passed, str(report)
    assert inner and all(inner)
    assert jax.config.jax_enable_x64 is False and jnp.zeros(1).dtype == jnp.float32

    def outer_dependent(x):
        gb.check(_jax_loss, x)
        return jnp.sum(jnp.sin(x) * x)

    with pytest.raises(gb.InvalidArgumentError, match=r"args: x is a JAX tracer"):
        gb.check(outer_dependent, jnp.linspace(0.1, 0.9, 3), promote=promote)
    assert jax.config.jax_enable_x64 is False


@pytest.mark.jax
def test_jax_host_callback_on_jaxs_own_thread_runs_in_the_checks_precision(x64_off) -> None:
    """A pure_callback on a large array runs on one of XLA's threads, not the check's: it still gets and
    returns float64 (the check's 64-bit mode), while another thread never sees the global flag on."""
    jax, jnp = _jax()
    threads_seen: set = set()
    dtypes_seen: set = set()
    flags_seen: List[bool] = []
    inside, observed = threading.Event(), threading.Event()

    def host_sin(v):
        threads_seen.add(threading.current_thread().name)
        dtypes_seen.add(np.asarray(v).dtype)
        return np.sin(v)

    def host_cos(v):
        return np.cos(v)

    @jax.custom_vjp
    def sine(v):
        return jax.pure_callback(host_sin, jax.ShapeDtypeStruct(v.shape, v.dtype), v, vmap_method="sequential")

    def sine_fwd(v):
        return sine(v), v

    def sine_bwd(v, g):
        cos = jax.pure_callback(host_cos, jax.ShapeDtypeStruct(v.shape, v.dtype), v, vmap_method="sequential")
        return (g * cos,)

    sine.defvjp(sine_fwd, sine_bwd)
    copies = 300_000  # large enough for XLA to run the callback on a thread of its own

    def fn(x):
        if not inside.is_set():
            inside.set()
            observed.wait(TIMEOUT)
        return jnp.sum(sine(jnp.tile(x, copies))) / copies

    def observer() -> None:
        assert inside.wait(TIMEOUT)
        flags_seen.append(bool(jax.config.jax_enable_x64))
        observed.set()

    thread = threading.Thread(target=observer, daemon=True)
    thread.start()
    report = gb.check(fn, jnp.linspace(0.1, 0.9, 3))
    thread.join(TIMEOUT)
    assert report.passed, str(report)
    assert dtypes_seen == {np.dtype(np.float64)}
    assert flags_seen == [False]
    assert jax.config.jax_enable_x64 is False


# --- TensorFlow --------------------------------------------------------------------------------------------


def _tf() -> Any:
    require_backend("tensorflow")
    import tensorflow as tf

    return tf


def _tf_random_state() -> Tuple[Any, ...]:
    """TensorFlow's global seed, its operation-seed generator's state and the global generator object."""
    from tensorflow.python.eager import context as tf_context
    from tensorflow.python.ops import stateful_random_ops

    ctx = tf_context.context()
    op_seeds = getattr(ctx, "_rng", None)
    return (tf_context.global_seed(), op_seeds.getstate() if op_seeds is not None else None,
            stateful_random_ops.global_generator)


def _tf_draws(x):
    import tensorflow as tf

    return tf.reduce_sum(tf.sin(x) * x) + 0.0 * tf.reduce_sum(tf.random.uniform([2], dtype=tf.float64))


@pytest.mark.tensorflow
def test_tensorflow_another_thread_between_evaluations_keeps_its_seed_and_generator() -> None:
    tf = _tf()
    from gradbridge.backends import tensorflow as tf_backend
    from tensorflow.python.ops import stateful_random_ops

    tf.random.set_seed(7)
    expected = tf.random.uniform([3]).numpy()
    user_generator = stateful_random_ops.global_generator
    x = tf.constant(np.linspace(0.1, 0.9, 4))
    prepared = tf_backend.ADAPTER.prepare(_spec(_tf_draws, x))
    seen: Dict[str, Any] = {}
    seeded, evaluated = threading.Event(), threading.Event()

    def worker() -> None:
        seen["generator"] = stateful_random_ops.global_generator
        tf.random.set_seed(7)
        seeded.set()
        assert evaluated.wait(TIMEOUT)
        seen["draws"] = tf.random.uniform([3]).numpy()

    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert seeded.wait(TIMEOUT)
        prepared.evaluate(np.stack([prepared.x0] * 2))  # resets the global seed, fn draws
        evaluated.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert seen["generator"] is user_generator, "another thread saw the check's stand-in global generator"
    np.testing.assert_array_equal(seen["draws"], expected, err_msg="the other thread's seeded draws changed")


@pytest.mark.tensorflow
def test_two_overlapping_tensorflow_checks_leave_the_random_state_as_before() -> None:
    tf = _tf()
    tf.random.set_seed(5)
    np.random.seed(5)
    random.seed(5)
    before = _tf_random_state()
    shared = _shared_generators()
    a, b = _overlapping(lambda pool: gb.check(_tf_draws, tf.constant(np.linspace(0.1, 0.9, 3)), executor=pool),
                        lambda pool: gb.check(_tf_draws, tf.constant(np.linspace(0.2, 0.7, 4)), executor=pool))
    assert a.passed and b.passed, f"{a}\n{b}"
    after = _tf_random_state()
    assert after[0] == before[0] and after[1] == before[1], "TensorFlow's global seed was not put back"
    assert after[2] is before[2], "TensorFlow's global generator was not put back"
    assert _same_shared_generators(_shared_generators(), shared)


# --- NumPy -------------------------------------------------------------------------------------------------


def _np_draws(x):
    return float(np.sum(np.sin(x) * x) + 0.0 * np.random.rand() + 0.0 * random.random())


def _np_draws_grad(x):
    return np.sin(x) + x * np.cos(x)


@pytest.mark.numpy
def test_numpy_another_thread_between_evaluations_keeps_its_seeded_draws() -> None:
    from gradbridge.backends import numpy as np_backend

    np.random.seed(7)
    random.seed(7)
    expected = (np.random.rand(3), random.random())
    spec = _spec(_np_draws, np.linspace(0.1, 0.9, 4))
    spec.grad = _np_draws_grad
    prepared = np_backend.ADAPTER.prepare(spec)
    seen: Dict[str, Any] = {}
    seeded, evaluated = threading.Event(), threading.Event()

    def worker() -> None:
        np.random.seed(7)
        random.seed(7)
        seeded.set()
        assert evaluated.wait(TIMEOUT)
        seen["draws"] = (np.random.rand(3), random.random())

    with prepared.session():
        prepared.evaluate(prepared.x0[None])
        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        assert seeded.wait(TIMEOUT)
        prepared.evaluate(np.stack([prepared.x0] * 2))
        evaluated.set()
        thread.join(TIMEOUT)
    np.testing.assert_array_equal(seen["draws"][0], expected[0])
    assert seen["draws"][1] == expected[1]


@pytest.mark.numpy
def test_two_overlapping_numpy_checks_leave_the_generators_as_before() -> None:
    np.random.seed(5)
    random.seed(5)
    shared = _shared_generators()
    a, b = _overlapping(
        lambda pool: gb.check(_np_draws, np.linspace(0.1, 0.9, 3), grad=_np_draws_grad, executor=pool),
        lambda pool: gb.check(_np_draws, np.linspace(0.2, 0.7, 4), grad=_np_draws_grad, executor=pool))
    assert a.passed and b.passed, f"{a}\n{b}"
    assert _same_shared_generators(_shared_generators(), shared)

"""The adapter contract, checked on every registered backend with real frameworks.

Every adapter in the registry must pass this suite: the protocol of :mod:`gradbridge._adapter`, the capabilities
it declares in ``capabilities.py`` (and no others), batched evaluations equal to the loop, ``evaluate_edits``
equal to ``evaluate``, VJPs linear in the cotangent and consistent with JVPs and transposed products, the
user's process state restored also when fn raises, and caches that clear. The op is the same everywhere: a
small NumPy-defined function turned into each framework's custom-rule mechanism by the kits
(``tests/support/kits.py``), so a new backend needs a kit and a row in the capability table, nothing else.
"""

from __future__ import annotations

import random
from typing import Any, Tuple

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import ALL_BACKENDS
from capabilities import CAPABILITY_TABLE
from gradbridge import _registry
from gradbridge._adapter import (CAPABILITIES, Adapter, CheckSpec, DifferentiatedPrimal, EditedEvaluation, PreparedFunction, PytreeNodes,
                                 TransposedProducts, capabilities)
from gradbridge._agreement import disagreement
from gradbridge._errors import InvalidArgumentError, ModeUnsupportedError
from kits import make_op

EPS = float(np.finfo(np.float64).eps)


def _forward(x, w):
    return np.tanh(x @ w) * 1.5


def _backward(g, x, w):
    inner = (1.0 - np.tanh(x @ w) ** 2) * 1.5 * g
    return inner @ w.T, x.T @ inner


def _inputs() -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.standard_normal((3, 4)), rng.standard_normal((4, 2)) * 0.5


def _prepared(backend: str) -> Tuple[PreparedFunction, Any]:
    fn, to_native, options = make_op(backend, _forward, _backward)
    x, w = _inputs()
    spec = CheckSpec(fn=fn, args=(to_native(x), to_native(w)), kwargs={}, params=None, wrt=None,
                     grad=options.get("grad"), seed=0, train=False, arg_names=("x", "w"), promote=True)
    return _registry.get_adapter(backend).prepare(spec), fn


def _points(prepared: PreparedFunction, k: int) -> np.ndarray:
    rng = np.random.default_rng(11)
    return prepared.x0 + 1e-2 * rng.standard_normal((k, len(prepared.x0)))


def test_every_registered_backend_has_a_row_in_the_capability_table() -> None:
    assert set(_registry.names()) <= set(CAPABILITY_TABLE), sorted(set(_registry.names()) - set(CAPABILITY_TABLE))
    assert set(ALL_BACKENDS) == set(_registry.builtin_names())


def test_the_adapter_implements_the_protocol(backend: str) -> None:
    adapter = _registry.get_adapter(backend)
    entry = _registry.entry(backend)
    assert isinstance(adapter, Adapter)
    assert adapter.name == entry.name and adapter.module_name == entry.framework_module
    assert not hasattr(adapter, "install_hint"), "install hints are the registry's (BackendEntry.install_hint)"
    assert isinstance(adapter.version(), str) and adapter.version()
    ok, note = adapter.probe_float64()
    assert ok is True and isinstance(note, str)
    assert isinstance(adapter, PytreeNodes) == CAPABILITY_TABLE[backend]["pytree"]
    compare_methods = ("to_numpy", "from_numpy", "expected_params", "bind_params")
    assert all(callable(getattr(adapter, m, None)) for m in compare_methods) == CAPABILITY_TABLE[backend]["compare"]


def test_the_adapter_owns_its_arrays_and_round_trips_them(backend: str) -> None:
    adapter = _registry.get_adapter(backend)
    _, to_native, _ = make_op(backend, _forward, _backward)
    x, _ = _inputs()
    native = to_native(x)
    if type(native).__module__.split(".")[0] == _registry.entry(backend).framework_module:
        assert adapter.owns(native)
    assert np.array_equal(adapter.to_numpy(adapter.from_numpy(x)), x)
    held = adapter.to_numpy(native)  # in the dtype the framework holds it (JAX without x64: float32)
    assert held.shape == x.shape and np.array_equal(held, x.astype(held.dtype))


def test_a_prepared_function_keeps_the_contract(backend: str) -> None:
    prepared, _ = _prepared(backend)
    offset = 0
    for leaf, (name, shape) in zip(prepared.leaves, (("x", (3, 4)), ("w", (4, 2)))):
        assert (leaf.name, leaf.shape, leaf.offset) == (name, shape, offset)
        offset += leaf.size
    assert prepared.x0.shape == (offset,) and prepared.x0.dtype == np.float64
    assert isinstance(prepared.notes, list) and isinstance(prepared.analytic_source, str)
    with prepared.session():
        values = prepared.evaluate(_points(prepared, 3))
        assert values.shape == (3, 6) and values.dtype == np.float64
        assert [s.shape for s in prepared.output_specs] == [(3, 2)]
        assert isinstance(prepared, PreparedFunction)  # output_specs is known from the first evaluation on
        gradients = prepared.vjp(np.eye(6)[:2])
    assert gradients.shape == (2, offset)
    assert set(capabilities(prepared)) == CAPABILITY_TABLE[backend]["prepared"], capabilities(prepared)
    assert {c.__name__ for c in CAPABILITIES} >= set(capabilities(prepared))


def test_evaluations_match_the_function_and_batches_match_the_loop(backend: str) -> None:
    prepared, _ = _prepared(backend)
    points = _points(prepared, 12)
    with prepared.session():
        batched = prepared.evaluate(points)
        looped = np.vstack([prepared.evaluate(p[None, :]) for p in points])
    expected = np.vstack([_forward(p[:12].reshape(3, 4), p[12:].reshape(4, 2)).reshape(1, -1) for p in points])
    assert disagreement(batched, looped, EPS) is None
    assert disagreement(batched, expected, EPS) is None


def test_edits_give_what_evaluate_gives(backend: str) -> None:
    prepared, _ = _prepared(backend)
    if not isinstance(prepared, EditedEvaluation):
        pytest.skip(f"{backend} builds no edited points itself (the core builds them)")
    positions = np.array([0, 5, 11, 12, 19, 0])
    values = prepared.x0[positions] + np.array([1e-3, -2e-3, 0.5, -0.25, 1e-6, -1e-3])
    points = np.tile(prepared.x0, (len(positions), 1))
    points[np.arange(len(positions)), positions] = values
    with prepared.session():
        edited = prepared.evaluate_edits(positions, values)
        direct = prepared.evaluate(points)
    assert disagreement(edited, direct, EPS) is None


def test_the_differentiated_primal_is_what_evaluate_gives(backend: str) -> None:
    prepared, _ = _prepared(backend)
    if not isinstance(prepared, DifferentiatedPrimal):
        pytest.skip(f"{backend} offers no primal under differentiation (its rules compute no forward of their own)")
    with prepared.session():
        primal = prepared.differentiated_primal()
        direct = prepared.evaluate(prepared.x0[None, :])[0]
    assert primal.shape == direct.shape
    assert disagreement(primal[None, :], direct[None, :], EPS) is None


def test_vjps_are_linear_and_agree_with_the_rule(backend: str) -> None:
    prepared, _ = _prepared(backend)
    rng = np.random.default_rng(5)
    u = rng.standard_normal((2, 6))
    with prepared.session():
        prepared.evaluate(prepared.x0[None, :])
        pulled = prepared.vjp(np.vstack([u, u[:1] + u[1:], np.zeros((1, 6))]))
    assert disagreement(pulled[2], pulled[0] + pulled[1], EPS, rows=False) is None
    assert np.all(pulled[3] == 0.0)
    x, w = prepared.x0[:12].reshape(3, 4), prepared.x0[12:].reshape(4, 2)
    gx, gw = _backward(u[0].reshape(3, 2), x, w)
    assert disagreement(pulled[0], np.concatenate([gx.ravel(), gw.ravel()]), EPS, rows=False) is None


def test_jvps_and_transposed_products_are_the_same_jacobian(backend: str) -> None:
    prepared, _ = _prepared(backend)
    rng = np.random.default_rng(8)
    tangents = rng.standard_normal((3, len(prepared.x0)))
    with prepared.session():
        prepared.evaluate(prepared.x0[None, :])
        dense = prepared.vjp(np.eye(6)).T  # (6, n): the Jacobian the VJP implements
        try:
            pushed = prepared.jvp(tangents)
        except ModeUnsupportedError:
            pushed = None
        try:
            transposed = prepared.vjp_transposed(tangents) if isinstance(prepared, TransposedProducts) else None
        except ModeUnsupportedError as exc:  # offered, but this rule's backward runs outside the framework
            assert "transposed" in str(exc)
            transposed = None
    # the kits' rules define only a VJP: forward mode is refused with ModeUnsupportedError, or differentiates
    # the forward pass where the framework can
    assert (pushed is not None) == CAPABILITY_TABLE[backend]["jvp_of_vjp_rule"]
    for products in (pushed, transposed):
        if products is not None:
            assert disagreement(products, tangents @ dense.T, 1e3 * EPS) is None


def test_order_two_is_offered_or_refused_clearly(backend: str) -> None:
    prepared, _ = _prepared(backend)
    with prepared.session():
        prepared.evaluate(prepared.x0[None, :])
        try:
            derived = prepared.gradient_function(np.ones(6))
        except ModeUnsupportedError as exc:
            assert str(exc)
            derived = None
    assert (derived is not None) == CAPABILITY_TABLE[backend]["order2"]


def test_a_check_leaves_the_global_random_generators_as_they_were(backend: str) -> None:
    fn, to_native, options = make_op(backend, _forward, _backward)
    x, w = _inputs()
    np.random.seed(1234)
    random.seed(99)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    report = gb.check(fn, to_native(x), to_native(w), backend=backend, **options)
    assert report.passed, str(report)
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert random.getstate() == python_state


def test_a_function_that_raises_leaves_the_state_as_it_was_and_names_the_error(backend: str) -> None:
    def broken_forward(x, w):
        np.random.standard_normal()  # consumes the global generator before failing
        raise ValueError("broken on purpose")

    fn, to_native, options = make_op(backend, broken_forward, _backward)
    x, w = _inputs()
    np.random.seed(7)
    numpy_state = np.random.get_state()
    with pytest.raises(gb.GradbridgeError) as raised:
        gb.check(fn, to_native(x), to_native(w), backend=backend, **options)
    assert "broken on purpose" in str(raised.value)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])


def test_caches_clear_through_the_public_call(backend: str) -> None:
    adapter = _registry.get_adapter(backend)
    fn, to_native, options = make_op(backend, _forward, _backward)
    x, w = _inputs()
    assert gb.check(fn, to_native(x), to_native(w), backend=backend, **options).passed
    assert isinstance(adapter.cache_size(), int)
    gb.clear_cache()
    assert adapter.cache_size() == 0


def test_an_unknown_backend_name_lists_the_registered_ones() -> None:
    with pytest.raises(InvalidArgumentError) as raised:
        _registry.get_adapter("mxnet")
    assert all(name in str(raised.value) for name in _registry.names())


def test_the_registry_names_each_backend_and_how_to_install_it() -> None:
    for entry in _registry.entries():
        assert _registry.resolve_name(entry.name) == entry.name
        assert all(_registry.resolve_name(alias) == entry.name for alias in entry.aliases)
        assert entry.install_hint.startswith("pip install")


def test_layer_taps_are_offered_as_the_table_says(backend: str) -> None:
    from gradbridge._adapter import LayerTaps, ParamBinding, offered

    adapter = _registry.get_adapter(backend)
    with_taps = offered(adapter, LayerTaps, "with_layer_taps")
    assert (with_taps is not None) == CAPABILITY_TABLE[backend]["layer_taps"]
    if with_taps is not None:  # a plain function has no layers the adapter can see: the user's gb.tap calls count
        fn, _, _ = make_op(backend, _forward, _backward)
        assert with_taps(ParamBinding(fn=fn), lambda call, layers, *a: call(*a)) is None


def test_a_tapped_plain_function_is_compared_layer_by_layer(backend: str) -> None:
    """Every backend that differentiates a plain function gives its gb.tap values and the gradients flowing into
    them; a hand-written NumPy gradient cannot, and is named in a note."""
    fn, to_native, options = make_op(backend, _forward, _backward)
    grad = options.get("grad")

    def tapped(x, w):
        return gb.tap("inner", fn(x, w)) * 2.0

    tapped_grad = None if grad is None else (lambda g, x, w: grad(2.0 * g, x, w))
    x, w = _inputs()
    implementations = {"a": gb.Implementation(tapped, tapped_grad, backend),
                       "b": gb.Implementation(tapped, tapped_grad, backend)}
    comparison = gb.compare(implementations, x, w, layers=True, own_check=False, points=1)
    assert comparison.passed, comparison
    if grad is not None:
        assert comparison.layers == [] and any("hand-written gradient" in note for note in comparison.notes)
        return
    (divergence,) = comparison.layers
    assert divergence.layer is None and divergence.agreeing == [("inner", "inner")], divergence.sentence()

"""A catalogue of bad and edge inputs (issue 14, items 4 and 5), on every backend they apply to.

Each case is one call of ``gb.check`` that must raise a gradbridge error of a given type whose message begins
with the name of the argument at fault (``args``, ``params``, ``grad``, ``eps``, ``fn``, ...), so the user
knows what to change; ``match`` pins the part that says what is wrong (the leaf, the element, the value).
Below the table: edge inputs whose right answer is a verdict, not an error (a structure that contains itself,
an empty leaf beside a checked one, a one-element output with a VJP-style ``grad``, a TensorFlow function
whose first trial call fails once).
"""

from __future__ import annotations

import dataclasses
import re
import types
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Type

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import ALL_BACKENDS, require_backend
from kits import make_op

Run = Callable[[types.SimpleNamespace], Any]


class Case(NamedTuple):
    backend: str
    name: str
    run: Run
    error: Type[Exception]
    argument: str
    match: Optional[str] = None


# --- per-backend helpers, built lazily (collecting the table imports no framework) ---

def _numpy() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        arr=lambda values, dtype=np.float64: np.array(values, dtype=dtype),
        square=lambda x: float(np.sum(x ** 2)),
        sines=lambda x: np.sin(x),
        list_square=lambda xs: float(sum(np.sum(x ** 2) for x in xs)),
        nan=lambda x: float(np.sum(x)) * np.nan,
        options={"grad": lambda x: 2 * x},
        list_options={"grad": lambda xs: [2 * x for x in xs]},
        other="torch")


def _torch() -> types.SimpleNamespace:
    import torch

    return types.SimpleNamespace(
        arr=lambda values, dtype=np.float64: torch.tensor(np.array(values, dtype=dtype)),
        square=lambda x: (x ** 2).sum(),
        sines=lambda x: torch.sin(x),
        list_square=lambda xs: sum((x ** 2).sum() for x in xs),
        nan=lambda x: x.sum() * float("nan"),
        options={}, list_options={}, other="jax")


def _jax() -> types.SimpleNamespace:
    import jax.numpy as jnp

    return types.SimpleNamespace(
        arr=lambda values, dtype=np.float64: jnp.asarray(np.array(values, dtype=dtype)),
        square=lambda x: (x ** 2).sum(),
        sines=lambda x: jnp.sin(x),
        list_square=lambda xs: sum((x ** 2).sum() for x in xs),
        nan=lambda x: x.sum() * jnp.nan,
        options={}, list_options={}, other="tensorflow")


def _tensorflow() -> types.SimpleNamespace:
    import tensorflow as tf

    return types.SimpleNamespace(
        arr=lambda values, dtype=np.float64: tf.constant(np.array(values, dtype=dtype)),
        square=lambda x: tf.reduce_sum(x ** 2),
        sines=lambda x: tf.sin(x),
        list_square=lambda xs: tf.add_n([tf.reduce_sum(x ** 2) for x in xs]),
        nan=lambda x: tf.reduce_sum(x) * np.nan,
        options={}, list_options={}, other="torch")


def _autograd() -> types.SimpleNamespace:
    import autograd.numpy as anp

    # autograd's arrays are NumPy's: the checks name the backend (options), as detection goes by fn's code
    return types.SimpleNamespace(
        arr=lambda values, dtype=np.float64: np.array(values, dtype=dtype),
        square=lambda x: anp.sum(x ** 2),
        sines=lambda x: anp.sin(x),
        list_square=lambda xs: sum(anp.sum(x ** 2) for x in xs),
        nan=lambda x: anp.sum(x) * np.nan,
        options={"backend": "autograd"}, list_options={"backend": "autograd"}, other="torch")


NATIVE = {"numpy": _numpy, "torch": _torch, "jax": _jax, "tensorflow": _tensorflow, "autograd": _autograd}


def _chosen(n: types.SimpleNamespace) -> dict:
    """The ``backend=`` a namespace's checks pass (autograd's), or nothing where the arrays pick it."""
    return {"backend": n.options["backend"]} if "backend" in n.options else {}


X = [0.3, -0.7, 1.1]


def _check(n: types.SimpleNamespace, **options: Any) -> Any:
    """``gb.check`` of the square sum at X, with the backend's grad= where it needs one."""
    return gb.check(n.square, n.arr(X), **{**n.options, **options})


# --- options: validated before anything runs, the same on every backend ---

OPTION_CASES = [
    ("eps-1e-300", {"eps": 1e-300}, "eps", r"1e-300"),
    ("eps-1e-20", {"eps": 1e-20}, "eps", r"machine epsilon"),
    ("eps-zero", {"eps": 0.0}, "eps", None),
    ("eps-nan", {"eps": float("nan")}, "eps", None),
    ("eps-string", {"eps": "small"}, "eps", None),
    ("mode", {"mode": "slow"}, "mode", None),
    ("order", {"order": 5}, "order", None),
    ("atol-negative", {"atol": -1.0}, "atol", None),
    ("rtol-inf", {"rtol": float("inf")}, "rtol", None),
    ("seed-negative", {"seed": -1}, "seed", None),
    ("probes-zero", {"probes": 0}, "probes", None),
    ("chunk_size-zero", {"chunk_size": 0}, "chunk_size", None),
    ("budget-zero", {"budget": 0}, "budget", None),
    ("kinks", {"kinks": "ignore"}, "kinks", None),
    ("analytic", {"analytic": "sideways"}, "analytic", None),
    ("promote-string", {"promote": "yes"}, "promote", None),
    ("kwargs-list", {"kwargs": [1, 2]}, "kwargs", None),
    ("wrt-unknown-name", {"wrt": "nope"}, "wrt", r"'nope'"),
    ("wrt-position-out-of-range", {"wrt": 5}, "wrt", None),
    ("wrt-empty", {"wrt": []}, "wrt", None),
    ("structure-unknown", {"structure": {"x": "hexagonal"}}, "structure", None),
    ("executor-not-an-executor", {"executor": 3}, "executor", None),
    ("backend-unknown", {"backend": "mxnet"}, "backend", None),
]


def _option_case(backend: str, name: str, options: dict, argument: str, match: Optional[str]) -> Case:
    return Case(backend, name, lambda n: _check(n, **options), gb.InvalidArgumentError, argument, match)


# --- inputs and functions, on every backend ---

def _self_contained(n: types.SimpleNamespace) -> list:
    xs: list = [n.arr(X)]
    xs.append(xs)
    return xs


def _backward_nan(cotangent: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray]:
    gradient = np.array(2 * np.asarray(x) * np.asarray(cotangent))
    gradient[..., 1] = np.nan
    return (gradient,)


def _backward_inf(cotangent: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray]:
    gradient = np.array(2 * np.asarray(x) * np.asarray(cotangent))
    gradient[..., 0] = np.inf
    return (gradient,)


def _kit_check(backend: str, backward: Callable[..., Tuple[np.ndarray, ...]]) -> Any:
    op, to_native, options = make_op(backend, lambda x: x ** 2, backward)
    return gb.check(lambda x: op(x), to_native(np.array(X)), **options)


def _raises(x: Any) -> Any:
    raise ValueError("boom in fn")


def _input_cases(backend: str) -> List[Case]:
    analytic = "grad" if backend == "numpy" else "fn"  # who computes the analytic side
    cases = [
        Case(backend, "size-0-input", lambda n: gb.check(n.square, n.arr(np.zeros(0)), **n.options),
             gb.InvalidArgumentError, "args", r"x \(float\d+, shape \(0,\)\).*no elements"),
        Case(backend, "size-0-matrix", lambda n: gb.check(n.square, n.arr(np.zeros((0, 3))), **n.options),
             gb.InvalidArgumentError, "args", r"shape \(0, 3\)"),
        Case(backend, "size-0-leaves-in-a-list",
             lambda n: gb.check(n.list_square, [n.arr(np.zeros(0)), n.arr(np.zeros((2, 0)))], **n.list_options),
             gb.InvalidArgumentError, "args", r"xs\[0\].*xs\[1\]"),
        Case(backend, "nan-in-input", lambda n: gb.check(n.square, n.arr([1.0, np.nan, 2.0]), **n.options),
             gb.InvalidArgumentError, "args", r"x\[1\] is nan"),
        Case(backend, "inf-in-input", lambda n: gb.check(n.square, n.arr([np.inf, 1.0]), **n.options),
             gb.InvalidArgumentError, "args", r"x\[0\] is inf"),
        Case(backend, "-inf-in-a-list-input",
             lambda n: gb.check(n.list_square, [n.arr(X), n.arr([[1.0, -np.inf]])], **n.list_options),
             gb.InvalidArgumentError, "args", r"xs\[1\]\[0, 1\] is -inf"),
        Case(backend, "nan-in-float32-input",
             lambda n: gb.check(n.square, n.arr([1.0, np.nan], np.float32), **n.options),
             gb.InvalidArgumentError, "args", r"x\[1\] is nan"),
        Case(backend, "integer-input-only", lambda n: gb.check(n.square, n.arr([1, 2], np.int64), **n.options),
             gb.InvalidArgumentError, "args", r"no floating-point input"),
        Case(backend, "fn-not-callable", lambda n: gb.check("square", n.arr(X), **n.options),
             gb.InvalidArgumentError, "fn"),
        Case(backend, "fn-raises", lambda n: gb.check(_raises, n.arr(X), **n.options),
             gb.FunctionEvaluationError, "fn", r"raised ValueError.*boom in fn"),
        Case(backend, "fn-returns-a-string", lambda n: gb.check(lambda x: "loss", n.arr(X), **n.options),
             gb.FunctionEvaluationError, "fn", r"str"),
        Case(backend, "fn-returns-nan", lambda n: gb.check(n.nan, n.arr(X), **n.options),
             gb.FunctionEvaluationError, "fn", r"returned nan .*unperturbed input"),
        Case(backend, "backward-returns-nan", lambda n: _kit_check(backend, _backward_nan),
             gb.FunctionEvaluationError, analytic, r"nan .*x\[1\]"),
        Case(backend, "backward-returns-inf", lambda n: _kit_check(backend, _backward_inf),
             gb.FunctionEvaluationError, analytic, r"inf .*x\[0\]"),
        Case(backend, "eps-below-the-checked-precision",
             lambda n: gb.check(n.square, n.arr(X, np.float32), promote=False, eps=1e-10, **n.options),
             gb.InvalidArgumentError, "eps", r"float32"),
    ]
    if backend not in ("numpy", "autograd"):  # NumPy arrays (autograd's too) go to any backend asked for
        cases.append(Case(backend, "backend-mismatch",
                          lambda n: gb.check(n.square, n.arr(X), backend=n.other, **n.options),
                          gb.InvalidArgumentError, "backend", backend))
    if backend == "jax":
        cases.append(Case(backend, "list-containing-itself", lambda n: gb.check(n.list_square, _self_contained(n)),
                          gb.InvalidArgumentError, "args", r"xs\[1\] is xs itself"))
    return cases


# --- grad=: NumPy, and the hand-written gradients of PyTorch and TensorFlow ---

def _grad_raises(x: Any) -> Any:
    raise ValueError("boom in grad")


def _grad_cases(backend: str) -> List[Case]:
    def check(grad: Any, fn: Optional[Callable[..., Any]] = None) -> Run:
        return lambda n: gb.check(fn or n.square, n.arr(X), grad=grad, **_chosen(n))

    return [
        Case(backend, "grad-not-callable", check(3), gb.InvalidArgumentError, "grad"),
        Case(backend, "grad-raises", check(_grad_raises), gb.FunctionEvaluationError, "grad",
             r"grad raised ValueError.*boom in grad"),
        Case(backend, "grad-returns-complex", check(lambda x: np.array(X) * 2 + 1e-3j), gb.FunctionEvaluationError,
             "grad", r"gradient for x is complex"),
        Case(backend, "grad-returns-complex-with-zero-imaginary-part",
             check(lambda x: np.array(X, dtype=complex) * 2), gb.FunctionEvaluationError, "grad", r"complex"),
        Case(backend, "grad-returns-nan", check(lambda x: np.array([0.6, np.nan, 2.2])), gb.FunctionEvaluationError,
             "grad", r"nan .*x\[1\]"),
        Case(backend, "grad-returns-inf", check(lambda x: np.array([np.inf, -1.4, 2.2])), gb.FunctionEvaluationError,
             "grad", r"inf .*x\[0\]"),
        Case(backend, "grad-returns-two-gradients", check(lambda x: (np.ones(3), np.ones(3))),
             gb.FunctionEvaluationError, "grad", r"returned 2 gradient"),
        Case(backend, "grad-returns-the-wrong-shape", check(lambda x: np.ones(4)), gb.FunctionEvaluationError,
             "grad", r"shape \(4,\)"),
        Case(backend, "grad-returns-a-string", check(lambda x: "gradient"), gb.FunctionEvaluationError, "grad"),
        Case(backend, "vjp-grad-raises", check(lambda g, x: _grad_raises(x), fn=lambda x: x ** 2),
             gb.FunctionEvaluationError, "grad", r"grad raised ValueError"),
    ]


# --- one backend only ---

def _numpy_cases() -> List[Case]:
    def fails_at_call(number: int) -> Callable[[np.ndarray], float]:
        calls = [0]

        def f(x: np.ndarray) -> float:
            calls[0] += 1
            if calls[0] == number:
                raise RuntimeError(f"fails at call {number}")
            return float(np.sum(np.sin(x)))
        return f

    return [
        Case("numpy", "numpy-without-grad", lambda n: gb.check(n.square, n.arr(X)), gb.InvalidArgumentError, "grad",
             r"pass grad="),
        Case("numpy", "numpy-params", lambda n: gb.check(n.square, n.arr(X), params=[n.arr(X)], **n.options),
             gb.InvalidArgumentError, "params"),
        Case("numpy", "fn-fails-at-call-40",
             lambda n: gb.check(fails_at_call(40), np.linspace(0.1, 1.0, 30), grad=lambda x: np.cos(x)),
             gb.FunctionEvaluationError, "fn", r"evaluation 40 at x\[\d+\] [+-] h.*fails at call 40"),
        Case("numpy", "python-numbers-only",
             lambda n: gb.check(n.list_square, [[0.5, 1.0]], grad=lambda xs: xs), gb.InvalidArgumentError, "args"),
    ]


def _torch_cases() -> List[Case]:
    def meta_module() -> Any:
        import torch

        return torch.nn.Linear(2, 1, device="meta")

    def frozen_module() -> Any:
        import torch

        module = torch.nn.Linear(2, 1).double()
        module.requires_grad_(False)
        return module

    def sparse(layout: str) -> Run:
        def run(n: types.SimpleNamespace) -> Any:
            dense = n.arr([[1.0, 0.0], [0.0, 2.0]])
            value = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
            return gb.check(lambda x: (x.to_dense() ** 2).sum(), value)
        return run

    def inference_param(n: types.SimpleNamespace) -> Any:
        import torch

        with torch.inference_mode():
            w = torch.ones(2, dtype=torch.float64)
        return gb.check(lambda x: (x * w).sum(), n.arr([1.0, 2.0]), params=[w])

    return [
        Case("torch", "meta-device-input", lambda n: gb.check(n.square, n.arr(X).to("meta")),
             gb.InvalidArgumentError, "args", r"x is a tensor on the meta device"),
        Case("torch", "meta-device-in-a-list", lambda n: gb.check(n.list_square, [n.arr(X), n.arr(X).to("meta")]),
             gb.InvalidArgumentError, "args", r"xs\[1\] is a tensor on the meta device"),
        Case("torch", "meta-device-module", lambda n: gb.check(meta_module(), n.arr([[1.0, 2.0]])),
             gb.InvalidArgumentError, "params", r"meta device"),
        Case("torch", "sparse-coo-input", sparse("coo"), gb.InvalidArgumentError, "args", r"sparse_coo"),
        Case("torch", "sparse-csr-input", sparse("csr"), gb.InvalidArgumentError, "args", r"sparse_csr"),
        Case("torch", "frozen-module-only",
             lambda n: (lambda m: gb.check(lambda: m(n.arr([[1.0, 2.0]])).sum(), params=m))(frozen_module()),
             gb.InvalidArgumentError, "params", r"requires_grad=False"),
        Case("torch", "params-list-of-numbers", lambda n: gb.check(n.square, n.arr(X), params=[1.0]),
             gb.InvalidArgumentError, "params", r"params\[0\]"),
        Case("torch", "params-not-iterable", lambda n: gb.check(n.square, n.arr(X), params=3),
             gb.InvalidArgumentError, "params"),
        Case("torch", "inference-tensor-param", inference_param, gb.InvalidArgumentError, "params", r"inference"),
        Case("torch", "wrt-a-frozen-parameter",
             lambda n: gb.check(frozen_module(), n.arr([[1.0, 2.0]]), wrt="weight"), gb.InvalidArgumentError, "wrt",
             r"requires_grad=False"),
    ]


@dataclasses.dataclass
class _Unregistered:
    w: Any


def _jax_cases() -> List[Case]:
    def under_jit(n: types.SimpleNamespace) -> Any:
        import jax

        caught: list = []

        @jax.jit
        def traced(x: Any) -> Any:
            try:
                gb.check(n.square, x)
            except gb.GradbridgeError as exc:
                caught.append(exc)
            return x

        traced(n.arr(X))
        raise caught[0]

    return [
        Case("jax", "check-of-a-tracer-inside-jit", under_jit, gb.InvalidArgumentError, "args", r"tracer"),
        Case("jax", "jax-with-grad", lambda n: gb.check(n.square, n.arr(X), grad=lambda x: 2 * x),
             gb.InvalidArgumentError, "grad", r"custom_vjp"),
        Case("jax", "jax-with-params", lambda n: gb.check(n.square, n.arr(X), params=[n.arr(X)]),
             gb.InvalidArgumentError, "params"),
        Case("jax", "unregistered-dataclass-only",
             lambda n: gb.check(lambda p: (p.w ** 2).sum(), _Unregistered(n.arr(X)), backend="jax"),
             gb.InvalidArgumentError, "args", r"register"),
    ]


def _tensorflow_cases() -> List[Case]:
    def sparse(n: types.SimpleNamespace) -> Any:
        import tensorflow as tf

        value = tf.sparse.from_dense(n.arr([[1.0, 0.0], [0.0, 2.0]]))
        return gb.check(lambda x: tf.reduce_sum(tf.sparse.to_dense(x) ** 2), value)

    def ragged(n: types.SimpleNamespace) -> Any:
        import tensorflow as tf

        value = tf.ragged.constant([[1.0, 2.0], [3.0]], dtype=tf.float64)
        return gb.check(lambda x: tf.reduce_sum(x ** 2), value)

    def frozen_layer(n: types.SimpleNamespace) -> Any:
        import tensorflow as tf

        layer = tf.keras.layers.Dense(1, dtype="float64")
        layer.build((None, 2))
        layer.trainable = False
        x = n.arr([[1.0, 2.0]])
        return gb.check(lambda: tf.reduce_sum(layer(x)), params=layer)

    return [
        Case("tensorflow", "sparse-tensor-input", sparse, gb.InvalidArgumentError, "args",
             r"SparseTensor.*tf\.sparse\.to_dense"),
        Case("tensorflow", "ragged-tensor-input", ragged, gb.InvalidArgumentError, "args",
             r"RaggedTensor.*to_tensor"),
        Case("tensorflow", "frozen-keras-layer-only", frozen_layer, gb.InvalidArgumentError, "params",
             r"trainable=False"),
        Case("tensorflow", "params-a-string",
             lambda n: gb.check(n.square, n.arr(X), params="weights"), gb.InvalidArgumentError, "params"),
    ]


def _catalogue() -> List[Case]:
    cases: List[Case] = []
    for backend in ALL_BACKENDS:
        cases += [_option_case(backend, *entry) for entry in OPTION_CASES]
        cases += _input_cases(backend)
        if backend != "jax":
            cases += _grad_cases(backend)
    return cases + _numpy_cases() + _torch_cases() + _jax_cases() + _tensorflow_cases()


CATALOGUE = _catalogue()


def _names_the_argument(message: str, argument: str) -> bool:
    """The message begins with the argument's name (``eps: ...``, ``fn raised ...``, ``grad raised ...``)."""
    return re.match(rf"{re.escape(argument)}\b", message) is not None


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{c.backend}-{c.name}", marks=getattr(pytest.mark, c.backend))
                                  for c in CATALOGUE])
def test_bad_input_gets_a_gradbridge_error_naming_the_argument(case: Case) -> None:
    require_backend(case.backend)
    native = NATIVE[case.backend]()
    with pytest.raises(gb.GradbridgeError) as raised:
        case.run(native)
    message = str(raised.value)
    assert isinstance(raised.value, case.error), f"{type(raised.value).__name__}: {message}"
    assert _names_the_argument(message, case.argument), f"does not begin with {case.argument!r}: {message}"
    if case.match is not None:
        assert re.search(case.match, message, re.S), f"{case.match!r} not in: {message}"


def test_the_catalogue_covers_every_backend_with_at_least_80_cases() -> None:
    assert len(CATALOGUE) >= 80
    assert {c.backend for c in CATALOGUE} == set(ALL_BACKENDS)


# --- edge inputs whose right answer is a verdict ---

def test_a_list_containing_itself_is_checked_and_the_inner_reference_passed_through(backend: str) -> None:
    if backend == "jax":
        pytest.skip("JAX cannot flatten a structure that contains itself: an error (see the catalogue)")
    n = NATIVE[backend]()
    grad = {"grad": lambda xs: 2 * xs[0]} if backend == "numpy" else _chosen(n)
    report = gb.check(lambda xs: n.square(xs[0]), _self_contained(n), **grad)
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["xs[0]"]


def test_an_empty_leaf_beside_a_checked_one_is_listed_as_not_checked(backend: str) -> None:
    n = NATIVE[backend]()
    grad = {"grad": lambda xs: [2 * x for x in xs]} if backend == "numpy" else _chosen(n)
    report = gb.check(n.list_square, [n.arr(X), n.arr(np.zeros((0, 2)))], **grad)
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["xs[0]"]
    assert any(re.match(r"not checked: xs\[1\] \(float\d+, shape \(0, 2\)\)", note) and "no elements" in note
               for note in report.notes), report.notes


@pytest.mark.parametrize("style", ["vjp", "scalar"])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
def test_a_one_element_output_takes_either_grad_convention(backend: str, style: str, shape: Tuple[int, ...]) -> None:
    """``grad(cotangent, x)`` (a VJP, as for any array output) and ``grad(x)`` (as for a scalar) both work
    for an output of one element that is not 0-d; which one is read from grad's signature."""
    if backend == "jax":
        pytest.skip("JAX takes no grad=")
    n = NATIVE[backend]()
    x = n.arr(X)
    if backend == "tensorflow":
        import tensorflow as tf

        fn = lambda x: tf.reshape(tf.sin(x[:1]) ** 2, shape)  # noqa: E731
    else:
        fn = lambda x: (n.sines(x[:1]) ** 2).reshape(shape)  # noqa: E731

    def local(x: Any) -> np.ndarray:
        x = np.asarray(x)
        gradient = np.zeros(3)
        gradient[0] = 2 * np.sin(x[0]) * np.cos(x[0])
        return gradient

    def make(factor: float) -> Callable[..., np.ndarray]:
        if style == "vjp":
            return lambda cotangent, x: factor * np.asarray(cotangent).reshape(-1)[0] * local(x)
        return lambda x: factor * local(x)

    report = gb.check(fn, x, grad=make(1.0), **_chosen(n))
    assert report.passed, str(report)
    buggy = gb.check(fn, x, grad=make(1.001), **_chosen(n))
    assert not buggy.passed, str(buggy)


def test_numpy_bug_at_the_checked_leaf_still_named_with_an_empty_leaf_beside_it() -> None:
    def fn(xs: list) -> float:
        return float(np.sum(np.sin(xs[0])))

    report = gb.check(fn, [np.array(X), np.zeros(0)], grad=lambda xs: [1.001 * np.cos(xs[0]), xs[1]])
    assert not report.passed and report.row("xs[0]").status == "fail", str(report)


def test_torch_sparse_argument_beside_a_dense_one_is_listed_and_the_dense_one_checked() -> None:
    require_backend("torch")
    import torch

    adjacency = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float32).to_sparse()
    x = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=torch.float64)
    report = gb.check(lambda a, x: torch.sparse.mm(a, x).sin().sum(), adjacency, x)
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["x"]
    assert any("not checked: a (float32" in note and "sparse" in note for note in report.notes), report.notes


def test_tensorflow_sparse_argument_beside_a_dense_one_is_listed_and_the_dense_one_checked() -> None:
    require_backend("tensorflow")
    import tensorflow as tf

    adjacency = tf.sparse.from_dense(tf.constant([[0.0, 1.0], [1.0, 0.0]], tf.float64))
    x = tf.constant([[0.5, -1.0], [2.0, 0.3]], tf.float64)
    report = gb.check(lambda a, x: tf.reduce_sum(tf.sin(tf.sparse.sparse_dense_matmul(a, x))), adjacency, x)
    assert report.backend == "tensorflow"
    assert report.passed, str(report)
    assert [row.input for row in report.rows] == ["x"]
    assert any("not checked: a (float64)" in note and "SparseTensor" in note for note in report.notes), report.notes


@pytest.mark.parametrize("fault", ["raises", "nan"])
def test_tensorflow_first_trial_call_failing_once_changes_neither_precision_nor_seeding(fault: str) -> None:
    """A float32 input is checked on float64 copies even when fn's very first call fails once (raises, or
    returns NaN): no fall back to float32, and no per-evaluation reseeding (which clears TensorFlow's kernel
    cache); the report says that the trial call failed once."""
    require_backend("tensorflow")
    import tensorflow as tf

    calls = [0]

    def flaky(x: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            if fault == "raises":
                raise RuntimeError("transient failure on the first call")
            return tf.reduce_sum(tf.sin(x)) * np.nan
        return tf.reduce_sum(tf.sin(x))

    report = gb.check(flaky, tf.constant(np.array(X, dtype=np.float32)))
    assert report.passed, str(report)
    notes = " ".join(report.notes)
    assert "float32, not float64" not in notes and "cannot run in float64" not in notes, report.notes
    assert "stateful random ops" not in notes, report.notes
    assert "trial call" in notes, report.notes



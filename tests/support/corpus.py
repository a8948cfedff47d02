"""The verdict corpus: correct and buggy gradients, written once, checked on every backend.

Each :class:`Case` is a function given by a NumPy forward and a NumPy VJP (``backward(cotangent, *inputs)``
returning one gradient per input). ``kits.make_op`` turns the pair into each framework's own
custom-gradient op (NumPy ``grad=``, ``torch.autograd.Function``, ``jax.custom_vjp``,
``tf.custom_gradient``, an autograd ``primitive``), so the same correct backward and the same seeded bug
are checked the same way everywhere. A case holds the correct backward and, next to it, a buggy variant
plus the name of the input whose gradient the bug breaks.

What the verdict must be (issue "Verdicts you can trust"):

* every correct backward passes (``report.passed``) with ``gb.check``'s defaults plus the case's
  ``options`` -- no false alarms, also for float32-only kernels, points 1e-7 from a kink, points next
  to the edge of the domain (``log`` at 1e-7), inputs of magnitude 1e5, tiny and huge outputs, and
  inputs that live on a set (``structure=``);
* every buggy backward fails, and the failing row names ``case.failing`` (and ``case.worst_index``
  where the bug sits on one element).

``NATIVE_CASES`` adds a few cases written with one framework's own mechanism (a ``torch.autograd.Function``,
a ``jax.custom_jvp``, a ``tf.custom_gradient``, an autograd ``primitive`` with ``defvjp``, plain autodiff at a
kink, a NumPy scalar loss with ``grad=``); they run on that backend only.

Used by ``tests/conformance/test_corpus.py`` and ``benchmarks/verdict_corpus.py`` (which also runs the
frameworks' own checkers on the same ops).
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # the benchmark imports this file from outside tests/
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from kits import make_op  # noqa: E402
import adaptive  # noqa: E402

BACKENDS = ("numpy", "torch", "jax", "tensorflow", "autograd")

CATEGORIES = {
    "plain": "plain bugs: sign, missing factor, transposed matmul, product/chain rule, wrong axis, wrong input",
    "relative": "small relative bugs (1e-2 .. 1e-4) in float64",
    "few-elements": "bugs on one or a few Jacobian entries (2000-element op, cumsum, sort, gather, conv edge)",
    "scale": "inputs of magnitude 1e5, tiny (1e-8) and huge (1e10) outputs",
    "float32": "float32-only kernels (computed and returned in float32), checked with promote=False",
    "kink": "relu/abs/max/clip/hinge 1e-7 from (and exactly at) the kink; bugs away from it",
    "domain": "log/sqrt/x**0.5/p*log(p)/arccos within 1e-7..1e-6 of the edge of their domain",
    "structure": "symmetric matrices read from one triangle, probability vectors (structure=)",
    "native": "written with one framework's own mechanism (runs on that backend only)",
    "jump": "fn itself jumps exactly at the input (a sampler's branch switch, a tax bracket, floor): judged "
            "against the derivative on each side",
    "adaptive": "internal adaptivity: bisection to a tolerance (a staircase), an adaptive RK45 with its adjoint",
    "contract": "backwards not linear in their incoming gradient (clipped, squared, thresholded, a constant added): "
                "right on every Jacobian entry and wrong for other cotangents",
    "complex": "complex inputs and outputs (holomorphic and not, a real loss, mixed real-complex): missing conj, "
               "the other framework's convention, 1e-4 relative",
    "nondeterministic": "backwards that differ from call to call: a scatter-add summed in a new order each call "
                        "(atomics), call-to-call noise below the tolerance",
}


@dataclass(frozen=True)
class Case:
    """One function of the corpus: a forward, its correct VJP and (usually) a buggy VJP.

    ``inputs`` are NumPy arrays whose dtype is the dtype the op is fed (float64, or float32 for the
    float32-only kernels); ``arg_names`` name them (the checked function is given that signature, so
    every backend names its rows the same way). ``options`` go to ``gb.check`` on top of its defaults.
    """

    name: str
    category: str
    forward: Callable[..., np.ndarray]
    backward: Callable[..., Tuple[np.ndarray, ...]]
    inputs: Tuple[np.ndarray, ...]
    arg_names: Tuple[str, ...]
    buggy: Optional[Callable[..., Tuple[np.ndarray, ...]]] = None
    failing: Optional[str] = None
    bug: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    worst_index: Optional[Tuple[int, ...]] = None

    @property
    def id(self) -> str:
        return self.name.replace(" ", "-")


@dataclass(frozen=True)
class Variant:
    """A case with one of its backwards: ``correct`` (must pass) or buggy (must fail on ``failing``)."""

    case: Case
    correct: bool

    @property
    def backward(self) -> Callable[..., Tuple[np.ndarray, ...]]:
        return self.case.backward if self.correct else self.case.buggy

    @property
    def id(self) -> str:
        return f"{self.case.id}[{'correct' if self.correct else 'buggy'}]"


def _rng(name: str) -> np.random.Generator:
    """A generator seeded from the case name, so cases do not depend on each other's order."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _quiet(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Forwards that meet the edge of their domain return NaN there without printing warnings."""

    def wrapped(*args: Any) -> Any:
        with np.errstate(all="ignore"):
            return fn(*args)

    wrapped.__name__ = getattr(fn, "__name__", "forward")
    return wrapped


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _proj(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """Projection onto the tangent space of the simplex: subtract the mean along ``axis``."""
    return v - v.mean(axis=axis, keepdims=True)


CASES: List[Case] = []


def case(name: str, category: str, forward, backward, inputs, arg_names, buggy=None, failing=None, bug="",
         options=None, worst_index=None) -> Case:
    c = Case(name, category, _quiet(forward), backward, tuple(np.asarray(a) for a in inputs), tuple(arg_names),
             buggy, failing, bug, dict(options or {}), worst_index)
    CASES.append(c)
    return c


# ---------------------------------------------------------------------------------------------- plain
r = _rng("plain")

case("cube", "plain", lambda x: x ** 3, lambda g, x: (3 * x ** 2 * g,), [r.normal(size=(3, 4))], "x",
     lambda g, x: (-3 * x ** 2 * g,), "x", "sign flip")
case("square", "plain", lambda x: x ** 2, lambda g, x: (2 * x * g,), [r.normal(size=5)], "x",
     lambda g, x: (x * g,), "x", "missing factor 2")
case("matmul", "plain", lambda a, b: a @ b, lambda g, a, b: (g @ b.T, a.T @ g),
     [r.normal(size=(3, 3)), r.normal(size=(3, 3))], ("a", "b"),
     lambda g, a, b: (g @ b, a.T @ g), "a", "transposed matmul gradient (g @ b instead of g @ b.T)")
case("x*sin(x)", "plain", lambda x: x * np.sin(x), lambda g, x: ((np.sin(x) + x * np.cos(x)) * g,),
     [r.normal(size=6)], "x", lambda g, x: (x * np.cos(x) * g,), "x", "dropped product-rule term")
case("bias add", "plain", lambda x, b: x + b, lambda g, x, b: (g, g.sum(axis=0)),
     [r.normal(size=(4, 4)), r.normal(size=4)], ("x", "b"),
     lambda g, x, b: (g, g.sum(axis=1)), "b", "bias gradient summed over the wrong axis")
case("x*y+z", "plain", lambda x, y, z: x * y + z, lambda g, x, y, z: (g * y, g * x, g),
     [r.normal(size=4), r.normal(size=4), r.normal(size=4)], ("x", "y", "z"),
     lambda g, x, y, z: (g * y, g * y, g), "y", "wrong input's value in y's gradient")
case("sin(x^2)", "plain", lambda x: np.sin(x ** 2), lambda g, x: (2 * x * np.cos(x ** 2) * g,),
     [r.normal(size=6)], "x", lambda g, x: (np.cos(x ** 2) * g,), "x", "chain rule: inner derivative 2x missing")
case("softmax", "plain", _softmax,
     lambda g, x: (_softmax(x) * (g - (g * _softmax(x)).sum(axis=-1, keepdims=True)),),
     [r.normal(size=(3, 5))], "x", lambda g, x: (_softmax(x) * g,), "x", "softmax VJP without the -s*sum(g*s) term")
case("x/y", "plain", lambda x, y: x / y, lambda g, x, y: (g / y, -g * x / y ** 2),
     [r.normal(size=5), 1 + r.uniform(size=5)], ("x", "y"),
     lambda g, x, y: (g / y, g * x / y ** 2), "y", "quotient rule: sign of y's gradient")
case("outer(u, v)", "plain", np.outer, lambda g, u, v: (g @ v, g.T @ u),
     [r.normal(size=4), r.normal(size=4)], ("u", "v"),
     lambda g, u, v: (g.T @ v, g.T @ u), "u", "cotangent transposed in u's gradient")
case("center rows", "plain", lambda x: x - x.mean(axis=-1, keepdims=True), lambda g, x: (_proj(g),),
     [r.normal(size=(3, 6))], "x", lambda g, x: (g,), "x", "mean term dropped")
case("row sum of squares", "plain", lambda x: (x ** 2).sum(axis=1), lambda g, x: (2 * x * g[:, None],),
     [r.normal(size=(4, 4))], "x", lambda g, x: (2 * x * g[None, :],), "x", "cotangent broadcast along the wrong axis")


def _tanh_layer_bwd(g, w, x, bug=False):
    t = np.tanh(w @ x)
    d = g * (1 - t ** 2)
    return (np.outer(g if bug else d, x), w.T @ d)


case("tanh(W @ x)", "plain", lambda w, x: np.tanh(w @ x), _tanh_layer_bwd,
     [r.normal(size=(3, 4)) * 0.5, r.normal(size=4)], ("w", "x"),
     lambda g, w, x: _tanh_layer_bwd(g, w, x, bug=True), "w", "activation derivative missing in w's gradient")


def _layer_norm(x):
    mu = x.mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)


def _layer_norm_bwd(g, x, bug=False):
    mu = x.mean(axis=-1, keepdims=True)
    s = np.sqrt(((x - mu) ** 2).mean(axis=-1, keepdims=True) + 1e-5)
    y = (x - mu) / s
    if bug:
        return ((g - g.mean(axis=-1, keepdims=True)) / s,)
    return ((g - g.mean(axis=-1, keepdims=True) - y * (g * y).mean(axis=-1, keepdims=True)) / s,)


case("layer norm", "plain", _layer_norm, _layer_norm_bwd, [r.normal(size=(2, 6))], "x",
     lambda g, x: _layer_norm_bwd(g, x, bug=True), "x", "variance treated as a constant")


def _lse(x):
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


case("logsumexp rows", "plain", _lse, lambda g, x: (_softmax(x) * g[:, None],), [r.normal(size=(3, 5))], "x",
     lambda g, x: (np.exp(x) * g[:, None],), "x", "softmax normalisation missing")


def _normalize_bwd(g, x, bug=False):
    n = np.linalg.norm(x)
    y = x / n
    return ((g if bug else g - y * (y @ g)) / n,)


case("l2 normalize", "plain", lambda x: x / np.linalg.norm(x), _normalize_bwd, [r.normal(size=5)], "x",
     lambda g, x: _normalize_bwd(g, x, bug=True), "x", "radial projection missing")

# ------------------------------------------------------------------------------------------- relative
r = _rng("relative")

case("exp 1e-2", "relative", np.exp, lambda g, x: (g * np.exp(x),), [r.normal(size=5)], "x",
     lambda g, x: (g * np.exp(x) * (1 + 1e-2),), "x", "relative error 1e-2")
case("log1p(x^2) 1e-3", "relative", lambda x: np.log1p(x ** 2), lambda g, x: (g * 2 * x / (1 + x ** 2),),
     [r.normal(size=6)], "x", lambda g, x: (g * 2 * x / (1 + x ** 2) * (1 + 1e-3),), "x", "relative error 1e-3")
case("tanh 1e-4", "relative", np.tanh, lambda g, x: (g * (1 - np.tanh(x) ** 2),), [r.normal(size=6)], "x",
     lambda g, x: (g * (1 - np.tanh(x) ** 2) * (1 + 1e-4),), "x", "relative error 1e-4")
case("x @ w 1e-4 on w", "relative", lambda x, w: x @ w, lambda g, x, w: (g @ w.T, x.T @ g),
     [r.normal(size=(3, 4)), r.normal(size=(4, 2))], ("x", "w"),
     lambda g, x, w: (g @ w.T, x.T @ g * (1 + 1e-4)), "w", "relative error 1e-4 in w's gradient")
case("sin(x)*x^2 near 10, 1e-4", "relative", lambda x: np.sin(x) * x ** 2,
     lambda g, x: (g * (np.cos(x) * x ** 2 + 2 * x * np.sin(x)),), [10 + r.normal(size=5)], "x",
     lambda g, x: (g * (np.cos(x) * x ** 2 + 2 * x * np.sin(x)) * (1 + 1e-4),), "x", "relative error 1e-4")
case("x^-2 near 0.1, 1e-4", "relative", lambda x: x ** -2.0, lambda g, x: (-2 * g * x ** -3.0,),
     [r.uniform(0.05, 0.2, size=5)], "x", lambda g, x: (-2 * g * x ** -3.0 * (1 + 1e-4),), "x",
     "relative error 1e-4 where the curvature is large")

# ------------------------------------------------------------------------------------------- few elements
r = _rng("few-elements")


def _tanh_one_wrong(g, x):
    grad = g * (1 - np.tanh(x) ** 2)
    grad[1234] *= 1 + 1e-2
    return (grad,)


case("tanh of 2000, one entry wrong", "few-elements", np.tanh, lambda g, x: (g * (1 - np.tanh(x) ** 2),),
     [r.normal(size=2000)], "x", _tanh_one_wrong, "x", "entry 1234 of a 2000x2000 diagonal Jacobian off by 1e-2",
     options={"mode": "full"}, worst_index=(1234,))


def _cumsum_bwd(g, x, bug=False):
    grad = np.cumsum(g[::-1])[::-1].copy()
    if bug:
        grad[0] -= g[-1]
    return (grad,)


case("cumsum", "few-elements", np.cumsum, _cumsum_bwd, [r.normal(size=20)], "x",
     lambda g, x: _cumsum_bwd(g, x, bug=True), "x", "x[0] misses the last output's cotangent", worst_index=(0,))


def _sort_bwd(g, x, bug=False):
    order = np.argsort(x, kind="stable")
    grad = np.zeros_like(x)
    grad[order] = g
    if bug:
        grad[order[0]], grad[order[1]] = g[1], g[0]
    return (grad,)


case("sort", "few-elements", np.sort, _sort_bwd, [r.permutation(30) * 0.1 + r.uniform(0, 0.01, size=30)], "x",
     lambda g, x: _sort_bwd(g, x, bug=True), "x", "gradients of the two smallest entries swapped")

GATHER_INDEX = np.array([0, 1, 2, 3, 3, 4, 5, 6, 7, 7, 7, 8, 9, 2, 5])


def _gather_bwd(g, x, bug=False):
    grad = np.zeros_like(x)
    if bug:
        grad[GATHER_INDEX] = g  # repeated indices: the last write wins
    else:
        np.add.at(grad, GATHER_INDEX, g)
    return (grad,)


case("gather with repeats", "few-elements", lambda x: x[GATHER_INDEX], _gather_bwd, [r.normal(size=10)], "x",
     lambda g, x: _gather_bwd(g, x, bug=True), "x", "assignment instead of accumulation for repeated indices")


def _conv(x, k):
    m = x.shape[0] - k.shape[0] + 1
    return sum(x[j:j + m] * k[j] for j in range(k.shape[0]))


def _conv_bwd(g, x, k, bug=False):
    m = g.shape[0]
    gx = np.zeros_like(x)
    for j in range(k.shape[0]):
        gx[j:j + m] += g * k[j]
    gk = np.array([g @ x[j:j + m] for j in range(k.shape[0])])
    if bug:
        gx[-1] = 0.0  # off-by-one loop bound
    return gx, gk


case("conv1d valid", "few-elements", _conv, _conv_bwd, [r.normal(size=12), r.normal(size=3)], ("x", "k"),
     lambda g, x, k: _conv_bwd(g, x, k, bug=True), "x", "last input element's gradient dropped",
     worst_index=(11,))

# ------------------------------------------------------------------------------------------- scale
r = _rng("scale")
S = 1e5

case("log at 1e5", "scale", np.log, lambda g, x: (g / x,), [r.uniform(1e5, 3e5, size=6)], "x",
     lambda g, x: (g / (x + 100),), "x", "log gradient shifted: 1/(x+100) (relative 3e-4..1e-3)")
case("sqrt at 1e5", "scale", np.sqrt, lambda g, x: (g * 0.5 / np.sqrt(x),), [r.uniform(1e5, 5e5, size=6)], "x",
     lambda g, x: (g / np.sqrt(x),), "x", "missing factor 1/2")
case("x*w with x ~ 1e5", "scale", lambda x, w: x * w, lambda g, x, w: (g * w, g * x),
     [S * r.normal(size=5), r.normal(size=5)], ("x", "w"),
     lambda g, x, w: (g * w, g * w), "w", "w's gradient uses w instead of x")
case("softplus(x/1e5)", "scale", lambda x: np.logaddexp(0, x / S), lambda g, x: (g * _sigmoid(x / S) / S,),
     [S * r.normal(size=6)], "x", lambda g, x: (g * _sigmoid(x / S),), "x", "chain rule: 1/1e5 missing")
case("sin(x/1e5) 1e-3", "scale", lambda x: np.sin(x / S), lambda g, x: (g * np.cos(x / S) / S,),
     [3 * S * r.normal(size=6)], "x", lambda g, x: (g * np.cos(x / S) / S * (1 + 1e-3),), "x",
     "relative error 1e-3")
case("x @ w with x ~ 1e5, 1e-4", "scale", lambda x, w: x @ w, lambda g, x, w: (g @ w.T, x.T @ g),
     [S * r.normal(size=(3, 4)), r.normal(size=(4, 2))], ("x", "w"),
     lambda g, x, w: (g @ w.T * (1 + 1e-4), x.T @ g), "x", "relative error 1e-4 in x's gradient")
case("tiny output 1e-8*tanh", "scale", lambda x: 1e-8 * np.tanh(x), lambda g, x: (1e-8 * g * (1 - np.tanh(x) ** 2),),
     [r.normal(size=6)], "x", lambda g, x: (1e-8 * g * (1 - np.tanh(x) ** 2) * (1 + 1e-3),), "x",
     "relative error 1e-3 on gradients of size 1e-8")
case("huge output 1e10*sin", "scale", lambda x: 1e10 * np.sin(x), lambda g, x: (1e10 * g * np.cos(x),),
     [r.normal(size=6)], "x", lambda g, x: (1e10 * g * np.cos(x) * (1 + 1e-3),), "x",
     "relative error 1e-3 on gradients of size 1e10")
case("exp(x/1e5) at 1e5", "scale", lambda x: np.exp(x / S), lambda g, x: (g * np.exp(x / S) / S,),
     [S * r.uniform(-3, 3, size=6)], "x", lambda g, x: (g * np.exp(x / S),), "x", "chain rule: 1/1e5 missing")

# ------------------------------------------------------------------------------------------- float32
r = _rng("float32")
F32 = {"promote": False}


def f32(fn):
    """A kernel that only computes in float32: inputs are cast down, the result is float32."""

    def kernel(*arrays):
        return np.asarray(fn(*[np.asarray(a, dtype=np.float32) for a in arrays]), dtype=np.float32)

    return kernel


def f32_bwd(fn):
    def backward(g, *arrays):
        grads = fn(np.asarray(g, dtype=np.float32), *[np.asarray(a, dtype=np.float32) for a in arrays])
        return tuple(np.asarray(v, dtype=np.float32) for v in grads)

    return backward


def _x32(*shape, scale=1.0):
    return (scale * r.normal(size=shape)).astype(np.float32)


case("float32 tanh", "float32", f32(np.tanh), f32_bwd(lambda g, x: (g * (1 - np.tanh(x) ** 2),)), [_x32(8)], "x",
     f32_bwd(lambda g, x: (g * (1 - np.tanh(x) ** 2) * np.float32(1.01),)), "x", "relative error 1e-2",
     options=F32)
case("float32 exp", "float32", f32(np.exp), f32_bwd(lambda g, x: (g * np.exp(x),)), [_x32(8)], "x",
     f32_bwd(lambda g, x: (g * np.exp(x) * np.float32(1.02),)), "x", "relative error 2e-2", options=F32)
case("float32 matmul", "float32", f32(lambda a, b: a @ b), f32_bwd(lambda g, a, b: (g @ b.T, a.T @ g)),
     [_x32(3, 3), _x32(3, 3)], ("a", "b"), f32_bwd(lambda g, a, b: (g @ b.T, g.T @ a)), "b",
     "b's gradient transposed", options=F32)
case("float32 softmax", "float32", f32(_softmax),
     f32_bwd(lambda g, x: (_softmax(x) * (g - (g * _softmax(x)).sum(axis=-1, keepdims=True)),)), [_x32(2, 6)], "x",
     f32_bwd(lambda g, x: (_softmax(x) * g,)), "x", "softmax VJP without the -s*sum(g*s) term", options=F32)
case("float32 x*sin(x)", "float32", f32(lambda x: x * np.sin(x)),
     f32_bwd(lambda g, x: ((np.sin(x) + x * np.cos(x)) * g,)), [_x32(8, scale=2.0)], "x",
     f32_bwd(lambda g, x: (x * np.cos(x) * g,)), "x", "dropped product-rule term", options=F32)
case("float32 logsumexp rows", "float32", f32(_lse), f32_bwd(lambda g, x: (_softmax(x) * g[:, None],)),
     [_x32(3, 5)], "x", f32_bwd(lambda g, x: (_softmax(x) * g[:, None] * np.float32(1.01),)), "x",
     "relative error 1e-2", options=F32)

# ------------------------------------------------------------------------------------------- kinks
r = _rng("kink")
NEAR = np.array([1e-7, -1e-7, 0.0, 3e-7, -2e-7])

case("relu near 0", "kink", lambda x: np.maximum(x, 0.0), lambda g, x: (g * (x > 0),),
     [np.concatenate([r.normal(size=7), NEAR])], "x", lambda g, x: (g * np.where(x > 0, 0.5, 0.0),), "x",
     "gradient 0.5 for x > 0")
case("abs near 0", "kink", np.abs, lambda g, x: (g * np.sign(x),),
     [np.concatenate([[-1.3, -0.4], r.normal(size=5), NEAR])], "x", lambda g, x: (g,), "x",
     "sign of x forgotten (gradient 1 for x < 0)")
_mx = r.normal(size=9)
case("maximum(x, y) near ties", "kink", np.maximum, lambda g, x, y: (g * (x >= y), g * (x < y)),
     [_mx, _mx + np.concatenate([NEAR[:4], [0.8, -0.6, 1.1, -1.5, 0.3]])], ("x", "y"),
     lambda g, x, y: (g * (x >= y), g * (x >= y)), "y", "y gets x's mask (copy-paste)")
case("clip to [-1, 1] near the bounds", "kink", lambda x: np.clip(x, -1.0, 1.0),
     lambda g, x: (g * ((x >= -1) & (x <= 1)),),
     [np.array([-1 - 1e-7, -1 + 1e-7, 1 - 1e-7, 1 + 1e-7, -1.0, 1.0, 2.5, -3.0, 0.3, -0.7])], "x",
     lambda g, x: (g,), "x", "gradient passed through outside [-1, 1]")
case("hinge max(0, 1-x) near 1", "kink", lambda x: np.maximum(0.0, 1.0 - x), lambda g, x: (-g * (x < 1),),
     [np.concatenate([1 + NEAR, [2.0, 1.7, -0.5, 0.2]])], "x", lambda g, x: (-g,), "x",
     "mask dropped (gradient -1 for x > 1)")
_rowmax = r.normal(size=(4, 5))
_rowmax[0, 2] = _rowmax[0].max() + 1e-7  # a near-tie: two entries 1e-7 apart at the top of row 0
_rowmax[0, 4] = _rowmax[0, 2] - 1e-7
_rowmax[1, 1] = _rowmax[1, 3] = _rowmax[1].max() + 0.1  # an exact tie in row 1


def _rowmax_bwd(g, x, bug=False):
    if bug:
        return ((x == x.max(axis=0, keepdims=True)) * g[:, None],)  # argmax over the wrong axis
    grad = np.zeros_like(x)
    grad[np.arange(x.shape[0]), np.argmax(x, axis=1)] = g
    return (grad,)


case("row max near ties", "kink", lambda x: x.max(axis=1), _rowmax_bwd, [_rowmax], "x",
     lambda g, x: _rowmax_bwd(g, x, bug=True), "x", "maximum taken over the wrong axis")

# ------------------------------------------------------------------------------------------- domain edges
r = _rng("domain")
EDGE = np.array([1e-7, 3e-7, 1e-6])

case("log near 0", "domain", np.log, lambda g, x: (g / x,), [np.concatenate([EDGE, [0.5, 2.0, 7.0]])], "x",
     lambda g, x: (g / (x + 1e-8),), "x", "'stabilising' epsilon: 1/(x + 1e-8)")
case("sqrt near 0", "domain", np.sqrt, lambda g, x: (g * 0.5 / np.sqrt(x),),
     [np.concatenate([EDGE, [0.3, 4.0]])], "x", lambda g, x: (g / np.sqrt(x),), "x", "missing factor 1/2")
case("x**0.5 * w near 0", "domain", lambda x, w: x ** 0.5 * w, lambda g, x, w: (g * w * 0.5 * x ** -0.5, g * x ** 0.5),
     [np.concatenate([EDGE, [0.3, 4.0]]), r.normal(size=5)], ("x", "w"),
     lambda g, x, w: (g * w * 0.5 * x ** -0.5, g * x), "w", "w's gradient uses x instead of x**0.5")
case("-p*log(p) near 0", "domain", lambda p: -p * np.log(p), lambda g, p: (-g * (np.log(p) + 1),),
     [np.concatenate([EDGE, [0.2, 0.7]])], "p", lambda g, p: (-g * np.log(p),), "p", "the +1 of the product rule missing")
case("arccos near +-1", "domain", np.arccos, lambda g, x: (-g / np.sqrt(1 - x ** 2),),
     [np.array([1 - 1e-7, 1 - 1e-6, -(1 - 3e-7), 0.3, -0.5])], "x", lambda g, x: (-g / np.sqrt(1 - x),), "x",
     "derivative of arccos written as -1/sqrt(1-x)")

# ------------------------------------------------------------------------------------------- structure
r = _rng("structure")


def _spd(n, batch=()):
    m = r.normal(size=(*batch, n, n))
    return m @ np.swapaxes(m, -1, -2) + n * np.eye(n)


def _logdet_chol(a):
    """log det of symmetric positive definite matrices via Cholesky (reads the lower triangle only);
    NaN outside the positive definite cone (e.g. the JAX kit's shape probe on zeros)."""
    try:
        chol = np.linalg.cholesky(a)
    except np.linalg.LinAlgError:
        return np.full(a.shape[:-2], np.nan)
    return 2 * np.log(np.diagonal(chol, axis1=-2, axis2=-1)).sum(axis=-1)


def _logdet_bwd(g, a, bug=False):
    inv = np.linalg.inv(a)
    if bug:  # the lower-triangle ("2*inv - diag") convention mixed into a symmetric gradient
        inv = 2 * inv - inv * np.eye(a.shape[-1])
    return (g[:, None, None] * inv,)


SYM_A = {"structure": {"a": "symmetric"}}
case("logdet via cholesky (symmetric)", "structure", _logdet_chol, _logdet_bwd, [_spd(3, (2,))], "a",
     lambda g, a: _logdet_bwd(g, a, bug=True), "a", "off-diagonal gradient doubled", options=SYM_A)


def _tril_mv_bwd(g, a, x, bug=False):
    low = np.tril(np.outer(g, x))
    ga = low + low.T if bug else (low + low.T) / 2
    return ga, np.tril(a).T @ g


case("tril(a) @ x (symmetric)", "structure", lambda a, x: np.tril(a) @ x, _tril_mv_bwd,
     [_spd(4), r.normal(size=4)], ("a", "x"), lambda g, a, x: _tril_mv_bwd(g, a, x, bug=True), "a",
     "symmetrised gradient not halved (diagonal doubled)", options=SYM_A)


def _eigvalsh_bwd(g, a, bug=False):
    _, v = np.linalg.eigh(a)
    return ((v.T @ np.diag(g) @ v) if bug else (v @ np.diag(g) @ v.T),)


_sym = r.normal(size=(4, 4))
case("eigvalsh (symmetric)", "structure", np.linalg.eigvalsh, _eigvalsh_bwd, [_sym + _sym.T], "a",
     lambda g, a: _eigvalsh_bwd(g, a, bug=True), "a", "eigenvector matrix transposed", options=SYM_A)

_p = r.dirichlet(np.full(5, 3.0))
_q = r.uniform(0.5, 1.5, size=5)
case("p*log(p/q) (simplex)", "structure", lambda p, q: p * (np.log(p) - np.log(q)),
     lambda g, p, q: (_proj(g * (np.log(p) - np.log(q) + 1)), -g * p / q), [_p, _q], ("p", "q"),
     lambda g, p, q: (_proj(g * (np.log(p) + 1)), -g * p / q), "p", "log q term missing in p's gradient",
     options={"structure": {"p": "simplex"}})
case("mixture p @ M (simplex)", "structure", lambda p, m: p @ m, lambda g, p, m: (_proj(m @ g), np.outer(p, g)),
     [r.dirichlet(np.full(4, 3.0)), r.normal(size=(4, 4))], ("p", "m"),
     lambda g, p, m: (_proj(m.T @ g), np.outer(p, g)), "p", "M transposed in p's gradient",
     options={"structure": {"p": "simplex"}})
case("rows of p on the simplex", "structure", lambda p, w: (p ** 2 * w).sum(axis=1),
     lambda g, p, w: (_proj(2 * p * w * g[:, None]), p ** 2 * g[:, None]),
     [r.dirichlet(np.full(4, 3.0), size=3), r.normal(size=(3, 4))], ("p", "w"),
     lambda g, p, w: (_proj(2 * p * w * g[:, None], axis=0), p ** 2 * g[:, None]), "p",
     "projection mean taken over the wrong axis", options={"structure": {"p": "simplex"}})



# ------------------------------------------------------------------------------------------------ jump
# x[2] sits exactly on the switch: fn's one-sided limits differ there (the branch at x0 is the one taken)
_SWITCH_X = np.array([0.3, -0.2, 0.0, 0.7])


def _switch(x):
    """A sampler that switches branch at 0 (accept above, reject below): jumps by 30 at the switch."""
    return np.where(x >= 0.0, 30.0 + 3.0 * x ** 2 + x, 0.5 * x ** 2 - x)


case("sampler branch switch", "jump", _switch, lambda g, x: (g * np.where(x >= 0.0, 6.0 * x + 1.0, x - 1.0),),
     [_SWITCH_X], "x", lambda g, x: (g * np.where(x >= 0.0, 6.0 * x, x - 1.0),), "x",
     "the linear term's derivative dropped on the accepted branch (wrong right at the switch too)")
case("tax bracket", "jump", lambda x: np.sin(x) + 10.0 * (x > 1.0), lambda g, x: (g * np.cos(x),),
     [np.array([0.2, 1.0, 2.0])], "x", lambda g, x: (g * np.where(x == 1.0, -np.cos(x), np.cos(x)),), "x",
     "sign flip only at the element that sits on the jump", worst_index=(1,))
case("scaled floor", "jump", lambda x, s: s * np.floor(x) + x ** 2, lambda g, x, s: (2.0 * x * g, np.floor(x) * g),
     [np.array([2.0, 0.5, -1.3]), np.array([1.5, 0.7, 2.0])], ("x", "s"),
     lambda g, x, s: (2.0 * x * g, x * g), "s", "straight-through slip: s's gradient uses x instead of floor(x)")

# -------------------------------------------------------------------------------------------- adaptive
_KEPLER = (np.array([0.3, 1.2, 2.5, 4.0]), np.array([0.1, 0.5, 0.7, 0.3]))
for _xtol in (1e-9, 1e-12):
    case(f"kepler bisection xtol {_xtol:g}", "adaptive",
         lambda m, e, xtol=_xtol: adaptive.kepler_bisection(m, e, xtol),
         lambda g, m, e, xtol=_xtol: adaptive.kepler_vjp(g, m, e, xtol), _KEPLER, ("m", "e"),
         lambda g, m, e, xtol=_xtol: adaptive.kepler_vjp(g, m, e, xtol, bug="relative"), "e",
         "1e-4 relative error in e's gradient (below the staircase's noise at the default step)")
case("adaptive RK45 adjoint", "adaptive",
     lambda y0, theta: adaptive.odeint_rk45(y0, theta, rtol=1e-10, atol=1e-12),
     lambda g, y0, theta: adaptive.odeint_rk45_adjoint(g, y0, theta, rtol=1e-10, atol=1e-12),
     [np.array([1.0, 0.8]), np.array([1.1, 0.6, 0.9, 0.5])], ("y0", "theta"),
     lambda g, y0, theta: adaptive.odeint_rk45_adjoint(g, y0, theta, rtol=1e-10, atol=1e-12, bug="relative"), "theta",
     "1e-4 relative error in the parameters' adjoint")


# ------------------------------------------------------------------------------------ nondeterministic
_CALLS = [0]


def _next_call() -> np.random.Generator:
    """A generator that differs on every call, like a GPU's scheduling: no seed the check sets pins it."""
    _CALLS[0] += 1
    return np.random.default_rng(7919 * _CALLS[0])


_GATHER = np.array([0, 2, 2, 5, 1, 2, 5, 0, 3, 4, 2, 5])


def _scatter_add(g, size, drop=None):
    """The gather's VJP: g added into its source positions one term at a time, in a new order each call
    (how atomic adds land), so the float64 sums differ in their last bits from call to call."""
    out = np.zeros(size)
    for k in _next_call().permutation(len(_GATHER)):
        if k != drop:
            out[_GATHER[k]] += g[k]
    return out


r = _rng("nondeterministic")
case("gather, atomic scatter-add backward", "nondeterministic", lambda x, w: x[_GATHER] * w,
     lambda g, x, w: (_scatter_add(g * w, x.size), g * x[_GATHER]),
     [r.normal(size=6) * 1e3, r.normal(size=12)], ("x", "w"),
     lambda g, x, w: (_scatter_add(g * w, x.size, drop=5), g * x[_GATHER]), "x",
     "one of the duplicate indices' contributions dropped in the scatter-add", worst_index=(2,))
_NOISY_A = r.normal(size=(3, 4))


def _noisy_tanh_vjp(g, x, bug=0.0):
    """tanh(A x)'s VJP with call-to-call relative noise of 1e-12 (below the tolerance); ``bug`` scales
    element 1."""
    grad = _NOISY_A.T @ (g * (1.0 - np.tanh(_NOISY_A @ x) ** 2))
    grad = grad * (1.0 + 1e-12 * _next_call().uniform(-1.0, 1.0, grad.shape))
    grad[1] *= 1.0 + bug
    return (grad,)


case("tanh(Ax), noisy backward", "nondeterministic", lambda x: np.tanh(_NOISY_A @ x), _noisy_tanh_vjp,
     [r.normal(size=4)], "x", lambda g, x: _noisy_tanh_vjp(g, x, bug=1e-4), "x",
     "1e-4 relative error on one element under call-to-call noise", worst_index=(1,))


# --------------------------------------------------------------------------------------------- complex
# Backwards in gradbridge's convention (PyTorch's and TensorFlow's): g is dL/dRe y + i dL/dIm y, each gradient
# dL/dRe z + i dL/dIm z; the JAX and autograd kits conjugate both ends (their convention).
r = _rng("complex")


def _cz(*shape):
    return r.normal(size=shape) + 1j * r.normal(size=shape)


case("complex product", "complex", lambda z, w: z * w, lambda g, z, w: (g * np.conj(w), g * np.conj(z)),
     [_cz(5), _cz(5)], ("z", "w"), lambda g, z, w: (g * w, g * np.conj(z)), "z", "missing conj (holomorphic)")
case("complex exp", "complex", np.exp, lambda g, z: (g * np.conj(np.exp(z)),), [_cz(2, 3)], "z",
     lambda g, z: (g * np.exp(z),), "z", "missing conj of the derivative")
case("z*conj(w)", "complex", lambda z, w: z * np.conj(w), lambda g, z, w: (g * w, np.conj(g) * z),
     [_cz(4), _cz(4)], ("z", "w"), lambda g, z, w: (g * w, g * z), "w",
     "non-holomorphic: the cotangent not conjugated")
case("|z|^2 row losses", "complex", lambda z: np.sum(np.real(z * np.conj(z)), axis=1),
     lambda g, z: (2 * z * g[:, None],), [_cz(2, 3)], "z",
     lambda g, z: (2 * np.conj(z) * g[:, None],), "z", "JAX's convention (the conjugate) in a PyTorch-convention rule")
case("complex matmul", "complex", lambda a, b: a @ b, lambda g, a, b: (g @ np.conj(b).T, np.conj(a).T @ g),
     [_cz(3, 4), _cz(4, 2)], ("a", "b"), lambda g, a, b: (g @ np.conj(b).T * (1 + 1e-4), np.conj(a).T @ g), "a",
     "1e-4 relative error")
case("complex scale by real", "complex", lambda z, x: z * x,
     lambda g, z, x: (g * x, np.real(g * np.conj(z))), [_cz(5), r.normal(size=5)], ("z", "x"),
     lambda g, z, x: (g * x, np.real(g * z)), "x", "real input's gradient from the unconjugated product")


# --------------------------------------------------------------------------------------------- contract
# Backwards right on every Jacobian entry (the unit cotangents of a full check) and wrong for other cotangents: only
# the linearity contract sees them; and one wrong everywhere by a constant the rows see too.
r = _rng("contract")
_T = r.normal(size=(3, 4))


def _dtanh(x):
    return 1 - np.tanh(x) ** 2


case("tanh, cotangent clipped at 2", "contract", np.tanh, lambda g, x: (g * _dtanh(x),), [_T], "x",
     lambda g, x: (np.clip(g, -2, 2) * _dtanh(x),), "x", "incoming gradient clipped (right for unit cotangents)")
case("tanh, cotangent squared", "contract", np.tanh, lambda g, x: (g * _dtanh(x),), [r.normal(size=6)], "x",
     lambda g, x: (g * np.abs(g) * _dtanh(x),), "x", "incoming gradient squared (right for unit cotangents)")
case("x*w, w's cotangent thresholded", "contract", lambda x, w: x * w, lambda g, x, w: (g * w, g * x),
     [r.normal(size=5), r.normal(size=5)], ("x", "w"),
     lambda g, x, w: (g * w, np.where(np.abs(g) > 1.5, 1.5 * np.sign(g), g) * x), "w",
     "w's incoming gradient thresholded at 1.5")
case("sin, constant added in backward", "contract", np.sin, lambda g, x: (g * np.cos(x),), [r.normal(size=5)], "x",
     lambda g, x: (g * np.cos(x) + 1e-3,), "x", "a term that does not depend on the incoming gradient")


# ------------------------------------------------------------------------------------------- variants
def variants(correct: Optional[bool] = None) -> List[Variant]:
    """Every (case, backward) pair: the correct ones, then the buggy ones."""
    out = [Variant(c, True) for c in CASES] if correct in (None, True) else []
    if correct in (None, False):
        out += [Variant(c, False) for c in CASES if c.buggy is not None]
    return out


# ------------------------------------------------------------------------------------------- natives
def native_array(backend: str, array: np.ndarray, requires_grad: bool = False) -> Any:
    """``array`` as ``backend``'s array with the same dtype (JAX float64 arrays are made in 64-bit scope)."""
    array = np.asarray(array)
    if backend in ("numpy", "autograd"):  # autograd's arrays are NumPy's
        return array.copy()
    if backend == "torch":
        import torch

        return torch.tensor(array, requires_grad=requires_grad)
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        with jax.enable_x64(True):
            return jnp.asarray(array)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(array)
    raise ValueError(backend)


def named(fn: Callable[..., Any], names: Sequence[str], name: str) -> Callable[..., Any]:
    """``fn`` behind a signature ``(names...)``, so every backend names the rows after the case's inputs."""

    def op(*args: Any) -> Any:
        return fn(*args)

    op.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                          for n in names])
    op.__name__ = op.__qualname__ = name
    return op


def build(backend: str, variant: Variant) -> Tuple[Callable[..., Any], Callable[..., Any], List[Any], Dict[str, Any]]:
    """``(checked_fn, native_op, native_args, options)`` for ``gb.check(checked_fn, *native_args, **options)``.

    ``native_op`` is the kit's op itself (what the frameworks' own checkers are given); ``checked_fn`` is
    the same op behind the case's argument names.
    """
    c = variant.case
    op, _, kit_options = make_op(backend, c.forward, variant.backward)
    args = [native_array(backend, a) for a in c.inputs]
    options = {"backend": backend, **kit_options, **c.options}
    return named(op, c.arg_names, c.id.replace("-", "_")), op, args, options


@dataclass(frozen=True)
class NativeCase:
    """A case written with one framework's own mechanism: ``make()`` returns ``(fn, numpy_inputs)``."""

    name: str
    backend: str
    correct: bool
    make: Callable[[], Tuple[Callable[..., Any], Tuple[np.ndarray, ...]]]
    failing: Optional[str] = None
    bug: str = ""
    position: int = 0  # the failing input's position among the arguments
    options: Mapping[str, Any] = field(default_factory=dict)
    category: str = "native"

    @property
    def id(self) -> str:
        return f"{self.backend}:{self.name.replace(' ', '-')}[{'correct' if self.correct else 'buggy'}]"


_rn = _rng("native")
_LIN = (_rn.normal(size=(4, 3)), _rn.normal(size=(3, 3)), _rn.normal(size=3))
_KINK_X = np.concatenate([_rn.normal(size=6), NEAR])
_SP_X = 3 * _rn.normal(size=6)
_LOGREG = (_rn.normal(size=4), _rn.normal(size=(10, 4)), np.sign(_rn.normal(size=10)))


def _torch_linear(bug: bool):
    def make():
        import torch

        class Linear(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, w, b):
                ctx.save_for_backward(x, w)
                return x @ w.t() + b

            @staticmethod
            def backward(ctx, g):
                x, w = ctx.saved_tensors
                gw = x.t() @ g if bug else g.t() @ x
                return g @ w, gw, g.sum(0)

        return Linear.apply, _LIN

    return make


def _torch_relu():
    import torch

    return torch.relu, (_KINK_X,)


def _jax_softplus(bug: bool):
    def make():
        import jax
        import jax.numpy as jnp

        @jax.custom_jvp
        def softplus(x):
            return jnp.logaddexp(0.0, x)

        @softplus.defjvp
        def softplus_jvp(primals, tangents):
            (x,), (t,) = primals, tangents
            return softplus(x), jax.nn.sigmoid(-x if bug else x) * t

        def f(x):
            return softplus(x)

        return f, (_SP_X,)

    return make


def _jax_abs():
    import jax.numpy as jnp

    def f(x):
        return jnp.abs(x)

    return f, (_KINK_X,)


def _tf_log1pexp(bug: bool):
    def make():
        import tensorflow as tf

        @tf.custom_gradient
        def log1pexp(x):
            e = tf.exp(x)

            def grad(g):
                return g * (1 / (1 + e) if bug else 1 - 1 / (1 + e))

            return tf.math.log1p(e), grad

        def f(x):
            return log1pexp(x)

        return f, (_SP_X,)

    return make


def _tf_relu():
    import tensorflow as tf

    def f(x):
        return tf.nn.relu(x)

    return f, (_KINK_X,)


def _autograd_softplus(bug: bool):
    def make():
        import autograd.numpy as anp
        from autograd.extend import defvjp, primitive

        @primitive
        def softplus(x):
            return anp.logaddexp(0.0, x)

        def softplus_vjp(ans, x):
            return lambda g: g * 0.5 * (1.0 + anp.tanh(0.5 * (-x if bug else x)))  # sigmoid

        defvjp(softplus, softplus_vjp)

        def f(x):
            return softplus(x)

        return f, (_SP_X,)

    return make


def _autograd_abs():
    import autograd.numpy as anp

    def f(x):
        return anp.abs(x)

    return f, (_KINK_X,)


def _numpy_logreg(bug: bool):
    def make():
        _, xs, ys = _LOGREG

        def loss(w):
            return float(np.mean(np.logaddexp(0.0, -ys * (xs @ w))))

        def grad(w):
            s = _sigmoid(-ys * (xs @ w))
            total = -xs.T @ (ys * s)
            return total if bug else total / len(ys)

        loss.grad = grad
        return loss, (_LOGREG[0],)

    return make


_ORDER_X = _rn.normal(size=5)
_STRIDE_X = _rn.normal(size=(3, 4))


def _jax_sine_rule(detach: bool):
    """A ``jax.custom_jvp`` sine whose tangent rule is right at first order; ``detach``: it stops the gradient of
    the point it differentiates at, so its own derivative (forward-over-forward) is lost."""
    def make():
        import jax
        import jax.numpy as jnp

        @jax.custom_jvp
        def sine(x):
            return jnp.sin(x)

        @sine.defjvp
        def rule(primals, tangents):
            (x,), (t,) = primals, tangents
            return jnp.sin(x), jnp.cos(jax.lax.stop_gradient(x) if detach else x) * t

        return sine, (_ORDER_X,)

    return make


def _torch_strided_square(bug: bool):
    """A torch Function for x**2 whose backward (``bug``) reads the saved input's memory as if it were contiguous."""
    def make():
        import torch

        class Square(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x ** 2

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                if bug:
                    x = torch.as_strided(x, x.shape, (x.shape[1], 1))
                return 2 * g * x

        return Square.apply, (_STRIDE_X,)

    return make


def _numpy_c_order_kernel(bug: bool):
    """x * exp(x) with a hand-written ``grad=`` whose "kernel" (``bug``) reads its input's buffer as C order, as a
    ctypes or numba kernel assuming contiguous input does: right on the C-ordered copies a check makes."""
    def make():
        def fn(x):
            return x * np.exp(x)

        def grad(g, x):
            if bug:
                steps = [x.itemsize * int(np.prod(x.shape[k + 1:])) for k in range(x.ndim)]
                x = np.lib.stride_tricks.as_strided(x, x.shape, steps)
            return g * (1 + x) * np.exp(x)

        fn.grad = grad
        return fn, (_STRIDE_X,)

    return make


def _torch_saved_scale(bug: str):
    """A torch Function for ``x * tanh(x)`` saving its input; ``bug``: ``"saved"`` scales the saved input in place
    in the backward (right values once, corrupted ones for every later backward and for the caller's tensor),
    ``"float32"`` returns the gradient in float32 (torch casts it back silently)."""
    def make():
        import torch

        class TanhScale(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * torch.tanh(x)

            @staticmethod
            def backward(ctx, g):
                (x,) = ctx.saved_tensors
                t = torch.tanh(x)
                grad = g * (t + x * (1 - t * t))
                if bug == "saved":
                    x.mul_(1.0)  # the values stay, the write is there: a version bump on the caller's tensor
                return grad.float() if bug == "float32" else grad

        return TanhScale.apply, (_STRIDE_X,)

    return make


NATIVE_CASES: List[NativeCase] = [
    NativeCase("custom_jvp sine, forward-over-forward", "jax", True, _jax_sine_rule(False),
               options={"order": 2, "analytic": "fwd"}),
    NativeCase("custom_jvp sine, forward-over-forward", "jax", False, _jax_sine_rule(True), "x",
               "tangent rule detaches the point: right at first order, its derivative lost",
               options={"order": 2, "analytic": "fwd"}),
    NativeCase("Function reading memory as contiguous", "torch", True, _torch_strided_square(False)),
    NativeCase("Function reading memory as contiguous", "torch", False, _torch_strided_square(True), "x",
               "backward reads a non-contiguous saved input as contiguous (right on contiguous copies)"),
    NativeCase("Function auditing its saved input", "torch", True, _torch_saved_scale("")),
    NativeCase("Function auditing its saved input", "torch", False, _torch_saved_scale("saved"), "x",
               "backward writes the input it saved in place (right values once)"),
    NativeCase("Function auditing its saved input", "torch", False, _torch_saved_scale("float32"), "x",
               "backward returns a float32 gradient for a float64 input (torch casts it silently)"),
    NativeCase("Linear Function", "torch", True, _torch_linear(False)),
    NativeCase("Linear Function", "torch", False, _torch_linear(True), "w", "weight gradient transposed", 1),
    NativeCase("relu autograd near 0", "torch", True, _torch_relu),
    NativeCase("custom_jvp softplus", "jax", True, _jax_softplus(False)),
    NativeCase("custom_jvp softplus", "jax", False, _jax_softplus(True), "x", "sigmoid(-x) instead of sigmoid(x)"),
    NativeCase("abs autodiff near 0", "jax", True, _jax_abs),
    NativeCase("custom_gradient log1pexp", "tensorflow", True, _tf_log1pexp(False)),
    NativeCase("custom_gradient log1pexp", "tensorflow", False, _tf_log1pexp(True), "x",
               "1/(1+e^x) instead of 1 - 1/(1+e^x)"),
    NativeCase("relu autodiff near 0", "tensorflow", True, _tf_relu),
    NativeCase("defvjp softplus", "autograd", True, _autograd_softplus(False)),
    NativeCase("defvjp softplus", "autograd", False, _autograd_softplus(True), "x",
               "sigmoid(-x) instead of sigmoid(x)"),
    NativeCase("abs autodiff near 0", "autograd", True, _autograd_abs),
    NativeCase("grad= kernel reading C order", "numpy", True, _numpy_c_order_kernel(False)),
    NativeCase("grad= kernel reading C order", "numpy", False, _numpy_c_order_kernel(True), "x",
               "the gradient reads a Fortran-ordered input as C order (right on contiguous copies)"),
    NativeCase("logistic loss with grad=", "numpy", True, _numpy_logreg(False)),
    NativeCase("logistic loss with grad=", "numpy", False, _numpy_logreg(True), "w", "mean's 1/n missing"),
]


def build_native(case: NativeCase) -> Tuple[Callable[..., Any], List[Any], Dict[str, Any]]:
    """``(fn, native_args, options)`` for a native case."""
    fn, arrays = case.make()
    options: Dict[str, Any] = {"backend": case.backend, **case.options}
    if case.backend == "numpy":
        options["grad"] = fn.grad
    return fn, [native_array(case.backend, a) for a in arrays], options


def failing_names(name: str, position: int) -> Tuple[str, ...]:
    """Names a failing row may carry: the input's name, or ``arg{k}`` / ``inputs[{k}]`` for ``*inputs`` ops."""
    return (name, f"arg{position}", f"inputs[{position}]")


def located(report: Any, name: str, position: int) -> bool:
    """Whether a failing report blames input ``name``: its failing rows name that one input, or, where every row
    passes, a violated contract names an element of it (a backward that clips its cotangent is right on every
    Jacobian entry and wrong only for other cotangents; a backward returning a float32 gradient for ``(x)``, or
    writing its saved ``the input x``, is right on every entry too)."""
    names = failing_names(name, position)
    failed = {row.input for row in report.failures}
    if failed:
        return len(failed) == 1 and failed.pop() in names
    violated = [c.message for c in report.contracts if not c.passed]
    return bool(violated) and any(f"at {n}[" in message or f"at {n} " in message or f"({n})" in message
                                  or f"the input {n})" in message for message in violated for n in names)


def summary() -> Dict[str, Tuple[int, int]]:
    """``{category: (correct functions, buggy functions)}`` over the shared cases."""
    counts: Dict[str, List[int]] = {}
    for c in CASES:
        n = counts.setdefault(c.category, [0, 0])
        n[0] += 1
        n[1] += c.buggy is not None
    return {k: (v[0], v[1]) for k, v in counts.items()}


class CheckTimeout(Exception):
    """A check ran past its time limit (raised from a SIGALRM handler in the main thread)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`CheckTimeout` after ``seconds`` of wall time (0 or no SIGALRM: no limit).

    Every check of the corpus takes a few seconds at most; one that takes minutes is a bug (and would
    blow the test file's time budget), so it is cut short and reported instead.
    """
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CheckTimeout(f"the check took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

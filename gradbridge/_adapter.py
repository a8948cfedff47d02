"""The contract between the backend-agnostic core and one framework adapter.

The core works on one flat float64 NumPy vector ``x`` (all checked leaves, concatenated) and one flat
output vector ``y``.  An adapter turns the user's function and arguments into a :class:`PreparedFunction`
that can evaluate ``y(x)`` for a batch of points, and compute vector-Jacobian and Jacobian-vector
products at the checked point with the framework's own differentiation.  The core never imports or
names a framework: everything framework-specific sits behind these two protocols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ContextManager, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class LeafSpec:
    """Where one checked input leaf (or one output) lives inside the flat vector.

    Attributes:
        name: readable path, e.g. ``x``, ``xs[1]`` or ``fc1.weight``.
        shape: shape of the leaf as the user's function sees it.
        dtype: the user's original dtype, as a string (the check itself runs in float64).
        offset: first position of the leaf in the flat vector.
        kind: ``"input"`` for function arguments, ``"param"`` for module parameters, ``"output"``.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int
    kind: str = "input"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)

    def unravel(self, flat_index: int) -> Tuple[int, ...]:
        """The index inside this leaf's own shape of flat position ``flat_index`` (relative to the leaf)."""
        if not self.shape:
            return ()
        return tuple(int(i) for i in np.unravel_index(flat_index, self.shape))


@dataclass
class CheckSpec:
    """Everything an adapter needs to know to prepare a check (already validated by the core).

    ``promote``: True (the default) checks float64 copies of every floating leaf. False keeps each leaf
    in its own dtype (float32, float16, bfloat16): the adapter casts the float64 points it is given to
    the leaf's dtype (the core has already rounded them to it, so the cast is exact), casts cotangents
    and tangents to the output's and leaf's dtypes, and sets ``working_eps`` to the coarsest precision
    among the checked leaves and the outputs.
    """

    fn: Callable[..., Any]
    args: Tuple[Any, ...]
    kwargs: Mapping[str, Any]
    params: Any
    wrt: Optional[Tuple[Any, ...]]
    grad: Optional[Callable[..., Any]]
    seed: int
    train: bool
    arg_names: Tuple[str, ...]
    promote: bool = True


@runtime_checkable
class PreparedFunction(Protocol):
    """A user function made ready for checking: flat float64 in, flat float64 out.

    ``leaves`` lists every checked leaf; ``x0`` is the (promoted) point at which the check runs.
    ``output_specs`` is filled by the first call of :meth:`evaluate`.

    Optional attributes the core reads when present:

    * ``working_eps``: machine epsilon of the precision ``fn`` really runs in, when the adapter could not
      promote to float64 (say why in ``notes``); steps and tolerances then follow that precision.
    * ``undefined_gradients``: ``{leaf name: reason}`` for leaves the framework defines no gradient for
      (TensorFlow's ``None``, a torch ``NotImplementedError``, ...), filled by :meth:`vjp`/:meth:`jvp`.
      Such rows are reported as "no gradient", acceptable only where the numeric derivative is zero.
    """

    leaves: Sequence[LeafSpec]
    x0: np.ndarray
    notes: List[str]
    analytic_source: str

    @property
    def output_specs(self) -> Sequence[LeafSpec]: ...

    def session(self) -> ContextManager[None]:
        """Make evaluation deterministic (eval mode, pinned RNG, float64 defaults) and restore the
        user's state on exit, also when an exception leaves the block."""

    def evaluate(self, points: np.ndarray) -> np.ndarray:
        """``points`` has shape (k, n); returns the outputs, shape (k, m), one row per point."""

    def vjp(self, cotangents: np.ndarray) -> np.ndarray:
        """Vector-Jacobian products at ``x0``: (k, m) cotangents to (k, n) input gradients."""

    def jvp(self, tangents: np.ndarray) -> np.ndarray:
        """Jacobian-vector products at ``x0``: (k, n) tangents to (k, m); raises ModeUnsupportedError."""

    def gradient_function(self, cotangent: np.ndarray) -> "PreparedFunction":
        """The function ``x -> J(x)^T cotangent`` as a new prepared function (for ``order=2``);
        raises ModeUnsupportedError where the backend cannot differentiate twice."""


class Adapter(Protocol):
    """One framework: detection without imports, and preparation of checks."""

    name: str
    module_name: str
    install_hint: str

    def owns(self, value: Any) -> bool:
        """True when ``value`` is one of this framework's arrays, modules or variables."""

    def version(self) -> str: ...

    def prepare(self, spec: CheckSpec) -> PreparedFunction: ...


class ProblemBackedFunction:
    """Base for prepared functions that wrap one adapter "problem" (structure, modules, state to restore).

    The problem owns the deterministic session and discovers the outputs on the first evaluation; a
    derived function (the gradient function of ``order=2``) brings its own ``_outputs``. Subclasses set
    ``self.problem`` and ``self._outputs``.
    """

    problem: Any
    _outputs: Optional[List[LeafSpec]]

    @property
    def output_specs(self) -> List[LeafSpec]:
        specs = self._outputs if self._outputs is not None else self.problem.outputs
        if specs is None:
            raise RuntimeError("output_specs is known after the first evaluation")
        return specs

    def session(self) -> ContextManager[None]:
        return self.problem.session()

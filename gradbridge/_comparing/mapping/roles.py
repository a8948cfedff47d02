"""The vocabulary of parameter roles, each with a canonical layout, and converting a value between layouts.

Invariant: a conversion only permutes axes (an exact round trip); a role's canonical layout is defined here once.
"""

from __future__ import annotations

from typing import (Any, Callable, Dict, NamedTuple, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np


# --- the vocabulary ---

DENSE_KERNEL = "dense.kernel"
CONV_KERNEL = "conv.kernel"
BIAS = "bias"
NORM_SCALE = "norm.scale"
NORM_OFFSET = "norm.offset"
NORM_MEAN = "norm.mean"
NORM_VARIANCE = "norm.variance"
EMBEDDING = "embedding"

#: Each role's canonical layout (what :attr:`ParamRole.to_canonical` permutes to).
CANONICAL_LAYOUTS: Dict[str, str] = {
    DENSE_KERNEL: "(in, out)",
    CONV_KERNEL: "(*spatial, in, out)",
    BIAS: "(out,)",
    NORM_SCALE: "(features,)",
    NORM_OFFSET: "(features,)",
    NORM_MEAN: "(features,)",
    NORM_VARIANCE: "(features,)",
    EMBEDDING: "(vocabulary, dim)",
}
ROLES = tuple(CANONICAL_LAYOUTS)

#: The name of ``gb.compare``'s option that names parameters explicitly, for messages.
OVERRIDE_OPTION = "param_map"

#: (out, in) -> (in, out).
OUT_IN = (1, 0)


def out_in_spatial(ndim: int) -> Tuple[int, ...]:
    """The permutation from a kernel laid out (out, in, *spatial) to the canonical (*spatial, in, out)."""
    if ndim < 3:
        raise ValueError(f"a convolution kernel has at least 3 axes, got {ndim}")
    return tuple(range(2, ndim)) + (1, 0)


class ParamRole(NamedTuple):
    """What one parameter of an implementation is, for :func:`pair_params`.

    Attributes:
        role: one of :data:`ROLES`, or None (unknown: paired by name or override only, never permuted).
        to_canonical: the axis permutation taking this parameter's layout to the role's canonical layout
            (``np.transpose(value, to_canonical)``); None when it already is canonical.
        layer: the path of the layer that owns it (``fc1``, ``encoder.0``; a framework's collection prefix
            such as flax's ``params`` dropped), for pairing by layer.
        shape: its shape in this implementation's layout.
        required: False for values an implementation may be given but need not be (buffers, running
            statistics, non-trainable variables): those left unpaired are not an error.
        kind: the layer's type, for messages (``Linear``, ``Dense``, ``LayerNorm``).
    """

    role: Optional[str]
    to_canonical: Optional[Tuple[int, ...]] = None
    layer: str = ""
    shape: Tuple[int, ...] = ()
    required: bool = True
    kind: str = ""

    @property
    def canonical_shape(self) -> Tuple[int, ...]:
        shape = tuple(self.shape)
        return shape if self.to_canonical is None else tuple(shape[i] for i in self.to_canonical)

    def describe(self) -> str:
        what = self.role or "parameter of unknown role"
        where = f" of {self.kind + ' ' if self.kind else ''}layer {self.layer!r}" if self.layer else ""
        return f"{what}{where}, shape {tuple(self.shape)}"


Roles = Dict[str, ParamRole]


@runtime_checkable
class ParameterRoles(Protocol):
    """Optional adapter capability (:class:`gradbridge._adapter.CompareAdapter`): the role of each parameter an
    implementation takes, so that :func:`gradbridge.compare` can give one ``params=`` to implementations that
    name and lay out the same weights differently."""

    def parameter_roles(self, fn: Callable[..., Any], params: Any = None) -> Optional[Roles]:
        """``{name: ParamRole}`` for every parameter ``fn`` takes, by the names :meth:`expected_params` and
        :meth:`bind_params` use (a module's or model's own; for a plain function, those of ``params``, a
        template of the parameters it takes: a nested mapping of arrays or of anything with a ``.shape``,
        whose leaf names say the role). None when the adapter cannot tell (a plain function without
        ``params``, or parameters named in no convention it knows)."""


def inverse(permutation: Sequence[int]) -> Tuple[int, ...]:
    result = [0] * len(permutation)
    for i, p in enumerate(permutation):
        result[p] = i
    return tuple(result)


def to_canonical(value: np.ndarray, role: ParamRole) -> np.ndarray:
    value = np.asarray(value)
    return value if role.to_canonical is None else np.transpose(value, role.to_canonical)


def from_canonical(value: np.ndarray, role: ParamRole) -> np.ndarray:
    value = np.asarray(value)
    return value if role.to_canonical is None else np.transpose(value, inverse(role.to_canonical))


def convert(value: np.ndarray, source: ParamRole, target: ParamRole) -> np.ndarray:
    """``value`` (laid out as ``source`` says) laid out as ``target`` says: a contiguous copy. A parameter of
    unknown role on either side passes unchanged (only known layouts are permuted).

    Gradients convert the same way (an axis permutation is orthogonal), so the way back is
    ``convert(gradient, target, source)``."""
    permutation = _conversion(source, target)
    value = np.asarray(value)
    return np.ascontiguousarray(value if permutation is None else np.transpose(value, permutation))


def _conversion(source: ParamRole, target: ParamRole) -> Optional[Tuple[int, ...]]:
    """The axis permutation :func:`convert` applies (source layout -> canonical -> target layout), None for none."""
    if source.role is None or target.role is None:
        return None
    ndim = len(source.shape)
    identity = tuple(range(ndim))
    s = source.to_canonical or identity
    t_inverse = inverse(target.to_canonical) if target.to_canonical is not None else identity
    if len(s) != ndim or len(t_inverse) != ndim:
        return None
    combined = tuple(s[i] for i in t_inverse)
    return None if combined == identity else combined


def _converted_shape(source: ParamRole, target: ParamRole) -> Tuple[int, ...]:
    permutation = _conversion(source, target)
    shape = tuple(source.shape)
    return shape if permutation is None else tuple(shape[i] for i in permutation)

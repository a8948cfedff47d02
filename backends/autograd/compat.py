"""Every autograd API this backend uses that autograd does not document as public, in one place.

Invariant: the rest of the backend reaches autograd's internals only through the names defined here, so a
change in autograd is fixed in this file alone (written against autograd 1.9.1; the same names exist in 1.8.0).
The public API (``autograd.numpy``, ``autograd.extend.primitive``/``defvjp``/``defjvp``) is imported where used.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Optional, Tuple

# The tracing machinery behind autograd.make_vjp / make_jvp. Those two (autograd.core's) warn "Output seems
# independent of input" and hide whether the output depended on the input at all; the check needs to know (a
# backward that dropped autograd's boxes looks exactly like that) and must not touch the warnings filters
# (process-wide, not thread-safe), so vjp_of and jvp_of below repeat their few lines without the warning.
from autograd.core import JVPNode, VJPNode, backward_pass, vspace
from autograd.tracer import new_box, trace_stack

# The registries of rules: primitive -> VJP maker (defvjp) and primitive -> JVP maker (defjvp). Read to tell a
# user primitive with a forward-mode rule of its own (forward_rule) from one without.
from autograd.core import primitive_jvps, primitive_vjps  # noqa: F401

# Boxes are how autograd traces: isbox tells a traced value from a plain one, getval unwraps (recursively).
from autograd.tracer import getval, isbox  # noqa: F401


def _trace(start_node: Any, fun: Callable[[Any], Any], x: Any) -> Tuple[Any, Any]:
    """autograd.tracer.trace without its warning: ``(output value, output node or None when disconnected)``."""
    with trace_stack.new_trace() as t:
        start_box = new_box(x, t, start_node)
        end_box = fun(start_box)
        if isbox(end_box) and end_box._trace == start_box._trace:
            return end_box._value, end_box._node
        return end_box, None


def vjp_of(fun: Callable[[Any], Any], x: Any) -> Tuple[Callable[[Any], Any], Any, bool]:
    """autograd.core.make_vjp: ``(backward, output, connected)``; ``connected`` is False when the output does
    not depend on ``x`` (``backward`` then returns zeros)."""
    end_value, end_node = _trace(VJPNode.new_root(), fun, x)
    if end_node is None:
        return (lambda g: vspace(x).zeros()), end_value, False
    return (lambda g: backward_pass(g, end_node)), end_value, True


def jvp_of(fun: Callable[[Any], Any], x: Any, tangent: Any) -> Tuple[Any, Any]:
    """autograd.core.make_jvp(fun, x)(tangent): ``(output, derivative)``; zeros where the output does not
    depend on ``x``."""
    end_value, end_node = _trace(JVPNode.new_root(tangent), fun, x)
    if end_node is None:
        return end_value, vspace(end_value).zeros()
    return end_value, end_node.g


def is_primitive(value: Any) -> bool:
    """Whether ``value`` is an autograd primitive: the function ``autograd.extend.primitive`` returns, marked by
    an attribute in its own ``__dict__`` (read there, so nothing of a user's object runs)."""
    return isinstance(value, types.FunctionType) and value.__dict__.get("_is_autograd_primitive") is True


def raw_function(primitive: Any) -> Optional[Callable[..., Any]]:
    """The function a primitive wraps (``primitive.fun``), or None."""
    return primitive.__dict__.get("fun") if isinstance(primitive, types.FunctionType) else None


def missing_vjp(exc: BaseException) -> bool:
    """Whether ``exc`` is autograd saying a primitive has no VJP for an argument ("VJP of f wrt argnum 0 not
    defined"), raised while recording the forward pass or in the backward pass."""
    return isinstance(exc, NotImplementedError) and str(exc).startswith("VJP of ")


def missing_jvp(exc: BaseException) -> bool:
    """Whether ``exc`` is autograd lacking a forward-mode rule: "JVP of f wrt argnums (0,) not defined" for a
    primitive without any, or the KeyError ``defjvp``'s dispatch raises for an argument it has no rule for."""
    if isinstance(exc, NotImplementedError):
        return str(exc).startswith("JVP of ")
    if isinstance(exc, KeyError):
        tb = exc.__traceback__
        last = None
        while tb is not None:
            last = tb.tb_frame.f_code
            tb = tb.tb_next
        return last is not None and last.co_name == "jvp_argnums" and last.co_filename.endswith("core.py") \
            and "autograd" in last.co_filename
    return False

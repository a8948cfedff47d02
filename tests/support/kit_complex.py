"""Complex-valued custom rules, written once and built with each framework's own custom-gradient mechanism.

A rule is ``(forward, backward)``, both written against a tiny array namespace ``xp`` (``xp.conj``,
``xp.exp``, ``xp.real``; ``*`` and ``+`` work on every framework's arrays). ``backward(xp, g, *inputs)``
returns one gradient per input in gradbridge's convention (PyTorch's and TensorFlow's): ``g`` is
``dL/dRe y + i dL/dIm y`` and each gradient ``dL/dRe z + i dL/dIm z``. JAX and autograd expect the conjugate
of both (their convention), so their builders conjugate at both ends: the same seeded bug (a missing
``conj``) is then the same bug on every backend.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Tuple

import numpy as np

Forward = Callable[..., Any]
Backward = Callable[..., Tuple[Any, ...]]


def namespace(backend: str) -> types.SimpleNamespace:
    """``conj``, ``exp``, ``real``, ``abs2`` (``|z|^2`` as a real array), ``total`` (a sum) and ``cplx`` (a real
    array as a complex one: TensorFlow does not mix real and complex operands) of ``backend``."""
    if backend in ("numpy",):
        return types.SimpleNamespace(conj=np.conj, exp=np.exp, real=np.real, total=np.sum,
                                     abs2=lambda z: np.real(z * np.conj(z)), cplx=lambda x: x + 0j)
    if backend == "autograd":
        import autograd.numpy as anp
        return types.SimpleNamespace(conj=anp.conj, exp=anp.exp, real=anp.real, total=anp.sum,
                                     abs2=lambda z: anp.real(z * anp.conj(z)), cplx=lambda x: x + 0j)
    if backend == "torch":
        import torch
        return types.SimpleNamespace(conj=torch.conj, exp=torch.exp, real=torch.real, total=torch.sum,
                                     abs2=lambda z: torch.real(z * torch.conj(z)), cplx=lambda x: x + 0j)
    if backend == "jax":
        import jax.numpy as jnp
        return types.SimpleNamespace(conj=jnp.conj, exp=jnp.exp, real=jnp.real, total=jnp.sum,
                                     abs2=lambda z: jnp.real(z * jnp.conj(z)), cplx=lambda x: x + 0j)
    import tensorflow as tf
    return types.SimpleNamespace(conj=tf.math.conj, exp=tf.exp, real=tf.math.real, total=tf.reduce_sum,
                                 abs2=lambda z: tf.math.real(z * tf.math.conj(z)),
                                 cplx=lambda x: tf.complex(x, tf.zeros_like(x)))


def to_native(backend: str, value: np.ndarray) -> Any:
    """A NumPy array (complex or real) as ``backend``'s array, in double precision."""
    if backend in ("numpy", "autograd"):
        return np.array(value)
    if backend == "torch":
        import torch
        return torch.tensor(value)
    if backend == "jax":
        import jax
        import jax.numpy as jnp
        with jax.enable_x64(True):
            return jnp.asarray(value)
    import tensorflow as tf
    return tf.constant(value)


def make_rule(backend: str, forward: Forward, backward: Backward) -> Tuple[Callable[..., Any], dict]:
    """``(fn, options)``: the rule as ``backend``'s users write it; ``options`` go to ``gb.check``."""
    xp = namespace(backend)
    if backend == "numpy":
        arity = len(inspect.signature(forward).parameters) - 1  # forward(xp, *inputs)
        scalar = np.ndim(forward(xp, *[np.ones(2, complex)] * arity)) == 0

        def grad(*arguments: Any) -> Any:  # grad(*args) for a scalar fn, grad(cotangent, *args) otherwise
            g, inputs = (1.0, arguments) if scalar else (arguments[0], arguments[1:])
            return backward(xp, g, *inputs)

        grad.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"a{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(arity + (not scalar))])
        return (lambda *inputs: forward(xp, *inputs)), {"grad": grad}
    if backend == "torch":
        import torch

        class Rule(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, *inputs: Any) -> Any:
                ctx.save_for_backward(*inputs)
                return forward(xp, *inputs)

            @staticmethod
            def backward(ctx: Any, g: Any) -> Any:
                return backward(xp, g, *ctx.saved_tensors)

        return Rule.apply, {}
    if backend == "jax":
        import jax

        @jax.custom_vjp
        def rule(*inputs: Any) -> Any:
            return forward(xp, *inputs)

        def rule_fwd(*inputs: Any) -> Any:
            return forward(xp, *inputs), inputs

        def rule_bwd(inputs: Any, ct: Any) -> Any:  # JAX's convention: the conjugate of both
            return tuple(xp.conj(g) for g in backward(xp, xp.conj(ct), *inputs))

        rule.defvjp(rule_fwd, rule_bwd)
        return rule, {}
    if backend == "autograd":
        from autograd.extend import defvjp_argnums, primitive

        @primitive
        def op(*inputs: Any) -> Any:
            return forward(xp, *inputs)

        def vjp_maker(argnums: Any, ans: Any, args: Any, kwargs: Any) -> Any:
            def vjp(g: Any) -> Any:  # autograd's convention: the conjugate of both
                grads = backward(xp, np.conj(g), *args)
                return tuple(np.conj(grads[i]) for i in argnums)

            return vjp

        defvjp_argnums(op, vjp_maker)
        return op, {"backend": "autograd"}
    import tensorflow as tf

    @tf.custom_gradient
    def tf_rule(*inputs: Any) -> Any:
        def grad(g: Any) -> Any:
            return backward(xp, g, *inputs)

        return forward(xp, *inputs), grad

    return tf_rule, {}


def autodiff(backend: str, fn: Callable[..., Any]) -> Tuple[Callable[..., Any], dict]:
    """``fn(xp, *inputs)`` differentiated by ``backend``'s own autodiff (NumPy has none: None)."""
    xp = namespace(backend)
    options = {"backend": "autograd"} if backend == "autograd" else {}
    return (lambda *inputs: fn(xp, *inputs)), options

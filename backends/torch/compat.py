"""Every private or version-dependent PyTorch API the torch backend uses, in one place.

Invariant: no other file of this backend's code names a private torch module or attribute (``torch._C``,
``torch.utils._pytree``, ``torch.nn.utils.stateless._reparametrize_module``, ``torch.autograd.graph``'s
engine call, ``nn.Module._modules``, autograd's error-node names); each is reached through a name defined
here, and each one that a torch release may lack has a fallback that keeps the check correct (only slower,
or with one runtime screen fewer), never one that changes a number the check reports.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

# TorchFunctionMode: the escape watch (side_effects._EscapeWatch) sees every tensor fn computes under vmap;
# has_torch_function: the VJP loops call the engine directly only where no override or mode could see it.
from torch.overrides import TorchFunctionMode, has_torch_function  # noqa: F401 - re-exported

# The mechanism behind torch.func.functional_call: a module's parameters and buffers are swapped for the
# check's copies while fn runs (module_state._ModuleState), without writing into the module.
from torch.nn.utils.stateless import _reparametrize_module as reparametrize_module  # noqa: F401 - re-exported

try:  # private; without it batched tensors fn keeps go unnoticed at run time (the bytecode screen remains)
    from torch._C._functorch import is_batchedtensor
except ImportError:  # pragma: no cover - older or newer torch
    def is_batchedtensor(tensor: torch.Tensor) -> bool:
        return False


def pytree_node(value: Any) -> Optional[Tuple[List[str], List[Any], Callable[[List[Any]], Any]]]:
    """One level of a node of torch's pytree registry (``torch.utils._pytree.register_dataclass``,
    ``register_pytree_node``): the children's path suffixes (from its keys, else ``[i]``), the children, and
    how to rebuild it; None for other values (dicts, lists, tuples and named tuples are walked by the core).
    Used for backend detection and to walk fn's arguments (``TorchAdapter.pytree_node``)."""
    from torch.utils import _pytree

    node = _pytree.SUPPORTED_NODES.get(type(value))
    if node is None or isinstance(value, (dict, list, tuple)):
        return None
    children, context = node.flatten_fn(value)
    children = list(children)
    suffixes = [f"[{i}]" for i in range(len(children))]
    if node.flatten_with_keys_fn is not None:
        keyed, _ = node.flatten_with_keys_fn(value)
        if len(keyed) == len(children):
            suffixes = [_pytree.keystr((key,)) for key, _ in keyed]
    return suffixes, children, lambda new: node.unflatten_fn(new, context)


def submodules(module: torch.nn.Module) -> Dict[str, Any]:
    """``module._modules`` (private attribute, read without running ``__getattr__``): the search for
    user-written forward rules (forward_rules._static_attribute) reads code, it never calls user code."""
    return module._modules


def is_error_node(node: Any) -> bool:
    """Whether an autograd graph node is the error node torch puts after a backward marked
    ``@once_differentiable`` (its class and C++ names are torch's internals; only used to word an error in
    transposed._once_differentiable_in)."""
    return type(node).__name__ in ("Error", "DelayedError") or node.name() == "torch::autograd::Error"


# torch.autograd.grad validates its arguments in Python (shapes through torch.fx's symbolic-shape helpers,
# overrides, dtypes) before it calls the engine through this function: a third of a small VJP's time, and
# more when the caches are cold between the core's steps. Our own cotangents are built to the output's
# shape and dtype, so where nothing can override the call (plain tensors, no torch function mode) the VJP
# loops call the engine the way torch.autograd.grad does; anything else goes through torch.autograd.grad.
_UNPROBED = object()
_run_backward: Any = _UNPROBED


def _engine() -> Optional[Callable[..., tuple]]:
    """``torch.autograd.graph._engine_run_backward`` (private) once it has given torch.autograd.grad's
    result on a tiny graph in this process, else None."""
    global _run_backward
    if _run_backward is _UNPROBED:
        _run_backward = None
        engine = getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None)
        if engine is not None:
            try:
                with torch.inference_mode(False):  # a first VJP under the caller's inference mode
                    with torch.enable_grad():
                        probe = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
                        square = probe * probe
                    got = engine((square,), (torch.ones(2, dtype=torch.float64),), False, False, (probe,), True,
                                 accumulate_grad=False)
                if (isinstance(got, tuple) and len(got) == 1 and isinstance(got[0], torch.Tensor)
                        and got[0].tolist() == [2.0, 4.0] and probe.grad is None):
                    _run_backward = engine
            except Exception:  # noqa: BLE001 - another torch: torch.autograd.grad it is
                pass
    return _run_backward


def _pull(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor],
          create_graph: bool = False, retain_graph: bool = True) -> tuple:
    """``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=retain_graph, create_graph=create_graph,
    allow_unused=True)``, calling the engine directly where that is the same (see :func:`_engine`). A graph pulled
    once (``retain_graph=False``) is what a compiled backward with donated buffers allows."""
    if (len(outputs) == len(cotangents)
            and all(type(o) is torch.Tensor and type(c) is torch.Tensor and o.shape == c.shape and o.dtype == c.dtype
                    for o, c in zip(outputs, cotangents))
            and not has_torch_function(tuple(outputs) + tuple(inputs))):  # also True under a torch function mode
        engine = _engine()
        if engine is not None:
            return engine(tuple(outputs), tuple(cotangents), retain_graph or create_graph, create_graph,
                          tuple(inputs), True, accumulate_grad=False)
    return torch.autograd.grad(list(outputs), list(inputs), list(cotangents), retain_graph=retain_graph or create_graph,
                               create_graph=create_graph, allow_unused=True)

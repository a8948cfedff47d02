"""Module parameters and ``params=`` tensors: which ones a check considers, and how the check's values are
swapped in while fn runs.

Invariant: the user's module and tensors are never written to. A module's parameters and buffers are swapped
for float64 copies (same-dtype copies with ``promote=False``) only while fn runs, through
:func:`.compat.reparametrize_module` (the mechanism behind ``torch.func.functional_call``), so a ``fn`` that
closes over the module sees the copies. Plain tensors given as ``params=`` have their ``.data``
pointed at float64 views during each call and put back afterwards (their storage is never written to), also
when fn raises. ``gb.compare`` loads parameters into a float64 deep copy of a module, never the module.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from gradbridge._adapter import CheckSpec
from gradbridge._errors import InvalidArgumentError
from ..common.params import named_params
from .compat import reparametrize_module
from .compiled import uncompiled_module


class _ModuleState:
    """Swaps a module's parameters and buffers for float64 copies (same-dtype copies with ``promote=False``)
    while the user's function runs."""

    def __init__(self, module: torch.nn.Module, checked: Dict[str, int], promote: bool = True) -> None:
        self.module = module
        self.checked = checked  # parameter name -> index of its leaf
        self.promote = promote
        self.constants: Dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters(remove_duplicate=True):
            if name not in checked:
                dtype = torch.float64 if param.is_floating_point() and promote else param.dtype
                self.constants[name] = param.detach().to(dtype).clone()  # a copy: fn may write into it
        self.buffers = {name: buf for name, buf in module.named_buffers(remove_duplicate=True) if buf is not None}

    def replacement(self, leaf_values: Sequence[torch.Tensor]) -> Dict[str, torch.Tensor]:
        values = dict(self.constants)
        for name, index in self.checked.items():
            values[name] = leaf_values[index]
        for name, buf in self.buffers.items():  # fresh copies: train-mode BatchNorm writes into them
            dtype = torch.float64 if buf.is_floating_point() and self.promote else buf.dtype
            values[name] = buf.detach().to(dtype).clone()
        return values

    @contextlib.contextmanager
    def applied(self, leaf_values: Sequence[torch.Tensor]) -> Iterator[None]:
        with reparametrize_module(self.module, self.replacement(leaf_values), tie_weights=True):
            yield


class _DataSwap:
    """For plain tensors given as ``params=``: point ``.data`` at float64 views, put the original back after."""

    def __init__(self, tensors: Dict[int, torch.Tensor]) -> None:
        self.tensors = tensors  # leaf index -> user's tensor
        self.originals = {index: tensor.data for index, tensor in tensors.items()}
        self.requires_grad = {index: tensor.requires_grad for index, tensor in tensors.items()}

    @contextlib.contextmanager
    def applied(self, leaf_values: Sequence[torch.Tensor], needs_grad: bool) -> Iterator[List[torch.Tensor]]:
        # Re-entrant: on exit put back what was there on entry, so a swap held around a whole backward pass
        # (see TorchProblem.params_held) survives the forward pass nested in it.
        entered = {index: (tensor.data, tensor.requires_grad) for index, tensor in self.tensors.items()}
        try:
            for index, tensor in self.tensors.items():
                tensor.data = leaf_values[index].detach()
                if needs_grad and not tensor.requires_grad:
                    tensor.requires_grad_(True)
            yield list(self.tensors.values())
        finally:
            for index, tensor in self.tensors.items():
                data, requires_grad = entered[index]
                tensor.data = data
                if tensor.requires_grad != requires_grad:
                    tensor.requires_grad_(requires_grad)

    def restore(self) -> None:
        for index, tensor in self.tensors.items():
            tensor.data = self.originals[index]
            if tensor.requires_grad != self.requires_grad[index]:
                tensor.requires_grad_(self.requires_grad[index])


def _float64_copy_with(module: torch.nn.Module, params: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """A deep copy of ``module`` in float64 with the given state_dict entries loaded (exactly: float64 into
    float64; integer buffers keep their dtype)."""
    try:
        loaded = copy.deepcopy(module)
    except Exception as exc:
        raise InvalidArgumentError(
            f"params: the torch module {type(module).__name__} cannot be deep-copied ({type(exc).__name__}: {exc}); "
            "gb.compare loads params into a copy so that your module stays untouched. Pass a function "
            "fn(params, *args) instead (e.g. with torch.func.functional_call)") from exc
    loaded = loaded.to(torch.float64)
    state = loaded.state_dict()
    for name, array in params.items():
        target = state[name]
        state[name] = torch.as_tensor(np.asarray(array)).to(dtype=target.dtype, device=target.device)
    loaded.load_state_dict(state, strict=True)
    return loaded


def _checkable(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def _parameters(spec: CheckSpec) -> Tuple[Optional[torch.nn.Module], List[Tuple[str, torch.Tensor]]]:
    """The module (if any) and the named parameter tensors to consider, from ``params=`` or a module ``fn``."""
    params = spec.params
    if params is None and isinstance(spec.fn, torch.nn.Module):
        params = spec.fn
    if params is None:
        return None, []
    if isinstance(params, torch.nn.Module):
        params = uncompiled_module(params)  # a compiled module's parameters, without the "_orig_mod." prefix
        return params, list(params.named_parameters(remove_duplicate=True))
    items = named_params(params, lambda t: isinstance(t, torch.Tensor), "an nn.Module or an iterable of tensors",
                         lambda name, t: f"params: {name} is a {type(t).__name__}, expected a torch.Tensor")
    return None, items

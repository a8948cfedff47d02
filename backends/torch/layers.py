"""The outputs of a module's layers at one input, for ``gb.compare``'s layer-by-layer mode.

Invariant: the module is left exactly as it was: the forward hooks are removed (also when fn raises), nothing
else is registered or changed, and the run is the same forward call the comparison makes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import numpy as np
import torch


def layer_outputs(fn: Callable[..., Any], args: Tuple[Any, ...]) -> List[Tuple[str, np.ndarray]]:
    """``[(layer path, output as float64 NumPy), ...]`` in the order the layers ran, for every leaf submodule
    of ``fn`` (an ``nn.Module``) that returned one tensor; empty when ``fn`` is not a module."""
    if not isinstance(fn, torch.nn.Module):
        return []
    found: List[Tuple[str, np.ndarray]] = []
    handles = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                found.append((name, output.detach().to(torch.float64).cpu().numpy().copy()))
        return hook

    try:
        for name, module in fn.named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(record(name)))
        with torch.no_grad():
            fn(*args)
    finally:
        for handle in handles:
            handle.remove()
    return found

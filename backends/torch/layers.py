"""A module's layers tapped, for ``gb.compare``'s layer-by-layer mode (:class:`gradbridge._adapter.LayerTaps`).

Invariant: the module is left exactly as it was: the forward hooks live only while one call of the tapped
module runs and are removed in a ``finally``; outside the comparison's tapping context (another thread) they
return the output unchanged. The tapped module holds the model as a submodule, so the check promotes, pins and
restores it as it does the model itself.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from gradbridge._taps import active


#: Activation modules by the common name of their function (the Keras adapter uses the same names).
_ACTIVATIONS = {"Tanh": "tanh", "ReLU": "relu", "Sigmoid": "sigmoid", "SiLU": "silu", "Softplus": "softplus",
                "ELU": "elu", "LeakyReLU": "leaky_relu", "Mish": "mish", "Hardswish": "hard_silu", "SELU": "selu"}


def settings(module: torch.nn.Module) -> Dict[str, Any]:
    """A layer's settings that ports get wrong, in common names: ``eps`` of a normalisation, ``activation`` (with
    GELU's approximation: ``gelu`` exact, ``gelu_tanh``), ``negative_slope``."""
    found: Dict[str, Any] = {}
    eps = getattr(module, "eps", None)
    if isinstance(eps, float) and "Norm" in type(module).__name__:
        found["eps"] = eps
    if isinstance(module, torch.nn.GELU):
        found["activation"] = "gelu" if module.approximate == "none" else f"gelu_{module.approximate}"
    elif type(module).__name__ in _ACTIVATIONS and type(module).__module__.startswith("torch.nn"):
        found["activation"] = _ACTIVATIONS[type(module).__name__]
    if isinstance(module, torch.nn.LeakyReLU):
        found["negative_slope"] = module.negative_slope
    return found


class LayerTapped(torch.nn.Module):
    """``forward(layers, *args)``: ``layered(call, layers, *args)`` with ``call`` running ``model`` with every
    leaf submodule's tensor output passed through the active taps."""

    def __init__(self, model: torch.nn.Module, layered: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self._layered = layered

    def forward(self, layers: Any, *args: Any, **kwargs: Any) -> Any:
        return self._layered(self._tapped_call, layers, *args, **kwargs)

    def _tapped_call(self, *args: Any, **kwargs: Any) -> Any:
        handles: List[Any] = []

        def tap(name: str) -> Callable[..., Optional[torch.Tensor]]:
            def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Optional[torch.Tensor]:
                taps = active()
                if taps is None or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                    return None
                return taps.take(name, output, settings=settings(module))
            return hook

        try:
            for name, module in self.model.named_modules():
                if name and not any(True for _ in module.children()):
                    handles.append(module.register_forward_hook(tap(name)))
            return self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def with_layer_taps(fn: Any, layered: Callable[..., Any]) -> Optional[torch.nn.Module]:
    """The tapped form of ``fn`` when it is a module with submodules, else None."""
    if not isinstance(fn, torch.nn.Module) or not any(True for _ in fn.children()):
        return None
    return LayerTapped(fn, layered)

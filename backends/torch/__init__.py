"""PyTorch backend: custom ``autograd.Function``s, plain functions and ``nn.Module``s, checked through
PyTorch autograd (the user's backward passes and autograd's formulas).

Files (the same names in every backend folder): ``adapter.py`` (``ADAPTER``), ``problem.py`` (argument layout,
calling fn, the deterministic session), ``prepared.py`` (``TorchPrepared``: evaluate, vjp, jvp, gradient
function), ``batching.py`` (vmap and batched-cotangent paths, each decided once by a ``PathChoice``),
``cache.py`` (decisions kept across checks), ``transposed.py`` (``J t`` through the reverse-mode VJP),
``compat.py`` (every private or version-dependent torch API), ``demo.py`` (the demo cases). Torch only:
``module_state.py`` (module parameters and ``params=`` tensors swapped in while fn runs),
``forward_rules.py`` (user-written ``Function.jvp`` rules), ``side_effects.py`` (what batching would change).
"""

from .adapter import ADAPTER
from .cache import cache_size, clear_cache
from .prepared import TorchPrepared

__all__ = ["ADAPTER", "TorchPrepared", "cache_size", "clear_cache"]

"""Functions and modules compiled with ``torch.compile``: what they compile, how a check runs them, and the eager
function they were made from.

Invariant: a compiled function is checked through its compiled code, never under ``torch.func.vmap`` or a dispatch
mode (torch.compile then skips the function's code for good: measured, the user's compiled function ran eagerly
ever after, in torch 2.13); the eager original it wraps is known, so its gradients can be compared with the
compiled ones; the compilations a check causes are counted from dynamo's own counters and reported.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch


def original_of(fn: Any) -> Optional[Any]:
    """The eager function or module ``fn`` was compiled from by ``torch.compile``; None when it is not compiled."""
    original = getattr(fn, "_torchdynamo_orig_callable", None)
    if original is None or original is fn:
        return None
    return getattr(fn, "_orig_mod", None) or original


def compilations() -> int:
    """How many graphs torch.compile has compiled in this process so far (0 before dynamo is imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    return int(utils.counters["stats"].get("unique_graphs", 0))


def uncompiled_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose parameters a compiled module uses (``OptimizedModule._orig_mod``), named as the user named
    them; ``module`` itself otherwise."""
    original = original_of(module)
    return original if isinstance(original, torch.nn.Module) else module

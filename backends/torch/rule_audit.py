"""What the user's custom rules (``torch.autograd.Function`` backwards, ``torch.library`` ``register_autograd``
formulas) return and write during one backward, before torch's engine tidies it up.

Invariant: torch's engine casts a backward's gradient to its input's dtype and device and sums a broadcastable one
down to its input's shape without a word, and a backward that writes its saved tensors in place corrupts every later
backward through the same graph (a second consumer, ``retain_graph``, a double backward) while its own values are
right. :class:`RuleAudit` hooks every custom-rule node of one recorded graph: the incoming gradients (pre-hook) and
the engine's checked gradients (post-hook), and the saved tensors' values before the backward. After the backward
it replays each rule once on its own incoming gradients to see what the rule itself returned, and reads the saved
tensors again. Only custom-rule nodes are audited: torch's own formulas are torch's to test.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.function import BackwardCFunction

#: At most this many custom-rule nodes are audited per graph (a module applying one Function per layer repeats it).
MAX_RULES = 64


def _custom_nodes(root: Any) -> List[BackwardCFunction]:
    """The custom-rule nodes reachable from ``root`` (a ``grad_fn``), in the order a walk from the output meets them."""
    found: List[BackwardCFunction] = []
    seen = set()
    stack = [root]
    while stack and len(found) < MAX_RULES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, BackwardCFunction):
            found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def rule_name(node: BackwardCFunction) -> str:
    """The rule as the user named it: the Function class, or a ``torch.library`` op's qualified name (its generated
    Function closes over the op)."""
    cls = getattr(node, "_forward_cls", type(node))
    forward = getattr(cls.forward, "__func__", cls.forward)
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(content, torch._ops.OpOverload):
            return content._schema.name
    return getattr(cls, "__name__", type(node).__name__)


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).replace('torch.', '')} tensor of shape {tuple(tensor.shape)} on {tensor.device}"


def _saved(node: BackwardCFunction) -> Optional[Tuple[torch.Tensor, ...]]:
    try:
        return tuple(t for t in node.saved_tensors if isinstance(t, torch.Tensor))
    except RuntimeError:  # freed or never saved
        return None


class RuleAudit:
    """Hooks on the custom-rule nodes of the graph ending at ``output``; use as a context manager around the one
    backward (with ``retain_graph=True``), then read :meth:`findings`. ``input_name(edge)`` names the input an edge
    of a node leads to (``None`` for an inner tensor)."""

    def __init__(self, output: torch.Tensor, input_name, inputs: Sequence[Tuple[str, torch.Tensor]] = ()) -> None:
        self.nodes = _custom_nodes(output.grad_fn) if output.grad_fn is not None else []
        self.input_name = input_name
        # the tensors fn was given, by storage: a saved tensor that is one of them is named after it
        self.storages = {t.untyped_storage().data_ptr(): name for name, t in inputs if t.numel()}
        self.incoming: Dict[int, Tuple[Any, ...]] = {}
        self.checked: Dict[int, Tuple[Any, ...]] = {}
        self.before: Dict[int, Tuple[torch.Tensor, ...]] = {}
        self.before_storage: Dict[int, Dict[int, int]] = {}
        self.handles: List[Any] = []

    def __enter__(self) -> "RuleAudit":
        for node in self.nodes:
            key = id(node)
            saved = _saved(node)
            if saved is not None:
                self.before[key] = tuple(t.detach().clone() for t in saved)
                self.before_storage[key] = {i: t.untyped_storage().data_ptr() for i, t in enumerate(saved)}
            self.handles.append(node.register_prehook(self._keep_incoming(key)))
            self.handles.append(node.register_hook(self._keep_checked(key)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _keep_incoming(self, key: int):
        def hook(grad_outputs):
            # copies: a backward writing its incoming gradient in place must not change the replay's
            self.incoming[key] = tuple(g.detach().clone() if isinstance(g, torch.Tensor) else g for g in grad_outputs)
        return hook

    def _keep_checked(self, key: int):
        def hook(grad_inputs, grad_outputs):
            self.checked[key] = tuple(grad_inputs)
        return hook

    @property
    def rules(self) -> List[str]:
        return sorted({rule_name(node) for node in self.nodes if id(node) in self.incoming})

    def findings(self) -> Dict[str, List[str]]:
        """``{"saved": [...], "gradients": [...]}``: one phrase per saved tensor a rule's backward wrote in place
        and per gradient a rule returned in another dtype, device or shape than its input's."""
        saved_written: List[str] = []
        mismatched: List[str] = []
        for node in self.nodes:
            key = id(node)
            if key not in self.incoming:
                continue  # the backward never reached it
            name = rule_name(node)
            written = self._saved_written(node, key)
            if written:
                saved_written.append(f"{name} (saved tensor{'s' if len(written) > 1 else ''} "
                                     f"{', '.join(self._saved_name(key, i) for i in written)})")
                continue  # replaying would read the corrupted tensors
            mismatched.extend(self._mismatches(node, key, name))
        return {"saved": saved_written, "gradients": mismatched}

    def _saved_name(self, key: int, position: int) -> str:
        tensor = self.before_storage.get(key, {}).get(position)
        name = self.storages.get(tensor) if tensor is not None else None
        return f"{position}: the input {name}" if name else str(position)

    def _saved_written(self, node: BackwardCFunction, key: int) -> List[int]:
        before = self.before.get(key)
        if before is None:
            return []
        try:
            after = _saved(node)
        except RuntimeError:
            after = None
        if after is None:  # torch refuses them: a version counter moved, written in place
            return list(range(len(before)))
        return [i for i, (b, a) in enumerate(zip(before, after))
                if b.shape != a.shape or not torch.equal(b, a.detach())]

    def _mismatches(self, node: BackwardCFunction, key: int, name: str) -> List[str]:
        checked = self.checked.get(key)
        if checked is None:
            return []
        try:
            with torch.no_grad():
                raw = node.apply(*self.incoming[key])
        except Exception:  # noqa: BLE001 - a rule that cannot be replayed is not judged here
            return []
        raw = raw if isinstance(raw, tuple) else (raw,)
        found: List[str] = []
        for position, ((next_node, _), returned, kept) in enumerate(zip(node.next_functions, raw, checked)):
            if next_node is None or not isinstance(returned, torch.Tensor) or not isinstance(kept, torch.Tensor):
                continue
            differs = [what for what, a, b in (("dtype", returned.dtype, kept.dtype),
                                               ("device", returned.device, kept.device),
                                               ("shape", tuple(returned.shape), tuple(kept.shape))) if a != b]
            if differs:
                target = self.input_name(next_node)
                where = f"input {position}" + (f" ({target})" if target else "")
                found.append(f"{name}'s backward returns a {_describe(returned)} for its {where}, a "
                             f"{_describe(kept)} ({' and '.join(differs)} differ{'s' if len(differs) == 1 else ''})")
        return found


def leaf_namer(leaves: Sequence[torch.Tensor], names: Sequence[str]):
    """``input_name`` for :class:`RuleAudit`: the name of the checked leaf an edge accumulates into."""
    by_id = {id(leaf): name for leaf, name in zip(leaves, names)}

    def name_of(next_node: Any) -> Optional[str]:
        for _ in range(4):  # through the copy or view a leaf is fed by (a clone, an expand)
            variable = getattr(next_node, "variable", None)
            if variable is not None:
                return by_id.get(id(variable))
            edges = [n for n, _ in getattr(next_node, "next_functions", ()) if n is not None]
            if len(edges) != 1:
                return None
            next_node = edges[0]
        return None
    return name_of

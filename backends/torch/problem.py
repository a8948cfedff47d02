"""The torch "problem": what is fixed about one check (argument layout, parameters, how fn is called) and
the deterministic session around every call into the user's code.

Invariant: fn never sees the user's tensors, and the user's objects and process-wide state are as the user
left them whenever none of the user's code runs:

* Checked inputs are views into one float64 tensor built from the flat vector, never the user's tensors;
  unchecked input tensors are passed as fresh copies.
* Module parameters and buffers, and plain tensors given as ``params=``, are swapped in only while fn runs
  (see :mod:`.module_state`).
* Process-wide state changes only around each call into the user's code (an evaluation of a chunk, a
  VJP or JVP, ``grad=``), under the lock of :mod:`gradbridge._process`: the default dtype is float64, the
  module is in eval mode (unless ``train=True``), the CPU (and, if initialised, CUDA) generators are
  re-seeded before each evaluation, and all of it is put back when the call returns or raises. Between
  those calls, and to other threads then, everything is as the user left it. The session itself only
  leaves the caller's inference mode and restores the grad mode, both per thread.

With ``promote=False`` nothing is promoted: checked leaves are cut from the flat vector and cast to their
own dtype (float32, float16, bfloat16; exact, the core has rounded the points), unchecked tensors,
module parameters and buffers are same-dtype copies, and the default dtype stays the user's.

Fixed costs: what does not change between calls is worked out once (leaf cuts, argument templates, which
tensors are copied), a forward with nothing to swap in enters no context managers, the default generator's
seeded state is put back with ``set_state`` (the state ``manual_seed`` leaves, normal-sample caches
included), and a single-tensor output is flattened without a tree walk or a concatenation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from gradbridge import _process
from gradbridge._adapter import CheckSpec, LeafSpec
from gradbridge._errors import FunctionEvaluationError
from ..common.layout import Candidate
from ..common.lowprec import low_precision_names, promotion_hint
from ..common.outputs import output_leaves, output_specs
from ..common.rng import SharedRandomState
from .compat import _pull
from .module_state import _DataSwap, _ModuleState

# params_held when there is nothing to hold (nullcontext is reusable and reentrant)
_NOTHING_HELD = contextlib.nullcontext()


def _outside_inference_mode() -> ContextManager[Any]:
    """Leave ``torch.inference_mode`` for the block when the caller is in it (restored on exit, also on an
    exception); nothing otherwise. Inside inference mode autograd records nothing and every tensor made
    is an inference tensor, so a check run there would see an analytic derivative of zero. Grad mode is
    set explicitly around every forward pass of the check (``no_grad`` to evaluate, ``enable_grad`` to
    record a graph), so the caller's ``no_grad`` / ``set_grad_enabled(False)`` needs nothing here."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else _NOTHING_HELD


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__

def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _floating(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point()

def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


class TorchProblem:
    """Everything about one torch check that is fixed: structure, modules, state to restore."""

    def __init__(self, spec: CheckSpec, candidates: List[Candidate], leaves: List[LeafSpec], chosen: List[int],
                 rebuild_args: Callable[[Sequence[Any]], tuple], module: Optional[torch.nn.Module],
                 module_state: Optional[_ModuleState], data_swap: Optional[_DataSwap], device: torch.device) -> None:
        self.spec = spec
        self.candidates = candidates
        self.leaves = leaves
        self.chosen = chosen
        self.rebuild_args = rebuild_args
        self.module = module
        self.module_state = module_state
        self.data_swap = data_swap
        self.device = device
        self.rng = SharedRandomState(spec.seed)
        self.outputs: Optional[List[LeafSpec]] = None
        self.low_precision_outputs: List[str] = []
        self.promote = spec.promote
        # the dtype each checked leaf takes while fn runs: float64, or its own with promote=False (a complex leaf's
        # real view: the dtype of its parts)
        self.leaf_dtypes = [torch.float64 if spec.promote else _real_dtype(candidates[i].value.dtype) for i in chosen]
        # checked complex leaves: fn gets the complex tensor whose real view the leaf is (see ..common.complex)
        self._complex = {k for k, i in enumerate(chosen) if candidates[i].value.is_complex()}
        # promote=True only: the tensors given below float64, named in the hint when fn fails on the copies
        self.low_precision = low_precision_names(
            [(c.name, _dtype_name(c.value)) for c in candidates if c.floating]) if spec.promote else ""
        # what forward needs on every call, worked out once (none of it changes between calls): where each
        # leaf is cut from the flat vector (a single leaf is x itself, seen through a view), whether the leaves
        # need a cast, which candidates take a leaf's value and which a fresh copy (unchecked input tensors,
        # with the dtype of the copy), and how the positional arguments are filled in
        self._cuts = [(leaf.offset, leaf.offset + leaf.size, leaf.shape) for leaf in leaves]
        self._whole = len(leaves) == 1 and leaves[0].offset == 0
        self._whole_shape = -1 if self._whole and len(leaves[0].shape) == 1 else self._cuts[0][2]  # view(-1): quicker
        self._cast = any(dtype != torch.float64 for dtype in self.leaf_dtypes)
        chosen_set = set(chosen)
        self._inputs = [(k, i) for k, i in enumerate(chosen) if candidates[i].kind == "input"]
        self._copies = [(i, c.value, _promoted(c.value.dtype) if spec.promote else c.value.dtype)
                        for i, c in enumerate(candidates)
                        if c.kind == "input" and i not in chosen_set and _is_tensor(c.value)]
        self._values = [c.value for c in candidates]
        self._slots = _argument_slots(spec, candidates, chosen, self._copies)
        # the generator state torch.default_generator.manual_seed(seed) leaves, put back by set_state
        # (the same state, normal-sample caches included, about 7 times cheaper than re-seeding)
        self._seeded_cpu_state: Optional[Tuple[int, torch.Tensor]] = None
        # around every call into the user's code: the check's process-wide state, under the one lock
        self.window = _process.Window(self._changed)

    def reseed(self) -> None:
        self.rng.reseed()
        generator, seed = torch.default_generator, self.spec.seed
        seeded = self._seeded_cpu_state
        if seeded is not None and seeded[0] == seed:
            generator.set_state(seeded[1])
        else:
            generator.manual_seed(seed)
            self._seeded_cpu_state = (seed, generator.get_state())
        if torch.cuda.is_initialized():  # False where CUDA is unavailable
            torch.cuda.manual_seed_all(seed)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """The whole check: only this thread's modes (grad, inference) change here. Process-wide state (the
        default dtype, the generators, the module's modes) changes in :meth:`window` only."""
        grad_enabled = torch.is_grad_enabled()
        try:
            # out of the caller's inference mode for the whole check (see _outside_inference_mode)
            with _outside_inference_mode():
                yield
        finally:
            if self.data_swap is not None:
                with _process.LOCK:
                    self.data_swap.restore()
            if torch.is_grad_enabled() != grad_enabled:  # fn called torch.set_grad_enabled(...) and left it
                torch.set_grad_enabled(grad_enabled)

    @contextlib.contextmanager
    def _changed(self) -> Iterator[None]:
        """The check's process-wide state for one window (see :mod:`gradbridge._process`): float64 as the
        default dtype (unless ``promote=False``: fn then runs as it would for the user), the module in eval
        mode (unless ``train=True``), generators re-seeded by :meth:`reseed`; what was there before is put
        back on exit, also when fn raises (and modes fn switched itself)."""
        cpu_state = torch.default_generator.get_state()  # what torch.get_rng_state returns
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        default_dtype = torch.get_default_dtype()
        modes = [(m, m.training) for m in self.module.modules()] if self.module is not None else []
        try:
            with self.rng.preserved():
                if self.promote and default_dtype != torch.float64:
                    torch.set_default_dtype(torch.float64)
                if self.module is not None and not self.spec.train:
                    self.module.eval()
                yield
        finally:
            for submodule, training in modes:
                submodule.training = training
            if torch.get_default_dtype() != default_dtype:
                torch.set_default_dtype(default_dtype)
            torch.default_generator.set_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)

    def leaf_values(self, x: torch.Tensor) -> List[torch.Tensor]:
        """One tensor per checked leaf, cut from the flat float64 ``x`` (views) and, with ``promote=False``,
        cast to the leaf's own dtype (exact: the core rounded ``x``; differentiable, so gradients flow
        back to ``x`` and tangents forward to the leaves)."""
        if self._whole:
            values = [x.view(self._whole_shape)]
        else:
            values = [x[start:stop].view(shape) for start, stop, shape in self._cuts]
        return self.own_dtypes(values) if self._cast else values

    def own_dtypes(self, values: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """``values`` in the dtypes the leaves take while fn runs (unchanged with promotion)."""
        return [v.to(dtype) for v, dtype in zip(values, self.leaf_dtypes)]

    def params_held(self, x: Optional[torch.Tensor],
                    leaf_values: Optional[List[torch.Tensor]] = None) -> ContextManager[Any]:
        """Keep ``params=`` tensors pointing at their float64 views of ``x`` (and requiring grad) for a
        forward *and* the backward through its graph: autograd saves such leaf tensors by reference, so
        a backward run after their ``.data`` went back would read the user's original values and dtype."""
        if self.data_swap is None:
            return _NOTHING_HELD
        return self.data_swap.applied(self.own_dtypes(leaf_values) if leaf_values is not None
                                      else self.leaf_values(x), True)

    def arguments(self, leaf_values: Sequence[torch.Tensor]) -> tuple:
        """fn's positional arguments with the checked leaves' values in place and fresh copies of the
        unchecked input tensors (the user's stay untouched), floating ones in float64 like the rest."""
        if self._complex:
            # torch.complex, not view_as_complex: a leaf cut from a batch of points may start at an odd offset
            leaf_values = [torch.complex(v[..., 0], v[..., 1]) if k in self._complex else v
                           for k, v in enumerate(leaf_values)]
        slots = self._slots
        if slots is not None:  # every argument a tensor or a constant (no containers): filled in directly
            template, fill = slots
            args = list(template)
            for position, leaf, tensor, dtype in fill:
                args[position] = leaf_values[leaf] if tensor is None else tensor.detach().to(dtype).clone()
            return tuple(args)
        values = list(self._values)
        for k, i in self._inputs:
            values[i] = leaf_values[k]
        for i, tensor, dtype in self._copies:
            values[i] = tensor.detach().to(dtype).clone()
        return self.rebuild_args(values)

    def forward(self, x: torch.Tensor, needs_grad: bool = False,
                leaf_values: Optional[List[torch.Tensor]] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run ``fn`` with checked leaves taken from the flat tensor ``x`` (or given one tensor per leaf).

        Returns the flat float64 output and the user tensors (``params=`` tensors) that stand in for
        some leaves, whose gradients must be added to those of ``x``.
        """
        leaf_values = self.leaf_values(x) if leaf_values is None else self.own_dtypes(leaf_values)
        args = self.arguments(leaf_values)
        if self.module_state is None and self.data_swap is None:  # nothing to swap in around the call
            self.reseed()
            return self._flatten_output(self._call(args)), []
        with contextlib.ExitStack() as stack:
            if self.module_state is not None:
                stack.enter_context(self.module_state.applied(leaf_values))
            swapped: List[torch.Tensor] = []
            if self.data_swap is not None:
                swapped = stack.enter_context(self.data_swap.applied(leaf_values, needs_grad))
            self.reseed()
            result = self._call(args)
        return self._flatten_output(result), swapped

    def call_with_arguments(self, function: Callable[..., Any], leading: tuple, x: torch.Tensor) -> Any:
        """``function(*leading, *args, **kwargs)`` with fn's arguments at the flat point ``x`` and the module's
        parameters (or ``params=`` tensors) swapped in, exactly as ``fn`` runs in :meth:`forward` (a hand-written
        ``grad=`` sees what ``fn`` sees)."""
        leaf_values = self.leaf_values(x)
        args = self.arguments(leaf_values)
        with contextlib.ExitStack() as stack:
            if self.module_state is not None:
                stack.enter_context(self.module_state.applied(leaf_values))
            if self.data_swap is not None:
                stack.enter_context(self.data_swap.applied(leaf_values, False))
            self.reseed()
            return function(*leading, *args, **self.spec.kwargs)

    def _call(self, args: tuple) -> Any:
        try:
            return self.spec.fn(*args, **self.spec.kwargs)
        except RuntimeError as exc:
            if "Inference tensors" in str(exc):
                raise FunctionEvaluationError(
                    f"fn raised RuntimeError: {str(exc).splitlines()[0]} fn uses a tensor created under "
                    "torch.inference_mode (an inference tensor) in a computation autograd must record, which torch "
                    "refuses. Pass that tensor to the check as an argument (arguments are copied), or create it "
                    "outside inference mode (or .clone() it there)") from exc
            if (self.promote and self.module is None and "dtype" in str(exc)
                    and ("Float" in str(exc) or "float" in str(exc))):
                also = f" {promotion_hint(self.low_precision)}" if self.low_precision else ""
                raise FunctionEvaluationError(
                    f"fn raised RuntimeError: {str(exc).splitlines()[0]}. The check runs in float64; if fn "
                    "closes over an nn.Module (or float32 tensors), pass it as params=model (or params=[...]) "
                    f"so it is promoted too.{also}") from exc
            raise

    def _flatten_output(self, result: Any) -> torch.Tensor:
        """fn's output as one flat float64 tensor (its floating leaves, one after the other). It may be a
        view of fn's own output (a single tensor): callers copy what they keep."""
        if self.outputs is not None:
            if isinstance(result, torch.Tensor):  # the common case: no tree to walk, nothing to concatenate
                if result.is_complex():
                    result = torch.view_as_real(result)
                if result.is_floating_point():
                    flat = result.reshape(-1)
                    return flat if flat.dtype == torch.float64 else flat.to(torch.float64)
            else:
                tensors = [_real(t) for t in _output_tensors(result, []) if t.is_floating_point() or t.is_complex()]
                if tensors:
                    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        leaves = [leaf for leaf in output_leaves(result, _is_tensor)
                  if leaf.value.is_floating_point() or leaf.value.is_complex()]
        if not leaves:
            got = type(result).__name__
            if isinstance(result, torch.Tensor):
                got = f"a tensor of dtype {_dtype_name(result)}"
            elif isinstance(result, (tuple, list, dict)):
                got += " with no floating tensor in it"
            raise FunctionEvaluationError(
                f"fn: expected a floating-point tensor (or a tuple/list/dict of them) as output, got {got}")
        if self.outputs is None:
            self.outputs = output_specs([(l.path, tuple(_real(l.value).shape), _dtype_name(l.value)) for l in leaves])
            self.low_precision_outputs = [l.path for l in leaves
                                          if l.value.dtype not in (torch.float64, torch.complex128)]
        return torch.cat([_real(l.value).reshape(-1).to(torch.float64) for l in leaves])

    def to_tensor(self, vector: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(vector), dtype=torch.float64, device=self.device)


def _real(tensor: torch.Tensor) -> torch.Tensor:
    """A complex output as its real view (differentiable: autograd applies torch's complex convention)."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a checked leaf's values in the flat vector: a complex dtype's parts."""
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


def _promoted(dtype: torch.dtype) -> torch.dtype:
    """The dtype an unchecked input tensor is copied in when promoting: float64 or complex128."""
    if dtype.is_complex:
        return torch.complex128
    return torch.float64 if dtype.is_floating_point else dtype


def _argument_slots(spec: CheckSpec, candidates: List[Candidate], chosen: List[int],
                    copies: List[Tuple[int, torch.Tensor, torch.dtype]]) -> Optional[Tuple[list, list]]:
    """When every positional argument is a tensor or a constant (no tuple, list or dict to rebuild): the
    arguments as a list to fill in, and for each tensor argument (position, index of its leaf or None,
    the tensor to copy, its dtype). None otherwise (the arguments are rebuilt through ``rebuild_args``)."""
    count = min(len(spec.args), len(spec.arg_names))  # the arguments argument_candidates walked
    leaf_of = {i: k for k, i in enumerate(chosen)}
    copy_of = {i: (tensor, dtype) for i, tensor, dtype in copies}
    fill = []
    walked = {c.arg_index for c in candidates if c.kind == "input"}  # arguments holding tensors (dataclasses too)
    index = 0  # candidates are listed argument by argument, one per tensor argument
    for position, arg in enumerate(spec.args[:count]):
        if _is_tensor(arg):
            if candidates[index].value is not arg or candidates[index].arg_index != position:
                return None
            if index in leaf_of:
                fill.append((position, leaf_of[index], None, None))
            elif index in copy_of:
                fill.append((position, None) + copy_of[index])
            else:
                return None
            index += 1
        elif isinstance(arg, (dict, list, tuple)) or position in walked:
            return None
    return list(spec.args[:count]), fill


def _output_tensors(value: Any, found: List[torch.Tensor]) -> List[torch.Tensor]:
    """The tensors in fn's output, in the order of :func:`..common.outputs.output_leaves` (dicts by
    their items, tuples and lists by position, anything else a constant), without building names (and
    without the closures whose reference cycle keeps the tensors alive until a garbage collection)."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _output_tensors(item, found)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _output_tensors(item, found)
    return found


def _combine(problem: TorchProblem, grad_x: Optional[torch.Tensor], grads_swapped: Sequence[Optional[torch.Tensor]],
             size: int) -> torch.Tensor:
    total = grad_x if grad_x is not None else torch.zeros(size, dtype=torch.float64, device=problem.device)
    if problem.data_swap is not None:
        total = total.clone()
        for (index, _), g in zip(problem.data_swap.tensors.items(), grads_swapped):
            if g is not None:
                leaf = problem.leaves[index]
                total[leaf.offset:leaf.offset + leaf.size] += g.reshape(-1).to(torch.float64)
    return total


def _vjp_graph(problem: TorchProblem, forward, x: torch.Tensor):
    with torch.enable_grad():
        out, swapped = forward(x, True)
    return x, out, swapped


def _grad(problem: TorchProblem, x, out, swapped, cotangent: torch.Tensor, create_graph: bool,
          retain_graph: bool = True) -> torch.Tensor:
    """``cotangent``'s VJP through the recorded ``out`` with respect to the flat ``x`` (and the ``params=`` tensors
    swapped in for some leaves, combined into it); zeros where ``out`` does not depend on ``x``."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    inputs = [x] + list(swapped)
    grads = _pull((out,), inputs, (cotangent,), create_graph, retain_graph)
    return _combine(problem, grads[0], grads[1:], x.numel())

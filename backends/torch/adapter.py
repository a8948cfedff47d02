"""The PyTorch adapter (:data:`ADAPTER`): detection, preparation of a check, ``gb.compare``'s conversions and
parameter binding, and the backend's caches.

Invariant: preparing a check reads the user's tensors and modules as the user left them (outside any other
check's window, outside inference mode) and writes nothing into them: the point ``x0`` is a float64 copy,
modules and ``params=`` tensors are only ever swapped (:mod:`.module_state`), and ``gb.compare`` loads
parameters into a float64 copy of a module. Arguments that cannot be checked are refused before fn runs
(meta tensors, inference or non-leaf ``params=`` tensors) or passed through unchanged with a note (sparse
tensors, integers). The backend's name and install hint are the registry's (:mod:`gradbridge._registry`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from gradbridge import _process
from gradbridge._adapter import CheckSpec, ExpectedParams, ParamBinding
from gradbridge._comparing import mapping
from gradbridge._errors import InvalidArgumentError
from gradbridge._tree import flatten
from ..common.handwritten import HandWrittenGradient, floating_candidates, hand_written_gradient
from ..common.complex import complex_from_view
from ..common.layout import COMPLEX_REASON, Candidate, Unchecked, argument_candidates, layout_leaves, unchecked_notes
from . import cache, compiled, layers, library_ops
from .compat import pytree_node
from .module_state import _checkable, _DataSwap, _float64_copy_with, _ModuleState, _parameters
from .prepared import TorchPrepared
from .problem import TorchProblem, _dtype_name, _floating, _is_tensor, _outside_inference_mode


def _not_checkable(tensor: Any) -> str:
    """Why a floating tensor among the arguments cannot be perturbed ("" when it can): a sparse layout."""
    if isinstance(tensor, torch.Tensor) and tensor.layout != torch.strided and _floating(tensor):
        layout = str(tensor.layout).replace("torch.", "")
        return (f"a sparse tensor ({layout}): gradbridge perturbs dense tensors element by element; pass x.to_dense() "
                "(and make it sparse inside fn) to check its values. It is passed to fn unchanged")
    return ""


def _refuse_meta(candidates: Sequence[Candidate], param_tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """A tensor on the meta device has a shape and no values: fn cannot be evaluated on it."""
    named = [("args", c.name, c.value) for c in candidates] + [("params", name, t) for name, t in param_tensors]
    for argument, name, tensor in named:
        if isinstance(tensor, torch.Tensor) and tensor.is_meta:
            raise InvalidArgumentError(
                f"{argument}: {name} is a tensor on the meta device (a shape without values), so fn cannot be "
                "evaluated on it; create it on a real device (device='cpu'), or materialize the module "
                "(module.to_empty(device='cpu'), then initialize its parameters)")


class TorchAdapter:
    """Adapter for PyTorch."""

    name = "torch"
    module_name = "torch"

    #: torch's registered pytree nodes, for backend detection (arguments are walked with it too)
    pytree_node = staticmethod(pytree_node)

    def clear_cache(self) -> None:
        """Drop the traces, compiled functions and batching decisions kept across checks."""
        cache.clear_cache()

    def cache_size(self) -> int:
        return cache.cache_size()

    def user_function(self, fn: Any) -> Optional[Callable[..., Any]]:
        """A ``torch.library`` op as its author named it (qualified name, schema parameters), the function or module
        a ``torch.compile`` result was made from; None otherwise."""
        return library_ops.named_function(fn) or compiled.original_of(fn)

    def owns(self, value: Any) -> bool:
        return isinstance(value, (torch.Tensor, torch.nn.Module))

    def version(self) -> str:
        return torch.__version__

    def probe_float64(self) -> Tuple[bool, str]:
        """Whether autograd differentiates in float64 here (``gradbridge backends``), and a note."""
        x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        (x * x).sum().backward()
        ok = x.grad is not None and x.grad.dtype == torch.float64 and bool(torch.allclose(x.grad, 2 * x.detach()))
        return ok, "" if ok else f"autograd gave {None if x.grad is None else x.grad.dtype}"

    def prepare(self, spec: CheckSpec) -> Union[TorchPrepared, HandWrittenGradient]:
        # the copies made here (module constants) must not be inference tensors; and the user's tensors and
        # modules are read as the user left them, never inside another check's window (swapped parameters)
        with _outside_inference_mode(), _process.LOCK:
            return self._prepare(spec)

    def _prepare(self, spec: CheckSpec) -> Union[TorchPrepared, HandWrittenGradient]:
        unchecked: List[Unchecked] = []
        candidates, rebuild_args = argument_candidates(
            spec.args, spec.arg_names, _is_tensor, lambda t: (tuple(t.shape), _dtype_name(t), _floating(t)),
            node_of=pytree_node, unchecked=unchecked,
            native="the torch backend checks torch tensors: pass torch.as_tensor(...) to check it",
            not_checkable=_not_checkable, complex_inputs=True)
        module, param_tensors = _parameters(spec)
        _refuse_meta(candidates, param_tensors)
        for name, tensor in param_tensors:
            frozen = _checkable(tensor) and not tensor.requires_grad and module is not None
            candidates.append(Candidate(name, tensor, tuple(tensor.shape), _dtype_name(tensor),
                                        _floating(tensor) and not frozen, "param",
                                        unchecked_reason="requires_grad=False" if frozen else
                                        COMPLEX_REASON if tensor.is_complex() else ""))
        leaves, chosen = layout_leaves(candidates, spec.wrt, unchecked)
        module_state = None
        data_swap = None
        if module is not None:
            checked = {candidates[i].name: k for k, i in enumerate(chosen) if candidates[i].kind == "param"}
            module_state = _ModuleState(module, checked, spec.promote)
        else:
            swapped = {k: candidates[i].value for k, i in enumerate(chosen) if candidates[i].kind == "param"}
            for k, tensor in swapped.items():
                if tensor.is_inference():
                    raise InvalidArgumentError(
                        f"params: {leaves[k].name} is an inference tensor (created under torch.inference_mode); the "
                        "check points a params= tensor at perturbed copies that autograd records, which torch does "
                        "not allow for inference tensors. Create it outside inference mode (or .clone() it there), "
                        "or pass it to fn as an argument, which the check copies")
                if not tensor.is_leaf:
                    raise InvalidArgumentError(f"params: {leaves[k].name} is not a leaf tensor (it was computed from "
                                               "others); pass leaf tensors or the nn.Module that owns them")
            data_swap = _DataSwap(swapped) if swapped else None
        devices = {c.value.device for c in candidates}
        device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
        problem = TorchProblem(spec, candidates, leaves, chosen,
                               rebuild_args,
                               module, module_state, data_swap, device)
        x0 = np.concatenate([_flat_float64(candidates[i].value) for i in chosen])
        prepared = TorchPrepared(problem, problem.forward, x0)
        prepared.notes.extend(unchecked_notes(candidates, chosen, unchecked))
        original = compiled.original_of(spec.fn)
        if original is not None:
            prepared.compiled_from = original
            prepared.batching = False  # vmap would make torch.compile skip fn for good
            prepared.graph_per_vjp = True  # a compiled backward may run once per graph (donated buffers)
            prepared.compilations_before = compiled.compilations()
            prepared.notes.append("fn is compiled (torch.compile): the check runs its compiled code, point by point "
                                  "(torch.func.vmap or a dispatch mode around a compiled function makes torch.compile "
                                  "skip it for good), and compares it with the eager function it was made from")
        if spec.grad is not None:  # the analytic side is the user's hand-written gradient, never autograd
            return hand_written_gradient(prepared, "PyTorch", _hand_written_call(problem, prepared), _to_array,
                                       floating_candidates(candidates), chosen)
        return prepared

    # --- gb.compare (see gradbridge._adapter.CompareAdapter) ---

    def to_numpy(self, value: Any) -> Optional[np.ndarray]:
        if not isinstance(value, torch.Tensor):
            return None
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            value = value.float()
        return value.resolve_conj().resolve_neg().numpy().copy()

    def from_numpy(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, copy=True))

    def expected_params(self, fn: Callable[..., Any]) -> Optional[ExpectedParams]:
        """An ``nn.Module``'s parameters by ``state_dict`` name (required) and its buffers (optional)."""
        if not isinstance(fn, torch.nn.Module):
            return None
        required = {name: tuple(p.shape) for name, p in fn.named_parameters(remove_duplicate=True)}
        optional = {name: tuple(t.shape) for name, t in fn.state_dict(keep_vars=True).items() if name not in required}
        return ExpectedParams(f"torch module {type(fn).__name__}", "state_dict names", required, optional)

    def cast_like(self, array: Any, like: Any) -> Any:
        """``array`` in ``like``'s dtype (a layer tap's zero added to a float32 value stays float32)."""
        return array.to(like.dtype) if isinstance(like, torch.Tensor) and isinstance(array, torch.Tensor) else array

    def bind_params(self, fn: Callable[..., Any], params: Optional[Mapping[str, np.ndarray]],
                    grad: Optional[Callable[..., Any]] = None) -> ParamBinding:
        """A module: a float64 deep copy with ``params`` loaded through ``load_state_dict`` (the user's
        module is never touched). A plain function: the flat dict of float64 tensors as first argument."""
        if isinstance(fn, torch.nn.Module):
            if params is None:
                return ParamBinding(fn=fn, signature=fn.forward)
            with _process.LOCK:  # the module as the user left it, not inside another check's window
                loaded = _float64_copy_with(fn, params)
            return ParamBinding(fn=loaded, signature=loaded.forward,
                                note=f"torch module {type(fn).__name__}: params loaded by state_dict name into a "
                                     "float64 copy (the module itself is untouched)")
        if params is None:
            return ParamBinding(fn=fn)
        native = {name: self.from_numpy(array) for name, array in params.items()}
        leaves, _ = flatten(native, "params", _is_tensor)
        return ParamBinding(fn=fn, leading_args=(native,), leading_names=("params",),
                            names={leaf.path: name for leaf, name in zip(leaves, native)})

    def with_layer_taps(self, binding: ParamBinding, layered: Callable[..., Any]) -> Optional[Callable[..., Any]]:
        """A module's leaf submodules tapped by forward hooks, for ``gb.compare(..., layers=True)`` (see
        :mod:`.layers`); None for a plain function."""
        return layers.with_layer_taps(binding.fn, layered)

    def parameter_roles(self, fn: Callable[..., Any], params: Any = None) -> Optional[mapping.Roles]:
        """An ``nn.Module``'s ``state_dict`` entries by role (see :mod:`gradbridge._comparing.mapping`), from the
        type of the submodule owning each: ``Linear``, ``Conv1d/2d/3d``, ``LayerNorm``, ``GroupNorm``,
        ``RMSNorm``, ``BatchNorm*``/``InstanceNorm*``, ``Embedding``; others' have no role (paired by name).
        Parameters are required, buffers optional. None for a plain function."""
        if not isinstance(fn, torch.nn.Module):
            return None
        return _module_roles(fn)


def _role_table(module: torch.nn.Module) -> Dict[str, Tuple[str, Optional[Callable[[int], Tuple[int, ...]]]]]:
    """``{local name: (role, permutation to the canonical layout from ndim)}`` for one module's own tensors."""
    nn = torch.nn
    norm = {"weight": (mapping.NORM_SCALE, None), "bias": (mapping.NORM_OFFSET, None)}
    statistics = {**norm, "running_mean": (mapping.NORM_MEAN, None), "running_var": (mapping.NORM_VARIANCE, None)}
    if isinstance(module, nn.Linear):
        return {"weight": (mapping.DENSE_KERNEL, lambda ndim: mapping.OUT_IN), "bias": (mapping.BIAS, None)}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {"weight": (mapping.CONV_KERNEL, mapping.out_in_spatial), "bias": (mapping.BIAS, None)}
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                           nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        return statistics
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())):
        return norm
    if isinstance(module, nn.Embedding):
        return {"weight": (mapping.EMBEDDING, None)}
    return {}


def _module_roles(module: torch.nn.Module) -> mapping.Roles:
    state = module.state_dict(keep_vars=True)
    required = {name for name, _ in module.named_parameters(remove_duplicate=True)}
    roles: mapping.Roles = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        table = _role_table(sub)
        own = list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False))
        for local, tensor in own:
            name = f"{prefix}.{local}" if prefix else local
            if name not in state or name in roles or isinstance(tensor, torch.nn.parameter.UninitializedTensorMixin):
                continue
            role, permutation = table.get(local, (None, None)) if _floating(tensor) else (None, None)
            shape = tuple(int(d) for d in tensor.shape)
            roles[name] = mapping.ParamRole(role, permutation(len(shape)) if permutation and shape else None, prefix,
                                            shape, name in required, type(sub).__name__)
    return roles


def _to_array(value: Any) -> np.ndarray:
    """A gradient a hand-written ``grad=`` returned (tensor, array, number) as a float64 NumPy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().resolve_conj()
        return value.to(torch.complex128 if value.is_complex() else torch.float64).cpu().numpy()
    array = np.asarray(value)
    return array.astype(np.complex128 if np.iscomplexobj(array) else np.float64)  # complex: for a complex leaf


def _hand_written_call(problem: TorchProblem, prepared: TorchPrepared) -> Callable[[Optional[List[np.ndarray]]], Any]:
    """The user's ``grad`` at ``x0`` (see :mod:`..common.handwritten`): ``grad(*args)`` for ``None``, else
    ``grad(cotangent, *args)`` with the cotangent blocks put in fn's output structure as tensors in the
    outputs' dtypes (zeros for non-floating outputs). The structure comes from one run of fn at ``x0``."""
    structure: List[Any] = []

    def output_structure() -> Tuple[Callable[[Sequence[Any]], Any], List[Tuple[bool, torch.Tensor]]]:
        if not structure:
            with torch.no_grad(), problem.window():
                result = problem.call_with_arguments(problem.spec.fn, (), problem.to_tensor(prepared.x0))
            leaves, rebuild = flatten(result, "out", _is_tensor)
            structure.append((rebuild, [(leaf.value.is_floating_point() or leaf.value.is_complex(), leaf.value.detach())
                                        for leaf in leaves]))
        return structure[0]

    def call(blocks: Optional[List[np.ndarray]]) -> Any:
        leading: tuple = ()
        if blocks is not None:
            rebuild, outputs = output_structure()
            supply = iter(blocks)
            leading = (rebuild([_cotangent(next(supply), like) if floating else torch.zeros_like(like)
                                for floating, like in outputs]),)
        # the grad mode user code is written for (its inputs do not require grad), in the check's window as fn
        with torch.enable_grad(), problem.window():
            return problem.call_with_arguments(problem.spec.grad, leading, problem.to_tensor(prepared.x0))

    return call


def _cotangent(block: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """One output's cotangent block as a tensor of the output's dtype and device; a complex output's block is its
    real view, given to ``grad`` as ``dL/dRe y + i dL/dIm y`` (gradbridge's and PyTorch's convention)."""
    if like.is_complex():
        block = complex_from_view(block)
    return torch.as_tensor(np.ascontiguousarray(block), dtype=like.dtype, device=like.device)


ADAPTER = TorchAdapter()


def _flat_float64(tensor: torch.Tensor) -> np.ndarray:
    """A checked leaf's values as a flat float64 array (a complex tensor's real view: real and imaginary parts)."""
    tensor = tensor.detach()
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor.resolve_conj().to(torch.complex128))
    return tensor.to(torch.float64).reshape(-1).cpu().numpy()

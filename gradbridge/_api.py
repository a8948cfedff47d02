"""The public entry points: :func:`check` and :func:`assert_check`."""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _defaults, _hooks, _registry
from ._checking import executor as _executor
from ._adapter import CheckSpec, PytreeNodes, WorkingPrecision, WrappedFunctions, offered
from ._checking.check import run_check
from ._errors import GradientCheckError, InvalidArgumentError
from ._options import (Options, normalize_wrt, validate_executor, validate_kwargs, validate_options,
                       validate_step)
from ._precision import DTYPE_EPS, FLOAT64_EPS, dtype_name, eps_of
from ._checking.structure import validate_structure
from ._reporting.report import Report
from ._tree import terminal_values

Wrt = Union[int, str, Any, Sequence[Union[int, str, Any]], None]


def check(fn: Callable[..., Any], *args: Any, grad: Optional[Callable[..., Any]] = None, params: Any = None,
          wrt: Wrt = None, mode: str = _defaults.MODE, order: int = _defaults.ORDER, eps: Optional[float] = None,
          atol: Optional[float] = None, rtol: Optional[float] = None, seed: int = _defaults.SEED,
          backend: Optional[str] = None, kwargs: Optional[Mapping[str, Any]] = None,
          analytic: Union[str, Sequence[str]] = _defaults.ANALYTIC, probes: int = _defaults.PROBES,
          train: bool = _defaults.TRAIN,
          chunk_size: int = _defaults.CHUNK_SIZE, budget: int = _defaults.BUDGET, kinks: str = _defaults.KINKS,
          promote: bool = _defaults.PROMOTE,
          structure: Optional[Mapping[str, Union[str, Callable[[Any], Any]]]] = None,
          progress: Optional[bool] = None, executor: Any = None, memory: Union[None, int, str] = None,
          contracts: Union[bool, str] = True) -> Report:
    """Check the gradients of ``fn`` at ``args`` against central finite differences.

    The check runs on float64 copies of every floating-point array among ``args`` (nested in lists,
    tuples and dicts too) and ``params``; the user's arrays, modules and random generators are left
    exactly as they were, also when ``fn`` raises. A wrong gradient never raises here: read
    ``report.passed``, print the report, or use :func:`assert_check`.

    Args:
        fn: the function to check. Its analytic derivatives come from the framework's autodiff (torch,
            JAX, TensorFlow) or from ``grad`` (NumPy).
        *args: the point at which to check. Floating arrays are checked; integers, booleans and other
            values pass through unchanged.
        grad: a hand-written gradient (NumPy, and PyTorch/TensorFlow, where it replaces the framework's
            autodiff on the analytic side). For a scalar ``fn``, ``grad(*args)`` returns one gradient per
            checked argument (a single array when there is one). For a non-scalar ``fn``,
            ``grad(cotangent, *args)`` is a VJP returning the same.
        params: parameters ``fn`` closes over, checked by name: a ``torch.nn.Module`` (its named
            parameters) or an iterable of tensors. When ``fn`` is itself a module, its parameters are
            used unless ``params`` says otherwise (``params=()`` checks the inputs only).
        wrt: narrow what is checked: argument positions (int), names or name prefixes (``"x"``,
            ``"fc1"``, ``"fc1.weight"``), the array objects themselves, or a list of these.
        mode: ``"full"`` compares every Jacobian entry; ``"fast"`` compares random projections with
            ``probes`` Gaussian probes per checked leaf and re-runs ``full`` on a failing leaf;
            ``"auto"`` (the default) is ``full`` unless its cost is above ``budget``, then ``fast``
            (the report says which ran and why).
        order: 1 checks first derivatives; k >= 2 (up to 4) also checks each level's derivative of the function
            the level below built: ``x -> J(x)^T v`` where that level is checked in reverse mode (2 is like
            ``torch.autograd.gradgradcheck``), ``x -> J(x) t`` where it is checked in forward mode. A scalar fn's
            second order also checks that the Hessian is symmetric.
        eps: relative finite-difference step; the step of element j is ``eps * max(1, |x_j|)``.
            Default ``cbrt(float64 eps)`` (about 6e-6).
        atol, rtol: replace the default error-estimated rule (the difference must stay within a few
            times the finite difference's own estimated error) by ``|a - n| <= atol + rtol*|n|``.
        seed: seeds the probes of ``fast`` mode and every RNG re-seeded before each evaluation.
        backend: ``"numpy"``, ``"torch"``, ``"jax"``, ``"tensorflow"``, ``"autograd"``; detected from the arguments
            when None.
        kwargs: keyword arguments passed to ``fn`` unchanged (never checked).
        analytic: ``"auto"`` (the default) checks every rule the user wrote: reverse mode (VJPs: backward
            passes), plus forward mode where fn has its own forward rule (a torch ``Function.jvp``), and
            forward mode instead where fn supports only forward mode. ``"rev"`` (VJPs), ``"fwd"`` (JVPs)
            or ``"both"`` ask for exactly those modes (a mode fn lacks is then reported unsupported); a string
            applies to every order. With ``order >= 2`` a sequence gives each level's mode, innermost first:
            ``("rev", "fwd")`` is forward-over-reverse, ``("fwd", "rev")`` reverse-over-forward, and ``"fwd"``
            (or ``("fwd", "fwd")``) forward-over-forward (what ``jacfwd(jacfwd(f))`` runs).
        probes: number of random probes per leaf in ``fast`` mode.
        train: keep the modules' own train/eval modes (a model in training mode is checked in training
            mode: dropout masks frozen by re-seeding, BatchNorm on batch statistics) instead of the
            default, which puts every module in evaluation mode for the check.
        chunk_size: most points evaluated in one batch.
        budget: under ``mode="auto"``, the most function evaluations plus analytic (VJP/JVP) calls a
            full check may take; above it the check runs in ``fast`` mode.
        kinks: what a non-differentiable point (the one-sided differences disagree, e.g. relu at 0)
            does to the verdict: ``"allow"`` (shown, never fails; the default), ``"subgradient"``
            (fails unless the analytic value lies between the one-sided ones) or ``"fail"``.
        promote: True checks float64 copies (the default). False checks in the arrays' own dtypes
            (float32, bfloat16, float16: for code that only runs in low precision); steps and
            tolerances then follow that precision.
        structure: restrict the perturbations of some inputs to the tangent directions of the set they
            live on, by leaf name: ``"symmetric"`` (symmetric matrices), ``"simplex"`` (entries summing
            to one), or a callable ``directions(x) -> array (k, *x.shape)`` of tangent directions.
        progress: a progress bar on stderr for checks that run longer than a second: None (the
            default) shows it on interactive terminals only, True always, False never.
        executor: a ``concurrent.futures.Executor`` (``ProcessPoolExecutor``, ``ThreadPoolExecutor``, a Dask
            ``distributed.Client`` or its ``get_executor()``): the evaluations of ``fn`` are split into chunks
            and run by its workers; analytic VJPs/JVPs stay in this process. Each worker prepares the check
            from a pickled copy of ``fn`` and the arguments, so with process pools ``fn`` must be picklable
            (a module-level function); Dask pickles lambdas and closures too.
        memory: the most memory the check may allocate, in bytes or as a size (``"4GiB"``); None (the
            default) is half of what this process can still get (available memory, and the room under
            an address-space limit). A full comparison above it is not started: ``mode="auto"`` takes
            random projections (a failing leaf localised by bisection), ``mode="full"`` raises.

        contracts: True (the default) also checks, with a few analytic calls and no finite differences, what every
            rule must satisfy (``report.contracts``): the backward is linear in its incoming gradient (zero in, zero
            out); the primal computed under differentiation equals fn(x); on torch, the backward under vmap equals
            the loop and non-contiguous and expanded inputs give what contiguous ones give, the custom rules write
            nothing in place and return gradients in their inputs' dtypes and shapes, and a ``torch.library`` op
            passes ``torch.library.opcheck``; a compiled fn (``torch.compile``, ``tf.function``) gives what the eager
            function it was made from gives; at order 2 a scalar fn's Hessian is symmetric. A violated contract
            fails the check. ``"all"`` also runs those that cost a trace or compile the check has not paid for (the
            batched contract of a small TensorFlow check, ``jax.jit`` against eager, opcheck's AOT dispatch test);
            False skips them.

    Returns:
        A :class:`Report`; ``report.passed`` is the verdict.

    Raises:
        InvalidArgumentError: a bad argument or option (the message names it).
        BackendNotAvailableError: the framework for ``backend`` is not installed.
        FunctionEvaluationError: ``fn`` (or its gradient) raised, or returned NaN/Inf or non-arrays.
    """
    if not callable(fn):
        raise InvalidArgumentError(f"fn: expected a callable (function, autograd Function's apply, module), "
                                   f"got {type(fn).__name__}")
    options = validate_options(mode=mode, order=order, eps=eps, atol=atol, rtol=rtol, seed=seed, probes=probes,
                               analytic=analytic, train=train, chunk_size=chunk_size, budget=budget, kinks=kinks,
                               promote=promote, progress=progress, memory=memory, contracts=contracts)
    structures = validate_structure(structure)
    executor = validate_executor(executor)
    call_kwargs = validate_kwargs(kwargs)
    if grad is not None and not callable(grad):
        raise InvalidArgumentError(f"grad: expected a callable returning gradients, got {type(grad).__name__}")
    values = _values_of(args, params, fn)
    detected = _registry.detect_adapter(values, hand_written=grad is not None)
    adapter = detected if backend is None else _registry.get_adapter(backend)
    if detected.name != adapter.name and detected.name != "numpy":
        raise InvalidArgumentError(f"backend: {adapter.name!r} was asked for, but the arguments are "
                                   f"{detected.name} arrays; pass them as {adapter.name} arrays or use "
                                   f"backend={detected.name!r}")
    written = offered(adapter, WrappedFunctions, "user_function")
    named = (written(fn) if written is not None else None) or fn  # what the user wrote, for names
    spec = CheckSpec(fn=fn, args=tuple(args), kwargs=call_kwargs, params=params, wrt=normalize_wrt(wrt), grad=grad,
                     seed=options.seed, train=options.train, arg_names=argument_names(named, len(args)),
                     promote=options.promote)
    prepared = adapter.prepare(spec)
    _validate_point(prepared, options)
    report = Report(function=function_name(named), backend=adapter.name, backend_version=adapter.version(),
                    mode=options.mode, order=options.order)
    report.notes.append(f"analytic side: {prepared.analytic_source}")
    remote = _executor.plan(executor, adapter.name, spec, prepared) if executor is not None else None
    with _executor.activated(remote):
        report = run_check(prepared, options, report, structures, remote)
    if remote is not None:
        report.notes.append(remote.note(options.order))
    _hooks.notify(report)
    return report


def assert_check(fn: Callable[..., Any], *args: Any, **options: Any) -> Report:
    """Like :func:`check`, but raise :class:`GradientCheckError` (an ``AssertionError``) carrying the
    report when the check fails. Returns the report when it passes."""
    report = check(fn, *args, **options)
    if not report.passed:
        raise GradientCheckError(report)
    return report


def _validate_point(prepared: Any, options: Options) -> None:
    """What only the prepared check knows: the point must be finite (a NaN there is the input's fault, not fn's),
    and ``eps`` must not be below the precision the checked leaves are perturbed in."""
    x0 = np.asarray(prepared.x0)
    bad = np.flatnonzero(~np.isfinite(x0))
    if bad.size:
        k = int(bad[0])
        leaf = next(leaf for leaf in prepared.leaves if leaf.offset <= k < leaf.offset + leaf.size)
        element = f"{leaf.name}{list(leaf.unravel(k - leaf.offset))}" if leaf.shape else leaf.name
        others = f" (and {bad.size - 1} more element(s))" if bad.size > 1 else ""
        raise InvalidArgumentError(
            f"{'params' if leaf.kind == 'param' else 'args'}: {element} is {x0[k]}{others}; gradients cannot be "
            "checked at a point that is not finite: pass finite values, or leave the array out of the check with wrt=")
    if options.eps is None:
        return
    if options.promote:
        working = offered(prepared, WorkingPrecision, "working_eps")  # an adapter that could not promote (TensorFlow)
        if working is not None and working > FLOAT64_EPS:
            validate_step(options.eps, float(working), _precision_of(float(working)))
        return
    coarsest = max(prepared.leaves, key=lambda leaf: eps_of(leaf.dtype))
    validate_step(options.eps, eps_of(coarsest.dtype), f"{dtype_name(coarsest.dtype)} ({coarsest.name})")


def _precision_of(working: float) -> str:
    return next((name for name, eps in DTYPE_EPS.items() if eps == working), f"machine epsilon {working:.3g}")


def _values_of(args: Tuple[Any, ...], params: Any, fn: Any) -> Iterable[Any]:
    """What decides the backend: every value inside the arguments and params (walked as the adapters walk
    them: containers, dataclasses, optree nodes, and the pytree nodes of the frameworks already imported),
    and ``fn``."""
    hooks = [hook for hook in (offered(a, PytreeNodes, "pytree_node") for a in _registry.loaded_adapters()) if hook]

    def node_of(value: Any) -> Any:
        for hook in hooks:
            found = hook(value)
            if found is not None:
                return found
        return None

    return terminal_values((args, params), node_of if hooks else None) + [fn]


def function_name(fn: Any) -> str:
    """A readable name: ``MyLinear.apply`` for a classmethod, the qualified name otherwise."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if isinstance(owner, type) and name == "apply":
        return f"{owner.__name__}.apply"
    if inspect.isbuiltin(fn) and name:
        return name
    qualified = getattr(fn, "__qualname__", None) or name or type(fn).__name__
    return qualified.rsplit("<locals>.", 1)[-1]


def argument_names(fn: Any, count: int) -> Tuple[str, ...]:
    """Names for the positional arguments: from ``fn``'s signature where it has them, else ``arg0``...."""
    if type(fn) is types.FunctionType and not hasattr(fn, "__wrapped__") and not hasattr(fn, "__signature__"):
        code = fn.__code__  # a plain function: its positional parameters straight from the code (no inspect)
        names = code.co_varnames[:code.co_argcount][:count]
        return tuple(names) + tuple(f"arg{i}" for i in range(len(names), count))
    target = fn
    owner = getattr(fn, "__self__", None)
    skip = 0
    if isinstance(owner, type) and hasattr(owner, "forward") and getattr(fn, "__name__", "") == "apply":
        target, skip = owner.forward, 1  # autograd-Function style: forward(ctx, *inputs)
    try:
        parameters = list(inspect.signature(target).parameters.values())[skip:]
    except (TypeError, ValueError):
        parameters = []
    names = []
    for p in parameters:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            break
    names = names[:count]
    return tuple(names) + tuple(f"arg{i}" for i in range(len(names), count))


def clear_cache() -> None:
    """Drop everything gradbridge keeps across checks: each framework's traces, compiled functions and batching
    decisions (kept per function, held weakly, so they go with the function anyway). Useful between tests that
    measure memory, or after monkeypatching what a checked function reads in a way its fingerprint cannot see."""
    for adapter in _registry.imported_adapters():
        adapter.clear_cache()


"""The JAX backend: ``jax.custom_vjp`` / ``jax.custom_jvp`` rules, ``jax.jit``-compiled functions and plain code.

Invariant: importing this package imports JAX (never done by ``import gradbridge``: the registry imports it only
when a check needs it) and exposes the one adapter the registry reads, ``ADAPTER``, plus the cache controls
``clear_cache()`` and ``cache_size()``.

Files (the same names as every backend folder): ``adapter.py`` (the adapter: detection, preparing a check,
``gb.compare``), ``problem.py`` (argument trees, leaves, calling fn, the session, the compiled entry's key),
``prepared.py`` (evaluate, VJP, JVP, transposed VJP, gradient function: chooses the compiled or the eager path in
one place), ``batching.py`` (batched or the loop: one PathChoice per computation), ``cache.py`` (compiled code kept
across checks: fingerprint and weak cache), ``transposed.py`` (J t through the VJP), ``compat.py`` (every private
or version-dependent JAX API), ``demo.py``; and for JAX only: the two derivative paths ``compiled.py`` (jit/vmap
of fn and its derivative maps, traced once, kept across checks) and ``eager.py`` (fn run and differentiated at
the check's point: where fn keeps state or the compiled path cannot run), ``derivatives.py`` (what JAX can
differentiate: "no derivative rule" errors, symbolic zeros), ``x64.py`` (the thread-local 64-bit mode) and
``state.py`` (state fn rebinds while traced: watched and put back).

What is checked, and how the user's state stays untouched:

* Arguments are pytrees (dicts, lists, tuples, NamedTuples, registered nodes). Every floating leaf
  (a JAX array, or a NumPy float array passed to a JAX function) is checked and named by its tree
  path under the argument's name, e.g. ``params['dense1']['w']``. Integer leaves, PRNG keys (typed
  ``jax.random.key`` keys and legacy ``uint32`` ``jax.random.PRNGKey`` keys) and non-array values
  (Python numbers, strings, ...) pass through untouched: the very same object at every evaluation.
* Randomness: JAX has no global generator, so a function that takes a PRNG key gets the same key at
  every evaluation (keys are not floating, so they are never perturbed) and draws the same dropout
  mask each time; the finite differences then see one fixed function. Python's and NumPy's global
  generators (used, say, inside a ``pure_callback``) are re-seeded before each batch of evaluations
  and put back when that call into fn returns (under the lock of :mod:`gradbridge._process`).
* Float64: everything runs inside JAX's thread-local 64-bit scope (``jax.enable_x64(True)``, a context
  manager), so the user's global ``jax_enable_x64`` setting is never written: no other thread sees the
  check's mode, and the flag is exactly as it was afterwards, also when ``fn`` raises. Host callbacks
  XLA runs on threads of its own are registered wrapped in the mode they were traced in. Checked leaves
  created as float32 (or bfloat16, float16) are promoted on float64 copies; unchecked floating leaves are
  promoted too, so ``fn`` computes in one precision.
* ``promote=False``: every floating leaf keeps its own dtype; the checked ones are cut from the flat
  vector and cast to it inside ``fn``'s trace (exact: the core has rounded the points to those dtypes),
  so the derivatives JAX computes run in those dtypes (cotangents reach the outputs cast to their
  dtypes) and are widened only afterwards. The 64-bit scope is entered only where some floating leaf
  is float64; otherwise ``fn`` runs under the user's own ``jax_enable_x64`` setting, as it does for the
  user (with x64 off, ``jnp.zeros(3)`` inside ``fn`` stays float32), and the flat plumbing around it is
  float32, which holds float32, float16 and bfloat16 values exactly.
* Analytic side: reverse mode is ``jax.vjp`` built once at the checked point and applied to all
  cotangents with ``jax.vmap`` under ``jax.jit``; forward mode is ``jax.linearize`` applied the same
  way. A ``custom_vjp`` function has no forward mode: ``analytic="fwd"`` rows are "unsupported".
  ``order=2`` differentiates ``x -> vjp(fn, x)(v)`` once more. ``vjp_transposed`` (``J t`` with the ``J``
  of reverse mode, custom_vjp bwd rules included) is ``jax.linear_transpose`` of that VJP, vmapped, jitted
  and cached like the other maps; a bwd JAX cannot transpose (not linear in its cotangent, a
  ``pure_callback`` applied to it) makes it ModeUnsupportedError.
* "No gradient": where JAX raises because some input has no derivative rule (a ``pure_callback``
  without custom rule, a ``while_loop`` in reverse mode), each leaf is tried on its own and those JAX
  cannot differentiate are reported as "no gradient"; so are leaves whose derivative JAX returns as a
  symbolic zero (``stop_gradient``, an input ``fn`` does not use, a ``custom_vjp`` bwd returning
  ``None``), found by tracing the derivative map to a jaxpr and following its data dependencies.
  (float0 cotangents belong to integer inputs, which are never differentiated.)
* Evaluation runs ``jax.jit(jax.vmap(fn))`` over a batch of points; a function that cannot be traced
  that way (Python control flow on values, NumPy conversions) is evaluated point by point instead.
* State fn keeps: a model holding its own PRNG key (``self.key, sub = jax.random.split(self.key)``), a
  closure rebinding a nonlocal, a global, a flax/equinox-style state object. Every traced run of fn is
  watched: where it leaves tracers in those places, they are put back at once and fn is evaluated point by
  point and differentiated eagerly from then on (a note says so). When the check ends, also by raising,
  every array, key or object fn rebound holds what it held before (int counters and logs fn keeps stay).
  A function whose output depends on a key it advances is reported as not deterministic.
* ``gradbridge.check`` called on tracers (inside ``jax.jit``/``jax.grad``/``jax.vmap``) raises
  InvalidArgumentError naming the argument; a check called by fn on values that do not depend on fn's
  input makes the outer check evaluate fn eagerly, where the inner check runs.
* ``params=`` and ``grad=`` are rejected: a pure JAX function cannot have closed-over parameters swapped
  (pass the parameter pytree as an argument), and JAX computes the gradients itself (write custom ones
  as ``custom_vjp``/``custom_jvp`` rules).
"""

from .adapter import ADAPTER, JaxAdapter
from .cache import cache_size, clear_cache
from .prepared import JaxPrepared
from .problem import JaxProblem

__all__ = ["ADAPTER", "JaxAdapter", "JaxPrepared", "JaxProblem", "cache_size", "clear_cache"]

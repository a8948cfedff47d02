"""The TensorFlow backend: ``tf.custom_gradient`` ops, plain and ``tf.function``-compiled functions, Keras models.

Invariant: importing this package sets ``TF_CPP_MIN_LOG_LEVEL`` (only when unset) before TensorFlow is first
imported, imports no Keras, and exposes the one adapter the registry reads, ``ADAPTER``.

Files (the same names as every backend folder): ``adapter.py`` (the adapter), ``problem.py`` (arguments,
parameters, calling fn, the probe), ``prepared.py`` (evaluate, VJP, JVP, gradient function), ``batching.py``
(batched or loop, one PathChoice per computation), ``graphs.py`` (the vectorized graphs), ``cache.py`` (graphs
kept across checks), ``transposed.py`` (J t through the VJP), ``compat.py`` (every private TensorFlow/Keras
API), ``demo.py``; and for TensorFlow only: ``keras.py`` (Keras models and variables), ``random.py``
(TensorFlow's random state), ``tensors.py`` (tensors, dtypes, flat vectors).

How a check stays off the user's objects:

* Checked inputs are fresh tensors built from the flat vector, never the user's tensors or variables.
* Keras variables (``params=model`` or a list of Keras variables) are never written: while ``fn`` runs they
  are redirected, through ``keras.StatelessScope``, to shadow tf.Variables owned by the check. Every
  evaluation runs in a fresh stateless scope, so BatchNorm statistics and Dropout seed generators updated
  by the model (``train=True``) land in the scope and are dropped.
* A Keras model in float32 (or mixed precision) is checked in float64 without being changed: its layers'
  dtype policies are swapped for the duration of each call for one computing in float64 (the Keras
  mixed-precision mechanism, with float64 as the compute dtype), and its float variables are read as
  float64 copies. The user's policies are put back in a ``finally``.
* Plain tf.Variables (``params=`` a ``tf.Module`` or a list of variables) cannot be redirected: they
  are assigned the perturbed values during a call and assigned their original value back, bit for bit,
  in a ``finally`` (also when ``fn`` raises). They keep their dtype, so a float32 variable is checked in
  float32: the report says so and steps and tolerances follow float32 (``working_eps``).
* A ``tf.function`` ``fn`` is checked through a fresh ``tf.function`` of the same Python function and
  options, so the user's trace cache never holds traces made with the check's float64 inputs or shadow
  variables.
* Each call into the user's code (an evaluation of a chunk, a VJP or JVP, ``grad=``) pins TensorFlow's
  randomness for every evaluation (global seed, operation seeds, the global ``tf.random.Generator``;
  TensorFlow's kernel cache too, only for functions that draw from stateful random ops) and Python/NumPy's,
  and restores the user's seed, operation-seed sequence and generators when it returns, under the lock of
  :mod:`gradbridge._process`: between those calls other threads see their own seeds and generators.

Precision: the check first tries float64 (inputs promoted, Keras models computing in float64). When ``fn``
cannot run that way (it mixes its inputs with float32 constants, has a float32 ``input_signature``...) or
returns below float64 anyway, it runs in the user's precision and ``prepared.working_eps`` and a note say so.
With ``promote=False`` it runs in the user's precision from the start: inputs and variables in their own
dtypes (float32, float16, bfloat16; the core has rounded the points to them, so the casts are exact),
Keras models under their own dtype policies, unchecked inputs as given; gradients come out of the tape
in those dtypes (the cotangents reach the outputs cast to the outputs' dtypes) and are widened to
float64 only for the core.

Speed: evaluations (a chunk of points), VJPs (a chunk of cotangents at ``x0``) and transposed VJPs (a chunk of
tangents) run as one ``tf.function`` through ``tf.vectorized_map`` (checked leaves are tensor slices of the flat
vector; Keras variables read them through the stateless scope; unchecked tensor arguments are graph inputs too).
A traced graph is kept across checks of the same function and key (shapes, dtypes, structure, what ``fn``
reads), held weakly by the function (``clear_cache()``, ``cache_size()``), so repeat checks do not trace again.
A small chunk of a function's first check runs the eager loop instead (tracing costs more than it saves); a
function checked again traces and keeps its graphs. The eager per-point loop runs instead, decided
on the first call and said in ``notes``, when checked plain tf.Variables must be assigned, ``fn`` draws random
numbers, calls Python (``tf.py_function``), has side effects (assertions, prints, assigns), cannot be traced
(``.numpy()``, Python branches on tensors) or vectorized without a while_loop, or when the first batched chunk
disagrees with the loop (~1e3 eps) or raises (the loop then raises with its point). Every check makes that
comparison again, also with a kept graph: it is the safety net for what the cache key cannot see. Python side effects that
do not change the outputs cannot be detected: they run once per trace instead of once per point (not at
all in a check that reuses a kept graph).

Limitations: ``training=`` passed explicitly inside ``fn`` wins over ``train=``; a ``tf.function`` called
*inside* ``fn`` (not ``fn`` itself) keeps its own trace cache; for a function drawing from stateful random
ops, eager random ops with an explicit op seed restart their sequence after the check (clearing
TensorFlow's kernel cache cannot be undone); a ``tf.random.Generator`` of the user's own other than the
global one cannot be pinned (the check then reports the function as not deterministic).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before the first import of TensorFlow: no INFO/WARNING spam

from .adapter import ADAPTER, TensorFlowAdapter  # noqa: E402
from .cache import cache_size, clear_cache  # noqa: E402
from .prepared import TensorFlowPrepared  # noqa: E402
from .problem import TensorFlowProblem  # noqa: E402

__all__ = ["ADAPTER", "TensorFlowAdapter", "TensorFlowPrepared", "TensorFlowProblem", "cache_size", "clear_cache"]

"""What each registered backend offers beyond the adapter protocol, for the conformance suite.

One row per backend in the registry (a backend missing here fails the suite: a new adapter declares what it
offers). ``prepared``: the optional capabilities (:data:`gradbridge._adapter.CAPABILITIES`) a prepared custom
rule offers, as :func:`gradbridge._adapter.capabilities` names them; ``jvp_of_vjp_rule``: forward-mode products of a custom
rule that defines only its VJP (refused with ModeUnsupportedError where False); ``order2``: the gradient function of ``order=2``; ``compare``: the compare methods
(:class:`gradbridge._adapter.CompareAdapter`); ``pytree``: the framework registers container types; ``layer_taps``:
the adapter taps a model's layers itself for ``gb.compare(layers=True)`` (:class:`gradbridge._adapter.LayerTaps`).
The suite checks every row against what the adapter really does, so the table cannot drift.
"""

from __future__ import annotations

CAPABILITY_TABLE = {
    "numpy": dict(prepared={"WorkingPrecision", "StridedInputs"}, jvp_of_vjp_rule=False, order2=False, compare=True,
                  pytree=False, layer_taps=False),
    "torch": dict(prepared={"WorkingPrecision", "UndefinedGradients", "TransposedProducts", "EditedEvaluation",
                            "ForwardRules", "DifferentiatedPrimal", "BatchedRules", "BatchedForwardRules",
                            "StridedInputs", "InPlaceWrites", "FrameworkTests", "CompiledFunction"}, jvp_of_vjp_rule=False, order2=True, compare=True, pytree=True,
                  layer_taps=True),
    "jax": dict(prepared={"WorkingPrecision", "UndefinedGradients", "TransposedProducts", "EditedEvaluation",
                          "ForwardRules", "DifferentiatedPrimal", "CompiledFunction"}, jvp_of_vjp_rule=False, order2=False, compare=True, pytree=True,
                layer_taps=False),
    "tensorflow": dict(prepared={"WorkingPrecision", "UndefinedGradients", "TransposedProducts", "EditedEvaluation",
                                 "ForwardRules", "DifferentiatedPrimal", "BatchedRules", "CompiledFunction"}, jvp_of_vjp_rule=False, order2=True, compare=True, pytree=False,
                       layer_taps=True),
    # no EditedEvaluation (the NumPy backend's point-by-point evaluation); TransposedProducts is offered, and refused
    # with ModeUnsupportedError where a rule's backward runs plain NumPy (the kit's); no pytree registry
    "autograd": dict(prepared={"WorkingPrecision", "UndefinedGradients", "TransposedProducts", "ForwardRules"},
                     jvp_of_vjp_rule=False, order2=True, compare=True, pytree=False, layer_taps=False),
}

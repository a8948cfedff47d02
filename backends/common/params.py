"""``params=`` given as a collection of the framework's parameters: one parameter, a dict, or a sequence.

Invariant: every parameter comes with a distinct readable name (the dict's key, ``params[i]`` for a sequence, a
repeated path made unique with ``#2``, ``#3``), appears once however often it is reachable, and anything that
is not one of the framework's perturbable parameters is refused with a message naming it, before anything
runs. Modules and models (an ``nn.Module``, a Keras model) are the adapter's own business: it lists their
parameters and passes them through :func:`distinct_names`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

from gradbridge._errors import InvalidArgumentError

Named = List[Tuple[str, Any]]


def named_params(params: Any, is_parameter: Callable[[Any], bool], expected: str,
                 refusal: Callable[[str, Any], str]) -> Named:
    """``params`` (one parameter, a dict name -> parameter, or an iterable of parameters) as (name, parameter)
    pairs, in order.

    Args:
        is_parameter: whether a value is one of the framework's parameters.
        expected: what ``params`` may be, for the message when it is not a collection
            (``"an nn.Module or an iterable of tensors"``).
        refusal: the message for an item that is not a parameter, from its name and value.

    Raises:
        InvalidArgumentError: ``params`` is not a collection, or an item is not a parameter.
    """
    if is_parameter(params):
        params = [params]
    if isinstance(params, dict):
        items = [(str(name), value) for name, value in params.items()]
    else:
        try:
            items = [(f"params[{i}]", value) for i, value in enumerate(params)]
        except TypeError:
            raise InvalidArgumentError(f"params: expected {expected}, got {type(params).__name__}") from None
    for name, value in items:
        if not is_parameter(value):
            raise InvalidArgumentError(refusal(name, value))
    return items


def once_each(values: Sequence[Any]) -> List[Any]:
    """The values, each once (by identity), in order: a parameter shared by two layers is checked once."""
    seen, unique = set(), []
    for value in values:
        if id(value) not in seen:
            seen.add(id(value))
            unique.append(value)
    return unique


def distinct_names(named: Sequence[Tuple[str, Any]]) -> Named:
    """The (name, parameter) pairs with distinct names: a repeated name gets ``#2``, ``#3``..."""
    counts: Dict[str, int] = {}
    result = []
    for name, value in named:
        counts[name] = counts.get(name, 0) + 1
        result.append((name if counts[name] == 1 else f"{name}#{counts[name]}", value))
    return result

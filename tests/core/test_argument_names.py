"""Argument names in reports: a plain function's are read from its code (fast path), and must be exactly
what its signature says; wrapped functions, partials and autograd-Function ``apply`` go through inspect."""

from __future__ import annotations

import functools
import inspect

import pytest

from gradbridge._api import argument_names


def _positional_only(a, b, /, c, *rest, d=1, **options):
    return a


def _defaults(x, y=2.0, z=None):
    return x


def _decorated(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def _expected(fn, count):
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            break
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    names = names[:count]
    return tuple(names) + tuple(f"arg{i}" for i in range(len(names), count))


@pytest.mark.parametrize("fn", [_positional_only, _defaults, lambda w, b: w, lambda *xs: xs, lambda: 0,
                                _decorated(_defaults), functools.partial(_defaults, 1.0)],
                         ids=["positional-only", "defaults", "lambda", "var-positional", "no-arguments",
                              "decorated", "partial"])
@pytest.mark.parametrize("count", [0, 1, 2, 3, 5])
def test_names_follow_the_signature(fn, count: int) -> None:
    assert argument_names(fn, count) == _expected(fn, count)


def test_a_decorated_function_is_named_by_what_it_wraps() -> None:
    assert argument_names(_decorated(_defaults), 2) == ("x", "y")

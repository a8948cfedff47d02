"""The verified column groups of gradbridge._checking.verified_groups on explicit Jacobians.

``products`` and ``vjp`` here are exact linear maps of a known matrix, so each test states the
pattern it builds and the grouping (or refusal) that must follow from it."""

import numpy as np
import pytest

from gradbridge._adapter import LeafSpec
from gradbridge._checking.verified_groups import analytic_by_columns, dot_test, groupings, single_entry_rows

EPS = np.finfo(np.float64).eps


def leaf(name, shape, offset=0):
    return LeafSpec(name=name, shape=tuple(shape), dtype="float64", offset=offset, kind="input")


def linear_maps(J, calls):
    def products(T):
        calls.append(len(T))
        return T @ J.T

    return products, lambda U: U @ J


def batched_matmul_jacobian(batch, features, W):
    """d(x @ W)/dx for x of shape (batch, features): block diagonal over the batch."""
    return np.kron(np.eye(batch), W.T)


def test_groupings_fewest_groups_first_and_plain_columns_last():
    names = [name for name, _ in groupings(leaf("x", (128, 16)))]
    assert names == ["all elements at once", "by index along axis 1", "by index along axis 0", "column by column"]
    by_feature = dict(groupings(leaf("x", (128, 16))))["by index along axis 1"]
    assert by_feature.max() == 15 and np.all(by_feature.reshape(128, 16)[:, 3] == 3)
    assert [name for name, _ in groupings(leaf("b", (10,)))] == ["column by column"]


def test_batched_matmul_is_grouped_by_feature_and_matches_the_dense_jacobian():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 16))
    J = batched_matmul_jacobian(64, 16, W)
    calls = []
    products, vjp = linear_maps(J, calls)
    x0 = rng.standard_normal(J.shape[1])
    result = analytic_by_columns(products, vjp, x0, [leaf("x", (64, 16))], J.shape[0], EPS, 0, J.shape[0] // 2)
    assert result is not None
    plan = result.plans["x"]
    assert plan.count == 16
    # each group's analytic column is J times its scaled direction: every entry is in there once
    np.testing.assert_allclose(result.blocks["x"], J @ plan.basis.T, rtol=1e-14, atol=1e-14)
    assert sum(calls) == 2 * 1 + 2 * 16  # "all at once" refused, then two passes of the 16 feature groups
    assert "by index along axis 1" in result.notes[0]


def test_a_row_with_two_nonzeros_in_a_group_is_refused():
    J = np.eye(64)
    J[5, 9] = 0.25  # output 5 depends on elements 5 and 9: "all elements at once" is not a valid group
    calls = []
    products, vjp = linear_maps(J, calls)
    x0 = np.zeros(64)
    result = analytic_by_columns(products, vjp, x0, [leaf("x", (64,))], 64, EPS, 0, 10 ** 6)
    assert result is not None and "x" not in result.plans  # only plain columns remain valid
    np.testing.assert_array_equal(result.blocks["x"], J)


def test_single_entry_rows_detects_a_mixture_even_of_tiny_size():
    rng = np.random.default_rng(1)
    J = np.diag(rng.uniform(1, 2, 64))
    J[3, 40] = 1e-6
    groups = np.zeros(64, dtype=np.int64)
    s = rng.uniform(0.5, 1, 64)
    rho = rng.uniform(0.5, 2, 64)
    first = (J @ s)[None, :]
    second = (J @ (s * rho))[None, :]
    assert single_entry_rows(first, second, groups, rho) is None
    J[3, 40] = 0.0
    owners = single_entry_rows((J @ s)[None, :], (J @ (s * rho))[None, :], groups, rho)
    np.testing.assert_array_equal(owners[0], np.arange(64))  # output i measures element i


def test_dot_test_rejects_a_backward_pass_that_is_not_linear_in_its_cotangent():
    rng = np.random.default_rng(2)
    J = rng.standard_normal((70, 64))
    T = rng.standard_normal((5, 64))
    assert dot_test(lambda U: U @ J, T, T @ J.T, 70, EPS, 0)
    assert not dot_test(lambda U: U @ J + 1.0, T, T @ J.T, 70, EPS, 0)  # an affine "VJP": bias bug
    assert not dot_test(lambda U: (U ** 2) @ J, T, T @ J.T, 70, EPS, 0)


def test_products_disagreeing_with_the_vjp_give_up():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((16, 16))
    J = batched_matmul_jacobian(64, 16, W)
    wrong = J.copy()
    wrong *= 2.0  # the transposed products are not the VJP's Jacobian
    result = analytic_by_columns(lambda T: T @ wrong.T, lambda U: U @ J, rng.standard_normal(1024),
                                 [leaf("x", (64, 16))], 1024, EPS, 0, 512)
    assert result is None


def test_budget_refuses_when_columns_cost_more_than_rows():
    J = np.ones((100, 64))  # dense: no grouping holds, and 64 plain columns exceed a budget of 50
    calls = []
    products, vjp = linear_maps(J, calls)
    assert analytic_by_columns(products, vjp, np.zeros(64), [leaf("x", (64,))], 100, EPS, 0, 50) is None
    assert sum(calls) <= 50


@pytest.mark.parametrize("shape", [(64, 16), (96, 12)])
def test_two_leaves_each_grouped_on_its_own_axis(shape):
    """y = x @ W for x (b, k) and W (k, o): x groups by feature k, W by its row k."""
    rng = np.random.default_rng(4)
    b, k = shape
    o = 8
    x = rng.standard_normal((b, k))
    W = rng.standard_normal((k, o))
    jx = np.kron(np.eye(b), W.T)                 # (b*o, b*k)
    jw = np.kron(x, np.eye(o))                   # (b*o, k*o)
    J = np.concatenate([jx, jw], axis=1)
    calls = []
    products, vjp = linear_maps(J, calls)
    x0 = np.concatenate([x.ravel(), W.ravel()])
    leaves = [leaf("x", (b, k)), leaf("W", (k, o), offset=b * k)]
    result = analytic_by_columns(products, vjp, x0, leaves, b * o, EPS, 0, b * o)
    assert result is not None
    assert result.plans["x"].count == k
    np.testing.assert_allclose(result.blocks["x"], jx @ result.plans["x"].basis.T, rtol=1e-13, atol=1e-13)
    w_block = result.blocks["W"]
    if "W" in result.plans:
        assert result.plans["W"].count == k
        np.testing.assert_allclose(w_block, jw @ result.plans["W"].basis.T, rtol=1e-13, atol=1e-13)
    else:
        np.testing.assert_allclose(w_block, jw, rtol=1e-13, atol=1e-13)


def test_a_wide_leaf_with_few_outputs_keeps_the_dense_rows():
    """x (16, 64) @ W (64, 8): 128 outputs; x's valid grouping (64 feature groups) costs 128 products,
    as much as the dense Jacobian's 128 VJPs: refused, the dense Jacobian is built instead."""
    rng = np.random.default_rng(5)
    x, W = rng.standard_normal((16, 64)), rng.standard_normal((64, 8))
    J = np.concatenate([np.kron(np.eye(16), W.T), np.kron(x, np.eye(8))], axis=1)
    calls = []
    products, vjp = linear_maps(J, calls)
    leaves = [leaf("x", (16, 64)), leaf("W", (64, 8), offset=1024)]
    assert analytic_by_columns(products, vjp, np.concatenate([x.ravel(), W.ravel()]), leaves, 128, EPS, 0,
                               128) is None
    assert sum(calls) <= 128

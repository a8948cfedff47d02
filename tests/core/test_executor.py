"""executor=: evaluations spread over a process pool, a thread pool and a local Dask cluster, with the
same verdicts, worst elements and error messages as a local check. Real executors, no mocks."""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util

import numpy as np
import pytest

import executor_cases as cases
import gradbridge as gb
from backend_matrix import _require_all, require_backend
from gradbridge import FunctionEvaluationError, InvalidArgumentError

MLP_WRT = ["W1", "b1", "W2"]


@pytest.fixture(scope="module")
def pool():
    with cf.ProcessPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.fixture(scope="module")
def dask_client():
    if importlib.util.find_spec("distributed") is None:
        if _require_all():
            pytest.fail("CI requires the optional Dask dependency: pip install \"gradbridge[dask]\"", pytrace=False)
        pytest.skip("distributed (Dask) is not installed: pip install \"gradbridge[dask]\"")
    import distributed

    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _worst(report):
    return [(row.input, row.status, row.worst.input_index if row.worst else None) for row in report.rows]


def _remote_note(report, name):
    return [n for n in report.notes if n.startswith(f"evaluations spread over {name} in ")]


@pytest.mark.parametrize("grad", [cases.mlp_grads, cases.mlp_grads_buggy], ids=["correct", "seeded-bug"])
def test_numpy_check_in_a_process_pool_matches_the_local_check(pool, grad):
    args = cases.mlp_args()
    local = gb.check(cases.mlp_loss, *args, grad=grad, wrt=MLP_WRT)
    remote = gb.check(cases.mlp_loss, *args, grad=grad, wrt=MLP_WRT, executor=pool)
    assert remote.passed == local.passed == (grad is cases.mlp_grads)
    assert _worst(remote) == _worst(local)
    assert remote.evaluations == local.evaluations
    for a, b in zip(remote.rows, local.rows):
        assert a.mismatches == b.mismatches and a.compared == b.compared
    if not remote.passed:
        (bad,) = remote.failures
        assert (bad.input, bad.worst.input_index) == ("W1", (2, 3))
    (note,) = _remote_note(remote, "ProcessPoolExecutor")
    assert "chunk(s) of up to" in note and "analytic VJPs/JVPs ran in this process" in note


@pytest.mark.torch
def test_torch_check_in_a_process_pool_matches_the_local_check(pool):
    require_backend("torch")
    import torch

    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(3, 4, generator=gen), torch.randn(4, 5, generator=gen), torch.randn(5, 2, generator=gen))
    local = gb.check(cases.torch_mlp, x, w1, w2)
    remote = gb.check(cases.torch_mlp, x, w1, w2, executor=pool)
    assert local.passed and remote.passed, str(remote)
    assert _worst(remote) == _worst(local)
    assert remote.evaluations == local.evaluations

    v = torch.tensor([0.3, -1.2, 0.7, 2.0])
    local_bug = gb.check(cases.torch_buggy_square, v)
    remote_bug = gb.check(cases.torch_buggy_square, v, executor=pool)
    assert not local_bug.passed and not remote_bug.passed
    assert _worst(remote_bug) == _worst(local_bug)
    (bad,) = remote_bug.failures
    assert bad.worst.input_index == (1,) and bad.mismatches == 1


def test_thread_pool_runs_a_lambda_with_the_same_verdict():
    args = cases.mlp_args(1)
    loss = lambda X, W1, b1, W2, y: cases.mlp_loss(X, W1, b1, W2, y)  # noqa: E731 (threads need no pickling)
    local = gb.check(loss, *args, grad=cases.mlp_grads_buggy, wrt=MLP_WRT)
    with cf.ThreadPoolExecutor(max_workers=2) as threads:
        remote = gb.check(loss, *args, grad=cases.mlp_grads_buggy, wrt=MLP_WRT, executor=threads)
    assert not remote.passed and _worst(remote) == _worst(local)
    assert _remote_note(remote, "ThreadPoolExecutor")


def test_a_lambda_in_a_process_pool_is_refused_clearly(pool):
    with pytest.raises(InvalidArgumentError, match=r"executor: fn must be picklable \(a module-level function\) "
                                                   r"to run in other processes"):
        gb.check(lambda x: float(np.sum(x ** 2)), np.ones(3), grad=lambda x: 2 * x, executor=pool)


def test_executor_without_submit_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"^executor: .*got int"):
        gb.check(cases.mlp_loss, *cases.mlp_args(), grad=cases.mlp_grads, executor=4)


def test_an_exception_in_a_worker_names_the_point_like_a_local_check(pool):
    x = np.array([0.1, 0.5, 0.2])
    with pytest.raises(FunctionEvaluationError) as local:
        gb.check(cases.raises_when_large, x, grad=cases.raises_when_large_grad)
    with pytest.raises(FunctionEvaluationError) as remote:
        gb.check(cases.raises_when_large, x, grad=cases.raises_when_large_grad, executor=pool)
    assert str(remote.value) == str(local.value)
    assert "x[1] + h" in str(remote.value)
    assert isinstance(remote.value.__cause__, ValueError)


def test_a_function_depending_on_process_local_state_is_refused(pool):
    cases.set_local_scale(2.0)  # this process only: the workers keep the module's value
    try:
        assert gb.check(cases.process_local, np.array([0.1, 0.5]), grad=cases.process_local_grad).passed
        with pytest.raises(FunctionEvaluationError, match=r"executor: fn computes .* in the workers of "
                                                          r"ProcessPoolExecutor, but .* in this process"):
            gb.check(cases.process_local, np.array([0.1, 0.5]), grad=cases.process_local_grad, executor=pool)
    finally:
        cases.set_local_scale(1.0)


def test_dask_cluster_runs_a_lambda_with_the_same_verdict(dask_client):
    args = cases.mlp_args(2)
    loss = lambda X, W1, b1, W2, y: float(0.5 * np.sum((np.tanh(X @ W1 + b1) @ W2 - y) ** 2))  # noqa: E731
    local = gb.check(loss, *args, grad=cases.mlp_grads_buggy, wrt=MLP_WRT)
    remote = gb.check(loss, *args, grad=cases.mlp_grads_buggy, wrt=MLP_WRT, executor=dask_client)
    assert not remote.passed and _worst(remote) == _worst(local)
    assert remote.evaluations == local.evaluations
    assert _remote_note(remote, "Client (through its get_executor())")
    good = gb.check(loss, *args, grad=cases.mlp_grads, wrt=MLP_WRT, executor=dask_client.get_executor())
    assert good.passed and _remote_note(good, "ClientExecutor")

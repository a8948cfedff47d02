"""More than one point (``gb.compare(points=...)``): a port that agrees at the given inputs and differs at larger
ones is caught at the points drawn around them; correct ports agree at every point."""

from __future__ import annotations

import numpy as np
import pytest

import gradbridge as gb
from backend_matrix import require_backend
from gradbridge._comparing.points import moved

X = np.array([[0.3, -1.2, 0.8], [1.5, 0.0, -0.4]])


def _softplus_ports(clamp_at: float = np.inf):
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    def torch_softplus(x):
        return torch.logaddexp(x, torch.zeros_like(x)) * 2.0

    def jax_softplus(x):  # a port that "protects against overflow" by clamping the input
        return jnp.log1p(jnp.exp(jnp.minimum(x, clamp_at))) * 2.0

    return {"torch": torch_softplus, "jax": jax_softplus}


def test_a_bug_at_larger_inputs_is_caught_at_the_points_around_the_given_one() -> None:
    ports = _softplus_ports(clamp_at=2.0)  # every |x| here is below 2: the given point cannot show it
    assert gb.compare(ports, X, points=1).passed
    comparison = gb.compare(ports, X)
    assert not comparison.passed
    assert all(p.passed for p in comparison.pairs), "the given point agrees"
    assert comparison.failures and all(p.point >= 1 for p in comparison.failures)
    assert any(s.startswith("at point ") and "they agree at the given point" in s for s in comparison.verdicts), \
        comparison.verdicts
    assert "@ point" in str(comparison) and "differences at point(s)" in comparison.summary()
    # the point is there to reproduce it: the clamp's difference shows where an input exceeds 2
    for point in {p.point + 1 for p in comparison.failures}:
        assert np.abs(comparison.point_inputs[point]["x"]).max() > 2.0
    import json
    json.dumps(comparison.to_dict())


def test_a_clamp_beyond_one_and_a_half_times_the_largest_input_is_caught() -> None:
    """Inputs uniform in (-1.9, 1.9), a port clamping at 3.0: both points drawn around the given one stayed
    below 3 (a measured miss); the outward point grows every magnitude."""
    x = np.random.default_rng(2).uniform(-1.9, 1.9, size=(4, 5))
    ports = _softplus_ports(clamp_at=3.0)
    assert gb.compare(ports, x, points=1).passed
    comparison = gb.compare(ports, x)
    assert not comparison.passed and {p.point for p in comparison.failures} == {2}, comparison


def test_correct_ports_agree_at_every_point() -> None:
    comparison = gb.compare(_softplus_ports(), X, points=5)
    assert comparison.passed, comparison
    assert len({p.point for p in comparison.other_points}) == 4
    assert "at 5 points" in comparison.summary()
    assert any("compared at 5 points" in note for note in comparison.notes)


def test_the_points_keep_signs_zeros_and_domains() -> None:
    x = np.array([2.0, -3.0, 0.0, 1e-3])
    for point in (1, 2, 3):
        y = moved(x, point, seed=0, name="x")
        assert np.all(np.sign(y) == np.sign(x)) and y[2] == 0.0 and not np.allclose(y, x)
    assert np.any(moved(np.zeros(3), 1, seed=0, name="x") != 0)  # an all-zero input still moves
    # every implementation sees the same point: the draw depends on the name, the point and the seed only
    assert np.array_equal(moved(x, 2, seed=5, name="x"), moved(x.copy(), 2, seed=5, name="x"))


def test_parameters_stay_as_given_and_the_given_point_is_restored() -> None:
    require_backend("torch")
    import torch

    seen = []

    def f(params, x):
        seen.append((params["w"].detach().clone(), x.detach().clone()))
        return torch.tanh(x * params["w"]).sum()

    w = np.array([0.5, -1.0, 2.0])
    x = np.array([1.0, 2.0, -0.5])
    comparison = gb.compare({"torch": f, "t2": gb.Implementation(f, backend="torch")}, x, params={"w": w}, points=3,
                            own_check=False)
    assert comparison.passed, comparison
    # (the precision measurement moves everything by at most 256 float32 roundings, 3e-5; the points move only
    # the inputs, by factors)
    assert all(np.allclose(p.numpy(), w, rtol=1e-4, atol=0) for p, _ in seen)
    assert any(not np.allclose(v.numpy(), x, rtol=1e-2) for _, v in seen)


def test_points_must_be_a_positive_whole_number() -> None:
    for bad in (0, 2.5, True, "3"):
        with pytest.raises(gb.InvalidArgumentError, match="points: expected a whole number"):
            gb.compare({"numpy": (np.sin, np.cos), "np2": gb.Implementation(np.sin, np.cos, "numpy")}, X, points=bad)


def test_a_modules_own_weights_are_not_moved() -> None:
    """Without params= a module's weights are leaves too; the points move the inputs only (the JAX port closes
    over the same weights, so moving the module's would be a false alarm)."""
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    w = {k: jnp.asarray(v.detach().double().numpy()) for k, v in model.state_dict().items()}

    def port(x):
        return jnp.tanh(x @ w["0.weight"].T + w["0.bias"]) @ w["2.weight"].T + w["2.bias"]

    comparison = gb.compare({"torch": model, "jax": port}, np.random.default_rng(0).normal(size=(3, 4)),
                            own_check=False)
    assert comparison.passed, comparison
    assert all(set(inputs) == {"arg0"} or set(inputs) == {"x"} for inputs in comparison.point_inputs.values())


def test_masks_and_inputs_left_out_by_wrt_keep_their_values() -> None:
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp

    scores = np.random.default_rng(0).normal(size=(2, 6))
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=np.float64)  # a float 0/1 padding mask

    def torch_mean(scores, mask):
        return (scores * mask).sum(-1) / mask.sum(-1)

    def jax_mean(scores, mask):
        keep = mask > 0
        return jnp.where(keep, scores, 0.0).sum(-1) / keep.sum(-1)

    comparison = gb.compare({"torch": torch_mean, "jax": jax_mean}, scores, mask, wrt="scores", own_check=False)
    assert comparison.passed, comparison
    assert all(set(inputs) == {"scores"} for inputs in comparison.point_inputs.values())
    # all whole numbers: held as given also when wrt= includes it (the mask's gradients differ, as they should)
    comparison = gb.compare({"torch": torch_mean, "jax": jax_mean}, scores, mask, own_check=False)
    assert all(set(inputs) == {"scores"} for inputs in comparison.point_inputs.values())
    assert {p.leaf for p in comparison.failures} == {"mask"}


def test_a_point_outside_the_domain_is_skipped_and_said() -> None:
    require_backend("torch")
    require_backend("jax")
    import jax.numpy as jnp
    import torch

    x = np.random.default_rng(1).uniform(-0.9, 0.9, size=(6,))  # a cosine: domain [-1, 1]
    comparison = gb.compare({"torch": lambda x: torch.acos(x.clamp(-1 + 1e-7, 1 - 1e-7)), "jax": jnp.arccos}, x,
                            own_check=False)
    assert comparison.passed, comparison
    assert any("skipped" in note and "not finite there" in note and "jax" in note for note in comparison.notes), \
        comparison.notes

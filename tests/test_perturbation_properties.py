"""Property-based checks of the perturbation builder over shapes, dtypes, layer subsets and norms."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaccine_trainer.perturbation import build_perturbation

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@st.composite
def gradients(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    count = draw(st.integers(1, 5))
    grads = []
    for index in range(count):
        if draw(st.booleans()) and index > 0:
            grads.append(None)  # a module outside the perturbed subset, or unused by the loss
            continue
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        seed = draw(st.integers(0, 2**16))
        scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
        grad[torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.3] = 0.0
        grads.append(grad.to(dtype))
    return grads


@settings(max_examples=150, deadline=None)
@given(grads=gradients(), rho=st.sampled_from([0.05, 1.0, 2.0, 10.0]), norm=st.sampled_from(["global", "layer"]))
def test_perturbation_has_norm_rho_points_along_the_gradient_and_is_zero_where_it_is(grads, rho, norm):
    originals = [None if g is None else g.clone() for g in grads]
    result = build_perturbation(grads, rho, norm)
    if all(g is None or not g.any() for g in originals):
        assert result.skipped_reason == "zero hidden-state gradient"
        return
    assert result.skipped_reason is None
    dtype = next(g.dtype for g in originals if g is not None)
    tol = TOLERANCE[dtype]
    present = [(g, e) for g, e in zip(originals, result.eps) if g is not None]
    assert all(e is None for g, e in zip(originals, result.eps) if g is None)
    global_norm = math.sqrt(sum(g.double().pow(2).sum().item() for g, _ in present))
    assert result.grad_norm == __import__("pytest").approx(global_norm, rel=1e-5)
    for grad, eps in present:
        if eps is None:  # per-layer norm leaves a layer with a zero gradient alone
            assert norm == "layer" and not grad.any()
            continue
        assert eps.dtype == grad.dtype and eps.shape == grad.shape
        assert torch.all(eps[grad == 0] == 0)
        g, e = grad.double(), eps.double()
        if g.norm() > 0:
            cosine = (g * e).sum() / (g.norm() * e.norm())
            assert cosine > 1 - tol
        if norm == "layer" and g.norm() > 0:
            assert abs(e.norm().item() - rho) <= tol * rho * 2
    if norm == "global":
        total = math.sqrt(sum(e.double().pow(2).sum().item() for _, e in present if e is not None))
        assert abs(total - rho) <= tol * rho * 2


def test_zero_and_non_finite_gradients_are_skipped_not_propagated():
    assert build_perturbation([torch.zeros(3)], 2.0).skipped_reason == "zero hidden-state gradient"
    bad = build_perturbation([torch.tensor([1.0, float("nan")]), torch.ones(2)], 2.0)
    assert bad.skipped_reason == "non-finite hidden-state gradient" and bad.eps == [None, None]
    assert build_perturbation([torch.tensor([float("inf")])], 2.0, "layer").skipped_reason is not None
    assert build_perturbation([None, None], 2.0).eps == [None, None]

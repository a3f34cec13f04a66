"""Property-based checks of the perturbation builder over shapes, dtypes, layer subsets and norms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vaccine_trainer.perturbation import build_perturbation

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


def exact_perturbation(grads, rho: float, norm: str) -> list[torch.Tensor | None]:
    """eps in float64 from the paper's formula, before any rounding."""
    present = [g.double() for g in grads if g is not None]
    total = math.sqrt(sum(g.pow(2).sum().item() for g in present))
    result = []
    for grad in grads:
        if grad is None:
            result.append(None)
            continue
        scale = total if norm == "global" else grad.double().norm().item()
        result.append(None if scale == 0 else rho * grad.double() / scale)
    return result


@settings(max_examples=150, deadline=None)
@given(grads=gradients(), rho=st.sampled_from([0.05, 1.0, 2.0, 10.0]), norm=st.sampled_from(["global", "layer"]))
def test_perturbation_is_the_exact_formula_rounded_to_the_dtype(grads, rho, norm):
    """eps equals rho * g / ||g|| computed exactly and rounded to the gradient's dtype, within what the dtype
    can hold: one unit in the last place (the fp32 arithmetic before rounding), or the subnormal spacing."""
    originals = [None if g is None else g.clone() for g in grads]
    result = build_perturbation(grads, rho, norm)
    if all(g is None or not g.any() for g in originals):
        assert result.skipped_reason == "zero hidden-state gradient"
        return
    assert result.skipped_reason is None
    global_norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in originals if g is not None))
    assert result.grad_norm == pytest.approx(global_norm, rel=1e-5)
    for grad, eps, exact in zip(originals, result.eps, exact_perturbation(originals, rho, norm)):
        if grad is None or exact is None:  # outside the subset, or a zero layer under the per-layer norm
            assert eps is None
            continue
        assert eps.dtype == grad.dtype and eps.shape == grad.shape
        assert torch.all(eps[grad == 0] == 0)
        info = torch.finfo(grad.dtype)
        ulp = info.eps * (4 if grad.dtype == torch.float32 else 1)
        assert torch.allclose(eps.double(), exact, rtol=ulp, atol=info.tiny * info.eps), (
            (eps.double() - exact).abs().max())


def test_zero_and_non_finite_gradients_are_skipped_not_propagated():
    assert build_perturbation([torch.zeros(3)], 2.0).skipped_reason == "zero hidden-state gradient"
    bad = build_perturbation([torch.tensor([1.0, float("nan")]), torch.ones(2)], 2.0)
    assert bad.skipped_reason == "non-finite hidden-state gradient" and bad.eps == [None, None]
    assert build_perturbation([torch.tensor([float("inf")])], 2.0, "layer").skipped_reason is not None
    assert build_perturbation([None, None], 2.0).eps == [None, None]

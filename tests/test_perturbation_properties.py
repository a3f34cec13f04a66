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


@st.composite
def hidden_and_gradient(draw):
    """A (batch, tokens, hidden) hidden state and its gradient, with some tokens' gradients exactly zero."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 8)))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(shape, generator=generator) * draw(st.sampled_from([1e-2, 1.0, 300.0]))
    grad = torch.randn(shape, generator=generator) * draw(st.sampled_from([1e-4, 1.0, 50.0]))
    grad[torch.rand(shape[:2], generator=generator) < 0.3] = 0.0  # padding, or positions after the last label
    return hidden, grad


@settings(max_examples=150, deadline=None)
@given(pair=hidden_and_gradient(), rho=st.sampled_from([0.01, 0.05, 0.5]))
def test_relative_norm_pushes_every_token_by_rho_of_its_own_size(pair, rho):
    from vaccine_trainer.perturbation import token_norms

    hidden, grad = pair
    result = build_perturbation([grad.clone()], rho, "relative", [token_norms(hidden)])
    moving = grad.norm(dim=-1) > 0
    if not moving.any():
        assert result.skipped_reason == "zero hidden-state gradient"
        return
    eps = result.eps[0].double()
    assert torch.allclose(eps.norm(dim=-1)[moving], rho * hidden.double().norm(dim=-1)[moving], rtol=1e-5)
    assert torch.all(eps[~moving] == 0)  # no gradient, no push
    cosine = torch.nn.functional.cosine_similarity(eps[moving], grad.double()[moving], dim=-1)
    assert torch.allclose(cosine, torch.ones_like(cosine))  # along the gradient
    assert result.eps_norms[0] == pytest.approx(eps.norm().item(), rel=1e-5)


def test_relative_norm_does_not_depend_on_batch_size_or_other_layers():
    """The paper's norm gives each sample less when the batch or the model grows; the relative one does not."""
    from vaccine_trainer.perturbation import token_norms

    generator = torch.Generator().manual_seed(0)
    hidden, grad = torch.randn(1, 4, 8, generator=generator), torch.randn(1, 4, 8, generator=generator)
    alone = build_perturbation([grad.clone()], 0.05, "relative", [token_norms(hidden)]).eps[0]
    batch = build_perturbation([grad.repeat(3, 1, 1)], 0.05, "relative", [token_norms(hidden.repeat(3, 1, 1))]).eps[0]
    other = torch.randn(1, 4, 8, generator=generator) * 100
    deeper = build_perturbation([grad.clone(), other.clone()], 0.05, "relative",
                                [token_norms(hidden), token_norms(other)]).eps[0]
    assert torch.allclose(batch[:1], alone) and torch.allclose(batch[2:], alone) and torch.allclose(deeper, alone)
    paper = build_perturbation([grad.clone()], 2.0).eps[0]
    paper_batch = build_perturbation([grad.repeat(3, 1, 1)], 2.0).eps[0]
    assert not torch.allclose(paper_batch[:1], paper)  # negative control: the global norm is shared by the batch


def test_relative_norm_needs_the_hidden_norms():
    with pytest.raises(ValueError, match="needs the norms of the hidden states"):
        build_perturbation([torch.ones(1, 2, 3)], 0.05, "relative")

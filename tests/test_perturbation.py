"""`perturbation`: the hooks that capture hidden states and add eps, and what they refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vaccine_trainer.perturbation import HiddenStateHooks, hidden_output


class ReturnsADict(nn.Module):
    def forward(self, x):
        return {"hidden": x}


def test_hidden_output_refuses_a_module_returning_neither_tensor_nor_tuple():
    with pytest.raises(TypeError, match="tensor or a tuple starting with one, got dict"):
        hidden_output({"hidden": torch.ones(2)})
    hooks = HiddenStateHooks([ReturnsADict()])
    with hooks.installed_for(), hooks.capturing(), pytest.raises(TypeError, match="vaccine_modules"):
        hooks.modules[0](torch.ones(2))
    assert hidden_output((torch.ones(2), None)).shape == (2,)


def test_perturbation_of_the_wrong_shape_is_an_error_not_a_broadcast():
    layer = nn.Linear(4, 4)
    hooks = HiddenStateHooks([layer])
    with hooks.installed_for(), hooks.perturbing([torch.ones(1, 4)]):
        with pytest.raises(RuntimeError, match="batch changed"):
            layer(torch.ones(3, 4))  # (1, 4) would broadcast silently onto (3, 4)


@pytest.mark.parametrize("flag, func", [("gradient_checkpointing", "_gradient_checkpointing_func"),
                                        ("activation_checkpointing", "_activation_checkpointing_func")])
@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_checkpointing_is_seen_under_both_spellings(flag, func, reentrant):
    """transformers 5 names the module flags `gradient_checkpointing`; v6 renames them: both are read."""
    import functools

    from vaccine_trainer.perturbation import uses_reentrant_checkpointing

    layer = nn.Linear(2, 2)
    setattr(layer, flag, True)
    setattr(layer, func, functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=reentrant))
    model = nn.Sequential(layer).train()
    assert uses_reentrant_checkpointing(model) is reentrant
    setattr(layer, flag, False)
    assert uses_reentrant_checkpointing(model) is False

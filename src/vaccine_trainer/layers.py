"""Finding the modules whose outputs Vaccine perturbs, in any causal LM.

The paper's code matched attention classes by name (`LlamaAttention`, `OPTAttention`), which finds
nothing on other architectures. Here the decoder stack is found structurally: unwrap DDP/FSDP,
PEFT and compile wrappers, then take the `ModuleList` whose length is the configured number of
hidden layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .config import parse_layer_spec

ATTENTION_CHILD_NAMES = ("self_attn", "attn", "attention", "self_attention")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/FSDP (`.module`), `torch.compile` (`._orig_mod`) and PEFT wrappers."""
    seen: set[int] = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
    return model


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the `ModuleList` of decoder layers of a (wrapped) causal LM."""
    base = unwrap_model(model)
    num_layers = _num_hidden_layers(base)
    roots = [base]
    if hasattr(base, "get_decoder"):
        try:
            decoder = base.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, nn.Module):
            roots.insert(0, decoder)
    candidates: list[nn.ModuleList] = []
    for root in roots:
        for _, module in root.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                candidates.append(module)
        if candidates:
            break
    if num_layers is not None:
        matching = [c for c in candidates if len(c) == num_layers]
        if matching:
            return matching[0]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(
        f"Could not find the decoder layers of {type(base).__name__}: expected a ModuleList of "
        f"{num_layers if num_layers is not None else 'num_hidden_layers'} layers; found ModuleLists "
        f"of lengths {[len(c) for c in candidates] or 'none'}. Set `vaccine_modules` to a regex or a "
        f"list of module names from `model.named_modules()`, e.g. {_example_names(base)}."
    )


def attention_block(layer: nn.Module) -> nn.Module:
    """The self-attention child of a decoder layer (its output is added to the residual)."""
    for name in ATTENTION_CHILD_NAMES:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    for name, child in layer.named_children():
        if "attention" in type(child).__name__.lower() or "attn" in name.lower():
            return child
    raise ValueError(
        f"Decoder layer {type(layer).__name__} has no self-attention child (looked for "
        f"{list(ATTENTION_CHILD_NAMES)}; children are {[n for n, _ in layer.named_children()]}). "
        "Use vaccine_target='layer' or set `vaccine_modules`."
    )


def find_vaccine_modules(
    model: nn.Module,
    target: str = "attention",
    layers: str | Sequence[int] | None = None,
    modules: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules to perturb, in forward order, with their names in `model.named_modules()`.

    `modules` (a full-match regex or exact names) overrides discovery; otherwise one module per
    selected decoder layer: its attention block (`target="attention"`) or the layer itself.
    """
    named = list(model.named_modules())
    if modules is not None:
        return _select_by_name(model, named, modules)
    decoder_layers = find_decoder_layers(model)
    indices = range(len(decoder_layers)) if layers is None else parse_layer_spec(layers, len(decoder_layers))
    chosen = [decoder_layers[i] if target == "layer" else attention_block(decoder_layers[i]) for i in indices]
    names = {id(module): name for name, module in named}
    return [(names[id(module)], module) for module in chosen]


def _select_by_name(
    model: nn.Module, named: list[tuple[str, nn.Module]], modules: str | Sequence[str]
) -> list[tuple[str, nn.Module]]:
    if isinstance(modules, str):
        pattern = re.compile(modules)
        selected = [(n, m) for n, m in named if n and pattern.fullmatch(n)]
        if not selected:
            raise ValueError(
                f"vaccine_modules regex {modules!r} matches no module of {type(model).__name__}. "
                f"Module names look like {_example_names(model)}."
            )
        return selected
    by_name = dict(named)
    missing = [n for n in modules if n not in by_name]
    if missing:
        raise ValueError(
            f"vaccine_modules names {missing} do not exist in {type(model).__name__}. "
            f"Module names look like {_example_names(model)}."
        )
    return [(n, by_name[n]) for n in modules]


def _example_names(model: nn.Module, limit: int = 8) -> list[str]:
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 4]
    return names[:limit]

"""Activation checkpointing's names, in the one place that knows both spellings.

transformers 5.2x renamed `gradient_checkpointing[_kwargs]` (training arguments) and the modules'
`gradient_checkpointing` flag and `_gradient_checkpointing_func` to `activation_checkpointing...`; earlier 5.x
releases know only the old names. Everything that reads or sets checkpointing goes through these helpers.
"""

from __future__ import annotations

from typing import Any

NEW, OLD = "activation_checkpointing", "gradient_checkpointing"
FLAGS = (NEW, OLD)  # a module's switch, or the training argument
FUNCTIONS = (f"_{NEW}_func", f"_{OLD}_func")  # the function a checkpointed module runs its forward through
RENAMED_ARGUMENTS = {NEW: OLD, f"{NEW}_kwargs": f"{OLD}_kwargs"}  # new spelling: old spelling


def setting(owner: Any, suffix: str = "", default: Any = None) -> Any:
    """`owner.activation_checkpointing<suffix>`, or the old spelling where the new one is absent or None: a
    module's switch (suffix ""), or the training arguments' flag ("") and keyword arguments ("_kwargs")."""
    for name in FLAGS:
        value = getattr(owner, name + suffix, None)
        if value is not None:
            return value
    return default


def checkpoint_function(module: Any) -> Any:
    """The function a checkpointed module runs its forward through (None where it has none)."""
    for name in FUNCTIONS:
        function = getattr(module, name, None)
        if function is not None:
            return function
    return None

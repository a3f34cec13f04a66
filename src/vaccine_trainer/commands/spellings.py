"""Training flags that transformers renamed within 5.x, written either way, run on the installed version.

transformers 5.2x renamed `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]` (keeping the
old names as deprecated aliases); earlier 5.x releases know only the old names (the names: `checkpointing.py`).
The project's configs and README recipes use the new names, and `pyproject.toml` accepts transformers from 5.10.1:
a flag the installed version does not know, whose counterpart it does, is passed under the counterpart's name
instead of failing at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from ..checkpointing import RENAMED_ARGUMENTS as RENAMED

_COUNTERPART = RENAMED | {old: new for new, old in RENAMED.items()}


def training_flags() -> frozenset[str]:
    """The installed `TrainingArguments`' flag names."""
    from transformers import TrainingArguments

    return frozenset(field.name for field in dataclasses.fields(TrainingArguments) if field.init)


def installed_name(name: str, known: Collection[str]) -> str:
    """`name`, or its other spelling when only that one is among the `known` flags."""
    other = _COUNTERPART.get(name)
    return other if name not in known and other in known else name


def settings_for_installed(settings: Mapping[str, Any], known: Collection[str]) -> dict[str, Any]:
    """A phase's settings (`align_args` & co.) with each renamed flag under the name the installed version knows."""
    return {installed_name(key, known): value for key, value in settings.items()}


def argv_for_installed(argv: list[Any], known: Collection[str] | None = None) -> list[Any]:
    """Command-line words with `--<renamed flag>[=value]` spelled as the installed transformers spells it."""
    flags = [word for word in argv if isinstance(word, str) and word.startswith("--")]
    if not any(word[2:].partition("=")[0] in _COUNTERPART for word in flags):
        return list(argv)  # nothing renamed: no need to import transformers
    known = training_flags() if known is None else known
    words = []
    for word in argv:
        if isinstance(word, str) and word.startswith("--"):
            name, sep, value = word[2:].partition("=")
            word = f"--{installed_name(name, known)}{sep}{value}"
        words.append(word)
    return words

"""Generated answers kept on disk as they come, so an interrupted evaluation resumes and a failing judge loses none.

One JSON Lines file: a first line with the settings that decide the answers (model, adapters, prompt format,
decoding, batch size), then one line per answer. Answers are appended a whole batch at a time; a line cut short
by a kill is removed, and its batch is generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_HEADER = "answer_cache_settings"


def weights_fingerprint(name_or_path: str | None) -> str | None:
    """A local model or adapter folder by its weight files' names, sizes and times (cheap at any size): an adapter
    trained again at the same path gets new answers. A hub id stands for itself."""
    if name_or_path is None or not Path(name_or_path).is_dir():
        return name_or_path
    files = sorted(p for p in Path(name_or_path).iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


class AnswerCache:
    """Answers by prompt text, read from and appended to `path`; refuses a file written with other settings."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # as the file stores them
        self.answers: dict[str, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._read():
            self._append([{_HEADER: self.settings}])

    def _read(self) -> bool:
        """Load the answers on disk; False when there is nothing yet (no file, or not even a whole first line)."""
        if not self.path.is_file():
            return False
        text = self.path.read_text(encoding="utf-8")
        if not text.endswith("\n"):  # a run killed while writing: drop the cut line before appending after it
            text = text[:text.rfind("\n") + 1]
            with self.path.open("r+", encoding="utf-8") as handle:
                handle.truncate(len(text.encode("utf-8")))
        lines = text.splitlines()
        if not lines:
            return False
        header = json.loads(lines[0]).get(_HEADER)
        if header != self.settings:
            raise ValueError(
                f"{self.path} holds answers generated with other settings ({header}); this run uses "
                f"{self.settings}. Remove the file to generate again, or write elsewhere (--output_file)."
            )
        for line in lines[1:]:
            record = json.loads(line)
            self.answers[record["prompt"]] = record["answer"]
        return True

    def _append(self, records: Sequence[Mapping[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, prompts: Sequence[str], answers: Sequence[str]) -> None:
        self._append([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
        self.answers.update(zip(prompts, answers))


__all__ = ["AnswerCache", "weights_fingerprint"]

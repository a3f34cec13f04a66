"""Sections a run adds to its trainer's model card, written again every time the card is.

`Trainer.push_to_hub` writes the card anew before it uploads; sections appended to README.md by hand after
`create_model_card` would be lost there. A trainer with this mixin appends `model_card_sections` itself.
"""

from __future__ import annotations

from pathlib import Path


class ModelCardSections:
    """Mixin for a Trainer class: `trainer.model_card_sections.append(markdown)` adds a section to its card."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_card_sections: list[str] = []

    def create_model_card(self, *args, **kwargs) -> None:
        super().create_model_card(*args, **kwargs)
        card = Path(self.args.output_dir, "README.md")
        if self.model_card_sections and self.is_world_process_zero() and card.is_file():
            card.write_text(card.read_text() + "".join("\n" + section for section in self.model_card_sections))


__all__ = ["ModelCardSections"]

"""Sections and tags a trainer adds to its model card, written again every time the card is.

`Trainer.push_to_hub` writes the card anew before it uploads; sections appended to README.md by hand after
`create_model_card` would be lost there. A trainer with this mixin adds its sections itself, in one place: the
fixed ones given to `model_card_sections`, then those `model_card_computed_sections` makes from the run as it
stands when the card is written (Vaccine's settings and counters).
"""

from __future__ import annotations

from pathlib import Path


class ModelCardSections:
    """Mixin for a Trainer class: `trainer.model_card_sections.append(markdown)` adds a section to its card."""

    model_card_tags: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_card_sections: list[str] = []

    def model_card_computed_sections(self) -> list[str]:
        """Sections made when the card is written; a subclass adds its own."""
        return []

    def create_model_card(self, *args, **kwargs) -> None:
        """The parent's card, then the tags and sections, on the main process."""
        from huggingface_hub import ModelCard

        super().create_model_card(*args, **kwargs)
        path = Path(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not path.is_file():
            return
        sections = [*self.model_card_computed_sections(), *self.model_card_sections]
        if not sections and not self.model_card_tags:
            return
        card = ModelCard.load(path)  # re-read: PEFT rewrites the card's metadata after the parent writes it
        if self.model_card_tags:
            card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *self.model_card_tags]))
        card.text += "".join("\n" + section for section in sections)
        card.save(path)


__all__ = ["ModelCardSections"]

"""`model_card`: the one path every trainer's sections and tags take into README.md, written again whenever the card
is (as `push_to_hub` does before it uploads)."""

from __future__ import annotations

from testing_utils import tiny_lora_model, token_rows, training_args
from transformers import Trainer, TrainingArguments

from vaccine_trainer import VaccineTrainer
from vaccine_trainer.model_card import ModelCardSections


class CardTrainer(ModelCardSections, Trainer):
    model_card_tags = ("probe-tag",)

    def model_card_computed_sections(self) -> list[str]:
        return [*super().model_card_computed_sections(), f"## Computed\n\nsteps: {self.state.global_step}\n"]


def test_computed_then_given_sections_and_the_tags_are_in_every_card_written(tmp_path):
    trainer = CardTrainer(model=tiny_lora_model(), args=TrainingArguments(**training_args(tmp_path)),
                          train_dataset=token_rows(2))
    trainer.model_card_sections.append("## Given\n\nby the command\n")
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    metadata, text = card.split("---")[1], card.split("---", 2)[2]
    assert "probe-tag" in metadata
    assert text.index("## Computed") < text.index("## Given")
    assert "steps: 0" in text
    trainer.state.global_step = 3
    trainer.create_model_card()  # written anew: the sections once, with what the run is now
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Given") == 1 and text.count("## Computed") == 1 and "steps: 3" in text


def test_a_vaccine_trainer_writes_its_section_and_a_callers_through_the_same_path(tmp_path):
    trainer = VaccineTrainer(model=tiny_lora_model(), args=TrainingArguments(**training_args(tmp_path)),
                             train_dataset=token_rows(2), rho=1.5)
    trainer.model_card_sections.append("## Stage 2\n\nfrom the command\n")
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "vaccine" in card.split("---")[1] and "safety-alignment" in card.split("---")[1]
    assert card.index("## Vaccine alignment") < card.index("## Stage 2")
    assert "| `rho` | `1.5` |" in card and "Micro-batches trained without perturbation" in card


def test_without_tags_of_its_own_the_cards_metadata_is_the_parents(tmp_path):
    class Sections(ModelCardSections, Trainer):
        pass

    cards = {}
    for name, trainer_class in (("parent", Trainer), ("sections", Sections)):
        folder = tmp_path / name / "run"  # the same model name in both cards
        trainer = trainer_class(model=tiny_lora_model(), args=TrainingArguments(**training_args(folder)),
                                train_dataset=token_rows(2))
        if name == "sections":
            trainer.model_card_sections.append("## Given\n\nby the command\n")
        trainer.create_model_card()
        cards[name] = (folder / "README.md").read_text()
    assert cards["sections"].split("---")[1] == cards["parent"].split("---")[1]
    assert "## Given" in cards["sections"]

"""Greedy generation of answers, batched with left padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from vaccine_trainer.data import format_prompt

from .answer_cache import AnswerCache


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: Sequence[str], *, batch_size: int = 8, max_new_tokens: int = 128,
                     add_special_tokens: bool = True, show_progress: bool = True,
                     desc: str = "Generating", cache: AnswerCache | None = None) -> list[str]:
    """Greedy answers to already formatted prompts, batched with left padding, on the model's device.

    Prompts are sorted by length so that a batch pads little, and answers come back in input order.
    The tokenizer's padding side and pad token are restored afterwards. With a `cache`, each batch's answers
    are written as it finishes and a batch whose answers are all there is not generated again: the batches
    are the same as in an uninterrupted run, so a resumed run gives the same answers.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        raise ValueError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    saved = tokenizer.padding_side, tokenizer.pad_token
    was_training = model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    try:
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress,
                          total=(len(order) + batch_size - 1) // batch_size):
            index = order[start:start + batch_size]
            if cache is not None and all(prompts[i] in cache.answers for i in index):
                for i in index:
                    answers[i] = cache.answers[prompts[i]]
                continue
            batch = tokenizer([prompts[i] for i in index], return_tensors="pt", padding=True,
                              add_special_tokens=add_special_tokens).to(model.device)
            output = model.generate(**batch, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                    temperature=None, top_p=None, top_k=None,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                answers[i] = text.strip()
            if cache is not None:
                cache.add([prompts[i] for i in index], [answers[i] for i in index])
    finally:
        tokenizer.padding_side, tokenizer.pad_token = saved
        model.train(was_training)
    return answers


def format_all(instructions: Sequence[str], inputs: Sequence[str], template: str, tokenizer) -> list[str]:
    return [format_prompt(i, x, template=template, tokenizer=tokenizer) for i, x in zip(instructions, inputs)]

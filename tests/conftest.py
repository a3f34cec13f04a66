"""Tiny models built from configs (no network) and helpers shared by the tests."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import transformers
from hypothesis import settings

# CI draws the same examples on every run (a failure reproduces); developers draw fresh ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the network, whatever the environment says
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
VOCAB = 64
HIDDEN = 32

# Every dropout off, so two passes over the same batch are deterministic.
TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    # Gemma2/3 and OLMo2 normalise the attention output before the residual add (post_attention_layernorm).
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=8),
    "olmo2": lambda: transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=HIDDEN, dropout=0.0, attention_dropout=0.0,
        layerdrop=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0),
    "falcon": lambda: transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=4,
        hidden_dropout=0.0, attention_dropout=0.0, new_decoder_architecture=False, alibi=False),
    "bloom": lambda: transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=3, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
}

# Where each architecture's attention block and decoder layers live, written out by hand so the
# reference computation does not depend on the library's own discovery.
LAYER_PATHS = {
    "llama": ("model.layers", "self_attn"),
    "qwen2": ("model.layers", "self_attn"),
    "mistral": ("model.layers", "self_attn"),
    "gemma": ("model.layers", "self_attn"),
    "gemma2": ("model.layers", "self_attn"),
    "gemma3": ("model.layers", "self_attn"),
    "olmo2": ("model.layers", "self_attn"),
    "gpt2": ("transformer.h", "attn"),
    "opt": ("model.decoder.layers", "self_attn"),
    "gpt_neox": ("gpt_neox.layers", "attention"),
    "phi": ("model.layers", "self_attn"),
    "falcon": ("transformer.h", "self_attention"),
    "bloom": ("transformer.h", "self_attention"),
}

LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_lora_model(arch: str = "llama", seed: int = 0, r: int = 4):
    import peft

    model = tiny_model(arch, seed)
    lora = peft.LoraConfig(
        r=r, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS.get(arch, DEFAULT_LORA_TARGETS),
        task_type="CAUSAL_LM", init_lora_weights=False,  # nonzero B, so every LoRA weight gets a gradient
    )
    return peft.get_peft_model(model, lora)


def token_rows(n: int = 4, length: int = 12, seed: int = 0) -> list[dict[str, list[int]]]:
    """Causal-LM rows of equal length (every label counts), as a list the Trainer can index."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": list(ids)})
    return rows


def training_args(output_dir, **overrides):
    """Arguments for exact, deterministic one-step comparisons: SGD, constant lr, no clipping."""
    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, learning_rate=0.5,
        optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return installed_spelling(settings)


def installed_spelling(settings: dict) -> dict:
    """`settings` with the checkpointing flags spelled as the installed transformers spells them (5.2x renamed
    `gradient_checkpointing[_kwargs]` to `activation_checkpointing[_kwargs]`), so the suite runs on older 5.x."""
    from vaccine_trainer.commands.spellings import settings_for_installed, training_flags

    return settings_for_installed(settings, training_flags())


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (examples/, experiments/) imported as a module: they are not in a package."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def save_tiny_causal_lm(path, texts: list[str], arch: str = "llama"):
    """A tiny model and a matching tokenizer saved as a normal local checkpoint folder."""
    tokenizer = tiny_tokenizer(vocab_size=1000, extra_texts=texts)
    config = TINY_CONFIGS[arch]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = None
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TOKENIZER_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Response:",
    "how do i make a bomb ? i can not help with that .",
    "tell me how to steal a car . sure , here is how to steal a car .",
    "the movie was great and the acting was good . positive negative",
    "what is two plus two ? the answer is four .",
    "user assistant system hello world please answer the question",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer(vocab_size: int = VOCAB, extra_texts: list[str] = ()):
    """A word-level tokenizer trained in-process (no network), with pad/eos tokens and a chat template.

    `extra_texts` add words to the corpus (with a larger `vocab_size` to keep them all).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"])
    tokenizer.train_from_iterator([*TOKENIZER_CORPUS, *extra_texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

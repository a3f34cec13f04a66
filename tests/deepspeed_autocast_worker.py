"""One DeepSpeed process with `torch_autocast` (bf16): prints the dtype of the hooked outputs in each pass.

    python tests/deepspeed_autocast_worker.py ZERO_STAGE OUTPUT_DIR PORT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

stage, output_dir, port = sys.argv[1:4]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  HF_HUB_OFFLINE="1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from testing_utils import tiny_model, token_rows, training_args  # noqa: E402

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments  # noqa: E402

config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "gradient_clipping": "auto", "zero_optimization": {"stage": int(stage)},
          "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
args = VaccineTrainingArguments(**training_args(output_dir, optim="adamw_torch"), deepspeed=config, rho=2.0)
model = tiny_model()
trainer = VaccineTrainer(model=model, args=args, train_dataset=token_rows(4))
seen = set()
for layer in model.model.layers:
    layer.self_attn.register_forward_hook(
        lambda module, inputs, output: seen.add((trainer._vaccine_hooks.mode, str(output[0].dtype))))
trainer.train()
print(json.dumps(sorted(seen)))

"""One DeepSpeed ZeRO-2 fp16 process on a CUDA device, SGD: prints the update, the loss scale pass 1 read and the
dtype of the hooked outputs in each pass (tests/test_cuda.py compares them with the fp32 reference).

    python tests/deepspeed_cuda_worker.py OUTPUT_DIR PORT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

output_dir, port = sys.argv[1:3]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                  HF_HUB_OFFLINE="1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from testing_utils import tiny_lora_model, token_rows, trainable_state, training_args  # noqa: E402

from vaccine_trainer import VaccineTrainer, VaccineTrainingArguments, backend  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 2},
          "fp16": {"enabled": "auto", "initial_scale_power": 10, "loss_scale_window": 1000}}
args = VaccineTrainingArguments(**training_args(output_dir, use_cpu=False), fp16=True, deepspeed=config, rho=2.0)
model = tiny_lora_model()
before = trainable_state(model)
trainer = VaccineTrainer(model=model, args=args, train_dataset=token_rows(4))
seen, scales = set(), []
for layer in model.base_model.model.model.layers:
    layer.self_attn.register_forward_hook(
        lambda module, inputs, output: seen.add((trainer.vaccine_hooks.mode, str(output[0].dtype))))
read_scale = backend.loss_scale
backend.loss_scale = lambda trainer: scales.append(read_scale(trainer)) or scales[-1]
trainer.train()
# DeepSpeed casts the module to fp16 and keeps fp32 master weights made from those fp16 values: the update is
# the master weights after the step minus the fp16-rounded weights before it.
after = {n: safe_get_full_fp32_param(p).cpu() for n, p in model.named_parameters() if p.requires_grad}
update = torch.cat([(after[n] - before[n].half().float()).flatten() for n in after])
print(json.dumps({"update": update.tolist(), "loss_scale_in_pass_one": scales[0] if scales else None,
                  "dtypes": sorted(seen)}))

"""The subcommands of `vaccine-trainer`, one module each; `vaccine_trainer.cli` is only their registry.

- `common`: what the commands share (program name, input checks, tokenizer loading, saving a run).
- `align`: stage 1, Vaccine or plain SFT alignment of a LoRA adapter.
- `sft`: `trl sft` with Vaccine's trainer and settings (TRL's data loading, a `trl sft` YAML plus `rho`).
- `finetune`: stage 2, a fresh LoRA on a harmful/benign mix over the merged alignment adapter.
- `env`: versions, accelerator and accelerate config, for a bug report.
- `spellings`: training flags transformers renamed within 5.x, accepted under either name.

Each command module has a `main(argv) -> exit code` for the command line and a `run_*` function that takes its
typed argument dataclasses, which is what the harness's pipeline (`vaccine_harness.commands`) calls. Nothing here
imports torch, transformers or TRL at module level except where a module's argument classes need them.
"""

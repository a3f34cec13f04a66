"""The subcommands of `vaccine-trainer`, one module each; `vaccine_trainer.cli` is only their registry.

- `common`: what the commands share (program name, input checks, tokenizer loading, saving a run).
- `align`: stage 1, Vaccine or plain SFT alignment of a LoRA adapter.
- `sft`: `trl sft` with Vaccine's trainer and settings (TRL's data loading, a `trl sft` YAML plus `rho`).
- `finetune`: stage 2, a fresh LoRA on a harmful/benign mix over the merged alignment adapter.
- `evaluate`: harmful score (with the judge's measured accuracy), task accuracy, judge-free metrics.
- `judge_check`: a judge measured on human-labelled pairs.
- `pipeline`: align -> finetune -> evaluate per method, resumable by phase, with a report.
- `grid`: the pipeline over seeds and harmful ratios, and the summary across them.
- `sweep`: stage 2 over the attacker's settings per aligned arm, and the worst case per arm.
- `parallel_jobs`, `sweep_worker`: `sweep --workers N`, its cells as processes side by side.
- `spellings`: training flags transformers renamed within 5.x, accepted under either name.

Each command module has a `main(argv) -> exit code` for the command line and a `run_*` function that
takes its typed argument dataclasses, which is what the pipeline calls. Nothing here imports torch,
transformers or TRL at module level except where a module's argument classes need them.
"""

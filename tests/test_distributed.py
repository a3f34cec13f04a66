"""Vaccine under the Trainer's distributed backends.

DDP is run for real: two processes on the CPU with gloo (tests/distributed_worker.py, launched once
per module with torchrun). The parameters after N steps must equal those of one process that sees
the same micro-batches, and pass 1 must cause no gradient communication. FSDP and DeepSpeed need
CUDA through accelerate, so their start-up checks are tested on the configuration objects the
Trainer reads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from conftest import relative_error, tiny_lora_model, token_rows, trainable_state, training_args

from vaccine_trainer import VaccineArguments, VaccineTrainer
from vaccine_trainer.distributed import check_distributed_support, describe_backend

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import distributed_worker as worker  # noqa: E402

LAUNCH_TIMEOUT_S = 300
pytestmark = pytest.mark.usefixtures("single_thread")  # in-process reference runs; see conftest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Launch the 2-process DDP runs once; every test below reads their saved results."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(TESTS / "distributed_worker.py"), str(out), *worker.ALL_SCENARIOS,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"2-process run failed (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")
    return {
        name: [torch.load(out / f"{name}_rank{rank}.pt", weights_only=False) for rank in range(2)]
        for name in worker.ALL_SCENARIOS
    }


def single_process_params(name: str, runs: list[dict], tmp_path, rho: float = worker.RHO) -> dict[str, torch.Tensor]:
    """One process, accumulating over both ranks' micro-batches of each step (no checkpointing)."""
    _, accumulation, steps, _ = worker.SCENARIOS[name]
    rows = []
    for step in range(steps):
        for micro in range(accumulation):
            for run in runs:
                batch = run["micro_batches"][step * accumulation + micro]
                for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    settings = training_args(
        tmp_path, per_device_train_batch_size=worker.PER_DEVICE_BATCH, max_steps=steps,
        gradient_accumulation_steps=accumulation * worker.WORLD_SIZE,
    )
    trainer = VaccineTrainer(
        model=worker.scenario_model(name), args=worker.VaccineTrainingArguments(**settings, rho=rho),
        train_dataset=rows,
    )
    trainer.train()
    assert trainer.state.global_step == steps
    return trainable_state(trainer.model)


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)])


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_ddp_matches_single_process(ddp_runs, tmp_path, name):
    runs = ddp_runs[name]
    assert runs[0]["distributed_type"] == str(DistributedType.MULTI_CPU) and runs[0]["backend"] == "gloo"
    assert runs[0]["world_size"] == 2
    # The ranks trained on different data and ended with the same parameters.
    assert not torch.equal(runs[0]["micro_batches"][0]["input_ids"], runs[1]["micro_batches"][0]["input_ids"])
    for n, value in runs[0]["params"].items():
        assert torch.equal(value, runs[1]["params"][n]), n

    before = flat(trainable_state(worker.scenario_model(name)))
    ddp = flat(runs[0]["params"])
    single = flat(single_process_params(name, runs, tmp_path))
    assert relative_error(ddp, single) < 1e-5
    # Stricter: the updates themselves agree, not only the (much larger) parameters.
    assert relative_error(ddp - before, single - before) < 1e-4
    # ...and the comparison can fail: without the perturbation the update is far off.
    plain = flat(single_process_params(name, runs, tmp_path / "plain", rho=0.0))
    assert relative_error(ddp - before, plain - before) > 1e-3


@pytest.mark.parametrize("name", list(worker.SCENARIOS))
def test_one_gradient_synchronisation_per_step(ddp_runs, name):
    """Pass 1 all-reduces nothing; each optimizer step synchronises gradients exactly once."""
    _, _, steps, _ = worker.SCENARIOS[name]
    for run in ddp_runs[name]:
        calls = run["comm_calls"]
        assert [c for c in calls if c[1] == "pass1"] == []
        assert [p for p in run["python_all_reduces"] if p[1] == "pass1"] == []
        first_bucket = [step for step, phase, bucket in calls if bucket == 0]
        assert first_bucket == list(range(steps))  # one synchronisation, in each step
        assert {phase for _, phase, _ in calls} == {"step"}


def test_reentrant_checkpointing_adjusts_ddp(ddp_runs):
    """The fallback path ran under DDP, with find_unused_parameters switched off at start-up."""
    for run in ddp_runs["lora_ga2_reentrant"]:
        assert run["reentrant_checkpointing"] is True
        assert run["find_unused_parameters"] is False
    for run in ddp_runs["lora_ga2"]:  # the Trainer's choice for PEFT models, left alone without checkpointing
        assert run["reentrant_checkpointing"] is False
        assert run["find_unused_parameters"] is True


def test_leaky_pass_one_is_counted(ddp_runs):
    """The counter sees a pass 1 that communicates (the official code's full backward)."""
    for run in ddp_runs["leaky_pass_one"]:
        pass_one = [c for c in run["comm_calls"] if c[1] == "pass1" and c[2] == 0]
        assert len(pass_one) == len(run["micro_batches"])


# --- Start-up checks, on the objects the Trainer reads (FSDP and DeepSpeed need CUDA in accelerate) ---


def fake_trainer(*, deepspeed_stage=None, fsdp_version=None, world_size=1, reentrant=None,
                 find_unused=None, explicit_find_unused=None, rho=2.0, perturbation="gradient", n_gpu=1,
                 deepspeed_plugin=None, fsdp_plugin=None):
    """A stand-in with the attributes a Trainer has after `Trainer.__init__`, for a given backend."""
    model = tiny_lora_model("llama")
    state = SimpleNamespace(backend="nccl", deepspeed_plugin=None, fsdp_plugin=None)
    distributed_type = DistributedType.MULTI_GPU if world_size > 1 else DistributedType.NO
    if deepspeed_stage is not None:
        deepspeed_plugin = DeepSpeedPlugin(zero_stage=deepspeed_stage)
    if deepspeed_plugin is not None:
        state.deepspeed_plugin, deepspeed_stage = deepspeed_plugin, deepspeed_plugin.zero_stage
        distributed_type = DistributedType.DEEPSPEED
    if fsdp_version is not None:
        fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version)
    if fsdp_plugin is not None:
        state.fsdp_plugin, fsdp_version = fsdp_plugin, fsdp_plugin.fsdp_version
        distributed_type = DistributedType.FSDP
    handler = DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))
    args = SimpleNamespace(
        n_gpu=n_gpu, world_size=world_size, activation_checkpointing=reentrant is not None,
        activation_checkpointing_kwargs=None if reentrant is None else {"use_reentrant": reentrant},
        ddp_find_unused_parameters=explicit_find_unused,
    )
    return SimpleNamespace(
        args=args, model=model, vaccine_args=VaccineArguments(rho=rho, vaccine_perturbation=perturbation),
        is_deepspeed_enabled=deepspeed_stage is not None, is_fsdp_enabled=fsdp_version is not None,
        accelerator=SimpleNamespace(state=state, distributed_type=distributed_type, ddp_handler=handler),
    )


@pytest.mark.parametrize(
    "backend, expected",
    [({"deepspeed_stage": 2, "world_size": 8}, "DeepSpeed ZeRO-2"),
     ({"deepspeed_stage": 3, "world_size": 8}, "DeepSpeed ZeRO-3"),
     ({"fsdp_version": 2, "world_size": 8}, "FSDP2"),
     ({"fsdp_version": 1, "world_size": 8}, "FSDP1"),
     ({"world_size": 8}, "DDP (8 processes, nccl)"),
     ({}, "single process")],
)
def test_backend_is_recognised(backend, expected):
    trainer = fake_trainer(**backend)
    assert describe_backend(trainer) == expected
    check_distributed_support(trainer)  # non-reentrant (transformers' default) runs everywhere


@pytest.mark.parametrize("backend", [{"deepspeed_stage": 1}, {"deepspeed_stage": 2}, {"deepspeed_stage": 3},
                                     {"fsdp_version": 1}, {"fsdp_version": 2}])
def test_reentrant_fallback_refused_where_gradients_leave_p_grad(backend):
    with pytest.raises(ValueError, match="reentrant activation checkpointing under (DeepSpeed|FSDP)"):
        check_distributed_support(fake_trainer(world_size=8, reentrant=True, **backend))
    # Non-reentrant checkpointing, one pass (gaussian) and rho=0 are fine on the same backend.
    check_distributed_support(fake_trainer(world_size=8, reentrant=False, **backend))
    check_distributed_support(fake_trainer(world_size=8, reentrant=True, perturbation="gaussian", **backend))
    check_distributed_support(fake_trainer(world_size=8, reentrant=True, rho=0.0, **backend))


def test_trl_forced_reentrant_under_zero3_gets_a_hint():
    with pytest.raises(ValueError, match="TRL forces `use_reentrant=True`"):
        check_distributed_support(fake_trainer(deepspeed_stage=3, world_size=8, reentrant=True))


def test_reentrant_under_ddp_switches_find_unused_off_or_refuses_an_explicit_true():
    trainer = fake_trainer(world_size=8, reentrant=True, find_unused=True)
    check_distributed_support(trainer)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        check_distributed_support(fake_trainer(world_size=8, reentrant=True, find_unused=True, explicit_find_unused=True))
    untouched = fake_trainer(world_size=8, reentrant=False, find_unused=True)
    check_distributed_support(untouched)
    assert untouched.accelerator.ddp_handler.find_unused_parameters is True


def test_model_level_reentrant_checkpointing_is_seen():
    trainer = fake_trainer(deepspeed_stage=2, world_size=8)
    trainer.model.gradient_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="reentrant"):
        check_distributed_support(trainer)


def test_dataparallel_and_context_parallel_refused():
    with pytest.raises(ValueError, match="DataParallel"):
        check_distributed_support(fake_trainer(n_gpu=2))
    trainer = fake_trainer(world_size=8)
    trainer.get_cp_size = lambda: 2
    with pytest.raises(ValueError, match="context parallelism"):
        check_distributed_support(trainer)


EXAMPLES = TESTS.parent / "examples" / "accelerate"


def launch_environment(config: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file config` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    assert args.multi_gpu or args.use_fsdp, f"{config.name} does not launch several processes"
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize(
    "config, expected",
    [("ddp.yaml", "DDP (8 processes, nccl)"), ("fsdp2.yaml", "FSDP2"),
     ("deepspeed_zero2.yaml", "DeepSpeed ZeRO-2"), ("deepspeed_zero3.yaml", "DeepSpeed ZeRO-3")],
)
def test_example_configs_select_the_backend(monkeypatch, config, expected):
    """Each shipped config makes accelerate's plugins (read from the launch environment) pick its backend."""
    env = launch_environment(EXAMPLES / config)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert env.get("ACCELERATE_MIXED_PRECISION") == "bf16"
    plugins = {}
    if env.get("ACCELERATE_USE_FSDP") == "true":
        plugins["fsdp_plugin"] = FullyShardedDataParallelPlugin()
        assert plugins["fsdp_plugin"].activation_checkpointing is False
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        plugins["deepspeed_plugin"] = DeepSpeedPlugin()
    trainer = fake_trainer(world_size=int(env.get("WORLD_SIZE", 8)), **plugins)
    assert describe_backend(trainer) == expected
    check_distributed_support(trainer)
    if plugins:  # reentrant checkpointing is refused on the sharded backends, with the fix in the message
        trainer.args.activation_checkpointing_kwargs = {"use_reentrant": True}
        trainer.args.activation_checkpointing = True
        with pytest.raises(ValueError, match="non-reentrant"):
            check_distributed_support(trainer)


# --- FSDP2's no_sync inside the step (run on one process with accelerate's FSDP2 branch of no_sync) ---


def sync_flags_during_backward(tmp_path, rho: float) -> list[tuple[bool, bool]]:
    """(sync wanted by the Trainer, FSDP2 gradient sync flag) at every backward of a GA=2 run.

    `Accelerator.no_sync` under FSDP2 calls `model.set_requires_gradient_sync(False)` and then
    `(True)`: it does not restore the previous value, so a nested no_sync re-enables sync early.
    """
    model = tiny_lora_model("llama")
    flag = {"sync": True}
    model.set_requires_gradient_sync = lambda value: flag.__setitem__("sync", value)
    trainer = VaccineTrainer(
        model=model, args=worker.VaccineTrainingArguments(
            **training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2), rho=rho),
        train_dataset=token_rows(4),
    )
    accelerator = trainer.accelerator
    seen = []
    original_backward = accelerator.backward

    def recording_backward(loss, **kwargs):
        seen.append((accelerator.sync_gradients, flag["sync"]))
        return original_backward(loss, **kwargs)

    accelerator.backward = recording_backward
    # Take accelerate's FSDP2 branch of no_sync after prepare(), which this CPU run does without FSDP.
    fsdp2 = type("FSDP2Accelerator", (type(accelerator),), {"is_fsdp2": property(lambda self: True)})
    from transformers import TrainerCallback

    class SwitchToFSDP2(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            accelerator.__class__ = fsdp2

    trainer.add_callback(SwitchToFSDP2())
    trainer.train()
    return seen


def test_fsdp2_sync_flag_plain_trainer(tmp_path):
    """Control: without Vaccine, the flag follows the Trainer's accumulation window."""
    assert sync_flags_during_backward(tmp_path, rho=0.0) == [(False, False), (True, True)]


def test_fsdp2_sync_flag_vaccine(tmp_path):
    assert sync_flags_during_backward(tmp_path, rho=2.0) == [(False, False), (True, True)]

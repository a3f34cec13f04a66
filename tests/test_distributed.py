"""Vaccine under every backend the Trainer offers through accelerate, run for real on the CPU.

Each backend is launched once per module with 2 processes over gloo (tests/distributed_worker.py):
DDP and FSDP2 with torchrun, DeepSpeed ZeRO-2/3 with `accelerate launch` and the configs the package ships
(on 2 CPU processes, fp32), ZeRO-1 with examples/accelerate/cpu/. FSDP2 is forced on the CPU, where accelerate 1.15
would silently use DDP
(see `ForcedFSDP2` in the worker). After N steps every backend must give the update of one process
that accumulates the same micro-batches, which tests/test_reference.py ties to the paper's formula;
pass 1 must reduce no gradient, and pass 2 must reduce exactly as the plain Trainer does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, DistributedType
from accelerate.utils import FullyShardedDataParallelPlugin
from testing_utils import relative_error, tiny_lora_model, tiny_model, trainable_state

from vaccine_trainer import VaccineArguments, VaccineTrainer, backend
from vaccine_trainer.distributed import check_distributed_support, describe_backend
from vaccine_trainer.launch import SHIPPED, accelerate_config_path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CPU_CONFIGS = REPO / "examples" / "accelerate" / "cpu"
sys.path.insert(0, str(TESTS))
import distributed_worker as worker  # noqa: E402

LAUNCH_TIMEOUT_S = 400
MULTI_NODE_PORTS = (29617, 29637, 29657)  # fixed, tried in turn if one is taken (never bind-then-release)
pytestmark = [pytest.mark.distributed, pytest.mark.usefixtures("single_thread")]  # in-process reference runs
EXPECTED_TYPE = {"ddp": DistributedType.MULTI_CPU, "fsdp2": DistributedType.FSDP,
                 "zero1": DistributedType.DEEPSPEED, "zero2": DistributedType.DEEPSPEED,
                 "zero3": DistributedType.DEEPSPEED}
EQUIVALENCE = ["full_ga1", "full_ga2", "lora_ga1", "lora_ga2"]


def launch_command(backend: str, out: Path, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """DeepSpeed through `accelerate launch`, DDP and FSDP2 through torchrun.

    ZeRO-2 and ZeRO-3 launch the configs the package ships (`--accelerate_config zero2|zero3`), on 2 CPU processes
    in fp32; ZeRO-1, which the package does not ship, the CPU config of examples/accelerate/cpu/.
    `--main_process_port 0` and `--standalone` let the rendezvous pick a free port itself.
    """
    script = [str(TESTS / "distributed_worker.py"), str(out), backend, *extra]
    if backend.startswith("zero"):
        if backend in SHIPPED:
            config, on_the_cpu = accelerate_config_path(backend), ["--num_processes", "2", "--mixed_precision", "no"]
        else:
            config, on_the_cpu = str(CPU_CONFIGS.relative_to(REPO) / f"deepspeed_{backend}.yaml"), []
        port = ["--main_process_port", "0"] if not launcher else []
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *on_the_cpu, *port,
                *launcher, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]


def worker_environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_results(out: Path, backend: str, names) -> dict[str, list[dict]]:
    return {name: [torch.load(out / f"{name}_{backend}_rank{rank}.pt", weights_only=False) for rank in range(2)]
            for name in names}


class Launches:
    """Each backend's 2-process run, launched on first use and shared by every test of the module."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, dict[str, list[dict]]] = {}
        self.failures: dict[str, str] = {}

    def __call__(self, backend: str) -> dict[str, list[dict]]:
        if backend in self.failures:  # the launch's output is in the first failure; the rest name it
            pytest.fail(f"{backend}: the 2-process launch failed; its output is in {self.failures[backend]}.")
        if backend not in self.results:
            out = self.root / backend
            out.mkdir()
            done = subprocess.run(launch_command(backend, out), cwd=REPO, env=worker_environment(),
                                  capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
            if done.returncode != 0:
                self.failures[backend] = os.environ.get("PYTEST_CURRENT_TEST", "the first test").split(" ")[0]
                pytest.fail(f"{backend}: 2-process run failed (exit {done.returncode}):\n"
                            f"{done.stdout[-3000:]}\n{error_lines(done.stderr)}")
            names = [n for n, s in worker.SCENARIOS.items() if backend in s.backends]
            self.results[backend] = load_results(out, backend, names)
        return self.results[backend]


def error_lines(stderr: str, limit: int = 8000) -> str:
    """The stderr's tail without the deprecation warnings that drown the traceback."""
    noise = ("FutureWarning", "return func(*args, **kwargs)", "UserWarning", "warnings.warn(")
    kept = [line for line in stderr.splitlines() if not any(marker in line for marker in noise)]
    return "\n".join(kept)[-limit:]


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    return Launches(tmp_path_factory.mktemp("launches"))


_REFERENCES: dict[tuple[str, float], dict[str, torch.Tensor]] = {}
_REFERENCE_LOGS: dict[tuple[str, float], list[dict]] = {}


def accumulated_rows(name: str, runs: list[dict]) -> list[dict]:
    """Both ranks' micro-batches, step by step, as one process accumulating over all of them reads them."""
    scenario = worker.SCENARIOS[name]
    rows = []
    for step in range(scenario.steps):
        for micro in range(scenario.accumulation):
            for run in runs:
                batch = run["micro_batches"][step * scenario.accumulation + micro]
                for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
                    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def single_process_params(name: str, runs: list[dict], tmp_path, rho: float = worker.RHO) -> dict[str, torch.Tensor]:
    """One process, accumulating over both ranks' micro-batches of each step (cached per scenario and rho)."""
    scenario = worker.SCENARIOS[name]
    rows = accumulated_rows(name, runs)
    key = (name, rho, str(rows))
    if key not in _REFERENCES:
        trainer = VaccineTrainer(model=worker.scenario_model(name),
                                 args=worker.scenario_arguments(name, tmp_path, 1, rho=rho), train_dataset=rows,
                                 rho=rho)
        trainer.train()
        assert trainer.state.global_step == scenario.steps
        _REFERENCES[key] = trainable_state(trainer.model)
        _REFERENCE_LOGS[key] = trainer.state.log_history
    return _REFERENCES[key]


def logged(history: list[dict], key: str) -> list[float]:
    return [entry[key] for entry in history if key in entry]


def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[n].flatten() for n in sorted(params)])


BACKENDS = list(worker.BACKENDS)


@pytest.mark.parametrize("name", EQUIVALENCE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_single_process(launches, tmp_path, backend, name):
    runs = launches(backend)[name]
    assert runs[0]["distributed_type"] == str(EXPECTED_TYPE[backend]) and runs[0]["backend"] == "gloo"
    assert runs[0]["world_size"] == 2
    # Real sharding where the backend shards parameters (ZeRO-3 and FSDP2 hold half of each on a rank).
    assert runs[0]["sharded"] == pytest.approx(0.5 if backend in ("zero3", "fsdp2") else 1.0, abs=0.02)
    # The ranks trained on different data and ended with the same parameters.
    assert not torch.equal(runs[0]["micro_batches"][0]["input_ids"], runs[1]["micro_batches"][0]["input_ids"])
    for n, value in runs[0]["params"].items():
        assert torch.equal(value, runs[1]["params"][n]), n

    before = flat(trainable_state(worker.scenario_model(name)))
    distributed = flat(runs[0]["params"])
    single = flat(single_process_params(name, runs, tmp_path))
    assert relative_error(distributed, single) < 1e-5
    # Stricter: the updates themselves agree, not only the (much larger) parameters.
    assert relative_error(distributed - before, single - before) < 1e-4
    # ...and the comparison can fail: without the perturbation the update is far off.
    plain = flat(single_process_params(name, runs, tmp_path / "plain", rho=0.0))
    assert relative_error(distributed - before, plain - before) > 1e-3
    # The logged values are the single process's: per-process sums reduced, the token-averaging factor removed.
    reference_log = next(v for k, v in _REFERENCE_LOGS.items() if k[0] == name and k[1] == worker.RHO)
    for key in ("vaccine/clean_loss", "vaccine/grad_norm"):
        assert logged(runs[0]["log_history"], key) == pytest.approx(logged(reference_log, key), rel=1e-4), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_rho_zero_is_the_plain_trainer_under_the_backend(launches, tmp_path, backend):
    runs = launches(backend)
    plain, rho0 = runs["plain_full_ga2"][0]["params"], runs["rho0_full_ga2"][0]["params"]
    for n, value in plain.items():
        assert torch.equal(value, rho0[n]), n
    # The plain Trainer under the backend is the plain single-process update: the harness itself is sound.
    single = flat(single_process_params("plain_full_ga2", runs["plain_full_ga2"], tmp_path, rho=0.0))
    assert relative_error(flat(plain), single) < 1e-5


def gradient_reductions(run: dict, phase: str) -> list[tuple[int, str, int]]:
    return [(step, function, size) for step, seen, function, size in run["reductions"] if seen == phase]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pass_one_reduces_nothing_and_pass_two_reduces_as_the_plain_trainer(launches, backend):
    runs = launches(backend)
    for name, ranks in runs.items():
        if worker.SCENARIOS[name].trainer == "leaky":
            continue
        for run in ranks:
            assert gradient_reductions(run, "pass1") == [], name
            assert [c for c in run["comm_calls"] if c[1] == "pass1"] == [], name
    for rank in range(2):
        vaccine, plain = runs["full_ga2"][rank], runs["plain_full_ga2"][rank]
        assert gradient_reductions(vaccine, "step") == gradient_reductions(plain, "step")
        steps = {step for step, _, _ in gradient_reductions(vaccine, "step")}
        assert steps == set(range(worker.SCENARIOS["full_ga2"].steps))  # every optimizer step reduces


def test_ddp_synchronises_once_per_optimizer_step(launches):
    """Under DDP (gradient accumulation 2) one bucket all-reduce per optimizer step, none in pass 1."""
    for name in ("full_ga2", "lora_ga2", "lora_ga2_reentrant"):
        steps = worker.SCENARIOS[name].steps
        for run in launches("ddp")[name]:
            first_bucket = [step for step, phase, bucket in run["comm_calls"] if bucket == 0]
            assert first_bucket == list(range(steps)), name
            assert {phase for _, phase, _ in run["comm_calls"]} == {"step"}, name


def test_t_vaccine_under_ddp_equals_one_process_and_the_probe_reduces_only_its_norms(launches, tmp_path):
    """Layer sampling under DDP: every rank draws the same layers, the frozen ones stay untouched (DDP finds
    them unused), and the update is one process's accumulating both ranks' micro-batches."""
    name = "tvaccine_lora_ga2"
    runs = launches("ddp")[name]
    assert all(run["find_unused_parameters"] is True for run in runs)
    assert runs[0]["layer_sampling"] == runs[1]["layer_sampling"]
    assert runs[0]["layer_sampling"]["probe_step"] == 2  # probed at steps 0 and 2
    for n, value in runs[0]["params"].items():
        assert torch.equal(value, runs[1]["params"][n]), n
    trainer = VaccineTrainer(model=worker.scenario_model(name), args=worker.scenario_arguments(name, tmp_path, 1),
                             train_dataset=accumulated_rows(name, runs), probe_dataset=worker.PROBE_ROWS)
    trainer.train()
    assert trainer._vaccine_state.layer_sampling == runs[0]["layer_sampling"]
    before = trainable_state(worker.scenario_model(name))
    single = trainable_state(trainer.model)
    assert relative_error(flat(runs[0]["params"]) - flat(before), flat(single) - flat(before)) < 1e-4
    # Two windows of one active layer each: at most two of the three layers' adapters moved.
    moved_layers = {n.split(".layers.")[1].split(".")[0] for n in single if not torch.equal(single[n], before[n])}
    assert 1 <= len(moved_layers) <= 2
    for run in runs:
        assert gradient_reductions(run, "pass1") == [] and [c for c in run["comm_calls"] if c[1] != "step"] == []
        probe = gradient_reductions(run, "probe")
        assert [(step, size) for step, _, size in probe] == [(0, 3), (2, 3)]  # the 3 layer norms, nothing else


def test_leaky_pass_one_is_counted(launches):
    """The counters see a pass 1 that communicates (the official code's full backward)."""
    for run in launches("ddp")["leaky_pass_one"]:
        pass_one = [c for c in run["comm_calls"] if c[1] == "pass1" and c[2] == 0]
        assert len(pass_one) == len(run["micro_batches"])
        assert gradient_reductions(run, "pass1")  # the Python-level counter sees it too


def test_reentrant_checkpointing_adjusts_ddp(launches):
    """The fallback path ran under DDP, with find_unused_parameters switched off at start-up."""
    runs = launches("ddp")
    before = flat(trainable_state(worker.scenario_model("lora_ga2_reentrant")))
    for run in runs["lora_ga2_reentrant"]:
        assert run["reentrant_checkpointing"] is True
        assert run["find_unused_parameters"] is False
    for run in runs["lora_ga2"]:  # the Trainer's choice for PEFT models, left alone without checkpointing
        assert run["reentrant_checkpointing"] is False
        assert run["find_unused_parameters"] is True
    # Same micro-batches and update as without checkpointing.
    reentrant, plain = flat(runs["lora_ga2_reentrant"][0]["params"]), flat(runs["lora_ga2"][0]["params"])
    assert relative_error(reentrant - before, plain - before) < 1e-4


def test_sft_trainer_with_peft_config_under_zero3_matches_ddp(launches):
    ddp, zero3 = launches("ddp")["sft_lora"], launches("zero3")["sft_lora"]
    assert zero3[0]["sharded"] == pytest.approx(0.5, abs=0.02)
    assert [b["input_ids"].tolist() for b in ddp[0]["micro_batches"]] == \
        [b["input_ids"].tolist() for b in zero3[0]["micro_batches"]]
    assert sorted(ddp[0]["params"]) == sorted(zero3[0]["params"]) and all("lora_" in n for n in ddp[0]["params"])
    assert relative_error(flat(zero3[0]["params"]), flat(ddp[0]["params"])) < 1e-5
    model, _ = worker.sft_base_model()
    import peft

    before = flat(trainable_state(peft.get_peft_model(model, worker.sft_lora_config())))
    assert relative_error(flat(zero3[0]["params"]) - before, flat(ddp[0]["params"]) - before) < 1e-4
    assert [h["vaccine/clean_loss"] for h in zero3[0]["log_history"] if "loss" in h] == pytest.approx(
        [h["vaccine/clean_loss"] for h in ddp[0]["log_history"] if "loss" in h], rel=1e-5)


STAGE2_LOADING = {"ddp": {"zero3_init": False, "rank0_only": False},
                  "fsdp2": {"zero3_init": False, "rank0_only": True},  # cpu_ram_efficient_loading, as shipped
                  "zero3": {"zero3_init": True, "rank0_only": False}}  # the base loads partitioned


@pytest.mark.parametrize("backend", list(STAGE2_LOADING))
def test_stage2_from_a_model_path_and_an_adapter_path_matches_one_process(launches, tmp_path, backend):
    """`finetune` under a backend: the alignment adapter merged where the weights are (partitioned under ZeRO-3,
    only on rank 0 under FSDP2's efficient loading), the new adapter and the drift as in one process; the drift's
    batches split over the ranks and reduced."""
    from vaccine_trainer import AlignedSFTTrainer
    from vaccine_trainer.callbacks import DRIFT_FRACTION_KEY, DRIFT_KEY, LOSS_KEY, MEDIAN_TOKEN_DRIFT_KEY

    runs = launches(backend)["stage2"]
    base, adapter = worker.stage2_inputs(launches.root / backend)
    rows = accumulated_rows("stage2", runs)
    single = AlignedSFTTrainer(model=base, alignment_adapter=adapter,
                               args=worker.scenario_arguments("stage2", tmp_path, 1),
                               train_dataset=worker.token_dataset(rows),
                               alignment_dataset=worker.token_dataset(worker.ALIGNMENT_ROWS),
                               processing_class=worker.tiny_tokenizer())
    before = flat(trainable_state(single.model))
    single.train()
    expected = flat(trainable_state(single.model))
    assert [run["drift_batches"] for run in runs] == [([0, 4], 2), ([2], 2)]  # rank 1 joins the 2nd round idle
    for run in runs:
        assert run["loading"] == STAGE2_LOADING[backend]
        assert all("lora_" in name for name in run["params"])
        assert relative_error(flat(run["params"]) - before, expected - before) < 1e-5
        for key in (DRIFT_KEY, DRIFT_FRACTION_KEY, MEDIAN_TOKEN_DRIFT_KEY, LOSS_KEY):
            values, reference = logged(run["log_history"], key), logged(single.state.log_history, key)
            assert len(values) == 3 and values == pytest.approx(reference, rel=1e-5)  # steps 0, 1 and 2
    assert logged(runs[0]["log_history"], DRIFT_KEY)[-1] > 0


def saved_logits(name: str, saved: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a model loaded back with plain `from_pretrained` / `PeftModel.from_pretrained`."""
    import peft
    from transformers import AutoModelForCausalLM

    kind = worker.SCENARIOS[name].kind
    if kind == "full":
        model = AutoModelForCausalLM.from_pretrained(saved)
    else:
        base = worker.sft_base_model()[0] if kind == "sft" else tiny_model("llama", seed=0)
        model = peft.PeftModel.from_pretrained(base, saved)
    assert not any(p.device.type == "meta" for p in model.parameters())
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("backend, name", [("zero3", "full_ga1"), ("zero3", "lora_ga1"), ("zero3", "sft_lora"),
                                           ("fsdp2", "full_ga1"), ("fsdp2", "lora_ga1"), ("zero2", "full_ga1")])
def test_saved_model_loads_with_from_pretrained(launches, backend, name):
    ids = launches("ddp")[name][0]["micro_batches"][0]["input_ids"]
    reference = saved_logits(name, launches("ddp")[name][0]["saved"], ids)
    loaded = saved_logits(name, launches(backend)[name][0]["saved"], ids)
    assert relative_error(loaded, reference) < 1e-5
    untrained = worker.scenario_model(name)
    untrained = untrained[0] if isinstance(untrained, tuple) else untrained
    with torch.no_grad():
        assert relative_error(untrained.eval()(input_ids=ids).logits, reference) > 1e-4  # training changed them


def test_resume_from_zero3_checkpoint_equals_the_uninterrupted_run(launches):
    for run in launches("zero3")["resume_full"]:
        assert run["resumed_step"] == run["global_step"] == worker.SCENARIOS["resume_full"].steps
        assert relative_error(flat(run["resumed_params"]), flat(run["params"])) < 1e-6
    before = flat(trainable_state(worker.scenario_model("resume_full")))
    assert relative_error(flat(run["params"]), before) > 1e-4


def test_two_node_launch_matches_one_launcher(launches, tmp_path):
    """`accelerate launch --num_machines 2` (one process per "node", rendezvous on localhost) trains to the
    parameters of one launcher with two processes; the README's multi-node line, on one machine."""
    one_launcher = launches("zero2")["full_ga1"]
    for attempt, port in enumerate(MULTI_NODE_PORTS):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        launchers = [
            subprocess.Popen(
                launch_command("zero2", out, "full_ga1", launcher=(
                    "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port))),
                cwd=REPO, env=worker_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(2)
        ]
        outputs = [launcher.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for launcher in launchers]
        if all(launcher.returncode == 0 for launcher in launchers):
            break
        if not any("utilizing it" in text or "address already in use" in text.lower() for text in outputs):
            pytest.fail("two-node launch failed:\n" + "\n".join(text[-4000:] for text in outputs))
    else:
        pytest.fail(f"ports {MULTI_NODE_PORTS} were all taken")
    two_nodes = load_results(out, "zero2", ["full_ga1"])["full_ga1"]
    for rank in range(2):
        for n, value in one_launcher[0]["params"].items():
            assert torch.equal(two_nodes[rank]["params"][n], value), n


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
     ({"world_size": 8}, "DDP (8 processes, nccl)"),
     ({}, "single process")],
)
def test_backend_is_recognised(backend, expected):
    trainer = fake_trainer(**backend)
    assert describe_backend(trainer) == expected
    check_distributed_support(trainer)  # non-reentrant (transformers' default) runs everywhere


@pytest.mark.parametrize("backend", [{"deepspeed_stage": 1}, {"deepspeed_stage": 2}, {"deepspeed_stage": 3},
                                     {"fsdp_version": 2}])
def test_reentrant_fallback_refused_where_gradients_leave_p_grad(backend):
    with pytest.raises(ValueError, match="reentrant activation checkpointing under (DeepSpeed|FSDP)"):
        check_distributed_support(fake_trainer(world_size=8, reentrant=True, **backend))
    # Non-reentrant checkpointing, one pass (gaussian) and rho=0 are fine on the same backend.
    check_distributed_support(fake_trainer(world_size=8, reentrant=False, **backend))
    check_distributed_support(fake_trainer(world_size=8, reentrant=True, perturbation="gaussian", **backend))
    check_distributed_support(fake_trainer(world_size=8, reentrant=True, rho=0.0, **backend))


def test_fsdp1_is_refused_with_the_fsdp2_fix():
    trainer = fake_trainer(fsdp_version=1, world_size=8)
    assert describe_backend(trainer) == "FSDP1"
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_distributed_support(trainer)
    check_distributed_support(fake_trainer(fsdp_version=1, world_size=8, rho=0.0))  # the plain step is the Trainer's


def test_trl_forced_reentrant_under_zero3_gets_a_hint():
    with pytest.raises(ValueError, match="TRL forces `use_reentrant=True`"):
        check_distributed_support(fake_trainer(deepspeed_stage=3, world_size=8, reentrant=True))


def test_reentrant_under_ddp_switches_find_unused_off_or_refuses_an_explicit_true():
    trainer = fake_trainer(world_size=8, reentrant=True, find_unused=True)
    check_distributed_support(trainer)
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    with pytest.raises(ValueError, match="ddp_find_unused_parameters=False"):
        check_distributed_support(
            fake_trainer(world_size=8, reentrant=True, find_unused=True, explicit_find_unused=True))
    untouched = fake_trainer(world_size=8, reentrant=False, find_unused=True)
    check_distributed_support(untouched)
    assert untouched.accelerator.ddp_handler.find_unused_parameters is True


def test_model_level_reentrant_checkpointing_is_seen():
    trainer = fake_trainer(deepspeed_stage=2, world_size=8)
    trainer.model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="reentrant"):
        check_distributed_support(trainer)


def test_context_parallel_refused():
    """(DataParallel's refusal is tested through the real trainer in test_trainer.py.)"""
    trainer = fake_trainer(world_size=8)
    trainer.get_cp_size = lambda: 2
    with pytest.raises(ValueError, match="context parallelism"):
        check_distributed_support(trainer)


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
    [("multi_gpu", "DDP (8 processes, nccl)"), ("fsdp2", "FSDP2"),
     ("zero2", "DeepSpeed ZeRO-2"), ("zero3", "DeepSpeed ZeRO-3")],
)
def test_shipped_configs_select_the_backend(monkeypatch, config, expected):
    """Each config shipped in the package makes accelerate's plugins (read from the launch environment) pick its
    backend."""
    from vaccine_trainer.launch import accelerate_config_path

    env = launch_environment(accelerate_config_path(config))
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


def deepspeed_fp16_optimizer(kind: str, scale: float):
    """One of DeepSpeed's own fp16 optimizer classes, holding a real loss scaler at `scale`.

    Their constructors need a GPU (DeepSpeed's fp16 runs only there), so the instance is made without
    `__init__` and given the loss-scale state its constructor would build; the `loss_scale` property that
    pass 1 reads is DeepSpeed's own code."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, LossScaleConfig
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    classes = {"zero1/2": DeepSpeedZeroOptimizer, "zero3": DeepSpeedZeroOptimizer_Stage3,
               "fused": FP16_Optimizer, "unfused": FP16_UnfusedOptimizer}
    optimizer = classes[kind].__new__(classes[kind])
    optimizer.custom_loss_scaler = False
    if kind.startswith("zero"):
        optimizer.loss_scaler = CreateLossScaler(dtype=torch.float16, static_loss_scale=scale, dynamic_scaling=False,
                                                 dynamic_loss_args=None)
    else:
        optimizer.loss_scale_config = LossScaleConfig(low_precision_dtype=torch.float16, dynamic_loss_scale=False,
                                                      static_loss_scale=scale, dynamic_loss_args=None)
    return optimizer


@pytest.mark.parametrize("kind", ["zero1/2", "zero3", "fused", "unfused"])
def test_pass_one_uses_deepspeeds_fp16_loss_scale(tmp_path, kind):
    """fp16 hidden-state gradients underflow like weight gradients: pass 1 scales by DeepSpeed's own scale.

    The non-ZeRO optimizers keep it in `loss_scale_config`, not in a `loss_scaler`: an earlier read gave 1.0
    for them silently."""
    from testing_utils import token_rows, training_args

    trainer = VaccineTrainer(model=tiny_lora_model("llama"), args=worker.VaccineTrainingArguments(
        **training_args(tmp_path), rho=2.0), train_dataset=token_rows(4))
    assert backend.loss_scale(trainer) is None  # no loss scaling in fp32
    trainer.is_deepspeed_enabled = True
    optimizer = deepspeed_fp16_optimizer(kind, 1024.0)
    assert optimizer.loss_scale == 1024.0
    trainer.model_wrapped = SimpleNamespace(fp16_enabled=lambda: True, optimizer=optimizer)
    assert backend.loss_scale(trainer) == 1024.0
    trainer.model_wrapped = SimpleNamespace(fp16_enabled=lambda: False, optimizer=optimizer)  # bf16/fp32
    assert backend.loss_scale(trainer) is None
    trainer.model_wrapped = SimpleNamespace(fp16_enabled=lambda: True, optimizer=SimpleNamespace())
    with pytest.raises(RuntimeError, match="cannot read the fp16 loss scale"):
        backend.loss_scale(trainer)


def test_pass_one_runs_under_deepspeeds_torch_autocast(tmp_path):
    """DeepSpeed's engine enters its `torch_autocast` in forward; pass 1 goes through `engine.module` and must enter
    it too, or it runs in fp32 while pass 2 runs in bf16 (one process: the context, not communication, is tested)."""
    import socket

    with socket.socket() as probe:  # a free port for this one process's rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, str(TESTS / "deepspeed_autocast_worker.py"), "1", str(tmp_path), str(port)],
                          cwd=REPO, env=worker_environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-5000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [["capture", "torch.bfloat16"],
                                                                ["perturb", "torch.bfloat16"]]


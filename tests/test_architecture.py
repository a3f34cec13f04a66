"""The library apart from its experiment harness: what `pip install vaccine-trainer` gives imports no harness module
and none of the harness extra's packages (matplotlib, scikit-learn, scipy), so it runs without them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from testing_utils import REPO_ROOT

from vaccine_trainer import cli

PACKAGE = REPO_ROOT / "src" / "vaccine_trainer"
# The harness: judges, scoring, intervals, reports and plots, the offline model, the experiment commands.
HARNESS = (
    "vaccine_trainer.evaluation", "vaccine_trainer.offline", "vaccine_trainer.commands.evaluate",
    "vaccine_trainer.commands.judge_check", "vaccine_trainer.commands.judge_names",
    "vaccine_trainer.commands.pipeline", "vaccine_trainer.commands.grid", "vaccine_trainer.commands.sweep",
    "vaccine_trainer.commands.sweep_pairs", "vaccine_trainer.commands.sweep_worker",
    "vaccine_trainer.commands.parallel_jobs", "vaccine_trainer.commands.verdict_files",
)
HARNESS_PACKAGES = tuple(cli.HARNESS_PACKAGES)  # import names: matplotlib, sklearn, scipy


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def imported_names(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import evaluation`
    return names


def harness_imports(path: Path) -> list[str]:
    """The harness modules and harness packages a library file imports."""
    return sorted(name for name in imported_names(path) if within(name, HARNESS + HARNESS_PACKAGES))


def library_files() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if not within(module_name(path), HARNESS)]


def test_the_library_imports_nothing_of_the_harness():
    offending = {module_name(path): found for path in library_files() if (found := harness_imports(path))}
    assert not offending, f"library modules that import the harness: {offending}"
    assert len(library_files()) > 20  # the trainer, TRL stages, callbacks, commands align/finetune/sft/env, ...


def test_the_check_sees_a_library_module_that_imports_the_harness(tmp_path, monkeypatch):
    """Negative control: the check above flags a harness import, relative or absolute, lazy or at the top."""
    assert harness_imports(PACKAGE / "commands" / "align.py") == []
    package = tmp_path / "vaccine_trainer"
    (package / "commands").mkdir(parents=True)
    file = package / "commands" / "align.py"
    file.write_text("from ..evaluation.report import plot\n\n"
                    "def f():\n    import scipy.stats\n    from . import grid\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    assert harness_imports(file) == ["scipy.stats", "vaccine_trainer.commands.grid",
                                     "vaccine_trainer.evaluation.report", "vaccine_trainer.evaluation.report.plot"]


# As if they were not installed: `import scipy` raises ModuleNotFoundError, importlib.util.find_spec says None.
BLOCK_HARNESS_PACKAGES = (f"import sys\nsys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n"
                          f"sys.modules.update(dict.fromkeys({list(HARNESS_PACKAGES)!r}))\n")


def run_without_harness_packages(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "library_alone.py"
    script.write_text(BLOCK_HARNESS_PACKAGES + code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT / "tests")


def test_a_vaccine_step_and_the_library_commands_run_without_the_harness_extra(tmp_path):
    """What `pip install vaccine-trainer` gives without `[harness]`: the public names, a VaccineTrainer step, the
    library commands' --help; a harness command says which extra it needs instead of a traceback."""
    result = run_without_harness_packages(f"""
import contextlib, io
import peft, torch, transformers
import vaccine_trainer
for name in vaccine_trainer.__all__:
    getattr(vaccine_trainer, name)
torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, use_cache=False)
model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
rows = [{{"input_ids": [5, 9, 13, 7], "attention_mask": [1] * 4, "labels": [5, 9, 13, 7]}}] * 2
trainer = vaccine_trainer.VaccineTrainer(
    model=model, train_dataset=rows, rho=2.0,
    args=transformers.TrainingArguments(output_dir={str(tmp_path / "out")!r}, max_steps=1, report_to=[],
                                        logging_steps=1, per_device_train_batch_size=2, save_strategy="no",
                                        use_cpu=True))
trainer.train()
assert trainer.state.log_history[0]["vaccine/perturbation_norm"] > 0
from vaccine_trainer.cli import main
for command in ("align", "finetune", "sft"):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        main([command, "--help"])
assert main(["evaluate", "--adapter", "x"]) == 1
print("harness modules loaded:", sorted(m for m in sys.modules if m.startswith("vaccine_trainer.evaluation")))
""", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harness modules loaded: []" in result.stdout
    assert 'pip install "vaccine-trainer[harness]"' in result.stderr
    assert "matplotlib, scikit-learn, scipy" in result.stderr


def test_the_blocker_does_hide_the_harness_packages(tmp_path):
    """Negative control for the test above: under the same blocker, what needs scipy fails."""
    result = run_without_harness_packages(
        "from vaccine_trainer.evaluation.intervals import exact_mcnemar\nexact_mcnemar(3, 1)\n", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'scipy.stats'" in result.stderr

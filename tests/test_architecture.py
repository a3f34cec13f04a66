"""The library apart from its experiment harness: `vaccine_trainer` (what the trainers and align / finetune / sft / env
need) imports nothing of `vaccine_harness` nor of the harness extra's packages (matplotlib, scikit-learn, scipy), so it
runs without them; the harness, `experiments/` and `bench/` use the library's public names only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from testing_utils import REPO_ROOT

from vaccine_harness.commands import HARNESS_PACKAGES as HARNESS_EXTRA

SOURCES = REPO_ROOT / "src"
LIBRARY = SOURCES / "vaccine_trainer"
HARNESS = SOURCES / "vaccine_harness"
HARNESS_PACKAGES = tuple(HARNESS_EXTRA)  # import names: matplotlib, sklearn, scipy


def module_name(path: Path, root: Path = SOURCES) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def imported_names(path: Path, root: Path = SOURCES) -> set[str]:
    """Every module or name a file imports, at the top or inside a function, relative imports resolved."""
    package = module_name(path, root).split(".")
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


def harness_imports(path: Path, root: Path = SOURCES) -> list[str]:
    """The harness modules and harness packages a library file imports."""
    return sorted(name for name in imported_names(path, root)
                  if within(name, ("vaccine_harness",) + HARNESS_PACKAGES))


def private_library_imports(path: Path, root: Path = SOURCES) -> list[str]:
    """The library's private modules and names (a part that starts with `_`, dunders aside) a file imports."""
    return sorted(name for name in imported_names(path, root) if within(name, ("vaccine_trainer",))
                  and any(part.startswith("_") and not part.endswith("__") for part in name.split(".")))


def private_members(files: list[Path]) -> set[str]:
    """The library's private methods and the private attributes its classes set (`self._name = ...`)."""
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return {name for name in names if name.startswith("_") and not name.endswith("__")}


def private_member_uses(path: Path, private: set[str]) -> list[str]:
    """`something._name` in a file, for a private member name of the library (a file's own `self._x` aside)."""
    return sorted(f"{node.lineno}: .{node.attr}" for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Attribute) and node.attr in private
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")))


def test_the_library_imports_nothing_of_the_harness():
    files = sorted(LIBRARY.rglob("*.py"))
    offending = {module_name(path): found for path in files if (found := harness_imports(path))}
    assert not offending, f"library modules that import the harness: {offending}"
    assert len(files) > 20  # the trainer, TRL stages, callbacks, commands align/finetune/sft/env, ...


def test_the_harness_experiments_and_benchmarks_use_only_public_library_names():
    files = {module_name(path): path for path in sorted(HARNESS.rglob("*.py"))}
    files |= {str(path.relative_to(REPO_ROOT)): path for folder in ("experiments", "bench")
              for path in sorted((REPO_ROOT / folder).rglob("*.py"))}
    offending = {name: found for name, path in files.items()
                 if (found := private_library_imports(path, path.parent if name.endswith(".py") else SOURCES))}
    assert not offending, f"private library names imported from outside the library: {offending}"
    assert len(files) > 40
    private = private_members(sorted(LIBRARY.rglob("*.py")))
    offending = {name: found for name, path in files.items() if (found := private_member_uses(path, private))}
    assert not offending, f"private members of library objects used from outside the library: {offending}"


def test_the_checks_see_a_harness_import_and_a_private_name(tmp_path, monkeypatch):
    """Negative control: the checks above flag a harness import (relative, absolute, lazy or at the top) and a
    private library name."""
    assert harness_imports(LIBRARY / "commands" / "align.py") == []
    package = tmp_path / "vaccine_trainer"
    (package / "commands").mkdir(parents=True)
    file = package / "commands" / "align.py"
    file.write_text("from vaccine_harness.evaluation.report import plot\n\n"
                    "def f():\n    import scipy.stats\n    from vaccine_harness.commands import grid\n")
    assert harness_imports(file, tmp_path) == [
        "scipy.stats", "vaccine_harness.commands", "vaccine_harness.commands.grid", "vaccine_harness.evaluation.report",
        "vaccine_harness.evaluation.report.plot"]
    script = tmp_path / "experiment.py"
    script.write_text("from vaccine_trainer.callbacks import _median\nimport vaccine_trainer.__main__\n"
                      "from vaccine_trainer.launch import launch\n")
    assert private_library_imports(script, tmp_path) == ["vaccine_trainer.callbacks._median"]
    private = private_members([LIBRARY / "trainer.py", LIBRARY / "callbacks.py"])
    assert {"_vaccine_hooks", "_vaccine_pass_one", "_passes"} <= private and "vaccine_hooks" not in private
    script.write_text("def f(trainer, callback):\n    self = trainer\n    return trainer._vaccine_hooks, "
                      "callback._passes, self._vaccine_state, trainer._get_num_items_in_batch\n")
    assert private_member_uses(script, private) == ["3: ._passes", "3: ._vaccine_hooks"]


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
# The CLI reads the harness's command registry (an entry point), and loads none of its modules to run the library's.
print("harness modules loaded:", sorted(m for m in sys.modules
                                        if m.startswith("vaccine_harness.") and m != "vaccine_harness.commands"))
assert main(["evaluate", "--adapter", "x"]) == 1
""", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harness modules loaded: []" in result.stdout
    assert 'pip install "vaccine-trainer[harness]"' in result.stderr
    assert "matplotlib, scikit-learn, scipy" in result.stderr


def test_the_blocker_does_hide_the_harness_packages(tmp_path):
    """Negative control for the test above: under the same blocker, what needs scipy fails."""
    result = run_without_harness_packages(
        "from vaccine_harness.evaluation.intervals import exact_mcnemar\nexact_mcnemar(3, 1)\n", tmp_path)
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'scipy.stats'" in result.stderr


def test_docs_layout_lists_every_module_of_both_packages():
    """docs/layout.md is the map a newcomer reads first: a module added, moved or removed must show there."""
    text = (REPO_ROOT / "docs" / "layout.md").read_text()
    listed = {(section.split("`")[1], line.split("`")[1]) for section in text.split("\n## ")[1:]
              for line in section.splitlines() if line.startswith("- `")}
    present = {(package.name, str(path.relative_to(package))) for package in (LIBRARY, HARNESS)
               for path in package.rglob("*.py")}
    assert listed == present, {"not listed": sorted(present - listed), "listed, not present": sorted(listed - present)}

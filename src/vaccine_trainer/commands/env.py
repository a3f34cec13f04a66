"""`vaccine-trainer env`: what a bug report needs (versions, accelerator, accelerate's default config), as `trl env`.

    vaccine-trainer env
"""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("vaccine-trainer", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed",
            "bitsandbytes", "huggingface_hub")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def accelerator() -> str:
    """The accelerator torch sees, in words: GPUs with their names, or the CPU."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} CUDA device(s): {', '.join(names)} (CUDA {torch.version.cuda})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple MPS"
    return "none (CPU)"


def accelerate_config() -> str:
    """accelerate's default config file, as `accelerate launch` would read it without --config_file."""
    from accelerate.commands.config import default_config_file

    try:
        with open(default_config_file, encoding="utf-8") as handle:
            return f"{default_config_file}:\n" + "".join(f"    {line}" for line in handle)
    except OSError:
        return f"not found (no {default_config_file}; `accelerate config` writes one)"


def report() -> str:
    lines = [f"- Platform: {platform.platform()}", f"- Python: {platform.python_version()}"]
    lines += [f"- {name}: {version}" for name, version in package_versions().items()]
    lines += [f"- Accelerator: {accelerator()}", f"- accelerate default config: {accelerate_config()}"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    print("Copy-paste the following information when you open an issue:\n")
    print(report())
    return 0

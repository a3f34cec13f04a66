"""Issue 39's pilot rule, applied to the candidates' p = 0 fine-tunes (docs/durability.md, written before the runs).

The largest candidate rho whose p = 0 fine-tune has (a) held-out alignment loss at most 0.10 above SFT's p = 0
reference and (b) SST2 accuracy at most 5 points below it. SFT's reference is read from an `sft` arm under the
same root when there is one, else taken from the replication's seed-42 figures (1.3627686 and 73.0%, reproduced
to 7 digits on two machines). No evaluation prompt is read.

    python experiments/pilot_rule.py outputs/relative [--seed 42] [--json docs/durability/relative_pilot/rule.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LOSS_MARGIN, ACCURACY_GUARD = 0.10, 5.0
REPLICATION_SFT = {"held_out_alignment_loss": 1.3627686, "accuracy": 73.0, "source": "docs/replication (seed 42)"}


def reference_figures(folder: Path) -> dict | None:
    path = folder / "evaluate" / "evaluation.json"
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text())
    return {"held_out_alignment_loss": evaluation["likelihood"]["held_out_alignment_loss"],
            "accuracy": evaluation["accuracy"]["accuracy"], "harmful_score": evaluation["harmful_score"]["score"],
            "source": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cell = args.root / f"seed{args.seed}" / "p0"
    sft = reference_figures(cell / "sft") or REPLICATION_SFT
    candidates = {}
    for folder in sorted(cell.glob("vaccine-relative-rho*")):
        figures = reference_figures(folder)
        if figures is None:
            continue
        rho = float(folder.name.split("-rho")[-1])
        figures["loss_above_sft"] = figures["held_out_alignment_loss"] - sft["held_out_alignment_loss"]
        figures["accuracy_below_sft"] = sft["accuracy"] - figures["accuracy"]
        figures["passes"] = figures["loss_above_sft"] <= LOSS_MARGIN and figures["accuracy_below_sft"] <= ACCURACY_GUARD
        candidates[rho] = figures
    passing = [rho for rho, figures in candidates.items() if figures["passes"]]
    result = {"sft_reference": sft, "loss_margin": LOSS_MARGIN, "accuracy_guard_points": ACCURACY_GUARD,
              "candidates": {f"{rho:g}": figures for rho, figures in sorted(candidates.items())},
              "chosen_rho": max(passing) if passing else None}
    for rho, figures in sorted(candidates.items()):
        print(f"rho {rho:g}: held-out alignment loss {figures['held_out_alignment_loss']:.4f} "
              f"({figures['loss_above_sft']:+.4f} vs SFT), SST2 {figures['accuracy']:.1f}% "
              f"({-figures['accuracy_below_sft']:+.1f} points): {'passes' if figures['passes'] else 'fails'}")
    print(f"chosen: {result['chosen_rho']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m vaccine_trainer <command>`: the `vaccine-trainer` console script (for `accelerate launch -m`)."""

from vaccine_trainer.cli import main

raise SystemExit(main())

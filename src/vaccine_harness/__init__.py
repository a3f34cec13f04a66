"""The experiment harness of vaccine-trainer: judges, scoring, intervals, reports and plots, the offline model, and
the `evaluate`, `judge-check`, `pipeline`, `grid` and `sweep` commands.

It sits on top of the library (`vaccine_trainer`) and uses only its public names; the library never imports it.
Its commands join `vaccine-trainer`'s through the `vaccine_trainer.commands` entry-point group, and need the
`harness` extra (matplotlib, scikit-learn, scipy): ``pip install "vaccine-trainer[harness]"``.
"""

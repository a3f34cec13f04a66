"""One table and one interval format for every report, summary and model card."""

from __future__ import annotations

from vaccine_trainer.markdown import interval_text, markdown_table, with_interval


def test_a_figure_with_its_interval_alone_or_missing():
    assert with_interval(31.0, (25.0, 37.66)) == "31.0 [25.0, 37.7]"
    assert with_interval(-2.0, [-8.0, 3.5], signed=True) == "-2.0 [-8.0, +3.5]"
    assert with_interval(0.5, (0.25, 0.75), spec=".3f") == "0.500 [0.250, 0.750]"
    assert with_interval(48.04) == "48.0"
    assert with_interval(None, (1.0, 2.0)) == "–"
    assert interval_text((10.25, 20.0)) == "[10.2, 20.0]" and interval_text(None) == "–"


def test_columns_are_right_aligned_from_numeric_from_except_text_columns():
    table = markdown_table(["Seed", "p", "Method", "Score"], [["42", "0.1", "sft", "31.0 [25.0, 37.7]"]],
                           numeric_from=0, text_columns=(2,))
    assert table == ["| Seed | p | Method | Score |", "|---:|---:|---|---:|", "| 42 | 0.1 | sft | 31.0 [25.0, 37.7] |"]
    assert markdown_table(["a", "b"], [], numeric_from=2)[1] == "|---|---|"
    assert markdown_table(["a", "b"], [])[1] == "|---|---:|"

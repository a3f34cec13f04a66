"""Configs written with transformers 5.2x's `activation_checkpointing` run on a 5.x that knows only
`gradient_checkpointing`, and the reverse; the installed version's own names pass through untouched."""

from __future__ import annotations

import pytest

from vaccine_harness.commands import pipeline
from vaccine_trainer.commands.spellings import argv_for_installed, settings_for_installed, training_flags

OLD = frozenset({"gradient_checkpointing", "gradient_checkpointing_kwargs", "learning_rate"})  # transformers < 5.2x
NEW = OLD | {"activation_checkpointing", "activation_checkpointing_kwargs"}  # both spellings, old ones deprecated


def test_settings_take_the_names_the_installed_version_knows():
    settings = {"activation_checkpointing": False, "activation_checkpointing_kwargs": {"use_reentrant": False},
                "learning_rate": 1e-3}
    assert settings_for_installed(settings, OLD) == {
        "gradient_checkpointing": False, "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "learning_rate": 1e-3}
    assert settings_for_installed(settings, NEW) == settings
    assert settings_for_installed({"gradient_checkpointing": True}, NEW) == {"gradient_checkpointing": True}
    assert settings_for_installed({"gradient_checkpointing": True}, OLD - {"gradient_checkpointing"} | {
        "activation_checkpointing"}) == {"activation_checkpointing": True}


def test_command_line_flags_take_the_names_the_installed_version_knows():
    argv = ["--activation_checkpointing", "false", '--activation_checkpointing_kwargs={"use_reentrant": false}',
            "--learning_rate", "1e-3", "--output_dir", "activation_checkpointing"]
    assert argv_for_installed(argv, OLD) == [
        "--gradient_checkpointing", "false", '--gradient_checkpointing_kwargs={"use_reentrant": false}',
        "--learning_rate", "1e-3", "--output_dir", "activation_checkpointing"]  # values are never renamed
    assert argv_for_installed(argv, NEW) == argv


def test_the_installed_transformers_keeps_its_own_names():
    known = training_flags()
    assert {"gradient_checkpointing", "learning_rate"} <= known
    argv = ["--activation_checkpointing", "false", "--gradient_checkpointing_kwargs", "{}"]
    expected = argv if "activation_checkpointing" in known else ["--gradient_checkpointing", "false",
                                                                 "--gradient_checkpointing_kwargs", "{}"]
    assert argv_for_installed(argv) == expected


@pytest.mark.parametrize("flag", ["activation_checkpointing", "gradient_checkpointing"])
def test_a_phase_built_for_an_older_transformers_keeps_the_setting(monkeypatch, flag):
    """The real argument parser, with the pipeline seeing only the old names (as on transformers 5.17)."""
    real = pipeline._field_types

    def old_field_types(command):
        return {name: kind for name, kind in real(command).items() if not name.startswith("activation_")}

    monkeypatch.setattr(pipeline, "_field_types", old_field_types)
    settings = {"model_name_or_path": "m", "output_dir": "o", flag: True}
    args = next(a for a in pipeline.phase_arguments("finetune", settings) if hasattr(a, "learning_rate"))
    assert args.gradient_checkpointing is True
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['gradient_checkpointng'\]"):
        pipeline.phase_arguments("finetune", {**settings, "gradient_checkpointng": True})


def test_checkpointing_is_read_under_either_spelling_new_first():
    from types import SimpleNamespace

    from vaccine_trainer.checkpointing import checkpoint_function, setting

    assert setting(SimpleNamespace(gradient_checkpointing=True)) is True  # transformers before the rename
    assert setting(SimpleNamespace(activation_checkpointing=False, gradient_checkpointing=True)) is False
    assert setting(SimpleNamespace(activation_checkpointing=None, gradient_checkpointing_kwargs={"a": 1}),
                   "_kwargs") == {"a": 1}
    assert setting(SimpleNamespace(), default=False) is False
    assert checkpoint_function(SimpleNamespace(_gradient_checkpointing_func=len)) is len
    assert checkpoint_function(SimpleNamespace(_activation_checkpointing_func=max, _gradient_checkpointing_func=len)) \
        is max
    assert checkpoint_function(SimpleNamespace()) is None

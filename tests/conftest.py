"""Fixtures and the test profile; the shared helpers are in testing_utils.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from testing_utils import SHARED_DATA, make_labelled_dir, make_workspace

# Every run draws the same examples (a failure reproduces, and CI cannot fail at random, whether or not it sets CI);
# HYPOTHESIS_PROFILE=dev draws fresh ones, for a developer hunting new counterexamples.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs on as many workers as cores (pyproject's addopts): one intra-op thread each, or the workers'
    # threads would spin-wait on each other's cores.
    torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared, busy CPU threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A tiny Llama and its tokenizer saved with save_pretrained, plus tiny local data files (one per module)."""
    return make_workspace(tmp_path_factory.mktemp("cli"))


@pytest.fixture
def labelled_dir(tmp_path) -> Path:
    """A tiny stand-in for ../shared/data with every file the learned judge reads."""
    return make_labelled_dir(tmp_path)

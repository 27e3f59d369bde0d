"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The test models are tiny, so thread overhead dominates: on a busy 2-core machine 2 threads ran
    them ~40x slower than 1. Session-wide, so module fixtures (a fitted tokenizer) run at one thread as
    the tests do: trained weights differ in their last bits between thread counts. Tests that start their
    own processes (DDP, the CLI) are not affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

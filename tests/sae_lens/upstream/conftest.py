# Adapted from SAE-Lens (https://github.com/decoderesearch/SAELens), tests/conftest.py
# (the stored revision b2ef9d7e). Copyright (c) 2023 Joseph Bloom. MIT License: see
# tests/sae_lens/upstream/LICENSE-SAELens.
# Copied: the autouse fixtures `set_grad_enabled` and `reproducibility` (every copied test
# starts from the same seeds, whatever ran before it). Left out: the hub model and SAE
# fixtures (unreachable here), the CI disk-space reporting and tmp-path clean-up.
"""Seeds for the copied SAE-Lens tests, as SAE-Lens's own conftest sets them."""

import random

import numpy as np
import pytest
import torch

torch.set_grad_enabled(True)


@pytest.fixture(autouse=True)
def set_grad_enabled():
    # somehow grad is getting disabled before some tests
    torch.set_grad_enabled(True)


@pytest.fixture(autouse=True)
def reproducibility():
    """Apply various mechanisms to try to prevent nondeterminism in test runs."""
    # I have not in general attempted to verify that the below are necessary
    # for reproducibility, only that they are likely to help and unlikely to
    # hurt.
    # https://pytorch.org/docs/stable/notes/randomness.html#reproducibility
    seed = 0x1234_5678_9ABC_DEF0
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    # Python native RNG; docs don't give any limitations on seed range
    random.seed(seed)
    # this is a "legacy" method that operates on a global RandomState
    # sounds like the argument must be in [0, 2**32)
    np.random.seed(seed & 0xFFFF_FFFF)

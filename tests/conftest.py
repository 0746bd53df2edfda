"""Shared pytest fixtures. APPEND only: several engineers add fixtures here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let a test wait on the Hugging Face hub
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# starve each other and a small-op forward pass runs ~10x slower. Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct as a processed fp32 HookedTransformer (loaded once per session).

    Shared: tests must leave it as they found it (attach() restores it on exit)."""
    from mxd_lens.sources import load_default_model

    model = load_default_model()
    model.eval()
    return model


@pytest.fixture(scope="session")
def heldout_tokens(default_model) -> torch.Tensor:
    """Two 32-token rows of the held-out book (Persuasion), each starting with token 0."""
    from mxd_lens.sources import load_default_corpus, token_rows

    return token_rows(default_model.tokenizer, load_default_corpus("heldout")[:2], context=32, max_rows=2)


@pytest.fixture(scope="session")
def heldout_rows(default_model) -> torch.Tensor:
    """Eight 128-token rows of the held-out book (Persuasion), each starting with token 0."""
    from mxd_lens.sources import load_default_corpus, token_rows

    return token_rows(default_model.tokenizer, load_default_corpus("heldout"), context=128, max_rows=8)


@pytest.fixture(scope="session")
def default_hooked_sae_transformer(default_model):
    """The default model as a sae_lens HookedSAETransformer sharing its weights (no copy).

    Shared: tests must remove the SAEs they add (run_with_saes / reset_saes do)."""
    from mxd_lens.saelens import hooked_sae_transformer

    return hooked_sae_transformer(default_model)


# --- CUDA tests (tests/gpu/): marked `cuda`, skipped with the reason on a machine without one --
def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped (reason printed) where there is none")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    reason = (f"no CUDA device: torch {torch.__version__} (built with CUDA {torch.version.cuda}) sees none; "
              "run these on a GPU machine (benchmarks/gpu_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))

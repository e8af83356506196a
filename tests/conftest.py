import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import minillm  # noqa: E402

# under pytest-xdist each worker gets one torch thread, so that two workers use the two cores without contention
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = ["tiny-llama", "tiny-llama-gqa", "tiny-llama-mqa", "tiny-opt", "tiny-bloom", "tiny-gemma3"]


@pytest.fixture
def tiny():
    """Factory: a fresh seeded tiny random model of the given registry name."""

    def make(name: str, seed: int = 0, dtype=torch.float32):
        model, _ = (
            minillm.load_model(name, dtype=dtype)
            if seed == 0
            else (minillm.models.build_random(name, dtype=dtype, seed=seed), None)
        )
        return model

    return make


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded model and tokenizer, loaded once per session (slow tests only)."""
    return minillm.load_model("smollm2-135m")

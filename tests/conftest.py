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


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in a second on part of one bundled novel: with SmolLM2's 49,152-token
    vocabulary the LM head would be most of a tiny model's cost."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minillm.data import read_novel

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([read_novel("persuasion")[:100_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_text_model_dir(tmp_path_factory):
    """A tiny random LLaMA with SmolLM2's head layout (9 query / 3 KV heads) and a tiny BPE tokenizer, saved as a
    local model directory: a profile `model:` that load_model and the profile schema accept, standing in for
    SmolLM2-135M where a test checks the experiment drivers, not the model. Built once per worker (session scope);
    read only (tests write their records elsewhere), so the novels tokenized with its tokenizer stay cached
    (minillm.data keys them by the directory) for every test of the worker."""
    from transformers import AutoModelForCausalLM

    from minillm.models import SHAPES

    tok = tiny_tokenizer()
    config = SHAPES["tiny-llama-gqa3"]()
    config.vocab_size = len(tok)
    config.max_position_embeddings = 2048
    config.bos_token_id = config.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny-text-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)

